"""Prefect tasks for the weights: convert a checkpoint, and register the finished model in MLflow."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

from prefect import task

import llama
from llama.config.model import ModelConfig
from llama.data.tokenizer import load_tokenizer
from llama.errors import PipelineError
from llama.weights.source import open_checkpoint, verify_folder
from llama.weights.writer import write_checkpoint
from tasks.cache import CachedStage, verified_by
from tasks.stage import stage_task
from tasks.tracking import tracking_uri


CONVERT = CachedStage("convert", calls=("llama.weights.source", "llama.weights.writer", "llama.data.tokenizer"),
                      file_params=("source", "tokenizer", "model_config"),
                      outputs_valid=verified_by(verify_folder))


@task(name="convert", cache_key_fn=CONVERT.cache_key_fn, persist_result=True, task_run_name="convert-{fmt}")
@CONVERT.exclusive
def convert(source: str, work_dir: str, fmt: str = "ckpt", dtype: str | None = None,
            tokenizer: str | None = None, model_config: str | None = None) -> dict:
    """Convert any supported checkpoint into a verified folder (weights, model config, tokenizer); the result
    names the tokenizer file the folder carries (None if none), which the data stages then tokenize with."""
    out = CONVERT.output_dir(locals())
    opened = open_checkpoint(source, ModelConfig.load(model_config) if model_config else None)
    manifest = write_checkpoint(opened, out, fmt, dtype, tokenizer, overwrite=True, progress=False)
    return {"checkpoint": str(out), "source_format": opened.kind, "format": fmt, "dtype": manifest["dtype"],
            "parameters": manifest["parameters"], "tokenizer": _own_tokenizer(out)}


convert_stage = stage_task(convert, log=lambda run, result, cached: run.log_params(result))


def _own_tokenizer(folder: Path) -> str | None:
    """The tokenizer file of a checkpoint folder, as evaluations of it find it."""
    try:
        return str(load_tokenizer(folder).path)
    except PipelineError:
        return None


# registering is logging: what it logs (this module, the MLflow model and tracking) is its code
REGISTER = CachedStage("register", calls=(__name__, "tasks.mlflow_model"), file_params=("checkpoint",),
                       ignore=("run_id", "tags"))
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
LIBRARY = Path(llama.__file__).parent
# What a registered model needs to run, pinned to the versions it was logged with.
RUNTIME_PACKAGES = ("mindspore", "numpy", "sentencepiece", "tokenizers", "safetensors", "ml_dtypes", "pyyaml",
                    "pyarrow", "pandas", "mlflow")


@task(name="register", cache_key_fn=REGISTER.cache_key_fn, persist_result=True, task_run_name="register-{name}")
def register(checkpoint: str, name: str, metrics: dict, run_id: str, tags: dict | None = None) -> dict:
    """Log the checkpoint as an MLflow pyfunc model (MLmodel, signature, the checkpoint and the `llama` code
    as artifacts, our generation as `predict`) to the MLflow run, register it as a new version of model
    `name`, and attach the evaluation metrics to the logged model.

    Cached on the checkpoint's content and its metrics, so an unchanged rerun adds no duplicate version.
    """
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from tasks.mlflow_model import GENERATION_PARAMS

    signature = ModelSignature(
        inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec(key, "long" if isinstance(value, int) else "double", value)
                            for key, value in GENERATION_PARAMS.items()]))
    mlflow.set_tracking_uri(tracking_uri())
    with mlflow.start_run(run_id=run_id):
        logged = mlflow.pyfunc.log_model(
            name="model", python_model=str(MODEL_CODE), artifacts={"checkpoint": checkpoint},
            code_paths=[str(LIBRARY)], signature=signature, registered_model_name=name,
            pip_requirements=[f"{package}=={version(package)}" for package in RUNTIME_PACKAGES],
            tags={k: str(v) for k, v in (tags or {}).items()})
        numeric = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        mlflow.log_metrics(numeric, model_id=logged.model_id)
    version_number = int(logged.registered_model_version)
    for key, value in numeric.items():   # also on the version page, where the registry's UI shows tags
        mlflow.MlflowClient().set_model_version_tag(name, str(version_number), f"metric.{key}", str(value))
    return {"model_name": name, "version": version_number, "run_id": run_id,
            "model_uri": f"models:/{name}/{logged.registered_model_version}", "model_id": logged.model_id}


register_stage = stage_task(register)
