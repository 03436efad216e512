"""MLflow tracking for flows and tasks: one parent run per flow run, a nested run per stage.

Runs are addressed by id through `MlflowClient` rather than MLflow's thread-local "active run", because
Prefect runs tasks concurrently in worker threads. The default store is a SQLite file in the working
folder; `MLFLOW_TRACKING_URI` overrides it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from llama.config.loader import flatten
from llama.fileio import MANIFEST, sha256_file

DEFAULT_EXPERIMENT = "llama2-pipeline"
MAX_PARAM_LENGTH = 6000


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a local SQLite store (MLflow's default, ./mlruns,
    is relative to whatever folder the process started in); a server's own default otherwise."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


def run_address(run: "Run") -> str:
    """Where a run is seen: its page in the MLflow UI when the store is a tracking server, else its id and store."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        experiment = run.client.get_run(run.run_id).info.experiment_id
        return f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{run.run_id}"
    return f"run {run.run_id} in {uri}"


def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri())


def as_params(config: dict) -> dict[str, str]:
    """MLflow params are flat strings: `{"train": {"lr": 1e-4}}` → `{"train.lr": "0.0001"}`."""
    return {key: (json.dumps(value) if isinstance(value, (list, tuple)) else str(value))[:MAX_PARAM_LENGTH]
            for key, value in flatten(config).items()}


class Run:
    """One MLflow run, addressed by id so any thread or process can log to it."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.client = client()

    @classmethod
    def start(cls, name: str, experiment: str = DEFAULT_EXPERIMENT, parent: "Run | str | None" = None,
              tags: dict[str, str] | None = None) -> "Run":
        mlflow_client = client()
        found = mlflow_client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else mlflow_client.create_experiment(
            experiment, artifact_location=artifact_location(tracking_uri()))
        all_tags = {"mlflow.runName": name, **(tags or {})}
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent.run_id if isinstance(parent, Run) else parent
        run = mlflow_client.create_run(experiment_id, tags=all_tags, run_name=name)
        return cls(run.info.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = as_params(params)
        batch = [Param(key, value) for key, value in flat.items()]
        for start in range(0, len(batch), 100):
            self.client.log_batch(self.run_id, params=batch[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step or 0) for key, value in metrics.items()
                 if isinstance(value, (int, float)) and not isinstance(value, bool)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, paths: Iterable[str | os.PathLike], artifact_path: str | None = None) -> None:
        for path in paths:
            self.log_artifact(path, artifact_path)

    def log_dict(self, data: Any, name: str) -> None:
        """Log a JSON document as an artifact file called `name`."""
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / name
            target.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
            self.log_artifact(target)

    def log_dataset(self, name: str, path: str | os.PathLike, context: str, profile: dict | None = None) -> None:
        """Record the data at `path` as a run input with its content digest (a records folder's manifest's, or the
        file's), so runs show what data they used, in which role (`context`: training, evaluation ...)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        path = Path(path)
        digest = sha256_file(path / MANIFEST if path.is_dir() else path)
        dataset = Dataset(name=name, digest=digest[:36], source_type="local", source=json.dumps({"uri": str(path)}),
                          profile=json.dumps(profile) if profile else None)
        tags = [InputTag(key="mlflow.data.context", value=context)]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, tags=tags)])

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
