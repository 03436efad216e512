"""What the device MindSpore runs on can compute: the one rule training and model loading ask.

MindSpore's CPU kernels have no bfloat16 arithmetic (MatMul, Assign, Gather ...). There, weights may still be
stored as bf16 and cast on the fly, but compute runs in float32 or float16. Ascend and GPU compute in bf16.
"""

from __future__ import annotations

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
