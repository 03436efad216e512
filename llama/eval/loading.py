"""The model an evaluation runs on (its tokenizer: `llama.data.tokenizer.load_tokenizer`), kept warm between
evaluations of checkpoints with one config."""

from __future__ import annotations

import os
from contextlib import contextmanager

from llama.train.adapter import apply_adapter, read_adapter


class _Warm:
    """The model the last load inside `warm_models()` returned. The next such load of a checkpoint with the same
    config copies its weights into it, and the graphs compiled for it (perplexity, prefill, decode) serve the
    new weights: for a 30-layer model each costs seconds to tens of seconds to compile, so a pipeline that
    evaluates a base and a finetuned model compiles each graph once."""
    enabled = False
    model = None


@contextmanager
def warm_models():
    """Loads inside reuse and keep the warm model; it stays warm after, until `release_warm_model()`."""
    _Warm.enabled = True
    try:
        yield
    finally:
        _Warm.enabled = False


def release_warm_model() -> None:
    """Drop the warm model (before something else needs its memory, e.g. training)."""
    _Warm.model = None


def load_model(checkpoint: str | os.PathLike, dtype: str | None = None, model_config: str | None = None,
               adapter: str | os.PathLike | None = None):
    """(model in inference mode, ModelConfig) from any checkpoint `llama.weights` reads, checksums first.

    `model_config` (a name in configs/model or a config file) is for weights that carry none, e.g. a bare
    MindFormers .ckpt. `adapter` is a LoRA or prefix-tuning run folder trained on `checkpoint`, applied
    unmerged (its base is checked before anything is loaded). Inside `warm_models()` the warm model is reused
    and kept, unless there is an adapter or the weights are bf16 (MindSpore's CPU cannot copy those in place).
    """
    from llama.config.model import ModelConfig
    from llama.weights.load import load_checkpoint

    trained = read_adapter(adapter, checkpoint) if adapter is not None else None
    warm, _Warm.model = _Warm.model, None
    model, config = load_checkpoint(checkpoint, ModelConfig.load(model_config) if model_config else None, dtype,
                                    into=warm if _Warm.enabled and trained is None else None)
    del warm
    if _Warm.enabled and trained is None and config.param_dtype != "bfloat16":
        _Warm.model = model
    model.set_train(False)
    return (apply_adapter(model, trained) if trained else model), config


