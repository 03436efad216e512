"""Prefect tasks for evaluation: perplexity and SQuAD under both conventions, and sample generations."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from llama.eval.perplexity import evaluate_perplexity
from llama.eval.predict import predict
from llama.eval.squad import evaluate_squad
from llama.fileio import write_json_atomic
from tasks.cache import MINDSPORE_LOCK, CachedStage
from tasks.tracking import Run

RESULT = "result.json"


def result_intact(folder: Path) -> bool:
    return (folder / RESULT).is_file()


PERPLEXITY = CachedStage("perplexity", code=__name__, file_params=("checkpoint", "data"), outputs_valid=result_intact)


@task(name="perplexity", cache_key_fn=PERPLEXITY.cache_key_fn, persist_result=True,
      task_run_name="perplexity-{convention}")
def perplexity(checkpoint: str, data: str, convention: str, settings: dict, work_dir: str) -> dict:
    """Perplexity of a checkpoint on a records folder (mindformers) or raw WikiText (standard)."""
    out = PERPLEXITY.output_dir(locals())
    with MINDSPORE_LOCK:
        result = evaluate_perplexity(checkpoint, data, convention, show_progress=False, **settings)
    write_json_atomic(out / RESULT, result)
    return result


SQUAD = CachedStage("squad", code=__name__, file_params=("checkpoint", "data"), outputs_valid=result_intact)


@task(name="squad", cache_key_fn=SQUAD.cache_key_fn, persist_result=True, task_run_name="squad")
def squad(checkpoint: str, data: str, settings: dict, work_dir: str) -> dict:
    """SQuAD EM/F1 (official and MindFormers) by greedy generation; predictions land in the output folder."""
    out = SQUAD.output_dir(locals())
    with MINDSPORE_LOCK:
        result = evaluate_squad(checkpoint, data, out / "predictions", overwrite=True, show_progress=False, **settings)
    write_json_atomic(out / RESULT, result)
    return result


SAMPLES = CachedStage("samples", code=__name__, file_params=("checkpoint",), outputs_valid=result_intact)


@task(name="samples", cache_key_fn=SAMPLES.cache_key_fn, persist_result=True, task_run_name="samples")
def samples(checkpoint: str, prompts: list[str], settings: dict, work_dir: str) -> dict:
    """A few generations from the finished model, to read beside its metrics."""
    out = SAMPLES.output_dir(locals())
    with MINDSPORE_LOCK:
        result = predict(checkpoint, prompts, output=out / "samples.jsonl", overwrite=True, **settings)
    write_json_atomic(out / RESULT, {"samples": str(out / "samples.jsonl")})
    return {"samples": str(out / "samples.jsonl"), "completions": result["completions"]}


def log_perplexity(run: Run, result: dict, dataset: str) -> None:
    run.log_metrics({k: v for k, v in result.items() if k.startswith(("ppl_", "loss_", "word_", "byte_", "bits_"))})
    run.set_tags({"dataset": dataset, "convention": result["convention"]})


def log_squad(run: Run, result: dict, dataset: str) -> None:
    run.log_metrics({k: v for k, v in result.items() if k.startswith("squad_")})
    run.set_tags({"dataset": dataset, "split": "dev", "normalisation": "official: SQuAD v1.1 normalize_answer; "
                  "mindformers: EmF1Metric (first line, jieba-style segments, longest common run)"})
    predictions = Path(result["output"])
    run.log_artifacts(sorted(p for p in predictions.iterdir() if p.is_file()), "squad")


def log_samples(run: Run, result: dict) -> None:
    run.log_artifact(result["samples"], "samples")
    run.set_tags({"sample.0": json.dumps(result["completions"][0])[:500]})
