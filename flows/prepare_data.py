"""Prepare data: download the sources, tokenize each dataset and write verified MindRecord files.

The seed README's "Dataset preparation" section as one flow: WikiText-2 (pretraining and perplexity),
Alpaca (finetuning) and SQuAD 1.1 (reading comprehension) run concurrently, every step a cached task.

    llama2-pipeline prepare-data --config configs/data/tiny.yaml
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.common import Inputs, outcome
from llama.config.pipeline import load_flow_config
from llama.errors import PipelineError
from llama.fileio import MANIFEST
from tasks.data import preprocess
from tasks.tracking import Run

DATASET_KEYS = ("kind", "input")


@flow(name="prepare-data", log_prints=True)
def prepare_data(config: str = "configs/data/tiny.yaml", overrides: list[str] | None = None,
                 work_dir: str = "work", mirror: str | None = None, parent_run_id: str | None = None,
                 tokenizer: str | None = None) -> dict:
    """Download → tokenize → MindRecord for every dataset in the config; returns their summaries.

    `tokenizer`, a file, replaces the config's: the pipeline passes the tokenizer of the converted model when
    the weights bring their own (a GGUF file), so the records hold that model's ids.
    """
    settings, base = load_flow_config(config, overrides)  # checked: datasets is a non-empty mapping of specs
    datasets = settings["datasets"]
    resolve = Inputs(settings, base, work_dir, mirror)
    if tokenizer is None:
        if not settings.get("tokenizer"):
            raise PipelineError(f"config {config} names no tokenizer (give one with tokenizer=NAME_OR_PATH)")
        tokenizer = resolve(settings["tokenizer"])
    jobs = {}
    for name, spec in datasets.items():
        options = {k: v for k, v in spec.items() if k not in DATASET_KEYS}
        jobs[name] = preprocess.submit(name, spec["kind"], resolve(spec["input"]), tokenizer, options, work_dir)

    results = {name: job.result() for name, job in jobs.items()}
    tasks = resolve.outcomes()
    tasks.update({f"preprocess-{name}": outcome(job) for name, job in jobs.items()})
    run_id = _track(settings, results, parent_run_id)
    for name, summary in results.items():
        print(f"{name}: {summary['rows']} rows → {summary['output']} ({tasks[f'preprocess-{name}']})")
    return {"datasets": results, "tasks": tasks, "mlflow_run_id": run_id}


def _track(settings: dict, results: dict, parent_run_id: str | None) -> str:
    """A run for the data stage (nested under the pipeline's run when there is one), with one input per dataset."""
    run = Run.start("prepare-data", parent=parent_run_id, tags={"stage": "prepare-data"})
    run.log_params({"data": settings})
    for name, summary in results.items():
        run.log_metrics({f"{name}.rows": summary["rows"], f"{name}.dropped": summary.get("dropped", 0),
                         f"{name}.truncated": summary.get("truncated", 0)})
        run.log_artifact(Path(summary["output"]) / MANIFEST, f"manifests/{name}")
        run.log_dataset(name, summary["output"], context="prepared",
                        profile={"rows": summary["rows"], "row_length": summary["row_length"]})
    run.end()
    return run.run_id
