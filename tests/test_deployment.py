"""Integration: a real `prefect server` and `mlflow server` on 127.0.0.1, the pipeline served as a scheduled
deployment, one run triggered through the API, and its record read back through MLflow's REST API."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
QUICK = ["train.set.training.max_steps=3", "evaluate.squad.limit=2", "evaluate.samples.max_new_tokens=4"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _request(request: urllib.request.Request | str, timeout: float):
    """JSON from one HTTP call, retrying a busy server's 502/503 answers as Prefect's own client does."""
    for attempt in range(6):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            if err.code not in (502, 503) or attempt == 5:
                raise
            time.sleep(0.5 * 2 ** attempt)


def _get(url: str, timeout: float = 5.0):
    return _request(url, timeout)


def _post(url: str, body: dict):
    return _request(urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"}), 10)


def _wait_for(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds} s")


class Processes:
    """Child processes in their own process groups, all stopped at the end of the test."""

    def __init__(self, tmp: Path):
        self.tmp, self.running = tmp, []

    def start(self, name: str, command: list[str], env: dict) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")
        process = subprocess.Popen(command, env=env, cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.running.append(process)
        return process

    def stop(self) -> None:
        for process in self.running:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.running:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def processes(tmp_path):
    running = Processes(tmp_path)
    yield running
    running.stop()


def test_served_deployment_runs_and_is_recorded_in_mlflow(tmp_path, processes):
    prefect_port, mlflow_port = _free_port(), _free_port()
    prefect_api = f"http://127.0.0.1:{prefect_port}/api"
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path}/prefect-server.db",
           "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "prefect-results"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    prefect_server = processes.start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                                        "--port", str(prefect_port)], env)
    mlflow_server = processes.start("mlflow-server", [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
        "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow-server.db",
        "--artifacts-destination", str(tmp_path / "mlflow-artifacts"), "--workers", "1"], env)
    _wait_for(f"{prefect_api}/health", prefect_server)
    _wait_for(f"{mlflow_url}/health", mlflow_server)

    client_env = {**env, "PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": mlflow_url}
    processes.start("serve", [str(BIN / "llama2-pipeline"), "serve", "--name", "itest", "--cron", "0 3 * * 1",
                              "--config", "configs/pipeline/tiny.yaml", "--work-dir", str(tmp_path / "work"), *QUICK],
                    client_env)

    # Everything below talks to the servers only through their HTTP APIs.
    deadline = time.monotonic() + 180
    deployment = None
    while deployment is None and time.monotonic() < deadline:
        try:
            deployment = _get(f"{prefect_api}/deployments/name/llama2-pipeline/itest")
        except urllib.error.HTTPError:
            time.sleep(1)
    assert deployment, "the served deployment never appeared"
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * 1"]

    flow_run = _post(f"{prefect_api}/deployments/{deployment['id']}/create_flow_run", {})
    state = None
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        state = _get(f"{prefect_api}/flow_runs/{flow_run['id']}")["state"]["type"]
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        time.sleep(2)
    assert state == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]

    experiment = _get(f"{mlflow_url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=llama2-pipeline")
    runs = _post(f"{mlflow_url}/api/2.0/mlflow/runs/search", {
        "experiment_ids": [experiment["experiment"]["experiment_id"]],
        "filter": f"tags.prefect_flow_run_id = '{flow_run['id']}'"})["runs"]
    assert len(runs) == 1
    metrics = {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]}
    assert {f"{model}.{name}" for model in ("base", "finetuned", "delta") for name in (
        "ppl_mindformers", "ppl_standard_ctx256", "squad_f1_official", "squad_f1_mindformers")} <= set(metrics)
    assert all(value == value for value in metrics.values())  # no NaN

    model = _get(f"{mlflow_url}/api/2.0/mlflow/registered-models/get?name=llama2-tiny")["registered_model"]
    version = model["latest_versions"][0]
    tags = {t["key"]: t["value"] for t in version.get("tags", [])}
    assert float(tags["metric.ppl_mindformers"]) == pytest.approx(metrics["finetuned.ppl_mindformers"])
    artifacts = _get(f"{mlflow_url}/api/2.0/mlflow/artifacts/list?"
                     + urllib.parse.urlencode({"run_id": version["run_id"], "path": "model"}))
    assert {"manifest.json", "model.ckpt", "model_config.json", "tokenizer.model"} <= {
        Path(f["path"]).name for f in artifacts["files"]}
