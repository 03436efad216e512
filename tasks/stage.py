"""A pipeline stage: a cached task run inside the stage's own MLflow run, nested under the pipeline's run.

    convert_weights = stage_task(convert, log=lambda run, result, cached: run.log_params(result))
    result = convert_weights.submit("convert", parent_run_id, {"source": ..., "work_dir": ...}).result()

The stage task opens the run, logs what the stage is given (`params`, and `inputs`: the datasets it reads, in
the stage's `context`), then calls the cached task: a rerun with nothing changed takes its result from
Prefect's cache, and the run still records it, tagged `cached`. `log(run, result, cached)` records the result.
A cached task with a `run_id` parameter gets the stage run's id, to log to it while it works (training's
steps, the registered model); `run_id` is never part of a cache key. Each stage also leaves a table artifact in
Prefect, and its result carries `outcome`: "ran" or "cached".
"""

from __future__ import annotations

import inspect
import json
from typing import Callable

from prefect import Task, task
from prefect.artifacts import create_table_artifact

from tasks.tracking import Run

Log = Callable[[Run, dict, bool], None]


def stage_task(work: Task, log: Log | None = None, context: str | None = None) -> Task:
    """`work` as a stage that owns its MLflow run (see the module docstring); `context` says what the stage
    does with its `inputs` ("training", "evaluation")."""
    takes_run_id = "run_id" in inspect.signature(work.fn).parameters

    @task(name=f"{work.name}-stage", task_run_name="{stage}")
    def run_stage(stage: str, parent_run_id: str, arguments: dict, params: dict | None = None,
                  tags: dict[str, str] | None = None, inputs: dict[str, str] | None = None) -> dict:
        run = Run.start(stage, parent=parent_run_id, tags={"stage": stage, **(tags or {})})
        try:
            if params:
                run.log_params(params)
            for name, path in (inputs or {}).items():
                run.log_dataset(name, path, context)
            own_run = {"run_id": run.run_id} if takes_run_id else {}
            state = work(**arguments, **own_run, return_state=True)   # under its own run name, nested in `stage`
            result = state.result()
            cached = state.name == "Cached"
            if log is not None:
                log(run, result, cached)
        except BaseException:
            run.end("FAILED")
            raise
        run.set_tags({"cached": cached})
        run.end()
        outcome = "cached" if cached else "ran"
        _summarize_in_prefect(stage, outcome, result)
        return {**result, "outcome": outcome}

    return run_stage


def _summarize_in_prefect(stage: str, outcome: str, result: dict) -> None:
    """A table artifact per stage, so the Prefect UI shows what each stage produced."""
    rows = [{"key": key, "value": json.dumps(value) if isinstance(value, (dict, list)) else str(value)}
            for key, value in result.items() if not isinstance(value, (dict, list)) or len(str(value)) < 200]
    create_table_artifact([{"key": "outcome", "value": outcome}, *rows], key=f"stage-{stage}".lower().replace("_", "-"),
                          description=f"{stage}: {outcome}")
