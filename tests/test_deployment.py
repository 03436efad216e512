"""Integration: a real `prefect server` and `mlflow server` on 127.0.0.1, the pipeline served as a scheduled
deployment, one run triggered through the API, and its record read back through MLflow's REST API."""

import os
import time
import urllib.parse
from pathlib import Path

import pytest

from servers import BIN, get, post, start_mlflow_server, wait_for, free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
QUICK = ["train.set.training.max_steps=3", "evaluate.squad.limit=2", "evaluate.samples.max_new_tokens=4"]


def test_served_deployment_runs_and_is_recorded_in_mlflow(tmp_path, processes):
    prefect_port = free_port()
    prefect_api = f"http://127.0.0.1:{prefect_port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path}/prefect-server.db",
           "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "prefect-results"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    prefect_server = processes.start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                                        "--port", str(prefect_port)], env)
    mlflow_url = start_mlflow_server(processes, tmp_path, env)
    wait_for(f"{prefect_api}/health", prefect_server)

    client_env = {**env, "PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": mlflow_url}
    processes.start("serve", [str(BIN / "llama2-pipeline"), "serve", "--name", "itest", "--cron", "0 3 * * 1",
                              "--config", "configs/pipeline/tiny.yaml", "--work-dir", str(tmp_path / "work"), *QUICK],
                    client_env)

    # Everything below talks to the servers only through their HTTP APIs.
    deadline = time.monotonic() + 180
    deployment = None
    while deployment is None and time.monotonic() < deadline:
        try:
            deployment = get(f"{prefect_api}/deployments/name/llama2-pipeline/itest")
        except urllib.error.HTTPError:
            time.sleep(1)
    assert deployment, "the served deployment never appeared"
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * 1"]

    flow_run = post(f"{prefect_api}/deployments/{deployment['id']}/create_flow_run", {})
    state = None
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        state = get(f"{prefect_api}/flow_runs/{flow_run['id']}")["state"]["type"]
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        time.sleep(2)
    assert state == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]

    experiment = get(f"{mlflow_url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=llama2-pipeline")
    runs = post(f"{mlflow_url}/api/2.0/mlflow/runs/search", {
        "experiment_ids": [experiment["experiment"]["experiment_id"]],
        "filter": f"tags.prefect_flow_run_id = '{flow_run['id']}'"})["runs"]
    assert len(runs) == 1
    metrics = {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]}
    assert {f"{model}.{name}" for model in ("base", "finetuned", "delta") for name in (
        "ppl_mindformers", "ppl_standard_ctx256", "squad_f1_official", "squad_f1_mindformers")} <= set(metrics)
    assert all(value == value for value in metrics.values())  # no NaN

    model = get(f"{mlflow_url}/api/2.0/mlflow/registered-models/get?name=llama2-tiny")["registered_model"]
    version = model["latest_versions"][0]
    tags = {t["key"]: t["value"] for t in version.get("tags", [])}
    assert float(tags["metric.ppl_mindformers"]) == pytest.approx(metrics["finetuned.ppl_mindformers"])
    assert version["source"].startswith("models:/m-"), version["source"]   # the version points at a logged model
    files = _logged_model_files(mlflow_url, version["source"].removeprefix("models:/"))
    assert {"MLmodel", "manifest.json", "model.ckpt", "model_config.json",
            "tokenizer.model"} <= {Path(f).name for f in files}


def _logged_model_files(mlflow_url: str, model_id: str, directory: str = "") -> list[str]:
    """Every file of a logged model (MLflow 3 keeps a model's artifacts apart from its run's)."""
    query = urllib.parse.urlencode({"artifact_directory_path": directory} if directory else {})
    listing = get(f"{mlflow_url}/api/2.0/mlflow/logged-models/{model_id}/artifacts/directories?{query}")
    files = []
    for entry in listing.get("files", []):
        if entry.get("is_dir"):
            files += _logged_model_files(mlflow_url, model_id, entry["path"])
        else:
            files.append(entry["path"])
    return files
