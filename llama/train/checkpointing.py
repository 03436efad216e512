"""Training checkpoints: one folder per rank and step, written atomically, every file checksummed.

    <run>/rank_<k>/step_<NNNNNNNN>/
        weights.ckpt      MindSpore checkpoint: every model weight, or for LoRA/prefix runs only the adapter
        optimizer.ckpt    AdamW moments (`adam_m.<param>`, `adam_v.<param>`), float32
        state.json        step, data position, loss scale, dropout-key seed, last metrics; what the weights are
                          (kind full/lora/prefix, model config, pet settings, base checkpoint path and sha256)
        manifest.json     size and sha256 of the three files above, written last
    <run>/manifest.json   when the run finishes: size and sha256 of its config, metrics and result, so an
                          edited result.json is noticed like any other changed output

Tensors are stored in MindFormers' layout (llama.model.checkpoint_layout), as in every checkpoint written here.

A folder exists only complete (it appears in one rename), and `verify` checks it before anything reads it,
so a run killed at any moment resumes from the newest folder that verifies.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from llama.errors import PipelineError
from llama.fileio import MANIFEST, atomic_dir, read_json, sha256_file, verify_manifest, write_json_atomic, write_manifest

FORMAT = "llama2-pipeline train checkpoint 1"
RUN_FORMAT = "llama2-pipeline train run 1"
WEIGHTS, OPTIMIZER, STATE = "weights.ckpt", "optimizer.ckpt", "state.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")


def rank_dir(run_dir: str | os.PathLike, rank: int) -> Path:
    return Path(run_dir) / f"rank_{rank}"


def step_dir(run_dir: str | os.PathLike, rank: int, step: int) -> Path:
    return rank_dir(run_dir, rank) / f"step_{step:08d}"


def save(run_dir: str | os.PathLike, rank: int, step: int, weights: list, optimizer: list, state: dict,
         keep_last: int) -> Path:
    """Write one checkpoint folder and delete this rank's older ones beyond `keep_last`.

    `weights` and `optimizer` are MindSpore Parameters (saved under their names)."""
    import mindspore as ms
    from llama.model import checkpoint_layout

    final = step_dir(run_dir, rank, step)
    with atomic_dir(final, overwrite=True) as tmp:
        for params, name in ((weights, WEIGHTS), (optimizer, OPTIMIZER)):
            try:
                ms.save_checkpoint([{"name": p.name, "data": checkpoint_layout(p.name, p)} for p in params],
                                   str(tmp / name))
            except OSError as err:  # MindSpore re-raises a full disk without the file's name
                raise OSError(err.errno, err.strerror, str(final / name)) from err
        write_json_atomic(tmp / STATE, {"format": FORMAT, **state})
        write_manifest(tmp, FORMAT)
    for old in list_steps(run_dir, rank)[:-keep_last]:
        shutil.rmtree(step_dir(run_dir, rank, old), ignore_errors=True)
    return final


def list_steps(run_dir: str | os.PathLike, rank: int) -> list[int]:
    """Steps with a checkpoint folder for this rank, oldest first (not yet verified)."""
    folder = rank_dir(run_dir, rank)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)))


def verify(folder: str | os.PathLike) -> dict:
    """Check a checkpoint folder's files against its manifest; return its state.json."""
    folder = Path(folder)
    verify_manifest(folder, FORMAT, "training checkpoint")
    return read_json(folder / STATE, "checkpoint state")


def common_steps(run_dir: str | os.PathLike, world_size: int) -> list[int]:
    """Steps every rank has a checkpoint folder of, oldest first (not yet verified)."""
    steps = set(list_steps(run_dir, 0))
    for rank in range(1, world_size):
        steps &= set(list_steps(run_dir, rank))
    return sorted(steps)


def latest_common_step(run_dir: str | os.PathLike, world_size: int) -> int | None:
    """The newest step every rank has a verified checkpoint of (None: nothing to resume from)."""
    for step in reversed(common_steps(run_dir, world_size)):
        try:
            for rank in range(world_size):
                verify(step_dir(run_dir, rank, step))
        except PipelineError:
            continue
        return step
    return None


def write_run_manifest(run_dir: str | os.PathLike, names: tuple[str, ...]) -> None:
    """The finished run folder's manifest over its own files `names` (its checkpoints have their own)."""
    run_dir = Path(run_dir)
    files = {name: {"size": (run_dir / name).stat().st_size, "sha256": sha256_file(run_dir / name)}
             for name in names if (run_dir / name).is_file()}
    write_json_atomic(run_dir / MANIFEST, {"format": RUN_FORMAT, "files": files})


def verify_run(run_dir: str | os.PathLike) -> dict:
    """Check a finished run folder's files against its manifest."""
    return verify_manifest(run_dir, RUN_FORMAT, "training run")


def load_tensors(path: str | os.PathLike) -> dict:
    """name -> MindSpore Parameter from a verified folder's .ckpt file."""
    import mindspore as ms

    return ms.load_checkpoint(str(path))


def restore(params: list, tensors: dict, what: str) -> None:
    """Set each parameter from the checkpoint's tensor of the same name, refusing partial or misshaped ones."""
    missing = [p.name for p in params if p.name not in tensors]
    if missing:
        raise PipelineError(f"{what} lacks {len(missing)} tensors, e.g. {missing[0]}; it belongs to another run")
    from llama.model import checkpoint_layout

    for param in params:
        value = checkpoint_layout(param.name, tensors[param.name])
        if tuple(value.shape) != tuple(param.shape) or value.dtype != param.dtype:
            raise PipelineError(f"{what}: {param.name} is {value.dtype}{list(value.shape)}, "
                                f"the run expects {param.dtype}{list(param.shape)}")
        param.set_data(value)
