"""Flow subcommands: `prepare-data`, `run`, `demo`, `serve`. Prefect is imported only when one of them runs."""

from __future__ import annotations

import logging

from llama.cli import add_command
from tasks.tracking import tracking_uri


def _add_flow_options(parser, default_config: str) -> None:
    parser.add_argument("--config", default=default_config, help=f"flow config: a YAML file or the name of a shipped one (`llama2-pipeline configs`); "
                             f"default {default_config}")
    parser.add_argument("--work-dir", default="work", help="where outputs and the download cache live (default work)")
    parser.add_argument("--mirror", help="mirror for remote sources (see `download --help`)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. train.set.optimizer.learning_rate=1e-3")


def _checked(args, check) -> None:
    """Check the config (and what it names) before a Prefect server starts. Without --debug, a failed stage
    then shows as the `error:` line, last: Prefect's report of the exception (traceback, failed states) and the
    temporary server's goodbye at exit are kept for --debug."""
    check(args.config, args.overrides)
    if args.debug:
        return
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(lambda record: record.levelno < logging.ERROR and not record.exc_info)
    logging.getLogger("prefect").addFilter(
        lambda record: not record.getMessage().startswith("Stopping temporary server"))


def _prepare_data(args) -> dict:
    from llama.config.pipeline import load_flow_config

    _checked(args, load_flow_config)
    from flows.prepare_data import prepare_data

    return prepare_data(config=args.config, overrides=args.overrides, work_dir=args.work_dir, mirror=args.mirror)


def _run(args) -> dict:
    from llama.config.pipeline import check_pipeline_config

    _checked(args, check_pipeline_config)
    from flows.pipeline import comparison, pipeline

    result = pipeline(config=args.config, overrides=args.overrides, work_dir=args.work_dir, mirror=args.mirror)
    result["mlflow_ui"] = f"mlflow ui --backend-store-uri {tracking_uri()}"
    if args.json:
        return result
    # One line per metric, base beside finetuned, then where everything is.
    lines = {metric: _side_by_side(before, after, change)
             for metric, before, after, change in comparison(result["metrics"])}
    lines.update({key: value for key, value in result["metrics"].items() if key.startswith("train_")})
    ran = sum(how == "ran" for how in result["tasks"].values())
    return {**lines, "stages": f"{ran} ran, {len(result['tasks']) - ran} from cache",
            **{key: result[key] for key in ("checkpoint", "registered", "mlflow_run_id", "mlflow_ui")}}


def _side_by_side(before: float | None, after: float | None, change: float | None) -> str:
    """`base 14.2000 → finetuned 51.5000 (+37.3000)`, leaving out what a run did not measure."""
    text = " → ".join(f"{label} {value:.4f}" for label, value in (("base", before), ("finetuned", after))
                      if value is not None)
    return text if change is None else f"{text} ({change:+.4f})"


def _serve(args) -> dict:
    """Serve the pipeline as a Prefect deployment on a cron schedule (blocks until interrupted)."""
    from llama.config.pipeline import check_pipeline_config

    _checked(args, check_pipeline_config)
    from flows.pipeline import pipeline

    parameters = {"config": args.config, "overrides": args.overrides, "work_dir": args.work_dir, "mirror": args.mirror}
    pipeline.serve(name=args.name, cron=args.cron or None, parameters=parameters,
                   description=f"Retrain and evaluate {args.config} on a schedule")
    return {"deployment": f"llama2-pipeline/{args.name}", "stopped": True}


def register(subparsers) -> None:
    parser = add_command(subparsers, "prepare-data", _prepare_data,
                         help="download, tokenize and write verified MindRecord files for every dataset in a config")
    _add_flow_options(parser, "configs/data/tiny.yaml")
    parser = add_command(subparsers, "run", _run,
                         help="the whole pipeline as one cached Prefect flow: data, convert, train, merge, evaluate, "
                              "register")
    _add_flow_options(parser, "configs/pipeline/demo.yaml")
    parser = add_command(subparsers, "demo", _run,
                         help="the main job (what `make demo` runs): a real model evaluated, finetuned on SQuAD and "
                              "evaluated again, base and finetuned metrics side by side")
    _add_flow_options(parser, "configs/pipeline/demo.yaml")
    parser = add_command(subparsers, "serve", _serve,
                         help="serve the pipeline as a Prefect deployment with a retraining schedule")
    _add_flow_options(parser, "configs/pipeline/demo.yaml")
    parser.add_argument("--name", default="retrain", help="deployment name (default retrain)")
    parser.add_argument("--cron", default="0 3 * * 1",
                        help="schedule, cron syntax (default weekly: Monday 03:00); '' for none")
