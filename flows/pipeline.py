"""The whole workflow as one cached DAG, in the order of the seed README's sections:

    dataset preparation ─┐
    weight conversion ───┴─> training ─> merge ─> evaluate the base and the finetuned model ─> register
                                                  (perplexity, both conventions; SQuAD EM/F1; samples)

Each evaluation runs on the base and then on the finetuned model, one after the other, so the second reuses
the first's model and compiled graphs (llama.eval.loading: for a 30-layer model, tens of seconds a graph).

Every stage is a task that owns its MLflow run, nested under the flow run's, around a cached task
(tasks/stage.py): a rerun with nothing changed executes none, and a changed setting reruns exactly the
stages after it (a new learning rate reruns training and the finetuned model's evaluations, never the base
model's). The parent run carries every metric as `base.<name>` and `finetuned.<name>`, plus `delta.<name>`
(finetuned less base), so runs compare side by side.

    llama2-pipeline run --config configs/pipeline/demo.yaml [key.path=value ...]
"""

from __future__ import annotations

import subprocess

from prefect import allow_failure, flow, runtime
from prefect.artifacts import create_markdown_artifact

from flows.common import Inputs
from flows.prepare_data import prepare_data
from llama.config.loader import CONFIG_ROOT, as_overrides, config_file, resolve_path
from llama.config.pipeline import check_pipeline_config
from llama.config.train import load_train_config
from llama.errors import PipelineError
from tasks import evaluate, model, train
from tasks.cache import code_version
from tasks.tracking import Run, run_address


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


def _start_parent_run(name: str, settings: dict) -> Run:
    """The flow run's MLflow run, named after the Prefect flow run ("demo: witty-lynx") so runs are told apart
    in MLflow's charts and comparisons, each leading to its Prefect run by name as by the id tag."""
    flow_run = runtime.flow_run
    parent = Run.start(f"{name}: {flow_run.name}" if flow_run.name else name, tags={
        "pipeline": name, "prefect_flow_run_id": str(flow_run.id or ""),
        "prefect_flow_run_name": str(flow_run.name or ""), **_code_tags()})
    parent.log_params(settings)
    return parent


MODELS = ("base", "finetuned")  # the converted weights; the trained, merged model


@flow(name="llama2-pipeline", log_prints=True)
def pipeline(config: str = "configs/pipeline/demo.yaml", overrides: list[str] | None = None,
             work_dir: str = "work", mirror: str | None = None) -> dict:
    """Prepare data, convert weights, evaluate, train, merge, evaluate again and register, as the config says."""
    settings, base = check_pipeline_config(config, overrides)
    name = settings.get("name", "pipeline")
    parent = _start_parent_run(name, settings)
    try:
        result = _run(settings, base, work_dir, mirror, parent.run_id)
    except BaseException:
        parent.end("FAILED")
        raise
    parent.log_metrics(result["metrics"])
    parent.end()
    result["mlflow_run_id"] = parent.run_id
    table = comparison(result["metrics"])
    # the way back from the Prefect flow run to its MLflow run (which names the flow run in its tags)
    create_markdown_artifact(f"MLflow: {run_address(parent)}\n\n| metric | base | finetuned | change |\n"
                             "|---|---|---|---|\n" + "".join(
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


def _run(settings: dict, base, work_dir: str, mirror: str | None, parent: str) -> dict:
    """The seed README's sections in order, each a stage task that owns its MLflow run under `parent`."""
    resolve = Inputs(settings, base, work_dir, mirror)
    model_settings, train_settings = settings["model"], settings.get("train")
    tokenizer = resolve(model_settings["tokenizer"]) if model_settings.get("tokenizer") else None
    outcomes: dict[str, str] = {}

    def note(more: dict[str, str]) -> None:
        """Tasks' outcomes; one that ran anywhere in this flow run counts as ran (a source is downloaded once,
        then found in the cache by the next stage that needs it)."""
        outcomes.update({name: how for name, how in more.items() if outcomes.get(name) != "ran"})

    def finished(stage: str, future) -> dict:
        result = future.result()
        note({stage: result["outcome"]})
        return result

    # Weight conversion: runs while the data is prepared, unless the data needs the tokenizer the weights
    # bring (a GGUF file carries its own): then the records are tokenized with the converted one.
    converting = model.convert_stage.submit("convert", parent, {
        "source": resolve(model_settings["weights"]), "work_dir": work_dir, "fmt": model_settings.get("format", "ckpt"),
        "dtype": model_settings.get("dtype"), "tokenizer": tokenizer,
        "model_config": _model_config_file(model_settings.get("model_config"), base)})
    converted = data_tokenizer = None
    if tokenizer is None:
        converted = finished("convert", converting)
        tokenizer = data_tokenizer = converted["tokenizer"]
        if tokenizer is None:
            raise PipelineError(f"{model_settings['weights']} carries no tokenizer: set model.tokenizer")

    # Dataset preparation
    data = prepare_data(config=str(resolve_path(settings["data"], base)), work_dir=work_dir, mirror=mirror,
                        parent_run_id=parent, tokenizer=data_tokenizer)
    note(data["tasks"])
    datasets = {name: summary["output"] for name, summary in data["datasets"].items()}
    converted = converted or finished("convert", converting)
    checkpoint, adapter, trained, recipe_name = converted["checkpoint"], None, {}, None

    # Training, then merging the trained weights into one checkpoint (prefix tuning has no weights to merge:
    # evaluations load its run beside the base)
    if train_settings:
        recipe = resolve_path(train_settings["recipe"], base)
        recipe_name = recipe.stem
        train_config = load_train_config(recipe, as_overrides(train_settings.get("set") or {})).to_dict()
        dataset = train_settings["dataset"]
        trained = finished("train", train.train_stage.submit(
            "train", parent, {"recipe_name": recipe_name, "config": train_config, "data": datasets[dataset],
                              "base": checkpoint, "work_dir": work_dir},
            params={"recipe": recipe.name, **train_config}, inputs={dataset: datasets[dataset]}))
        if train_config["pet"]["type"] == "prefix":
            adapter = trained["output_dir"]
        else:
            checkpoint = finished("merge", train.merge_stage.submit("merge", parent, {
                "run_dir": trained["output_dir"], "base": converted["checkpoint"], "tokenizer": tokenizer,
                "work_dir": work_dir, "fmt": settings.get("merge", {}).get("format", "ckpt")}))["checkpoint"]

    # Evaluation of the base and the finetuned model
    evaluation = Evaluation(settings.get("evaluate") or {}, datasets, resolve, work_dir, parent)
    results = evaluation.run({"base": (converted["checkpoint"], None),
                              **({"finetuned": (checkpoint, adapter)} if train_settings else {})})
    note(evaluation.outcomes)
    metrics = {f"{name}.{key}": value for name, values in results.items() for key, value in values.items()}
    if len(results) == len(MODELS):
        metrics.update({f"delta.{key}": value - results["base"][key]
                        for key, value in results["finetuned"].items() if key in results["base"]})
    metrics.update({f"train_{k}": trained[k] for k in ("first_loss", "final_loss") if trained.get(k) is not None})

    # Register the final model with its own metrics
    registered = None
    if settings.get("register"):
        registered = finished("register", model.register_stage.submit("register", parent, {
            "checkpoint": checkpoint, "name": settings["register"]["model_name"],
            "metrics": results.get("finetuned" if trained else "base", {}),
            "tags": {"pipeline": settings.get("name", "pipeline"), "train_recipe": recipe_name or "none",
                     **({"adapter": adapter} if adapter else {})}}))
    note(resolve.outcomes())
    return {"metrics": metrics, "checkpoint": checkpoint, "registered": registered, "tasks": outcomes}


def _model_config_file(value: str | None, base) -> str | None:
    """A model config for weights that carry none: a file next to the config, or a name in configs/model."""
    if value is None:
        return None
    path = resolve_path(value, base)
    return str(path if path.exists() else config_file(value, "model"))


EVALUATION_METRICS = ("ppl_", "squad_", "word_", "byte_")


class Evaluation:
    """The `evaluate` section, run on each model: perplexity per convention, SQuAD and samples, each a stage
    named `<evaluation>-<model>` and tagged with the model. An evaluation block may list the `models` it runs
    on (default: all)."""

    STAGES = {"perplexity": evaluate.perplexity_stage, "squad": evaluate.squad_stage, "samples": evaluate.samples_stage}

    def __init__(self, settings: dict, datasets: dict[str, str], resolve: Inputs, work_dir: str, parent: str):
        self.settings, self.datasets, self.resolve = settings, datasets, resolve
        self.work_dir, self.parent = work_dir, parent
        self.outcomes: dict[str, str] = {}

    def _blocks(self):
        """(evaluation, its stage task, options, models it runs on) of every configured evaluation."""
        blocks = [(f"perplexity-{convention}", "perplexity", {**options, "convention": convention})
                  for convention, options in (self.settings.get("perplexity") or {}).items()]
        blocks += [(kind, kind, self.settings[kind]) for kind in ("squad", "samples") if self.settings.get(kind)]
        for evaluation, kind, options in blocks:
            options = dict(options)
            yield evaluation, kind, options, options.pop("models", MODELS)

    def _arguments(self, kind: str, options: dict, checkpoint: str, adapter: str | None) -> tuple[dict, dict]:
        """The stage task's arguments, and the datasets it reads (name: path)."""
        arguments = {"checkpoint": checkpoint, "work_dir": self.work_dir, "adapter": adapter}
        if kind == "samples":
            return {**arguments, "prompts": options.pop("prompts"), "settings": options}, {}
        dataset = options.pop("data")
        if kind == "perplexity":
            arguments["convention"] = options.pop("convention")
        if dataset in self.datasets:   # prepared records
            return {**arguments, "data": self.datasets[dataset], "settings": options}, {dataset: self.datasets[dataset]}
        return {**arguments, "data": self.resolve(dataset), "settings": options}, {}

    def run(self, models: dict[str, tuple[str, str | None]]) -> dict[str, dict[str, float]]:
        """Every evaluation of the models (name: (checkpoint, unmerged prefix `adapter` run or None)), each
        evaluation on every model in turn, one at a time (a task waits for the one before it, whatever its
        outcome, so the second model reuses the first's compiled graphs); the metrics of each model."""
        jobs, previous = [], None
        for evaluation, kind, options, runs_on in self._blocks():
            for model_name, (checkpoint, adapter) in models.items():
                if model_name not in runs_on:
                    continue
                stage = f"{evaluation}-{model_name}"
                arguments, inputs = self._arguments(kind, dict(options), checkpoint, adapter)
                tags = {"evaluation": evaluation, "model": model_name,
                        **({"dataset": options["data"]} if "data" in options else {})}
                previous = self.STAGES[kind].submit(stage, self.parent, arguments, tags=tags, inputs=inputs,
                                                    wait_for=[allow_failure(previous)] if previous else None)
                jobs.append((model_name, stage, previous))
        metrics: dict[str, dict[str, float]] = {}
        for model_name, stage, job in jobs:
            result = job.result()
            self.outcomes[stage] = result["outcome"]
            metrics.setdefault(model_name, {}).update(
                {k: v for k, v in result.items() if isinstance(v, float) and k.startswith(EVALUATION_METRICS)})
        return metrics
