"""A LoRA or prefix-tuning run applied, unmerged, to the model it was trained on: what `--adapter RUN_DIR` loads.

    adapter = read_adapter(run_dir, base_checkpoint)    # checked before the base model is loaded
    model = apply_adapter(model, adapter)               # evaluate or generate with it as with the model

A run records the base checkpoint it started from (path, and the sha256 of its manifest's file list);
an adapter applied to other weights means nothing, so any other base is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llama.errors import PipelineError
from llama.fileio import checkpoint_identity
from llama.train import checkpointing


@dataclass
class Adapter:
    folder: Path         # the run's newest checkpoint (rank 0: data-parallel replicas are identical)
    kind: str            # lora or prefix
    pet: dict            # the run's pet settings


def check_base(base: str | os.PathLike, recorded: dict, run: str | os.PathLike) -> None:
    """Refuse weights other than the base checkpoint the run's adapter was trained on."""
    if checkpoint_identity(base) != recorded["sha256"]:
        raise PipelineError(f"{base} is not the base checkpoint the adapter in {run} was trained on "
                            f"({recorded['path']}, sha256 {recorded['sha256'][:16]}... expected)")


def read_adapter(run_dir: str | os.PathLike, base: str | os.PathLike) -> Adapter:
    """The adapter of a LoRA or prefix run, its checkpoint verified and `base` checked against its record."""
    run_dir = Path(run_dir)
    step = checkpointing.latest_common_step(run_dir, 1)
    if step is None:
        raise PipelineError(f"adapter {run_dir} holds no verified training checkpoint (is it a training run folder?)")
    folder = checkpointing.step_dir(run_dir, 0, step)
    state = checkpointing.verify(folder)
    if state["kind"] not in ("lora", "prefix"):
        raise PipelineError(f"{run_dir} trained the whole model, not an adapter: `merge` it and evaluate the result")
    check_base(base, state["base"], run_dir)
    return Adapter(folder, state["kind"], state["pet"])


def apply_adapter(model, adapter: Adapter):
    """`model` with the adapter's weights: LoRA paths added to its Linears (in place), or the prefixes
    computed once and fed to every call. Returns the model to run, in inference mode."""
    tensors = checkpointing.load_tensors(adapter.folder / checkpointing.WEIGHTS)
    pet = adapter.pet
    if adapter.kind == "lora":
        from llama.train.lora import apply_lora

        apply_lora(model, pet["lora_rank"], pet["lora_alpha"], pet["lora_dropout"], pet["target_modules"])
        checkpointing.restore(list(model.trainable_params()), tensors, str(adapter.folder))
        model.set_train(False)
        return model
    from llama.train.prefix import PrefixedLM, PrefixTunedLM

    tuned = PrefixTunedLM(model, pet["prefix_token_num"], pet["mid_dim"], pet["dropout_rate"])
    checkpointing.restore(list(tuned.trainable_params()), tensors, str(adapter.folder))
    tuned.set_train(False)
    prefixed = PrefixedLM(model, tuned.prefix_layers(1))
    prefixed.set_train(False)
    return prefixed
