"""torch pickles (pytorch_model.bin, Meta's consolidated.*.pth), read where torch is installed, safely."""

from __future__ import annotations

import pickle
from pathlib import Path

import ml_dtypes
import numpy as np

from llama.errors import PipelineError
from llama.weights.entry import Entry
from llama.weights.names import NP_DTYPES


def read_torch_index(path: Path) -> dict[str, Entry]:
    """A torch pickle (pytorch_model.bin, consolidated.*.pth), loaded safely: weights_only, memory-mapped."""
    try:
        import torch  # optional: torch is not a dependency of the pipeline
    except ImportError:
        raise PipelineError(f"reading {path.name} needs torch, which is not installed; "
                            f"convert it to safetensors first or install torch") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise PipelineError(f"{path}: refused: it holds more than tensors, and an untrusted pickle is never run "
                            "(torch.load with weights_only)") from None
    except RuntimeError as err:
        raise PipelineError(f"{path} is not a readable torch checkpoint ({str(err).splitlines()[0][:120]})") from None

    def entry(tensor) -> Entry:
        dtype = NP_DTYPES.get(str(tensor.dtype).removeprefix("torch."))
        if dtype is None:
            raise PipelineError(f"{path}: unsupported tensor dtype {tensor.dtype}")
        as_bits = {np.dtype(ml_dtypes.bfloat16): torch.int16}.get(dtype)
        return Entry(tuple(tensor.shape), dtype, lambda: (tensor.view(as_bits).numpy().view(dtype) if as_bits
                                                          else tensor.numpy()).copy())
    return {name: entry(tensor) for name, tensor in state.items()}

