"""The registered model is an MLflow pyfunc model: logged to a real `mlflow server`, loaded by its registry
URI in a fresh process, it completes prompts exactly as `llama2-pipeline predict` does."""

import json
import os
import subprocess
import sys

import pytest

from llama.cli import run as cli
from servers import start_mlflow_server

pytestmark = pytest.mark.slow

LOAD_AND_PREDICT = """
import json, sys, mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
print(json.dumps({"completions": model.predict(["Once upon a time", "Lily"], params={"max_new_tokens": 8}),
                  "inputs": [str(t) for t in model.metadata.get_input_schema().input_types()]}))
"""


def test_registered_model_loads_with_pyfunc_in_a_fresh_process(fixtures, tmp_path, processes, monkeypatch, capsys):
    url = start_mlflow_server(processes, tmp_path, dict(os.environ))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    checkpoint = tmp_path / "stories"
    assert cli(["convert", "--input", str(fixtures / "stories260K.bin"), "--tokenizer",
                str(fixtures / "tok512.model"), "--output", str(checkpoint)]) == 0

    from tasks.model import register
    from tasks.tracking import Run, client

    run = Run.start("register-test")
    registered = register.fn(str(checkpoint), "llama2-test", {"ppl_mindformers": 3.5, "note": "text"}, run.run_id)
    assert registered["version"] == 1 and registered["model_uri"] == "models:/llama2-test/1"
    logged = client().get_logged_model(registered["model_id"])
    assert {m.key: m.value for m in logged.metrics} == {"ppl_mindformers": 3.5}

    # a fresh process that knows only the registry URI (and not this checkout: it runs from tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "PYTHONPATH": ""}
    loaded = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, registered["model_uri"]], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    result = json.loads(loaded.stdout.splitlines()[-1])
    assert result["inputs"] == ["DataType.string"]

    capsys.readouterr()
    assert cli(["predict", "--checkpoint", str(checkpoint), "--prompt", "Once upon a time", "--prompt", "Lily",
                "--max-new-tokens", "8", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out.splitlines()[-1])["completions"]
    assert result["completions"] == [c["completion"] for c in ours]
    assert all(result["completions"])
