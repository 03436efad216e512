"""Prefect tasks for the weights: convert a checkpoint, and register the finished model in MLflow."""

from __future__ import annotations

from pathlib import Path

from mlflow.exceptions import MlflowException
from prefect import task

from llama.checkpoint import open_checkpoint, verify_folder, write_checkpoint
from llama.config import ModelConfig
from llama.errors import PipelineError
from llama.eval.loading import load_tokenizer
from tasks.cache import CachedStage, verified_by
from tasks.tracking import Run


CONVERT = CachedStage("convert", code=__name__, file_params=("source", "tokenizer", "model_config"),
                      outputs_valid=verified_by(verify_folder))


@task(name="convert", cache_key_fn=CONVERT.cache_key_fn, persist_result=True, task_run_name="convert-{fmt}")
def convert(source: str, work_dir: str, fmt: str = "ckpt", dtype: str | None = None,
            tokenizer: str | None = None, model_config: str | None = None) -> dict:
    """Convert any supported checkpoint into a verified folder (weights, model config, tokenizer); the result
    names the tokenizer file the folder carries (None if none), which the data stages then tokenize with."""
    out = CONVERT.output_dir(locals())
    opened = open_checkpoint(source, ModelConfig.load(model_config) if model_config else None)
    manifest = write_checkpoint(opened, out, fmt, dtype, tokenizer, overwrite=True, progress=False)
    return {"checkpoint": str(out), "source_format": opened.kind, "format": fmt, "dtype": manifest["dtype"],
            "parameters": manifest["parameters"], "tokenizer": _own_tokenizer(out)}


def _own_tokenizer(folder: Path) -> str | None:
    """The tokenizer file of a checkpoint folder, as evaluations of it find it."""
    try:
        return str(load_tokenizer(folder).path)
    except PipelineError:
        return None


REGISTER = CachedStage("register", code=__name__, file_params=("checkpoint",), ignore=("run_id", "tags"))


@task(name="register", cache_key_fn=REGISTER.cache_key_fn, persist_result=True, task_run_name="register-{name}")
def register(checkpoint: str, name: str, metrics: dict, run_id: str, tags: dict | None = None) -> dict:
    """Log the checkpoint folder to the MLflow run and register it as a new version of model `name`.

    Cached on the checkpoint's content and its metrics, so an unchanged rerun adds no duplicate version.
    """
    run = Run(run_id)
    run.log_artifacts(sorted(Path(checkpoint).iterdir()), "model")
    try:
        run.client.create_registered_model(name)
    except MlflowException:
        pass  # already registered: add a version
    version = run.client.create_model_version(
        name=name, source=f"runs:/{run_id}/model", run_id=run_id,
        tags={**{k: str(v) for k, v in (tags or {}).items()}, **{f"metric.{k}": str(v) for k, v in metrics.items()}},
        description="A merged checkpoint folder (weights, model config, tokenizer, manifest of checksums).")
    return {"model_name": name, "version": version.version, "run_id": run_id}
