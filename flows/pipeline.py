"""The whole workflow as one cached DAG, in the order of the seed README's sections:

    dataset preparation ─┐
    weight conversion ───┴─> training ─> merge ─┬─> perplexity (mindformers)  ─┐
                                                ├─> perplexity (standard)      ├─> register
                                                ├─> SQuAD EM/F1                │
                                                └─> sample generations ────────┘

Every stage is a cached task (tasks/): a rerun with nothing changed executes none, and a changed setting
reruns exactly the stages after it. Each flow run is one MLflow parent run with a nested run per stage.

    llama2-pipeline run --config configs/pipeline/demo.yaml [key.path=value ...]
"""

from __future__ import annotations

import json
import subprocess

from prefect import flow, runtime
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.common import REPO, Inputs, outcome
from flows.prepare_data import prepare_data
from llama.config import CONFIG_DIR
from llama.errors import PipelineError
from llama.pipeline_config import check_pipeline_config
from llama.train.config import load_train_config
from llama.yamlconfig import as_overrides, resolve_path
from tasks import evaluate, model, train
from tasks.cache import code_version
from tasks.tracking import Run


def _code_tags() -> dict[str, str]:
    """The code version: the library's source digest, and the git commit when there is one."""
    tags = {"code_version": code_version("tasks.train")[:16]}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        tags["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return tags


class Stages:
    """The MLflow side of a flow run: the parent run, and a nested run per stage."""

    def __init__(self, name: str, settings: dict):
        self.parent = Run.start(f"pipeline:{name}", tags={
            "pipeline": name, "prefect_flow_run_id": str(runtime.flow_run.id or ""), **_code_tags()})
        self.parent.log_params(settings)
        self.outcomes: dict[str, str] = {}

    def note(self, outcomes: dict[str, str]) -> None:
        """Record tasks' outcomes; a task that ran anywhere in this flow run counts as ran (a source is
        downloaded once, then found in the cache by the next stage that needs it)."""
        for task_name, how in outcomes.items():
            if self.outcomes.get(task_name) != "ran":
                self.outcomes[task_name] = how

    def start(self, stage: str) -> Run:
        return Run.start(stage, parent=self.parent, tags={"stage": stage})

    def finish(self, stage: str, run: Run, future, log=None) -> dict:
        """Wait for a stage's task, note whether it ran or came from cache, `log(run, result, outcome)`, close
        the stage's run."""
        try:
            result = future.result()
            self.note({stage: outcome(future)})
            if log is not None:
                log(run, result, self.outcomes[stage])
        except BaseException:
            run.end("FAILED")
            raise
        run.set_tags({"cached": self.outcomes[stage] == "cached"})
        run.end()
        _summarize_in_prefect(stage, self.outcomes[stage], result)
        return result


def _summarize_in_prefect(stage: str, how: str, result: dict) -> None:
    """A table artifact per stage, so the Prefect UI shows what each stage produced."""
    rows = [{"key": key, "value": json.dumps(value) if isinstance(value, (dict, list)) else str(value)}
            for key, value in result.items() if not isinstance(value, (dict, list)) or len(str(value)) < 200]
    create_table_artifact([{"key": "outcome", "value": how}, *rows], key=f"stage-{stage}".lower().replace("_", "-"),
                          description=f"{stage}: {how}")


@flow(name="llama2-pipeline", log_prints=True)
def pipeline(config: str = "configs/pipeline/demo.yaml", overrides: list[str] | None = None,
             work_dir: str = "work", mirror: str | None = None) -> dict:
    """Prepare data, convert weights, train, merge, evaluate and register, as the config says."""
    settings, base = check_pipeline_config(config, overrides)
    name = settings.get("name", "pipeline")
    stages = Stages(name, settings)
    try:
        result = _run(settings, base, work_dir, mirror, stages)
    except BaseException:
        stages.parent.end("FAILED")
        raise
    stages.parent.log_metrics(result["metrics"])
    stages.parent.end()
    result.update(mlflow_run_id=stages.parent.run_id, tasks=stages.outcomes)
    create_markdown_artifact("| metric | value |\n|---|---|\n" + "".join(
        f"| {key} | {value:.4f} |\n" for key, value in sorted(result["metrics"].items())),
        key="pipeline-metrics", description=f"{name}: evaluation metrics")
    for key, value in sorted(result["metrics"].items()):
        print(f"{key:>32} {value:.4f}")
    return result


def _run(settings: dict, base, work_dir: str, mirror: str | None, stages: Stages) -> dict:
    resolve = Inputs(settings, base, work_dir, mirror)
    model_settings, train_settings = settings["model"], settings.get("train")
    tokenizer = resolve(model_settings["tokenizer"]) if model_settings.get("tokenizer") else None

    # Weight conversion starts while the data flow runs.
    convert_run = stages.start("convert")
    converted = model.convert.submit(resolve(model_settings["weights"]), work_dir, model_settings.get("format", "ckpt"),
                                     model_settings.get("dtype"), tokenizer,
                                     _model_config_file(model_settings.get("model_config"), base))
    data = prepare_data(config=str(resolve_path(settings["data"], base)), work_dir=work_dir, mirror=mirror,
                        parent_run_id=stages.parent.run_id)
    stages.note(data["tasks"])
    datasets = data["datasets"]
    base_checkpoint = stages.finish("convert", convert_run, converted, lambda run, result, _: run.log_params(result))

    # Training and merging (a config without `train` evaluates the converted weights as they are). A prefix
    # adapter has no weights to merge: the evaluations load it beside its base.
    checkpoint, trained, recipe_name, adapter = base_checkpoint["checkpoint"], {}, None, None
    if train_settings:
        if train_settings["dataset"] not in datasets:
            raise PipelineError(f"train.dataset {train_settings['dataset']!r} is not a dataset of {settings['data']}")
        recipe = resolve_path(train_settings["recipe"], base)
        recipe_name = recipe.stem
        train_config = load_train_config(recipe, as_overrides(train_settings.get("set") or {})).to_dict()
        train_run = stages.start("train")
        train_run.log_params({"recipe": recipe.name, **train_config})
        trained = stages.finish("train", train_run, train.train.submit(
            recipe_name, train_config, datasets[train_settings["dataset"]]["output"], checkpoint, work_dir,
            train_run.run_id), lambda run, result, how: train.log_training(run, result, how == "cached"))
        if train_config["pet"]["type"] == "prefix":
            adapter = trained["output_dir"]
        else:
            merge_run = stages.start("merge")
            checkpoint = stages.finish("merge", merge_run, train.merge.submit(
                trained["output_dir"], base_checkpoint["checkpoint"], tokenizer, work_dir,
                settings.get("merge", {}).get("format", "ckpt")))["checkpoint"]

    # Evaluation, every part concurrently.
    metrics = _evaluate(settings.get("evaluate") or {}, checkpoint, adapter, datasets, resolve, work_dir, stages)
    metrics.update({f"train_{k}": trained[k] for k in ("first_loss", "final_loss") if trained.get(k) is not None})

    # Register the merged model with its metrics.
    registered = None
    if settings.get("register"):
        register_run = stages.start("register")
        registered = stages.finish("register", register_run, model.register.submit(
            checkpoint, settings["register"]["model_name"], metrics, register_run.run_id,
            {"pipeline": settings.get("name", "pipeline"), "train_recipe": recipe_name or "none",
             **({"adapter": adapter} if adapter else {})}))
    stages.note(resolve.outcomes())
    return {"metrics": metrics, "checkpoint": checkpoint, "registered": registered}


def _model_config_file(value: str | None, base) -> str | None:
    """A model config for weights that carry none: a file next to the config, or a name in configs/model."""
    if value is None:
        return None
    path = resolve_path(value, base)
    return str(path if path.exists() else CONFIG_DIR / f"{value}.yaml")


def _evaluate(settings: dict, checkpoint: str, adapter: str | None, datasets: dict, resolve: Inputs,
              work_dir: str, stages: Stages) -> dict:
    """Submit every evaluation (of `checkpoint`, with the prefix `adapter` run if one is given), then log each
    as it is collected; return all metrics."""

    def data_of(value: str):
        return datasets[value]["output"] if value in datasets else resolve(value)

    jobs = []
    for convention, options in (settings.get("perplexity") or {}).items():
        options = dict(options)
        dataset = options.pop("data")
        run = stages.start(f"perplexity-{convention}")
        future = evaluate.perplexity.submit(checkpoint, data_of(dataset), convention, options, work_dir, adapter)
        jobs.append((f"perplexity-{convention}", run, future,
                     lambda r, result, _, d=dataset: evaluate.log_perplexity(r, result, d)))
    if settings.get("squad"):
        options = dict(settings["squad"])
        dataset = options.pop("data")
        run = stages.start("squad")
        future = evaluate.squad.submit(checkpoint, data_of(dataset), options, work_dir, adapter)
        jobs.append(("squad", run, future, lambda r, result, _, d=dataset: evaluate.log_squad(r, result, d)))
    if settings.get("samples"):
        options = dict(settings["samples"])
        prompts = options.pop("prompts")
        run = stages.start("samples")
        future = evaluate.samples.submit(checkpoint, prompts, options, work_dir, adapter)
        jobs.append(("samples", run, future, lambda r, result, _: evaluate.log_samples(r, result)))

    metrics: dict[str, float] = {}
    for stage, run, future, log in jobs:
        result = stages.finish(stage, run, future, log)
        metrics.update({k: v for k, v in result.items()
                        if isinstance(v, float) and k.startswith(("ppl_", "squad_", "word_", "byte_"))})
    return metrics
