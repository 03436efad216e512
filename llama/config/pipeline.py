"""Schemas of the flow configs: configs/data/*.yaml (`prepare-data`) and configs/pipeline/*.yaml (`run`).

The flows read these files as plain mappings; `load_flow_config` checks every key, type and range first and
`check_pipeline_config` also what a pipeline config names (its data config, the training recipe with its
settings, input files), so that a mistake is a one-line error before a Prefect server starts. This module
imports no Prefect, so the CLI runs these checks before importing it.
"""

from __future__ import annotations

from dataclasses import field
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, Strict
from pydantic.dataclasses import dataclass

from llama.config.loader import apply_overrides, as_overrides, config_file, load_yaml, resolve_path
from llama.config.schema import SCHEMA, Dtype, NonNegativeFloat, NonNegativeInt, PositiveInt, build
from llama.config.train import load_train_config
from llama.data.squad import MODES as SQUAD_MODES, QUESTIONS
from llama.data.wiki import MODES as WIKI_MODES
from llama.download import load_sources
from llama.errors import PipelineError

FORMATS = Literal["ckpt", "safetensors", "hf"]
NucleusMass = Annotated[float, Strict(), Field(gt=0, le=1)]


@dataclass(config=SCHEMA)
class WikiDataset:
    kind: Literal["wiki"]
    input: str
    seq_length: PositiveInt
    mode: Literal[WIKI_MODES] = "mindformers"


@dataclass(config=SCHEMA)
class AlpacaDataset:
    kind: Literal["alpaca"]
    input: str
    seq_length: PositiveInt
    on_mismatch: Literal["keep", "skip"] = "keep"


@dataclass(config=SCHEMA)
class SquadDataset:
    kind: Literal["squad"]
    input: str
    max_length: PositiveInt
    mode: Literal[SQUAD_MODES] = "eval"
    questions: Literal[QUESTIONS] = "first"
    articles: str | None = None       # START:STOP of the dev articles, e.g. "6:" (see `preprocess squad`)


@dataclass(config=SCHEMA)
class DataConfig:
    tokenizer: str | None             # None: the caller gives one (the pipeline: the converted model's)
    datasets: Annotated[dict[str, Annotated[Union[WikiDataset, AlpacaDataset, SquadDataset],
                                            Field(discriminator="kind")]], Field(min_length=1)]
    sources: str | None = None


@dataclass(config=SCHEMA)
class ModelSettings:
    weights: str
    tokenizer: str | None = None
    format: FORMATS = "ckpt"
    dtype: Dtype | None = None
    model_config: str | None = None


@dataclass(config=SCHEMA)
class TrainSettings:
    recipe: str
    dataset: str
    set: dict = field(default_factory=dict)   # train config overrides, checked with the recipe


@dataclass(config=SCHEMA)
class MergeSettings:
    format: FORMATS = "ckpt"


@dataclass(config=SCHEMA)
class PerplexitySettings:
    data: str
    batch_size: PositiveInt = 1
    window: Annotated[int, Strict(), Field(ge=2)] | None = None
    rolling_window: Annotated[int, Strict(), Field(ge=2)] | None = None
    lm_eval: bool = True
    models: list[Literal["base", "finetuned"]] = field(default_factory=lambda: ["base", "finetuned"])
    dtype: Dtype | None = None


@dataclass(config=SCHEMA)
class SquadSettings:
    data: str
    questions: Literal[QUESTIONS] = "first"
    max_new_tokens: PositiveInt = 20
    batch_size: PositiveInt = 8
    limit: PositiveInt | None = None
    worst: NonNegativeInt = 10
    models: list[Literal["base", "finetuned"]] = field(default_factory=lambda: ["base", "finetuned"])
    dtype: Dtype | None = None


@dataclass(config=SCHEMA)
class SampleSettings:
    prompts: Annotated[list[str], Field(min_length=1)]
    max_new_tokens: PositiveInt = 64
    temperature: NonNegativeFloat = 0.0
    top_k: NonNegativeInt = 0
    top_p: NucleusMass = 1.0
    seed: NonNegativeInt = 0
    batch_size: PositiveInt = 8
    ignore_eos: bool = False
    models: list[Literal["base", "finetuned"]] = field(default_factory=lambda: ["base", "finetuned"])
    dtype: Dtype | None = None


@dataclass(config=SCHEMA)
class EvaluateSettings:
    perplexity: dict[Literal["mindformers", "standard"], PerplexitySettings] = field(default_factory=dict)
    squad: SquadSettings | None = None
    samples: SampleSettings | None = None


@dataclass(config=SCHEMA)
class RegisterSettings:
    model_name: str


@dataclass(config=SCHEMA)
class PipelineConfig:
    data: str
    model: ModelSettings
    name: str = "pipeline"
    sources: str | None = None
    train: TrainSettings | None = None
    merge: MergeSettings = field(default_factory=MergeSettings)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)
    register: RegisterSettings | None = None


def load_flow_config(config: str, overrides: list[str] | None = None, schema=None) -> tuple[dict, Path]:
    """The config mapping (a file, or the name of one in configs/data or configs/pipeline, by `schema`) with
    overrides applied and checked against `schema`, and the folder its relative paths are resolved against."""
    path = config_file(config, "pipeline" if schema is PipelineConfig else "data")
    settings = apply_overrides(load_yaml(path), overrides or [])
    build(schema or DataConfig, settings, f"config {path}")
    return settings, path.resolve().parent


def check_pipeline_config(config: str, overrides: list[str] | None = None) -> tuple[dict, Path]:
    """`load_flow_config` of a pipeline config, and of everything it names: the data config, the training
    recipe with its settings, the input files. A mistake in any is a one-line error before a Prefect server
    starts or a stage runs."""
    settings, base = load_flow_config(config, overrides, PipelineConfig)
    data, data_base = load_flow_config(str(resolve_path(settings["data"], base)), schema=DataConfig)
    sources, data_sources = _sources(settings, base), _sources(data, data_base)
    for value in (data["tokenizer"], *(spec["input"] for spec in data["datasets"].values())):
        if value is not None:   # no tokenizer: the pipeline tokenizes with the converted model's own
            check_input(value, data_sources, data_base)
    model = settings["model"]
    for value in (model["weights"], model.get("tokenizer")):
        if value is not None:
            check_input(value, sources, base)
    train = settings.get("train")
    if train:
        if train["dataset"] not in data["datasets"]:
            raise PipelineError(f"train.dataset {train['dataset']!r} is not a dataset of {settings['data']}")
        load_train_config(resolve_path(train["recipe"], base), as_overrides(train.get("set") or {}))
    evaluations = settings.get("evaluate") or {}
    for options in [*(evaluations.get("perplexity") or {}).values(), evaluations.get("squad") or {}]:
        if options.get("data") and options["data"] not in data["datasets"]:
            check_input(options["data"], sources, base)
    return settings, base


def check_input(value: str, sources: dict, base: Path) -> str:
    """An input named in a config: `value` itself if it is a source of the sources file, else its existing path
    (relative to the config's folder); a one-line error otherwise."""
    if value in sources:
        return value
    path = resolve_path(value, base)
    if not path.exists():
        raise PipelineError(f"input {value!r} is neither a source in the sources file nor an existing path")
    return str(path)


def _sources(settings: dict, base: Path) -> dict:
    return load_sources(resolve_path(settings["sources"], base)) if settings.get("sources") else {}
