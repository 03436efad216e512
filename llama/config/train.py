"""The training config: one declarative YAML per recipe (configs/train/), checked before anything runs.

    config = load_train_config("configs/train/tiny_pretrain.yaml", ["data.train=out/wiki", "training.max_steps=20"])
    config.to_dict()                      # plain data, stored beside the checkpoints so a resume can compare

Sections mirror MindFormers' recipe YAMLs, flattened to what this trainer uses: `runner_config` and
`train_dataset` become `training` and `data`, `model_config.pet_config` becomes `pet`, `parallel_config`
becomes `parallel`, `runner_wrapper.scale_sense` becomes `loss_scale`. Paths written in a YAML file are
relative to that file; paths given as `key=value` overrides are relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import field
from pathlib import Path
from typing import Annotated, Iterable, Literal

from pydantic import Field, Strict, field_validator
from pydantic.dataclasses import dataclass

from llama.config.loader import apply_overrides, config_file, load_yaml, resolve_path
from llama.config.model import ModelConfig
from llama.config.schema import (SCHEMA, Dtype, Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat,
                                 PositiveInt, build)
from llama.device import compute_dtype_here
from llama.errors import PipelineError


@dataclass(config=SCHEMA)
class ModelSection:
    config: str | None = "tiny"          # a name in configs/model/, a path (our YAML, HF config.json, MindFormers
                                         # YAML), or null: the checkpoint's own
    checkpoint: str | None = None        # starting weights; required to finetune
    compute_dtype: Dtype | None = None   # overrides the model config's; CPU computes in float32 or float16


@dataclass(config=SCHEMA)
class DataSection:
    train: str | None = None             # a records folder written by `preprocess`
    shuffle: bool = True
    batch_size: PositiveInt = 1          # rows per worker per micro-batch


@dataclass(config=SCHEMA)
class TrainingSection:
    epochs: PositiveInt = 1
    max_steps: PositiveInt | None = None # stop earlier than `epochs` would
    gradient_accumulation_steps: PositiveInt = 1
    max_grad_norm: PositiveFloat | None = 1.0  # null: no clipping
    log_every: PositiveInt = 1
    recompute: bool = False              # MindFormers' recompute_config.recompute: every decoder layer's
                                         # activations recomputed in the backward pass (less memory, slower step)


@dataclass(config=SCHEMA)
class OptimizerSection:
    type: Literal["adamw"] = "adamw"
    learning_rate: PositiveFloat = 5e-5
    beta1: Fraction = 0.9
    beta2: Fraction = 0.95
    eps: PositiveFloat = 1e-8
    weight_decay: NonNegativeFloat = 0.0


@dataclass(config=SCHEMA)
class LRScheduleSection:
    type: Literal["cosine", "constant"] = "cosine"  # cosine: MindFormers' CosineWithWarmUpLR
    lr_end: NonNegativeFloat = 0.0
    warmup_ratio: Fraction = 0.03
    warmup_steps: NonNegativeInt | None = None      # wins over warmup_ratio


@dataclass(config=SCHEMA)
class LossScaleSection:
    type: Literal["dynamic", "static", "none"] = "dynamic"
    value: PositiveFloat = 65536.0
    factor: Annotated[float, Strict(), Field(gt=1, allow_inf_nan=False)] = 2.0  # the dynamic scale's step
    window: PositiveInt = 1000           # finite steps before the dynamic scale grows


@dataclass(config=SCHEMA)
class PetSection:
    type: Literal["none", "lora", "prefix"] = "none"
    lora_rank: PositiveInt = 16
    lora_alpha: PositiveFloat = 16.0
    lora_dropout: Fraction = 0.05
    target_modules: str = "wq|wk|wv|wo"  # regex searched in each Linear cell's name
    prefix_token_num: PositiveInt = 16
    mid_dim: PositiveInt = 512
    dropout_rate: Fraction = 0.01

    @field_validator("target_modules")
    @classmethod
    def _is_regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"not a regular expression: {err}") from None
        return value


@dataclass(config=SCHEMA)
class ParallelSection:
    data_parallel: PositiveInt = 1
    model_parallel: PositiveInt = 1      # carried for Ascend/GPU recipes; refused on CPU
    pipeline_stage: PositiveInt = 1
    micro_batch_num: PositiveInt = 1


@dataclass(config=SCHEMA)
class CheckpointSection:
    save_steps: PositiveInt = 100
    keep_last: PositiveInt = 3


@dataclass(config=SCHEMA)
class TrainConfig:
    run_mode: Literal["pretrain", "finetune"] = "pretrain"
    seed: NonNegativeInt = 0
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    lr_schedule: LRScheduleSection = field(default_factory=LRScheduleSection)
    loss_scale: LossScaleSection = field(default_factory=LossScaleSection)
    pet: PetSection = field(default_factory=PetSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """Types and ranges of every setting checked (schemas above), with a one-line error for the first bad one."""
        return build(cls, data, "train config")

    def validate(self) -> None:
        """Check a config built in Python and changed since: attributes are not re-checked on assignment."""
        TrainConfig.from_dict(self.to_dict())

    def require_inputs(self) -> None:
        """Recipes leave data and weights open; a run needs them, and a model config that loads."""
        if self.model.config:
            ModelConfig.load(self.model.config)
        if not self.data.train:
            raise PipelineError("train config: set data.train to a records folder written by `preprocess`")
        if self.run_mode == "finetune" and not self.model.checkpoint:
            raise PipelineError("train config: finetuning starts from pretrained weights: set model.checkpoint")

    def check_runnable(self) -> None:
        """The seed's recipes target Ascend; say which of their settings this device or trainer cannot run."""
        if self.model.compute_dtype:
            compute_dtype_here(self.model.compute_dtype, "model.compute_dtype")
        if self.parallel.model_parallel > 1 or self.parallel.pipeline_stage > 1:
            raise PipelineError(
                f"parallel.model_parallel={self.parallel.model_parallel} and parallel.pipeline_stage="
                f"{self.parallel.pipeline_stage}: this trainer runs data parallelism only (on any device; the seed's "
                "layout is kept for `llama2-pipeline plan`); set both to 1, e.g. parallel.model_parallel=1 "
                "parallel.pipeline_stage=1")

    @property
    def columns(self) -> list[str]:
        return ["input_ids"] if self.run_mode == "pretrain" else ["input_ids", "labels"]


def load_train_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = (),
                      base: dict | None = None) -> TrainConfig:
    """Read a YAML recipe (a file, or the name of one in configs/train; or start from `base`), apply
    `key.path=value` overrides and validate."""
    data = dict(base or {})
    if path is not None:
        path = config_file(path, "train")
        data = _resolve_paths(load_yaml(path), path.resolve().parent)
    data = _resolve_paths(apply_overrides(data, overrides), Path.cwd())
    return TrainConfig.from_dict(data)


def as_train_config(config: "TrainConfig | dict") -> TrainConfig:
    """The Python API takes a TrainConfig or the same settings as a plain dict (paths relative to the cwd)."""
    if isinstance(config, TrainConfig):
        config.validate()
        return config
    return TrainConfig.from_dict(_resolve_paths(config, Path.cwd()))


# Settings holding paths, and whether a bare name is allowed instead (model configs shipped by name).
_PATH_KEYS = (("model", "config", True), ("model", "checkpoint", False), ("data", "train", False))


def _resolve_paths(data: dict, base: Path) -> dict:
    data = {key: dict(value) if isinstance(value, dict) else value for key, value in data.items()}
    for section, key, may_be_name in _PATH_KEYS:
        value = (data.get(section) or {}).get(key)
        if not value:
            continue
        if may_be_name and os.sep not in str(value) and not Path(str(value)).suffix:
            continue
        data[section][key] = str(resolve_path(value, base))
    return data

