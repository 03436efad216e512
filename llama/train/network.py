"""The network a run trains: the model (seeded init or loaded weights), wrapped for LoRA or prefix tuning."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mindspore as ms

from llama.config.model import ModelConfig
from llama.config.train import TrainConfig
from llama.device import compute_dtype_here
from llama.errors import PipelineError
from llama.fileio import checkpoint_identity
from llama.model import RANDOM, ZEROS, LlamaForCausalLM
from llama.train.lora import apply_lora
from llama.train.prefix import PrefixTunedLM
from llama.weights.load import assign_weights
from llama.weights.source import open_checkpoint


@dataclass
class Network:
    net: object                  # the nn.Cell trained: LlamaForCausalLM, LoRA-wrapped, or PrefixTunedLM
    model_config: object         # llama.config.ModelConfig
    kind: str                    # full, lora or prefix
    base: dict | None            # the starting checkpoint: path and sha256

    def saved_weights(self) -> list:
        """Adapters save only what trains; full runs save every model weight."""
        if self.kind == "full":
            return list(self.net.get_parameters())
        return list(self.net.trainable_params())


def build_network(config: TrainConfig) -> Network:
    """The model (seeded init or loaded weights), wrapped for LoRA or prefix tuning as configured."""
    ms.set_seed(config.seed)
    model_config = ModelConfig.load(config.model.config) if config.model.config else None
    source = open_checkpoint(config.model.checkpoint, model_config) if config.model.checkpoint else None
    model_config = source.config if source else model_config
    if model_config is None:
        raise PipelineError("train config: set model.config (or model.checkpoint with its config)")
    model_config = model_config.replace(compute_dtype=compute_dtype_here(
        config.model.compute_dtype or model_config.compute_dtype,
        "model.compute_dtype" if config.model.compute_dtype else None))
    # Trainable weights are float32 masters whatever the checkpoint holds (MindFormers' param_init_type);
    # the frozen base of an adapter stays as stored. model_config keeps the stored dtype, which exports use.
    trains_all = config.pet.type == "none"
    model = LlamaForCausalLM(model_config.replace(param_dtype="float32") if trains_all else model_config,
                             RANDOM if source is None else ZEROS)
    base = None
    if source is not None:
        assign_weights(model, source)
        base = {"path": str(Path(config.model.checkpoint).resolve()),
                "sha256": checkpoint_identity(config.model.checkpoint)}
    pet = config.pet
    if pet.type == "lora":
        apply_lora(model, pet.lora_rank, pet.lora_alpha, pet.lora_dropout, pet.target_modules)
    if config.training.recompute:
        recompute_layers(model)
    if pet.type == "prefix":
        return Network(PrefixTunedLM(model, pet.prefix_token_num, pet.mid_dim, pet.dropout_rate),
                       model_config, "prefix", base)
    return Network(model, model_config, "lora" if pet.type == "lora" else "full", base)


def recompute_layers(model: LlamaForCausalLM) -> None:
    """Keep only each decoder layer's input for the backward pass and compute the rest again there (after LoRA
    wraps the layers' Linears, so that the adapters are recomputed too). Keyed dropout draws the same masks
    again, so the step computes the same values, up to the order of its float sums."""
    for layer in model.model.layers:
        layer.recompute()
