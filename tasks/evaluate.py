"""Prefect tasks for evaluation: perplexity and SQuAD under both conventions, and sample generations."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from llama.eval.perplexity import evaluate_perplexity
from llama.eval.predict import predict
from llama.eval.squad import evaluate_squad
from llama.fileio import verify_manifest, write_json_atomic, write_manifest
from tasks.cache import CachedStage, verified_by
from tasks.runtime import one_model
from tasks.stage import stage_task
from tasks.tracking import Run

RESULT = "result.json"
OUTPUTS = "llama2-pipeline evaluation outputs 1"


def _finish(out: Path, result: dict) -> None:
    """result.json, then the manifest of every output file: written last, it marks the folder complete."""
    write_json_atomic(out / RESULT, result)
    write_manifest(out, OUTPUTS)


outputs_intact = verified_by(lambda folder: verify_manifest(folder, OUTPUTS, "evaluation outputs"))
PERPLEXITY = CachedStage("perplexity", calls=("llama.eval.perplexity",), file_params=("checkpoint", "data", "adapter"),
                         outputs_valid=outputs_intact)


@task(name="perplexity", cache_key_fn=PERPLEXITY.cache_key_fn, persist_result=True,
      task_run_name="perplexity-{convention}")
@PERPLEXITY.exclusive
def perplexity(checkpoint: str, data: str, convention: str, settings: dict, work_dir: str,
               adapter: str | None = None) -> dict:
    """Perplexity of a checkpoint (with an unmerged adapter run) on a records folder (mindformers) or raw
    WikiText (standard)."""
    out = PERPLEXITY.output_dir(locals())
    with one_model(warm=True):
        result = evaluate_perplexity(checkpoint, data, convention, adapter=adapter, show_progress=False, **settings)
    _finish(out, result)
    return result


SQUAD = CachedStage("squad", calls=("llama.eval.squad",), file_params=("checkpoint", "data", "adapter"),
                    outputs_valid=outputs_intact)


@task(name="squad", cache_key_fn=SQUAD.cache_key_fn, persist_result=True, task_run_name="squad")
@SQUAD.exclusive
def squad(checkpoint: str, data: str, settings: dict, work_dir: str, adapter: str | None = None) -> dict:
    """SQuAD EM/F1 (official and MindFormers) by greedy generation; predictions land in the output folder."""
    out = SQUAD.output_dir(locals())
    with one_model(warm=True):
        result = evaluate_squad(checkpoint, data, out / "predictions", adapter=adapter, overwrite=True,
                                show_progress=False, **settings)
    _finish(out, result)
    return result


SAMPLES = CachedStage("samples", calls=("llama.eval.predict",), file_params=("checkpoint", "adapter"),
                      outputs_valid=outputs_intact)


@task(name="samples", cache_key_fn=SAMPLES.cache_key_fn, persist_result=True, task_run_name="samples")
@SAMPLES.exclusive
def samples(checkpoint: str, prompts: list[str], settings: dict, work_dir: str, adapter: str | None = None) -> dict:
    """A few generations from the finished model, to read beside its metrics."""
    out = SAMPLES.output_dir(locals())
    path = out / "samples.jsonl"
    with one_model(warm=True):
        result = predict(checkpoint, prompts, adapter=adapter, output=path, overwrite=True, **settings)
    _finish(out, {"samples": str(path)})
    return {"samples": str(path), "completions": result["completions"]}


def log_perplexity(run: Run, result: dict, cached: bool) -> None:
    run.log_metrics({k: v for k, v in result.items() if k.startswith(("ppl_", "loss_", "word_", "byte_", "bits_"))})
    run.set_tags({"convention": result["convention"]})


def log_squad(run: Run, result: dict, cached: bool) -> None:
    run.log_metrics({k: v for k, v in result.items() if k.startswith("squad_")})
    run.set_tags({"split": "dev", "normalisation": "official: SQuAD v1.1 normalize_answer; "
                  "mindformers: EmF1Metric (first line, jieba-style segments, longest common run)"})
    predictions = Path(result["output"])
    run.log_artifacts(sorted(p for p in predictions.iterdir() if p.is_file()), "squad")


def log_samples(run: Run, result: dict, cached: bool) -> None:
    run.log_artifact(result["samples"], "samples")
    run.set_tags({"sample.0": json.dumps(result["completions"][0])[:500]})


perplexity_stage = stage_task(perplexity, log=log_perplexity, context="evaluation")
squad_stage = stage_task(squad, log=log_squad, context="evaluation")
samples_stage = stage_task(samples, log=log_samples, context="evaluation")
