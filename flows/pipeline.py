"""The whole workflow as one cached DAG, in the order of the seed README's sections:

    dataset preparation ─┐
    weight conversion ───┴─> training ─> merge ─> evaluate the base and the finetuned model ─> register
                                                  (perplexity, both conventions; SQuAD EM/F1; samples)

Each evaluation runs on the base and then on the finetuned model, one after the other, so the second reuses
the first's model and compiled graphs (llama.eval.loading: for a 30-layer model, tens of seconds a graph).

Every stage is a cached task (tasks/): a rerun with nothing changed executes none, and a changed setting
reruns exactly the stages after it (a new learning rate reruns training and the finetuned model's
evaluations, never the base model's). Each flow run is one MLflow parent run with a nested run per stage;
the parent carries every metric as `base.<name>` and `finetuned.<name>`, plus `delta.<name>` (finetuned
less base), so runs compare side by side.

    llama2-pipeline run --config configs/pipeline/demo.yaml [key.path=value ...]
"""

from __future__ import annotations

import json
import subprocess

from prefect import allow_failure, flow, runtime
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.common import Inputs, outcome
from flows.prepare_data import prepare_data
from llama.config.loader import CONFIG_ROOT, as_overrides, config_file, resolve_path
from llama.config.pipeline import check_pipeline_config
from llama.config.train import load_train_config
from llama.errors import PipelineError
from tasks import evaluate, model, train
from tasks.cache import code_version
from tasks.tracking import Run


def _code_tags() -> dict[str, str]:
    """The code version: the digest of every stage's source (tasks and the library), and the git commit when
    there is one."""
    tags = {"code_version": code_version("tasks.data", "tasks.model", "tasks.train", "tasks.evaluate")[:16]}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=CONFIG_ROOT.parent, capture_output=True, text=True, check=True)
        tags["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return tags


class Stages:
    """The MLflow side of a flow run: the parent run, and a nested run per stage."""

    def __init__(self, name: str, settings: dict):
        # named after the Prefect flow run ("demo: witty-lynx"), so runs are told apart in MLflow's charts and
        # comparisons, and each leads to its Prefect run by name as by the id tag
        flow_run = runtime.flow_run
        self.parent = Run.start(f"{name}: {flow_run.name}" if flow_run.name else name, tags={
            "pipeline": name, "prefect_flow_run_id": str(flow_run.id or ""),
            "prefect_flow_run_name": str(flow_run.name or ""), **_code_tags()})
        self.parent.log_params(settings)
        self.outcomes: dict[str, str] = {}

    def note(self, outcomes: dict[str, str]) -> None:
        """Record tasks' outcomes; a task that ran anywhere in this flow run counts as ran (a source is
        downloaded once, then found in the cache by the next stage that needs it)."""
        for task_name, how in outcomes.items():
            if self.outcomes.get(task_name) != "ran":
                self.outcomes[task_name] = how

    def start(self, stage: str, tags: dict[str, str] | None = None) -> Run:
        return Run.start(stage, parent=self.parent, tags={"stage": stage, **(tags or {})})

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


MODELS = ("base", "finetuned")  # the converted weights; the trained, merged model


@flow(name="llama2-pipeline", log_prints=True)
def pipeline(config: str = "configs/pipeline/demo.yaml", overrides: list[str] | None = None,
             work_dir: str = "work", mirror: str | None = None) -> dict:
    """Prepare data, convert weights, evaluate, train, merge, evaluate again and register, as the config says."""
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
    table = comparison(result["metrics"])
    create_markdown_artifact("| metric | base | finetuned | change |\n|---|---|---|---|\n" + "".join(
        f"| {metric} | {_number(before)} | {_number(after)} | {_number(change, sign=True)} |\n"
        for metric, before, after, change in table), key="pipeline-metrics", description=f"{name}: evaluation metrics")
    print(f"{'metric':>32} {'base':>12} {'finetuned':>12} {'change':>12}")
    for metric, before, after, change in table:
        print(f"{metric:>32} {_number(before):>12} {_number(after):>12} {_number(change, sign=True):>12}")
    return result


def comparison(metrics: dict[str, float]) -> list[tuple[str, float | None, float | None, float | None]]:
    """(metric, base, finetuned, change) for every evaluation metric of a pipeline result, in name order."""
    names = sorted({key.split(".", 1)[1] for key in metrics if key.startswith(tuple(f"{m}." for m in MODELS))})
    return [(name, metrics.get(f"base.{name}"), metrics.get(f"finetuned.{name}"), metrics.get(f"delta.{name}"))
            for name in names]


def _number(value: float | None, sign: bool = False) -> str:
    return "-" if value is None else f"{value:+.4f}" if sign else f"{value:.4f}"


def _run(settings: dict, base, work_dir: str, mirror: str | None, stages: Stages) -> dict:
    resolve = Inputs(settings, base, work_dir, mirror)
    model_settings, train_settings = settings["model"], settings.get("train")
    tokenizer = resolve(model_settings["tokenizer"]) if model_settings.get("tokenizer") else None

    # Weight conversion starts while the data flow runs, unless the data needs the tokenizer the weights
    # bring (a GGUF file carries its own): then the records are tokenized with the converted one.
    convert_run = stages.start("convert")
    converted = model.convert.submit(resolve(model_settings["weights"]), work_dir, model_settings.get("format", "ckpt"),
                                     model_settings.get("dtype"), tokenizer,
                                     _model_config_file(model_settings.get("model_config"), base))

    def finish_convert() -> dict:
        return stages.finish("convert", convert_run, converted, lambda run, result, _: run.log_params(result))

    base_checkpoint = data_tokenizer = None
    if tokenizer is None:
        base_checkpoint = finish_convert()
        tokenizer = data_tokenizer = base_checkpoint["tokenizer"]
        if tokenizer is None:
            raise PipelineError(f"{model_settings['weights']} carries no tokenizer: set model.tokenizer")
    data = prepare_data(config=str(resolve_path(settings["data"], base)), work_dir=work_dir, mirror=mirror,
                        parent_run_id=stages.parent.run_id, tokenizer=data_tokenizer)
    stages.note(data["tasks"])
    datasets = data["datasets"]
    base_checkpoint = base_checkpoint or finish_convert()
    evaluation = Evaluation(settings.get("evaluate") or {}, datasets, resolve, work_dir, stages)
    checkpoint, trained, recipe_name, adapter = base_checkpoint["checkpoint"], {}, None, None
    if train_settings:
        if train_settings["dataset"] not in datasets:
            raise PipelineError(f"train.dataset {train_settings['dataset']!r} is not a dataset of {settings['data']}")
        recipe = resolve_path(train_settings["recipe"], base)
        recipe_name = recipe.stem
        train_config = load_train_config(recipe, as_overrides(train_settings.get("set") or {})).to_dict()
        train_run = stages.start("train")
        train_run.log_params({"recipe": recipe.name, **train_config})
        train_run.log_dataset(train_settings["dataset"], datasets[train_settings["dataset"]]["output"], "training")
        trained = stages.finish("train", train_run, train.train.submit(
            recipe_name, train_config, datasets[train_settings["dataset"]]["output"], checkpoint, work_dir,
            train_run.run_id), lambda run, result, how: train.log_training(run, result, how == "cached"))
        if train_config["pet"]["type"] == "prefix":   # no weights to merge: evaluations load it beside its base
            adapter = trained["output_dir"]
        else:
            merge_run = stages.start("merge")
            checkpoint = stages.finish("merge", merge_run, train.merge.submit(
                trained["output_dir"], base_checkpoint["checkpoint"], tokenizer, work_dir,
                settings.get("merge", {}).get("format", "ckpt")))["checkpoint"]

    evaluation.submit({"base": (base_checkpoint["checkpoint"], None),
                       **({"finetuned": (checkpoint, adapter)} if train_settings else {})})
    results = evaluation.collect()
    metrics = {f"{name}.{key}": value for name, values in results.items() for key, value in values.items()}
    if len(results) == len(MODELS):
        metrics.update({f"delta.{key}": value - results["base"][key]
                        for key, value in results["finetuned"].items() if key in results["base"]})
    metrics.update({f"train_{k}": trained[k] for k in ("first_loss", "final_loss") if trained.get(k) is not None})

    # Register the final model with its own metrics.
    registered = None
    if settings.get("register"):
        register_run = stages.start("register")
        registered = stages.finish("register", register_run, model.register.submit(
            checkpoint, settings["register"]["model_name"], results.get("finetuned" if trained else "base", {}),
            register_run.run_id, {"pipeline": settings.get("name", "pipeline"), "train_recipe": recipe_name or "none",
                                  **({"adapter": adapter} if adapter else {})}))
    stages.note(resolve.outcomes())
    return {"metrics": metrics, "checkpoint": checkpoint, "registered": registered}


def _model_config_file(value: str | None, base) -> str | None:
    """A model config for weights that carry none: a file next to the config, or a name in configs/model."""
    if value is None:
        return None
    path = resolve_path(value, base)
    return str(path if path.exists() else config_file(value, "model"))


EVALUATION_METRICS = ("ppl_", "squad_", "word_", "byte_")


class Evaluation:
    """The `evaluate` section, run on each model: perplexity per convention, SQuAD and samples, each an MLflow
    stage run named `<evaluation>-<model>` and tagged with the model. An evaluation block may list the
    `models` it runs on (default: all)."""

    def __init__(self, settings: dict, datasets: dict, resolve: Inputs, work_dir: str, stages: Stages):
        self.settings, self.datasets, self.resolve = settings, datasets, resolve
        self.work_dir, self.stages = work_dir, stages
        self.jobs: list[tuple] = []  # (model, stage, MLflow run, future, log)

    def _data(self, value: str):
        return self.datasets[value]["output"] if value in self.datasets else self.resolve(value)

    def _blocks(self):
        """(evaluation, options, models it runs on) of every configured evaluation."""
        blocks = [(f"perplexity-{convention}", options)
                  for convention, options in (self.settings.get("perplexity") or {}).items()]
        blocks += [(kind, self.settings[kind]) for kind in ("squad", "samples") if self.settings.get(kind)]
        for evaluation, options in blocks:
            options = dict(options)
            yield evaluation, options, options.pop("models", MODELS)

    def submit(self, models: dict[str, tuple[str, str | None]]) -> None:
        """Start every evaluation of the models (name: (checkpoint, unmerged prefix `adapter` run or None)),
        each evaluation on every model in turn: a task waits for the one before it, whatever its outcome."""
        previous = None
        for evaluation, options, runs_on in self._blocks():
            for model_name, (checkpoint, adapter) in models.items():
                if model_name not in runs_on:
                    continue
                stage = f"{evaluation}-{model_name}"
                run = self.stages.start(stage, {"evaluation": evaluation, "model": model_name})
                if options.get("data") in self.datasets:   # prepared records (a raw source is still downloading)
                    run.log_dataset(options["data"], self._data(options["data"]), "evaluation")
                wait_for = [allow_failure(previous)] if previous is not None else None
                future, log = self._start(evaluation, checkpoint, adapter, dict(options), stage, wait_for)
                self.jobs.append((model_name, stage, run, future, log))
                previous = future

    def _start(self, evaluation: str, checkpoint: str, adapter: str | None, options: dict, stage: str, wait_for):
        """The future of one evaluation's task, and how its result is logged: `log(run, result, outcome)`."""
        named = {"task_run_name": stage}
        if evaluation == "samples":
            prompts = options.pop("prompts")
            return (evaluate.samples.with_options(**named).submit(checkpoint, prompts, options, self.work_dir,
                                                                  adapter, wait_for=wait_for),
                    lambda run, result, _: evaluate.log_samples(run, result))
        dataset = options.pop("data")
        if evaluation == "squad":
            return (evaluate.squad.with_options(**named).submit(checkpoint, self._data(dataset), options,
                                                                self.work_dir, adapter, wait_for=wait_for),
                    lambda run, result, _: evaluate.log_squad(run, result, dataset))
        convention = evaluation.removeprefix("perplexity-")
        return (evaluate.perplexity.with_options(**named).submit(checkpoint, self._data(dataset), convention, options,
                                                                 self.work_dir, adapter, wait_for=wait_for),
                lambda run, result, _: evaluate.log_perplexity(run, result, dataset))

    def collect(self) -> dict[str, dict[str, float]]:
        """Wait for every evaluation and log it; the metrics of each model, by model."""
        metrics: dict[str, dict[str, float]] = {}
        for model_name, stage, run, future, log in self.jobs:
            result = self.stages.finish(stage, run, future, log)
            metrics.setdefault(model_name, {}).update(
                {k: v for k, v in result.items() if isinstance(v, float) and k.startswith(EVALUATION_METRICS)})
        return metrics
