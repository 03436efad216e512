"""The demo's pipeline, on the tiny model, end to end on the real MindSpore, Prefect (hermetic, see conftest)
and MLflow: base and finetuned evaluated side by side, cached by content."""

import math
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from flows.pipeline import pipeline
from llama.weights.source import open_checkpoint
from llama.weights.writer import write_checkpoint
from tasks.tracking import tracking_uri

pytestmark = pytest.mark.slow

CONFIG = "configs/pipeline/tiny.yaml"
# The tiny demo, made shorter: a few LoRA steps, a few SQuAD questions, short samples.
QUICK = ["train.set.training.max_steps=4", "evaluate.squad.limit=4", "evaluate.samples.max_new_tokens=8"]
EVALUATIONS = ("perplexity-mindformers", "perplexity-standard", "squad", "samples")
BASE = {f"{evaluation}-base" for evaluation in EVALUATIONS}
AFTER_TRAINING = {"train", "merge", "register"} | {f"{evaluation}-finetuned" for evaluation in EVALUATIONS}


@pytest.fixture
def weights_with_tokenizer(tmp_path, fixtures):
    """stories260K converted with its tokenizer: weights that bring their own tokenizer, as a GGUF file does."""
    folder = tmp_path / "stories260K"
    write_checkpoint(open_checkpoint(fixtures / "stories260K.bin"), folder, tokenizer=fixtures / "tok512.model",
                     progress=False)
    return folder


def test_demo_evaluates_base_and_finetuned_reruns_from_cache_and_reruns_only_what_a_change_touches(
        tmp_path, weights_with_tokenizer):
    work = str(tmp_path / "work")
    # The data is tokenized with the tokenizer the converted weights carry (the GGUF path of the real demo).
    quick = QUICK + [f"model.weights={weights_with_tokenizer}", "model.tokenizer=null"]
    first = pipeline(config=CONFIG, overrides=quick, work_dir=work)
    assert set(first["tasks"].values()) == {"ran"}
    assert BASE | AFTER_TRAINING | {"convert", "preprocess-squad_train", "preprocess-squad_eval"} <= set(first["tasks"])
    metrics = first["metrics"]
    for name in ("ppl_mindformers", "ppl_mindformers_token_weighted", "ppl_standard_ctx256", "word_perplexity",
                 "squad_f1_official", "squad_f1_mindformers"):
        for model in ("base", "finetuned"):
            assert math.isfinite(metrics[f"{model}.{name}"]), (model, name)
        assert metrics[f"delta.{name}"] == pytest.approx(metrics[f"finetuned.{name}"] - metrics[f"base.{name}"])
    assert math.isfinite(metrics["train_final_loss"])
    assert 1.0 < metrics["base.ppl_mindformers"] < 512.0  # better than uniform over tok512's vocabulary
    assert metrics["base.ppl_mindformers"] != metrics["finetuned.ppl_mindformers"]

    client = MlflowClient(tracking_uri())
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.data.tags["prefect_flow_run_id"] and parent.data.tags["code_version"]
    assert parent.info.run_name == f"tiny: {parent.data.tags['prefect_flow_run_name']}"
    assert parent.data.params["train.recipe"].endswith("tiny_lora.yaml")
    assert parent.data.metrics["finetuned.squad_f1_official"] == pytest.approx(metrics["finetuned.squad_f1_official"])
    assert parent.data.metrics["delta.ppl_mindformers"] == pytest.approx(metrics["delta.ppl_mindformers"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    stages = {run.data.tags["mlflow.runName"]: run for run in children}
    assert {"prepare-data", "convert", "train", "merge", "register"} | BASE | AFTER_TRAINING <= set(stages)
    for model in ("base", "finetuned"):
        squad = stages[f"squad-{model}"].data
        assert squad.tags["model"] == model and squad.tags["dataset"] == "squad_eval"
        assert squad.metrics["squad_f1_official"] == pytest.approx(metrics[f"{model}.squad_f1_official"])
    train_run = stages["train"]
    assert len(client.get_metric_history(train_run.info.run_id, "loss")) == 4
    artifacts = {a.path for a in client.list_artifacts(train_run.info.run_id)}
    assert {"curves.png", "metrics.jsonl", "train_config.json"} <= artifacts
    def inputs(stage: str) -> set[tuple[str, str]]:
        """(dataset name, context) of a stage run's MLflow inputs."""
        return {(i.dataset.name, {t.key: t.value for t in i.tags}["mlflow.data.context"])
                for i in stages[stage].inputs.dataset_inputs}

    assert {("squad_train", "prepared"), ("wiki_eval", "prepared")} <= inputs("prepare-data")
    assert inputs("train") == {("squad_train", "training")}
    for model in ("base", "finetuned"):
        assert inputs(f"squad-{model}") == {("squad_eval", "evaluation")}
        assert inputs(f"perplexity-mindformers-{model}") == {("wiki_eval", "evaluation")}
    assert {i.dataset.digest for i in stages["train"].inputs.dataset_inputs} <= \
        {i.dataset.digest for i in stages["prepare-data"].inputs.dataset_inputs}   # the same data, by content
    version = client.get_model_version("llama2-tiny", first["registered"]["version"])
    assert float(version.tags["metric.ppl_mindformers"]) == pytest.approx(metrics["finetuned.ppl_mindformers"])
    # In Prefect, each stage's task run holds the cached task's run, under that task's own name, not the stage's
    names = _prefect_task_run_names(parent.data.tags["prefect_flow_run_id"])
    assert names.count("train") == names.count("merge") == names.count("convert") == 1
    assert {"train-tiny_lora", "merge-ckpt", "squad", "samples"} <= set(names)
    artifacts = _prefect_artifacts()
    assert {"pipeline-metrics", "stage-train", "stage-squad-base", "stage-squad-finetuned"} <= set(artifacts)
    assert f"run {parent.info.run_id} in {tracking_uri()}" in artifacts["pipeline-metrics"]   # and back to MLflow

    second = pipeline(config=CONFIG, overrides=quick, work_dir=work)
    assert set(second["tasks"].values()) == {"cached"}
    assert second["metrics"] == metrics
    assert client.get_run(second["mlflow_run_id"]).info.run_name != parent.info.run_name
    # every stage still has its own run under the new parent, tagged as taken from the cache
    rerun = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{second['mlflow_run_id']}'")
    cached = {run.data.tags["mlflow.runName"]: run.data.tags.get("cached") for run in rerun}
    assert {"convert", "train", "merge", "register"} | BASE | AFTER_TRAINING <= set(cached)
    assert {name for name, tag in cached.items() if name != "prepare-data" and tag != "True"} == set()

    # A new learning rate reruns training and what follows it; the base model's evaluations come from cache.
    third = pipeline(config=CONFIG, overrides=quick + ["train.set.optimizer.learning_rate=5e-3"], work_dir=work)
    ran = {task for task, how in third["tasks"].items() if how == "ran"}
    assert ran == AFTER_TRAINING
    assert third["checkpoint"] != first["checkpoint"]
    assert {k: v for k, v in third["metrics"].items() if k.startswith("base.")} == \
        {k: v for k, v in metrics.items() if k.startswith("base.")}

    # A damaged evaluation output (its manifest no longer matches) reruns that evaluation and nothing else.
    damaged = sorted((tmp_path / "work" / "squad").glob("*/predictions/predictions.jsonl"))
    assert len(damaged) == 3  # base, and finetuned at both learning rates
    for predictions in damaged:
        with open(predictions, "a", encoding="utf-8") as handle:
            handle.write("\n")
    fourth = pipeline(config=CONFIG, overrides=quick + ["train.set.optimizer.learning_rate=5e-3"], work_dir=work)
    assert {task for task, how in fourth["tasks"].items() if how == "ran"} == {"squad-base", "squad-finetuned"}
    assert fourth["metrics"] == third["metrics"]


def _prefect_task_run_names(flow_run_id: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [run.name for run in runs]


def _prefect_artifacts() -> dict[str, str]:
    """The latest content of each keyed Prefect artifact."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        return {artifact.key: str(artifact.data) for artifact in prefect.read_latest_artifacts()}


def test_flows_keep_prefect_telemetry_off_unless_asked():
    """Offline, the temporary server's telemetry would log "ERROR ... Failed to send telemetry" in every run."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_ANALYTICS_ENABLED"}
    code = "import os, flows.commands, prefect.settings as s; print(s.get_current_settings().server.analytics_enabled)"
    for extra, expected in (({}, "False"), ({"PREFECT_SERVER_ANALYTICS_ENABLED": "true"}, "True")):
        out = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                             check=True)
        assert out.stdout.split()[-1] == expected
