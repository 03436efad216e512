"""What the device MindSpore runs on can compute: the one rule training and model loading ask.

MindSpore's CPU kernels have no bfloat16 arithmetic (MatMul, Assign, Gather ...). There, weights may still be
stored as bf16 and cast on the fly, but compute runs in float32 or float16. Ascend and GPU compute in bf16.
"""

from __future__ import annotations

import sys

import psutil

from llama.errors import PipelineError


def compute_dtype_here(dtype: str, setting: str | None = None) -> str:
    """`dtype` where this device computes in it. Where it cannot: a setting that asked for it by name
    (`setting`, e.g. "model.compute_dtype") is refused; a compute dtype that only followed how the weights are
    stored falls back to float32."""
    import mindspore as ms

    if dtype != "bfloat16" or ms.get_context("device_target") != "CPU":
        return dtype
    if setting is None:
        return "float32"
    raise PipelineError(f"{setting}=bfloat16 needs a device that computes in bf16 (Ascend or GPU); MindSpore's "
                        f"CPU kernels compute in float32 or float16: override it, e.g. {setting}=float32")


# A compiled graph on MindSpore's CPU backend keeps its own copy of every weight it reads, plus workspace: measured
# with a 4-layer model at Llama-2-7B's width (2.14 GB of float16 weights), a compiled forward took the process
# from 2.8 to 6.5 GB, an eager one to 3.1 GB.
GRAPH_EXTRA_PER_WEIGHT_BYTE = 1.8


def graph_copy_fits(weight_bytes: float, memory: float) -> bool:
    """Whether CPU graphs' copy of `weight_bytes` of weights fits in `memory` (with a 10% margin)."""
    return weight_bytes * GRAPH_EXTRA_PER_WEIGHT_BYTE < 0.9 * memory


def graphs_fit(model) -> bool:
    """Whether compiled graphs of `model` fit: their copy of its weights in the memory available now (always,
    off the CPU backend). Warns, once per call, when they do not: the model then runs eagerly."""
    import mindspore as ms

    weight_bytes = sum(p.nbytes for p in model.get_parameters())
    if ms.get_context("device_target") != "CPU" or graph_copy_fits(weight_bytes, psutil.virtual_memory().available):
        return True
    extra = weight_bytes * GRAPH_EXTRA_PER_WEIGHT_BYTE
    print(f"warning: running eagerly: a compiled graph would need about {extra / 2 ** 30:.1f} GiB more for its "
          f"copy of the weights than this machine has free", file=sys.stderr)
    return False


def runs_compiled(model) -> bool:
    """Whether `model` runs in compiled graphs: `graphs_fit` asked once, at its first use, and kept on the model,
    so that its training, perplexity and generation graphs agree, and a model kept warm keeps its choice (free
    memory shrinks as its first graphs compile)."""
    if "_runs_compiled" not in vars(model):
        model._runs_compiled = graphs_fit(model)
    return model._runs_compiled


def compiled_or_eager(function, model):
    """`mindspore.jit(function)` where `model` runs compiled, else `function` itself, run eagerly (PyNative:
    slower per step, but no second copy of a 7B model)."""
    import mindspore as ms

    return ms.jit(function) if runs_compiled(model) else function
