"""Prefect tasks for training and merging, and the MLflow record of a training run."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from llama.config.train import TrainConfig
from llama.errors import PipelineError
from llama.train import checkpointing
from llama.train.merge import merge as merge_checkpoints
from llama.train.run_folder import METRICS_FILE, RESULT_FILE
from llama.train.trainer import train as train_model
from llama.weights.source import verify_folder
from tasks.cache import CachedStage, verified_by
from tasks.runtime import one_model
from tasks.stage import stage_task
from tasks.tracking import Run

STEP_METRICS = ("loss", "lr", "grad_norm", "tokens_per_s", "loss_scale")


def training_intact(folder: Path) -> bool:
    """A finished run: its result (in the run's manifest) and the final checkpoint of every rank verify."""
    try:
        checkpointing.verify_run(folder)
        result = json.loads((folder / RESULT_FILE).read_text())
        for rank in range(result["world_size"]):
            checkpointing.verify(checkpointing.step_dir(folder, rank, result["steps"]))
    except (OSError, ValueError, KeyError, PipelineError):
        return False
    return True


TRAIN = CachedStage("train", calls=("llama.train.trainer",), file_params=("data", "base"),
                    outputs_valid=training_intact)


@task(name="train", cache_key_fn=TRAIN.cache_key_fn, persist_result=True, task_run_name="train-{recipe_name}")
@TRAIN.exclusive
def train(recipe_name: str, config: dict, data: str, base: str | None, work_dir: str, run_id: str | None = None) -> dict:
    """Train with `config` (a TrainConfig dict) on the records folder `data`, from weights `base`.

    A run interrupted earlier left checkpoints in the same key-named folder: it resumes from them. Every
    logged step goes to the MLflow run `run_id` as it happens.
    """
    out = TRAIN.output_dir(locals())
    settings = TrainConfig.from_dict(config).to_dict()
    settings["data"]["train"], settings["model"]["checkpoint"] = data, base
    resume = (out / "train_config.json").is_file()
    on_step = StepLogger(Run(run_id)) if run_id else None
    with one_model():
        return train_model(settings, out, resume=resume, on_step=on_step)


class StepLogger:
    """`on_step` callback: loss, learning rate, gradient norm and tokens/s to MLflow, per logged step."""

    def __init__(self, run: Run):
        self.run = run

    def __call__(self, step: int, metrics: dict) -> None:
        self.run.log_metrics({key: metrics[key] for key in STEP_METRICS if key in metrics}, step=step)


def log_training(run: Run, result: dict, cached: bool) -> None:
    """The finished run's summary, plots of loss and learning rate, and (for a cached run) its step metrics."""
    folder = Path(result["output_dir"])
    steps = [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines() if line.strip()]
    if cached:
        log_step = StepLogger(run)
        for entry in steps:
            log_step(entry["step"], entry)
    run.log_metrics({f"train_{key}": value for key, value in result.items()
                     if key in ("first_loss", "final_loss", "tokens_per_s", "steps")})
    run.log_artifact(folder / "train_config.json")
    run.log_artifact(folder / METRICS_FILE)
    if steps:
        run.log_artifact(plot_curves(steps, folder / "curves.png"))


def plot_curves(steps: list[dict], path: Path) -> Path:
    """Loss and learning rate against step, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, lr_axis) = plt.subplots(1, 2, figsize=(10, 3.5))
    x = [entry["step"] for entry in steps]
    loss_axis.plot(x, [entry["loss"] for entry in steps])
    loss_axis.set(xlabel="step", ylabel="loss", title="training loss")
    lr_axis.plot(x, [entry["lr"] for entry in steps], color="tab:orange")
    lr_axis.set(xlabel="step", ylabel="learning rate", title="learning rate")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


train_stage = stage_task(train, log=log_training, context="training")


MERGE = CachedStage("merge", calls=("llama.train.merge",), file_params=("run_dir", "base", "tokenizer"),
                    outputs_valid=verified_by(verify_folder))


@task(name="merge", cache_key_fn=MERGE.cache_key_fn, persist_result=True, task_run_name="merge-{fmt}")
@MERGE.exclusive
def merge(run_dir: str, base: str | None, tokenizer: str | None, work_dir: str, fmt: str = "ckpt") -> dict:
    """Rank checkpoints (and a LoRA adapter with its base) into one verified checkpoint folder."""
    out = MERGE.output_dir(locals())
    summary = merge_checkpoints(run_dir, out, fmt=fmt, base=base, tokenizer=tokenizer, overwrite=True)
    return {**summary, "checkpoint": str(out)}


merge_stage = stage_task(merge)
