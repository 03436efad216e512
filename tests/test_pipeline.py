"""The demo pipeline end to end on the real MindSpore, Prefect (hermetic, see conftest) and MLflow."""

import math

import pytest
from mlflow.tracking import MlflowClient

from flows.pipeline import pipeline
from tasks.tracking import tracking_uri

pytestmark = pytest.mark.slow

# The demo, made shorter: a few LoRA steps and a few SQuAD questions.
QUICK = ["train.set.training.max_steps=4", "evaluate.squad.limit=4", "evaluate.samples.max_new_tokens=8"]
AFTER_TRAINING = {"train", "merge", "perplexity-mindformers", "perplexity-standard", "squad", "samples", "register"}


def test_demo_runs_reruns_from_cache_and_reruns_only_what_a_change_touches(tmp_path):
    work = str(tmp_path / "work")
    first = pipeline(config="configs/pipeline/demo.yaml", overrides=QUICK, work_dir=work)
    assert set(first["tasks"].values()) == {"ran"}
    assert AFTER_TRAINING | {"convert", "preprocess-alpaca", "download-stories260K"} <= set(first["tasks"])
    metrics = first["metrics"]
    for name in ("ppl_mindformers", "ppl_mindformers_token_weighted", "ppl_standard_ctx256", "word_perplexity",
                 "squad_f1_official", "squad_f1_mindformers", "train_final_loss"):
        assert math.isfinite(metrics[name]), name
    assert 1.0 < metrics["ppl_mindformers"] < 512.0  # better than uniform over tok512's vocabulary

    client = MlflowClient(tracking_uri())
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.data.tags["prefect_flow_run_id"] and parent.data.tags["code_version"]
    assert parent.data.params["train.recipe"].endswith("tiny_lora.yaml")
    assert parent.data.metrics["ppl_mindformers"] == pytest.approx(metrics["ppl_mindformers"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    stages = {run.data.tags["mlflow.runName"]: run for run in children}
    assert {"prepare-data", "convert", "train", "merge", "squad", "register"} <= set(stages)
    train_run = stages["train"]
    assert len(client.get_metric_history(train_run.info.run_id, "loss")) == 4
    artifacts = {a.path for a in client.list_artifacts(train_run.info.run_id)}
    assert {"curves.png", "metrics.jsonl", "train_config.json"} <= artifacts
    assert stages["squad"].data.tags["dataset"] == "squad_eval"
    assert stages["prepare-data"].inputs.dataset_inputs
    version = client.get_model_version("llama2-demo", first["registered"]["version"])
    assert float(version.tags["metric.ppl_mindformers"]) == pytest.approx(metrics["ppl_mindformers"])
    assert {"pipeline-metrics", "stage-train", "stage-squad"} <= _prefect_artifact_keys()

    second = pipeline(config="configs/pipeline/demo.yaml", overrides=QUICK, work_dir=work)
    assert set(second["tasks"].values()) == {"cached"}
    assert second["metrics"] == metrics

    third = pipeline(config="configs/pipeline/demo.yaml",
                     overrides=QUICK + ["train.set.optimizer.learning_rate=5e-3"], work_dir=work)
    ran = {task for task, how in third["tasks"].items() if how == "ran"}
    assert ran == AFTER_TRAINING
    assert third["checkpoint"] != first["checkpoint"]

    # A damaged evaluation output (its manifest no longer matches) reruns that evaluation and nothing else.
    for predictions in (tmp_path / "work" / "squad").glob("*/predictions/predictions.jsonl"):
        with open(predictions, "a", encoding="utf-8") as handle:
            handle.write("\n")
    fourth = pipeline(config="configs/pipeline/demo.yaml",
                      overrides=QUICK + ["train.set.optimizer.learning_rate=5e-3"], work_dir=work)
    assert {task for task, how in fourth["tasks"].items() if how == "ran"} == {"squad"}
    assert fourth["metrics"] == third["metrics"]


def _prefect_artifact_keys() -> set[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        return {artifact.key for artifact in prefect.read_artifacts()}
