"""Prefix tuning (Li & Liang; P-tuning v2): trainable key/value prefixes for every layer, base model frozen.

The prefixes are reparameterised as in MindFormers' pet prefix tuning: an embedding of the prefix positions,
[prefix_token_num, 2 * layers * kv_width], goes through a two-layer tanh MLP of width `mid_dim` back to the same
width, then dropout, and is split into one (key, value) pair per layer. Parameter names follow MindFormers'
(`prefix_layers.mindpet_delta_prefixtuning_*`). Keys and values are as wide as the model's kv heads, so
grouped-query models (70B) get prefixes of the right shape. `PrefixedLM` runs a trained adapter for evaluation and
generation: its prefixes computed once, fed to every forward pass and decode step.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from llama.config.model import ModelConfig
from llama.model import LlamaForCausalLM
from llama.train.dropout import KeyedDropout


class PrefixEncoder(nn.Cell):
    """batch size -> per layer (key, value), each [batch, kv_heads, prefix_token_num, head_dim]."""

    def __init__(self, config: ModelConfig, prefix_token_num: int, mid_dim: int, dropout: float):
        super().__init__()
        self.num_layers, self.kv_heads, self.head_dim = config.num_layers, config.num_kv_heads, config.head_dim
        self.prefix_len = prefix_token_num
        width = 2 * self.num_layers * self.kv_heads * self.head_dim
        self.positions = Tensor(np.arange(prefix_token_num, dtype=np.int32))
        self.mindpet_delta_prefixtuning_embedding = Parameter(
            initializer(Normal(1.0), [prefix_token_num, width], ms.float32), name="embedding_table")
        self.mindpet_delta_prefixtuning_dense_in = nn.Dense(width, mid_dim)
        self.mindpet_delta_prefixtuning_dense_out = nn.Dense(mid_dim, width)
        self.dropout = KeyedDropout(dropout, site=1 << 20)

    def construct(self, batch_size: int):
        table = ops.gather(self.mindpet_delta_prefixtuning_embedding, self.positions, 0)       # [P, width]
        table = self.mindpet_delta_prefixtuning_dense_out(ops.tanh(self.mindpet_delta_prefixtuning_dense_in(table)))
        table = self.dropout(ops.broadcast_to(table.expand_dims(0), (batch_size,) + table.shape))
        # [B, P, layers * 2 * K * D] -> [layers * 2, B, K, P, D]
        table = table.reshape(batch_size, self.prefix_len, self.num_layers * 2, self.kv_heads, self.head_dim)
        table = table.transpose(2, 0, 3, 1, 4)
        return tuple((table[2 * i], table[2 * i + 1]) for i in range(self.num_layers))


class PrefixTunedLM(nn.Cell):
    """The base model (its parameter names unchanged, frozen) fed the encoder's prefixes on every call."""

    def __init__(self, model: LlamaForCausalLM, prefix_token_num: int, mid_dim: int, dropout: float):
        super().__init__(auto_prefix=False)
        for param in model.get_parameters():
            param.requires_grad = False
        self.config = model.config
        self.pet_model = model
        self.prefix_layers = PrefixEncoder(model.config, prefix_token_num, mid_dim, dropout)
        for path, param in self.prefix_layers.parameters_and_names():
            param.name = f"prefix_layers.{path}"

    def construct(self, input_ids, only_at=None):
        return self.pet_model(input_ids, self.prefix_layers(input_ids.shape[0]), only_at)


class PrefixedLM(nn.Cell):
    """The base model fed fixed prefixes (a trained adapter's, computed once): evaluation and generation call
    it as they call the model, forward passes and KV-cache decode steps alike."""

    def __init__(self, model: LlamaForCausalLM, prefix_key_values: tuple):
        super().__init__(auto_prefix=False)
        self.config, self.model = model.config, model
        self.prefix_key_values = prefix_key_values        # per layer (key, value), each [1, K, P, D]
        self.prefix_len = prefix_key_values[0][0].shape[2]

    def _prefixes(self, batch: int) -> tuple:
        return tuple((ops.broadcast_to(key, (batch,) + key.shape[1:]),
                      ops.broadcast_to(value, (batch,) + value.shape[1:])) for key, value in self.prefix_key_values)

    def construct(self, input_ids):
        return self.model(input_ids, self._prefixes(input_ids.shape[0]))

    def decode(self, input_ids, positions, mask, cache_rows, kv_caches):
        """The model's decode step; every query also attends to all prefix positions."""
        batch, _, seq, _ = mask.shape
        mask = ops.concat([ops.zeros((batch, 1, seq, self.prefix_len), ms.float32), mask], -1)
        return self.model.decode(input_ids, positions, mask, cache_rows, kv_caches, self._prefixes(batch))
