"""Prepare data: download the sources, tokenize each dataset and write verified MindRecord files.

The seed README's "Dataset preparation" section as one flow: WikiText-2 (pretraining and perplexity),
Alpaca (finetuning) and SQuAD 1.1 (reading comprehension) run concurrently, every step a cached task.

    llama2-pipeline prepare-data --config configs/data/tiny.yaml
"""

from __future__ import annotations

from prefect import flow

from flows.common import Inputs, outcome
from llama.config.pipeline import load_flow_config
from llama.errors import PipelineError
from tasks.data import preprocess, record_prepared_data

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
    run_id = record_prepared_data(settings, results, parent_run_id)
    for name, summary in results.items():
        print(f"{name}: {summary['rows']} rows → {summary['output']} ({tasks[f'preprocess-{name}']})")
    return {"datasets": results, "tasks": tasks, "mlflow_run_id": run_id}
