"""A training run's folder: its recorded config, metrics log and result, and the checks a resume makes.

    runs/NAME/train_config.json   the run's settings (a resume must match them, but for RESUMABLE_CHANGES)
    runs/NAME/metrics.jsonl       one line per logged step
    runs/NAME/result.json         the summary, written last
    runs/NAME/rank_k/step_N/      checkpoints (llama.train.checkpointing)
"""

from __future__ import annotations

import json
from pathlib import Path

from llama.config.train import TrainConfig
from llama.errors import PipelineError
from llama.fileio import read_json, remove_partials, write_json_atomic
from llama.train import checkpointing

CONFIG_FILE, METRICS_FILE, RESULT_FILE = "train_config.json", "metrics.jsonl", "result.json"
LOCK_FILE = ".train.lock"   # held by the process that trains into the folder (the launcher of msrun workers)
# Settings a resumed run may change: how long it runs and how it checkpoints and logs.
RESUMABLE_CHANGES = {("training", "epochs"), ("training", "max_steps"), ("training", "log_every"),
                     ("checkpoint", "save_steps"), ("checkpoint", "keep_last")}


def prepare_output(config: TrainConfig, output_dir: Path, resume: bool) -> int:
    """Record the config of a new run, or check a resumed one against it; return the step to start from.

    Temporaries of a killed run's unfinished writes are removed first. A folder with a config but no
    checkpoint (a run that failed or was killed before its first one) holds nothing to keep: a new run
    starts over in it.
    """
    saved_path = output_dir / CONFIG_FILE
    world = config.parallel.data_parallel
    for folder in (output_dir, *(checkpointing.rank_dir(output_dir, rank) for rank in range(world))):
        remove_partials(folder)
    if resume:
        if not saved_path.is_file():
            raise PipelineError(f"nothing to resume in {output_dir}: it has no {CONFIG_FILE}")
        changed = _changed_settings(read_json(saved_path, "train config"), config.to_dict())
        if changed:
            raise PipelineError(f"--resume with different settings than the run in {output_dir}: "
                                f"{', '.join(changed)} (start a new output folder instead)")
        return checkpointing.latest_common_step(output_dir, world) or 0
    if any(checkpointing.list_steps(output_dir, rank) for rank in range(world)):
        raise PipelineError(f"{output_dir} already holds a training run; pass --resume to continue it, "
                            "or choose a new output folder")
    write_json_atomic(saved_path, config.to_dict())
    (output_dir / METRICS_FILE).unlink(missing_ok=True)
    return 0


def _changed_settings(saved: dict, current: dict) -> list[str]:
    """Settings of `current` that differ from the run's `saved` ones; a setting newer than the saved run counts
    as its default there (the run trained with what that setting's default does)."""
    defaults = TrainConfig().to_dict()
    return sorted(f"{section}.{key}" for section, values in current.items() if isinstance(values, dict)
                  for key, value in values.items() if (section, key) not in RESUMABLE_CHANGES
                  and saved.get(section, {}).get(key, defaults[section][key]) != value) + \
        sorted(key for key, value in current.items() if not isinstance(value, dict) and saved.get(key) != value)


def append_metrics(path: Path, step: int, metrics: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"step": step, **metrics}) + "\n")
        handle.flush()


def truncate_metrics(path: Path, start_step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: drop their lines from the interrupted run."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= start_step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
