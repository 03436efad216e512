"""Real servers for integration tests: child processes in their own process groups on 127.0.0.1, stopped at
the end of the test, and JSON over HTTP with the retries a busy server needs."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request_json(request: urllib.request.Request | str, timeout: float):
    """JSON from one HTTP call, retrying a busy server's 502/503 answers as Prefect's own client does."""
    for attempt in range(6):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            if err.code not in (502, 503) or attempt == 5:
                raise
            time.sleep(0.5 * 2 ** attempt)


def get(url: str, timeout: float = 5.0):
    return request_json(url, timeout)


def post(url: str, body: dict):
    return request_json(urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"}), 10)


def wait_for(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
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



def start_mlflow_server(processes: Processes, tmp: Path, env: dict) -> str:
    """`mlflow server` with a SQLite store and proxied artifacts under `tmp`; its URL once it answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = processes.start("mlflow-server", [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{tmp}/mlflow-server.db",
        "--artifacts-destination", str(tmp / "mlflow-artifacts"), "--workers", "1"], env)
    wait_for(f"{url}/health", server)
    return url
