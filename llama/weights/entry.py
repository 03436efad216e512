"""`Entry`: one tensor of a checkpoint, its shape and dtype known, its values read only when asked: from byte
ranges of a file, or through a function (a cast, a concatenation of shards, the q/k permutation below).

Meta, llama2.c and GGUF store q/k rows in the interleaved rotary layout; `permute_qk` turns them, lazily, into
the rotate-half layout of Hugging Face and MindFormers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from llama.config.model import ModelConfig
from llama.errors import PipelineError
from llama.weights.names import LAYER_NAME


@dataclass
class Entry:
    """One tensor of a checkpoint: its shape and dtype now, its values when `read()` is called."""
    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[], np.ndarray]
    raw: tuple[Path, list[tuple[int, int]]] | None = None   # (file, byte ranges) when stored as-is on disk

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize



def _file_entry(path: Path, ranges: list[tuple[int, int]], dtype, shape) -> Entry:
    return Entry(tuple(shape), np.dtype(dtype), lambda: _read_range(path, ranges, dtype, shape), (path, ranges))


def _read_range(path: Path, ranges: list[tuple[int, int]], dtype, shape) -> np.ndarray:
    """Read byte ranges of a file straight into one new array (no mmap, so no file pages stay resident)."""
    array = np.empty(shape, dtype=dtype)
    buffer = memoryview(array.reshape(-1).view(np.uint8))
    filled = 0
    with open(path, "rb") as handle:
        for offset, length in ranges:
            handle.seek(offset)
            if handle.readinto(buffer[filled:filled + length]) != length:
                raise PipelineError(f"{path} is truncated (a tensor ends past the end of the file)")
            filled += length
    return array



def _interleaved_to_half(weight: np.ndarray, heads: int) -> np.ndarray:
    """Meta/llama2.c q/k rows (pairs per frequency) -> rotate-half order; what HF's converter's permute does."""
    rows, cols = weight.shape
    return np.ascontiguousarray(weight.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols))


def _permuted(entry: Entry, heads: int) -> Entry:
    return Entry(entry.shape, entry.dtype, lambda: _interleaved_to_half(entry.read(), heads))


def permute_qk(entries: dict[str, Entry], config: ModelConfig) -> dict[str, Entry]:
    """q/k weights in the interleaved rotary layout (Meta, llama2.c, GGUF) -> rotate-half, lazily."""
    heads = {"attention.wq.weight": config.num_heads, "attention.wk.weight": config.num_kv_heads}
    out = {}
    for name, entry in entries.items():
        match = LAYER_NAME.fullmatch(name)
        out[name] = _permuted(entry, heads[match[2]]) if match and match[2] in heads else entry
    return out

