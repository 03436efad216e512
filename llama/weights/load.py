"""A model from a checkpoint and back: `load_checkpoint`, `assign_weights`, `params_source`, `save_checkpoint`.
The only module of the package that uses MindSpore and llama.model.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import mindspore as ms
from mindspore import ops

from llama.config.model import ModelConfig
from llama.device import compute_dtype_here
from llama.errors import PipelineError
from llama.model import ZEROS, LlamaForCausalLM, checkpoint_layout, transposed_in_model
from llama.weights.entry import Entry
from llama.weights.names import MS_TYPES, NP_DTYPES
from llama.weights.source import Source, entries_source, open_checkpoint
from llama.weights.writer import write_checkpoint


def _param_array(param) -> np.ndarray:
    """A MindSpore tensor as numpy; MindSpore's own bfloat16 numpy type is re-viewed as ml_dtypes'."""
    array = param.asnumpy()
    return array.view(np.uint16).view(ml_dtypes.bfloat16) if array.dtype.name == "bfloat16" else array


def params_source(model_or_params, config: ModelConfig) -> Source:
    """A Source over an in-memory model (nn.Cell; its tensors are read out in the checkpoint layout) or a
    {name: numpy array, MindSpore tensor or Entry} dict that is in the checkpoint layout already."""
    is_model = hasattr(model_or_params, "parameters_and_names")
    params = dict(model_or_params.parameters_and_names()) if is_model else model_or_params
    entries = {}
    for name, value in params.items():
        if isinstance(value, Entry):
            entries[name] = value
        elif isinstance(value, np.ndarray):
            entries[name] = Entry(value.shape, value.dtype, lambda v=value: v)
        else:
            entries[name] = Entry(tuple(value.shape), np.dtype(MS_TYPES[str(value.dtype)]),
                                  lambda v=value: _param_array(v))
    if is_model:
        for name, entry in list(entries.items()):
            if transposed_in_model(name):
                entries[name] = Entry(entry.shape[::-1], entry.dtype,
                                      lambda n=name, e=entry: checkpoint_layout(n, e.read()))
    return entries_source(entries, config)


def save_checkpoint(model_or_params, out_dir: str | os.PathLike, config: ModelConfig, fmt: str = "ckpt",
                    tokenizer: str | os.PathLike | None = None, dtype: str | None = None,
                    overwrite: bool = False) -> dict:
    """Save a model or parameter dict as a verified folder (see the module docstring); return its manifest.
    Non-finite weights (a diverged run being merged) are saved as they are, with a warning naming them."""
    return write_checkpoint(params_source(model_or_params, config), out_dir, fmt, dtype, tokenizer, overwrite,
                            progress=False, allow_nonfinite=True)


def load_checkpoint(path: str | os.PathLike, model_config: ModelConfig | None = None, dtype: str | None = None,
                    into=None):
    """Build `LlamaForCausalLM` from any supported checkpoint (checksums verified first); return (model, config).

    `dtype` sets how weights are stored (float32, float16, bfloat16); it is also the compute dtype where the
    device computes in it (llama.device). None keeps the checkpoint's dtype. `into`: a model of the same
    config whose weights are overwritten in place instead of building a new one, so that the graphs already
    compiled for it serve the new weights (ignored where the configs differ).
    """
    source = open_checkpoint(path, model_config)
    config = source.config
    if dtype is not None:
        if dtype not in NP_DTYPES:
            raise PipelineError(f"unknown dtype {dtype!r} (float32, float16 or bfloat16)")
        config = config.replace(param_dtype=dtype, compute_dtype=dtype)
    config = config.replace(compute_dtype=compute_dtype_here(config.compute_dtype))
    reuse = into is not None and into.config == config
    model = into if reuse else LlamaForCausalLM(config, ZEROS)
    assign_weights(model, source, in_place=reuse)
    return model, config


def assign_weights(model, source: Source, in_place: bool = False) -> None:
    """Set every weight of `model` from the checkpoint's tensor of the same name, cast to the model's dtype
    and converted to the model's layout. `in_place` copies into the existing parameter memory (ops.assign):
    a compiled graph reads its parameters from there, and would keep reading the old weights after
    `set_data`, which gives a parameter new memory."""
    params = dict(model.parameters_and_names())
    if in_place and set(params) != set(source.entries):
        raise PipelineError(f"{source.path} does not hold exactly the model's weights")
    wanted = NP_DTYPES[model.config.param_dtype]
    for name, entry in source.entries.items():
        value = ms.Tensor(checkpoint_layout(name, entry.read().astype(wanted, copy=False)))
        if in_place:
            ops.assign(params[name], value)
        else:
            params[name].set_data(value)
