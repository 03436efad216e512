"""LoRA: frozen Linear weights plus a trainable low-rank update, y = W x + (B A dropout(x)) * alpha / rank.

Parameter names follow MindFormers' pet LoRA (`<module>.mindpet_delta_lora_a` [rank, in] and
`<module>.mindpet_delta_lora_b` [out, rank]), so adapters trained here and by MindFormers merge the same way.
The wrapped module keeps the original weight Parameter under its original name, so base checkpoints still
load into a LoRA model and the merged weight lands where the base weight was.
"""

from __future__ import annotations

import math
import re

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import HeUniform, Zero, initializer

from llama.errors import PipelineError
from llama.model import Linear
from llama.weights.names import LORA_A, LORA_B
from llama.train.dropout import KeyedDropout



class LoRALinear(nn.Cell):
    """A model `Linear` with the low-rank path added; B starts at zero so training starts from the base model."""

    def __init__(self, base: Linear, rank: int, alpha: float, dropout: float, site: int):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.compute_dtype = base.compute_dtype
        self.weight = base.weight
        # Kaiming-uniform with a=sqrt(5) for A, as PEFT and MindFormers initialise it.
        self.mindpet_delta_lora_a = Parameter(
            initializer(HeUniform(math.sqrt(5)), [rank, self.in_features], ms.float32), name=LORA_A)
        self.mindpet_delta_lora_b = Parameter(initializer(Zero(), [self.out_features, rank], ms.float32), name=LORA_B)
        self.scaling = float(alpha) / rank
        self.dropout = KeyedDropout(dropout, site)
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        flat = x.reshape(-1, self.in_features).astype(self.compute_dtype)
        out = self.matmul(flat, self.weight.astype(self.compute_dtype))
        low = self.matmul(self.dropout(flat), self.mindpet_delta_lora_a.astype(self.compute_dtype))
        low = self.matmul(low, self.mindpet_delta_lora_b.astype(self.compute_dtype))
        out = out + low * self.scaling
        return out.reshape(x.shape[:-1] + (self.out_features,))


def apply_lora(net: nn.Cell, rank: int, alpha: float, dropout: float, target_modules: str) -> list[str]:
    """Wrap every Linear whose name matches `target_modules` (regex search) and freeze everything else.

    Returns the wrapped module names. Parameter names are re-derived from the cell tree afterwards, because
    MindSpore renames a cell's parameters when the cell is attached to a new parent.
    """
    try:
        pattern = re.compile(target_modules)
    except re.error as err:
        raise PipelineError(f"pet.target_modules {target_modules!r} is not a valid regex: {err}") from None
    targets = [(name, cell) for name, cell in net.cells_and_names()
               if isinstance(cell, Linear) and name and pattern.search(name)]
    if not targets:
        raise PipelineError(f"pet.target_modules {target_modules!r} matches no Linear module of the model")
    for param in net.get_parameters():
        param.requires_grad = False
    for site, (name, cell) in enumerate(targets):
        parent_name, _, leaf = name.rpartition(".")
        parent = net.get_sub_cell(parent_name) if parent_name else net
        setattr(parent, leaf, LoRALinear(cell, rank, alpha, dropout, site))
    rename_parameters(net)
    return [name for name, _ in targets]


def rename_parameters(net: nn.Cell) -> None:
    """Set each parameter's name to its path in the cell tree (what checkpoints use)."""
    for path, param in net.parameters_and_names():
        param.name = path
