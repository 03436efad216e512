"""Prefect tasks for the data stages: download a source, tokenize a dataset into MindRecord, and the data
stage's MLflow run."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from llama import download
from llama.data import alpaca, records, squad, wiki
from llama.errors import PipelineError
from llama.fileio import MANIFEST
from tasks.cache import CachedStage, content_digest, forget_cached_result, verified_by
from tasks.tracking import Run

PREPROCESSORS = {
    "wiki": (wiki.preprocess_wiki, "seq_length"),
    "alpaca": (alpaca.preprocess_alpaca, "seq_length"),
    "squad": (squad.preprocess_squad, "max_length"),
}


def _cached_download_intact(source: download.Source, cache_dir: str) -> bool:
    path = download.cached_path(source, cache_dir)
    if not path.is_file():
        return False
    actual = content_digest(path) if source.algo == "sha256" else download.git_blob_id(path)
    return actual == source.digest


def _download_key(context, parameters: dict) -> str:
    """A download is named by the digest it must have; the key misses when the cached copy is gone or damaged."""
    source: download.Source = parameters["source"]
    key = f"download-{source.algo}-{source.digest}"
    if not _cached_download_intact(source, parameters["cache_dir"]):
        forget_cached_result(key)
    return key


@task(name="download", cache_key_fn=_download_key, persist_result=True, retries=2, retry_delay_seconds=5,
      task_run_name="download-{source.name}")
def download_source(source: download.Source, cache_dir: str, mirror: str | None = None) -> str:
    """Fetch one source into the content-addressed cache (checksum verified); return its path."""
    return str(download.fetch(source, cache_dir, mirror=mirror, progress=False))


PREPROCESS = CachedStage("records", calls=tuple(run.__module__ for run, _ in PREPROCESSORS.values()),
                         file_params=("input", "tokenizer"), ignore=("work_dir", "name"),
                         outputs_valid=verified_by(records.verify))


@task(name="preprocess", cache_key_fn=PREPROCESS.cache_key_fn, persist_result=True,
      task_run_name="preprocess-{name}")
@PREPROCESS.exclusive
def preprocess(name: str, kind: str, input: str, tokenizer: str, settings: dict, work_dir: str) -> dict:
    """Tokenize one dataset into a verified MindRecord folder named by its cache key; return its summary."""
    out = PREPROCESS.output_dir(locals())
    if kind not in PREPROCESSORS:
        raise PipelineError(f"dataset {name}: unknown kind {kind!r} (choose from {', '.join(PREPROCESSORS)})")
    run, length_key = PREPROCESSORS[kind]
    options = dict(settings)
    if length_key not in options:
        raise PipelineError(f"dataset {name}: {kind} needs {length_key}")
    length = options.pop(length_key)
    run(input, tokenizer, length, out, overwrite=True, **options)
    return {"name": name, **records.summarize(out, records.verify(out))}


@task(name="record-prepared-data", task_run_name="prepare-data")
def record_prepared_data(settings: dict, results: dict, parent_run_id: str | None) -> str:
    """The data stage's MLflow run (nested under the pipeline's run when there is one): its config, rows per
    dataset, each records manifest, and one input per dataset; returns the run's id."""
    run = Run.start("prepare-data", parent=parent_run_id, tags={"stage": "prepare-data"})
    try:
        run.log_params({"data": settings})
        for name, summary in results.items():
            run.log_metrics({f"{name}.rows": summary["rows"], f"{name}.dropped": summary.get("dropped", 0),
                             f"{name}.truncated": summary.get("truncated", 0)})
            run.log_artifact(Path(summary["output"]) / MANIFEST, f"manifests/{name}")
            run.log_dataset(name, summary["output"], context="prepared",
                            profile={"rows": summary["rows"], "row_length": summary["row_length"]})
    except BaseException:
        run.end("FAILED")
        raise
    run.end()
    return run.run_id
