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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable

from llama.errors import PipelineError
from llama.yamlconfig import apply_overrides, load_yaml, resolve_path

RUN_MODES = ("pretrain", "finetune")
PET_TYPES = ("none", "lora", "prefix")


@dataclass
class ModelSection:
    config: str = "tiny"                 # a name in configs/model/, or a path (our YAML, HF config.json, MindFormers YAML)
    checkpoint: str | None = None        # starting weights; required to finetune
    compute_dtype: str | None = None     # overrides the model config's; CPU computes in float32 or float16


@dataclass
class DataSection:
    train: str | None = None             # a records folder written by `preprocess`
    shuffle: bool = True
    batch_size: int = 1                  # rows per worker per micro-batch


@dataclass
class TrainingSection:
    epochs: int = 1
    max_steps: int | None = None         # stop earlier than `epochs` would
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0    # null: no clipping
    log_every: int = 1


@dataclass
class OptimizerSection:
    type: str = "adamw"
    learning_rate: float = 5e-5
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class LRScheduleSection:
    type: str = "cosine"                 # cosine (MindFormers' CosineWithWarmUpLR) or constant
    lr_end: float = 0.0
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None      # wins over warmup_ratio


@dataclass
class LossScaleSection:
    type: str = "dynamic"                # dynamic, static or none
    value: float = 65536.0
    factor: float = 2.0
    window: int = 1000                   # finite steps before the dynamic scale grows


@dataclass
class PetSection:
    type: str = "none"                   # none, lora or prefix
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: str = "wq|wk|wv|wo"  # regex searched in each Linear cell's name
    prefix_token_num: int = 16
    mid_dim: int = 512
    dropout_rate: float = 0.01


@dataclass
class ParallelSection:
    data_parallel: int = 1
    model_parallel: int = 1              # carried for Ascend/GPU recipes; refused on CPU
    pipeline_stage: int = 1
    micro_batch_num: int = 1


@dataclass
class CheckpointSection:
    save_steps: int = 100
    keep_last: int = 3


@dataclass
class TrainConfig:
    run_mode: str = "pretrain"
    seed: int = 0
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
        config = _build(cls, data, "train config")
        config.validate()
        return config

    def validate(self) -> None:
        """One-line errors for settings that cannot work, before any model is built."""
        def need(ok: bool, message: str):
            if not ok:
                raise PipelineError(f"train config: {message}")

        need(self.run_mode in RUN_MODES, f"run_mode {self.run_mode!r} is not one of {', '.join(RUN_MODES)}")
        need(self.pet.type in PET_TYPES, f"pet.type {self.pet.type!r} is not one of {', '.join(PET_TYPES)}")
        need(self.model.compute_dtype in (None, "float32", "float16", "bfloat16"),
             f"model.compute_dtype {self.model.compute_dtype!r} is not float32, float16 or bfloat16")
        need(self.optimizer.type == "adamw", f"optimizer.type {self.optimizer.type!r} is not adamw")
        need(self.lr_schedule.type in ("cosine", "constant"),
             f"lr_schedule.type {self.lr_schedule.type!r} is not cosine or constant")
        need(self.loss_scale.type in ("dynamic", "static", "none"),
             f"loss_scale.type {self.loss_scale.type!r} is not dynamic, static or none")
        for name in ("data.batch_size", "training.epochs", "training.gradient_accumulation_steps",
                     "training.log_every", "checkpoint.save_steps", "checkpoint.keep_last",
                     "parallel.data_parallel", "parallel.model_parallel", "parallel.pipeline_stage",
                     "pet.lora_rank", "pet.prefix_token_num", "pet.mid_dim"):
            section, key = name.split(".")
            value = getattr(getattr(self, section), key)
            need(isinstance(value, int) and value >= 1, f"{name} must be a positive integer, not {value!r}")
        need(self.training.max_steps is None or self.training.max_steps >= 1, "training.max_steps must be >= 1")
        need(0.0 <= self.pet.lora_dropout < 1.0 and 0.0 <= self.pet.dropout_rate < 1.0,
             "dropout rates must be in [0, 1)")

    def require_inputs(self) -> None:
        """Recipes leave data and weights open; a run needs them."""
        if not self.data.train:
            raise PipelineError("train config: set data.train to a records folder written by `preprocess`")
        if self.run_mode == "finetune" and not self.model.checkpoint:
            raise PipelineError("train config: finetuning starts from pretrained weights: set model.checkpoint")

    def check_runnable(self) -> None:
        """The seed's recipes target Ascend; say which of their settings this device or trainer cannot run."""
        from llama.device import compute_dtype_here

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
    """Read a YAML recipe (or start from `base`), apply `key.path=value` overrides and validate."""
    data = dict(base or {})
    if path is not None:
        data = _resolve_paths(load_yaml(path), Path(path).resolve().parent)
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


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise PipelineError(f"{where} must be a mapping, not {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise PipelineError(f"{where}: unknown setting {', '.join(unknown)} (known: {', '.join(known)})")
    values = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            value = _build(type(default), value or {}, f"{where} section {name}")
        elif value is not None and isinstance(default, float) and isinstance(value, int) \
                and not isinstance(value, bool):
            value = float(value)
        values[name] = value
    return cls(**values)
