"""Dropout whose mask is a pure function of (key, site, position), so a resumed run draws the same masks.

MindSpore's dropout kernels keep their random state inside the kernel, where `get_rng_state`/`set_rng_state`
do not reach, so a run resumed from a checkpoint would draw different masks than the run it continues. Here
the trainer sets one key per micro-batch (from seed, rank, step and micro-batch) and every dropout site hashes
(key, its own site number, element index) with a 32-bit integer mixer (Wellons' lowbias32) into a uniform
number. Integer arithmetic runs in int64 and is masked to 32 bits after each multiply, so nothing overflows.
"""

from __future__ import annotations

import hashlib

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

MASK32 = 0xFFFFFFFF


def _mix32(x):
    x = ops.bitwise_xor(x, ops.bitwise_right_shift(x, 16))
    x = ops.bitwise_and(x * 0x7FEB352D, MASK32)
    x = ops.bitwise_xor(x, ops.bitwise_right_shift(x, 15))
    x = ops.bitwise_and(x * 0x846CA68B, MASK32)
    return ops.bitwise_xor(x, ops.bitwise_right_shift(x, 16))


class KeyedDropout(nn.Cell):
    """Inverted dropout with rate `p`; identity when the cell is not training or p is 0."""

    def __init__(self, p: float, site: int):
        super().__init__()
        self.p = float(p)
        self.site = int(site) & MASK32
        self.threshold = int(self.p * (1 << 24))       # keep an element when its 24-bit draw is >= threshold
        self.key = Parameter(Tensor(0, ms.int64), name="key", requires_grad=False)

    def construct(self, x):
        if not self.training or self.p == 0.0:
            return x
        index = ops.arange(0, x.size, dtype=ms.int64).reshape(x.shape)
        seed = _mix32(ops.bitwise_and(self.key * 0x9E3779B1 + self.site, MASK32))
        draw = ops.bitwise_right_shift(_mix32(ops.bitwise_and(index + seed * 0x85EBCA6B, MASK32)), 8)
        keep = (draw >= self.threshold).astype(x.dtype)
        return x * keep / (1.0 - self.p)


def step_key(seed: int, rank: int, step: int, micro: int) -> int:
    """The dropout key of one micro-batch: different on every rank, step and micro-batch, fixed by the seed."""
    digest = hashlib.sha256(f"{seed}/{rank}/{step}/{micro}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def set_dropout_key(net: nn.Cell, key: int) -> None:
    """Give every KeyedDropout in `net` the micro-batch's key before its forward pass.

    The key is written with `ops.assign`, into the parameter's memory: a compiled graph keeps reading the
    tensor it was compiled with, so `Parameter.set_data` would leave every later step on the first step's masks.
    """
    value = Tensor(key, ms.int64)
    for _, cell in net.cells_and_names():
        if isinstance(cell, KeyedDropout) and cell.p > 0.0:
            ops.assign(cell.key, value)
