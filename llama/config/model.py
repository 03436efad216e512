"""Model shapes and dtypes: one `ModelConfig`, read from our YAML, a Hugging Face `config.json`, or the
`model.model_config` section of a MindFormers YAML.

    ModelConfig.named("llama2_7b")            # configs/model/llama2_7b.yaml
    ModelConfig.from_yaml(path)               # our own YAML (the fields below)
    ModelConfig.from_hf_config(path_or_dict)  # transformers' LlamaConfig JSON
    ModelConfig.from_mindformers_yaml(path)   # MindFormers run/finetune YAML
    cfg.to_dict(); cfg.to_hf_config()

`param_dtype` is how weights are stored, `compute_dtype` what matmuls run in. MindSpore's CPU kernels cannot
compute in bfloat16, so there bf16 weights are cast to `compute_dtype` (float32 by default) on the fly; on
Ascend `compute_dtype: bfloat16` works as written (llama/device.py holds the rule). Norms, softmax and rotary
tables always run in float32, as in Hugging Face's implementation, which the tests compare against.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import fields
from pathlib import Path

from pydantic.dataclasses import dataclass

from llama.config.loader import config_file, load_yaml
from llama.config.schema import DTYPES, SCHEMA, Dtype, NonNegativeInt, PositiveFloat, PositiveInt, build
from llama.errors import PipelineError

HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def llama_intermediate_size(hidden_size: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's (and MindFormers') rule for the SwiGLU width: 2/3 of 4*hidden, scaled, rounded up."""
    width = int(2 * 4 * hidden_size / 3)
    if ffn_dim_multiplier is not None:
        width = int(ffn_dim_multiplier * width)
    return multiple_of * ((width + multiple_of - 1) // multiple_of)


@dataclass(config=SCHEMA)
class ModelConfig:
    vocab_size: PositiveInt = 32000
    hidden_size: PositiveInt = 4096
    intermediate_size: PositiveInt = 11008
    num_layers: PositiveInt = 32
    num_heads: PositiveInt = 32
    num_kv_heads: PositiveInt | None = None
    max_position_embeddings: PositiveInt = 4096
    rms_norm_eps: PositiveFloat = 1e-5
    rope_theta: PositiveFloat = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: NonNegativeInt = 1
    eos_token_id: NonNegativeInt = 2
    pad_token_id: NonNegativeInt = 0
    param_dtype: Dtype = "float32"
    compute_dtype: Dtype = "float32"

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.hidden_size % self.num_heads:
            raise PipelineError(f"model config: hidden_size {self.hidden_size} is not divisible by "
                                f"num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise PipelineError(f"model config: num_heads {self.num_heads} is not divisible by "
                                f"num_kv_heads {self.num_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def check_fits(self, what: str, *, vocab_size: int | None = None, ids=None, length: int | None = None) -> None:
        """The one check, before anything compiles, that inputs fit this model: a tokenizer's `vocab_size`, or
        token `ids` (an array), within the embedding, and rows of `length` positions within the context.
        Past either, MindSpore's Gather fails with a traceback (in training, after the first compile)."""
        if ids is not None and ids.size:
            if ids.min() < 0:
                raise PipelineError(f"{what}: negative token id {int(ids.min())}")
            vocab_size = max(vocab_size or 0, int(ids.max()) + 1)
        if vocab_size is not None and vocab_size > self.vocab_size:
            raise PipelineError(f"{what}: token ids up to {vocab_size - 1} do not fit the model's vocabulary of "
                                f"{self.vocab_size}; data, tokenizer and checkpoint must share one vocabulary")
        if length is not None and length > self.max_position_embeddings:
            raise PipelineError(f"{what}: {length} tokens per row exceed the model's context of "
                                f"{self.max_position_embeddings}")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "model config") -> "ModelConfig":
        """Types and ranges checked, unknown keys refused, each with a one-line error."""
        return build(cls, data, source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(load_yaml(path), source=str(path))

    @classmethod
    def named(cls, name: str) -> "ModelConfig":
        """A config shipped in configs/model/, e.g. "tiny", "llama2_7b"."""
        return cls.from_yaml(config_file(name, "model"))

    @classmethod
    def load(cls, spec: str | Path) -> "ModelConfig":
        """A path to our YAML or JSON (a converted folder's model_config.json), a HF config.json, a MindFormers
        YAML, or the name of a shipped config."""
        path = Path(spec)
        if not path.exists():
            return cls.named(str(spec))
        if path.suffix == ".json":
            data = _read_json(path)
            if set(data) <= {f.name for f in fields(cls)}:
                return cls.from_dict(data, source=str(path))
            return cls.from_hf_config(data, source=str(path))
        data = load_yaml(path)
        if "model" in data:
            return cls.from_mindformers_yaml(path)
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_hf_config(cls, config: str | Path | dict, source: str = "Hugging Face config") -> "ModelConfig":
        """Read transformers' LlamaConfig (config.json); rope scaling and biases are not supported."""
        if not isinstance(config, dict):
            source, config = str(config), _read_json(config)
        missing = [key for key in HF_REQUIRED if key not in config]
        if missing:
            raise PipelineError(f"{source}: not a Llama config (no {', '.join(missing)})")
        if config.get("model_type", "llama") != "llama":
            raise PipelineError(f"{source}: model_type {config['model_type']!r} is not llama")
        for flag in ("attention_bias", "mlp_bias"):
            if config.get(flag):
                raise PipelineError(f"{source}: {flag} is not supported")
        if config.get("rope_scaling"):
            raise PipelineError(f"{source}: rope_scaling is not supported")
        heads = config["num_attention_heads"]
        if config.get("head_dim") not in (None, config["hidden_size"] // heads):
            raise PipelineError(f"{source}: head_dim {config['head_dim']} is not hidden_size / num_attention_heads")
        dtype = config.get("torch_dtype") or "float32"
        return build(cls, dict(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=config.get("rope_theta", 10000.0),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            bos_token_id=_token_id(config.get("bos_token_id"), 1),
            eos_token_id=_token_id(config.get("eos_token_id"), 2),
            pad_token_id=_token_id(config.get("pad_token_id"), 0),
            param_dtype=dtype if dtype in DTYPES else "float32",
        ), source)

    def to_hf_config(self) -> dict:
        """transformers' LlamaConfig as JSON, so a model trained here loads with from_pretrained."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "rope_scaling": None,
            "use_cache": True,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
        }

    @classmethod
    def from_mindformers_yaml(cls, path: str | Path) -> "ModelConfig":
        """Read `model.model_config` of a MindFormers YAML (LlamaConfig: multiple_of, n_kv_heads, theta ...)."""
        data = load_yaml(path)
        mf = (data.get("model") or {}).get("model_config")
        if not isinstance(mf, dict):
            raise PipelineError(f"{path}: no model.model_config section")
        if mf.get("qkv_concat"):
            raise PipelineError(f"{path}: qkv_concat checkpoints are not supported")
        missing = [key for key in ("hidden_size", "num_layers", "num_heads") if key not in mf]
        if missing:
            raise PipelineError(f"{path}: model.model_config has no {', '.join(missing)}")
        hidden = mf["hidden_size"]
        intermediate = mf.get("intermediate_size") or llama_intermediate_size(
            hidden, mf.get("multiple_of", 256), mf.get("ffn_dim_multiplier"))
        param_dtype = mf.get("param_init_type", "float32")
        compute_dtype = mf.get("compute_dtype", "float32")
        return build(cls, dict(
            vocab_size=mf.get("vocab_size", 32000),
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_layers=mf["num_layers"],
            num_heads=mf["num_heads"],
            num_kv_heads=mf.get("n_kv_heads") or mf["num_heads"],
            max_position_embeddings=mf.get("seq_length", 4096),
            rms_norm_eps=mf.get("rms_norm_eps", 1e-5),
            rope_theta=mf.get("theta", 10000.0),
            tie_word_embeddings=bool(mf.get("tie_word_embeddings", False)),
            bos_token_id=mf.get("bos_token_id", 1),
            eos_token_id=_token_id(mf.get("eos_token_id"), 2),
            pad_token_id=mf.get("pad_token_id", 0),
            param_dtype=param_dtype,
            compute_dtype=compute_dtype,
        ), str(path))


def _token_id(value, default: int) -> int:
    """HF allows a list of ids (several EOS tokens); the first is the one we stop on."""
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else int(value)


def _read_json(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PipelineError(f"cannot read model config {path}: {err}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise PipelineError(f"model config {path} is not a mapping")
    return data
