"""Schemas of the flow configs: configs/data/*.yaml (`prepare-data`) and configs/pipeline/*.yaml (`run`).

The flows read these files as plain mappings; the schemas check every key, type and range first, so that a
misspelt key or an impossible value is a one-line error before a Prefect server starts. Input names (a source
of the sources file, or a path) and training settings are checked by flows.common.check_pipeline_config.
"""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal, Union

from pydantic import Field, Strict
from pydantic.dataclasses import dataclass

from llama.data.squad import MODES as SQUAD_MODES, QUESTIONS
from llama.data.wiki import MODES as WIKI_MODES
from llama.yamlconfig import SCHEMA, Dtype, NonNegativeFloat, NonNegativeInt, PositiveInt

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


@dataclass(config=SCHEMA)
class DataConfig:
    tokenizer: str
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
    dtype: Dtype | None = None


@dataclass(config=SCHEMA)
class SquadSettings:
    data: str
    questions: Literal[QUESTIONS] = "first"
    max_new_tokens: PositiveInt = 20
    batch_size: PositiveInt = 8
    limit: PositiveInt | None = None
    worst: NonNegativeInt = 10
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
