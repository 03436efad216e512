"""What every flow shares: reading and checking its config, and telling which tasks ran and which came from
cache."""

from __future__ import annotations

from pathlib import Path

from prefect.futures import PrefectFuture

from llama.download import load_sources
from llama.errors import PipelineError
from llama.pipeline_config import DataConfig, PipelineConfig
from llama.train.config import load_train_config
from llama.yamlconfig import apply_overrides, as_overrides, build, load_yaml, resolve_path
from tasks.data import download_source

REPO = Path(__file__).resolve().parent.parent


def load_flow_config(config: str, overrides: list[str] | None = None, schema=DataConfig) -> tuple[dict, Path]:
    """The config mapping with overrides applied and checked against `schema`, and the folder its relative
    paths are resolved against."""
    path = Path(config)
    if not path.is_absolute() and not path.exists() and (REPO / path).exists():
        path = REPO / path  # configs/... works from any working folder
    settings = apply_overrides(load_yaml(path), overrides or [])
    build(schema, settings, f"config {path}")
    return settings, path.resolve().parent


def check_pipeline_config(config: str, overrides: list[str] | None = None) -> tuple[dict, Path]:
    """`load_flow_config` of a pipeline config, and of everything it names: the data config, the training
    recipe with its settings, the input files. A mistake in any is a one-line error before a Prefect server
    starts or a stage runs."""
    settings, base = load_flow_config(config, overrides, PipelineConfig)
    data, data_base = load_flow_config(str(resolve_path(settings["data"], base)), schema=DataConfig)
    inputs, data_inputs = Inputs(settings, base), Inputs(data, data_base)
    data_inputs.check(data["tokenizer"])
    for spec in data["datasets"].values():
        data_inputs.check(spec["input"])
    model = settings["model"]
    for value in (model["weights"], model.get("tokenizer")):
        if value is not None:
            inputs.check(value)
    train = settings.get("train")
    if train:
        if train["dataset"] not in data["datasets"]:
            raise PipelineError(f"train.dataset {train['dataset']!r} is not a dataset of {settings['data']}")
        load_train_config(resolve_path(train["recipe"], base), as_overrides(train.get("set") or {}))
    evaluations = settings.get("evaluate") or {}
    for options in [*(evaluations.get("perplexity") or {}).values(), evaluations.get("squad") or {}]:
        if options.get("data") and options["data"] not in data["datasets"]:
            inputs.check(options["data"])
    return settings, base


def outcome(future: PrefectFuture) -> str:
    """"cached" when Prefect took the result from its cache, else "ran"."""
    return "cached" if future.state.name == "Cached" else "ran"


class Inputs:
    """Config values that name input files: a source from the sources file (downloaded once per flow run,
    checksummed, cached) or a path relative to the config file."""

    def __init__(self, settings: dict, base: Path, work_dir: str = "work", mirror: str | None = None):
        self.sources = load_sources(resolve_path(settings["sources"], base)) if settings.get("sources") else {}
        self.base, self.mirror = base, mirror
        self.cache_dir = str(Path(work_dir) / "cache")
        self.downloads: dict[str, PrefectFuture] = {}

    def __call__(self, value: str) -> PrefectFuture | str:
        """A future of the downloaded file for a source name, else the existing file's path."""
        if value in self.sources:
            if value not in self.downloads:
                self.downloads[value] = download_source.submit(self.sources[value], self.cache_dir, self.mirror)
            return self.downloads[value]
        return self.check(value)

    def check(self, value: str) -> str:
        """`value` itself if it names a source, else its existing path; a one-line error otherwise."""
        if value in self.sources:
            return value
        path = resolve_path(value, self.base)
        if not path.exists():
            raise PipelineError(f"input {value!r} is neither a source in the sources file nor an existing path")
        return str(path)

    def outcomes(self) -> dict[str, str]:
        return {f"download-{name}": outcome(job) for name, job in self.downloads.items()}
