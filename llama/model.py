"""Llama 2 decoder in MindSpore, in one file, with MindFormers' parameter names.

    model = LlamaForCausalLM(ModelConfig.named("tiny"))
    logits = model(input_ids)                     # int32 [batch, seq] -> float32 [batch, seq, vocab]

Parameter names equal MindFormers' (`model.tok_embeddings.embedding_weight`,
`model.layers.{i}.attention.wq.weight`, `...feed_forward.w1.weight`, `model.norm_out.weight`,
`lm_head.weight`), and so do the shapes, but for one: the output projection `lm_head.weight` is held as
[hidden, vocab], the transpose of MindFormers' [vocab, hidden]. oneDNN multiplies a decoding step's hidden
state by that layout in about 0.9 ms instead of 1.4 ms for the tiny model (the largest kernel of a step: about
10% more tokens/s). Checkpoints on disk keep MindFormers' layout; `checkpoint_layout` converts at that boundary
and llama/weights/load.py's `load_checkpoint`/`save_checkpoint` apply it, so a MindFormers checkpoint loads as it
is. Weights use the
Hugging Face / MindFormers rotary layout (rotate-half, not Meta's interleaved pairs); llama/weights/entry.py
permutes Meta and llama2.c weights on conversion.

Extension points for other stages:
- LoRA: `attention.wq/wk/wv/wo` are `Linear` cells (weight [out, in] named `weight`); replace one with a
  wrapper whose construct adds the low-rank path.
- Prefix tuning: `construct(input_ids, prefix_key_values=...)` takes one (key, value) pair per layer, each
  [batch, num_kv_heads, prefix_len, head_dim]; every query attends to all prefix positions.
- Generation: `decode(...)` runs with a fixed-size `KVCache`, written in place, so prefill and every decode
  step have static shapes and compile once each (see llama/generate.py).

Shapes in comments: B batch, S new tokens, L keys visible (cache length, plus prefix), H query heads,
K kv heads, D head_dim, E hidden size, V vocab.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, One, Zero, initializer

from llama.config.model import ModelConfig

MS_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
NEG_INF = -1e9  # finite, so a fully masked row (a padding query) gives a uniform softmax, not NaN
RANDOM, ZEROS = Normal(0.02), Zero()   # weight initializers: a new model's, and one about to load a checkpoint


class Linear(nn.Cell):
    """y = x @ weight.T without bias; weight [out, in] is stored in param_dtype, used in compute_dtype."""

    def __init__(self, in_features: int, out_features: int, param_dtype, compute_dtype, weight_init=RANDOM):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.weight = Parameter(initializer(weight_init, [out_features, in_features], param_dtype), name="weight")
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        out = self.matmul(x.reshape(-1, self.in_features).astype(self.compute_dtype),
                          self.weight.astype(self.compute_dtype))
        return out.reshape(x.shape[:-1] + (self.out_features,))


class OutputProjection(nn.Cell):
    """logits = x @ weight, weight [hidden, vocab] (see the module docstring for why not [vocab, hidden]).
    Not a `Linear`: LoRA wraps Linears and relies on their [out, in] weight."""

    def __init__(self, hidden_size: int, vocab_size: int, param_dtype, compute_dtype, weight_init=RANDOM):
        super().__init__()
        self.hidden_size, self.compute_dtype = hidden_size, compute_dtype
        self.weight = Parameter(initializer(weight_init, [hidden_size, vocab_size], param_dtype), name="weight")
        self.matmul = ops.MatMul()

    def construct(self, x):
        out = self.matmul(x.reshape(-1, self.hidden_size).astype(self.compute_dtype),
                          self.weight.astype(self.compute_dtype))
        return out.reshape(x.shape[:-1] + (-1,))


def transposed_in_model(name: str) -> bool:
    """Whether the model holds this tensor transposed relative to MindFormers' checkpoints: the output
    projection and anything named after it (optimizer moments such as `adam_m.lm_head.weight`)."""
    return name == "lm_head.weight" or name.endswith(".lm_head.weight")


def checkpoint_layout(name: str, array):
    """A model tensor (numpy or MindSpore) in MindFormers' checkpoint layout, or a checkpoint tensor in the
    model's: the layouts differ only by a transpose, so one function converts both ways."""
    if not transposed_in_model(name):
        return array
    return np.ascontiguousarray(array.T) if isinstance(array, np.ndarray) else array.T.contiguous()


class Embedding(nn.Cell):
    def __init__(self, vocab_size: int, hidden_size: int, param_dtype, compute_dtype, weight_init=RANDOM):
        super().__init__()
        self.compute_dtype = compute_dtype
        # MindSpore's CPU Gather has no bfloat16 kernel: cast the table first when it is stored as bf16.
        self.cast_table_first = param_dtype == ms.bfloat16
        self.embedding_weight = Parameter(initializer(weight_init, [vocab_size, hidden_size], param_dtype),
                                          name="embedding_weight")

    def construct(self, input_ids, table=None):
        """int32 [B, S] -> [B, S, E]; `table`: this cell's weight already read in the graph (see
        LlamaForCausalLM.decode)."""
        table = self.embedding_weight if table is None else table
        if self.cast_table_first:
            return ops.gather(table.astype(self.compute_dtype), input_ids, 0)
        return ops.gather(table, input_ids, 0).astype(self.compute_dtype)


# For an elementwise op whose operands differ in shape, MindSpore's CPU kernels keep an index table of 16 bytes
# per output element, for the life of the compiled graph (30 layers x 512 tokens of SmolLM2-135M: about 8 GB).
# Large operands are therefore broadcast explicitly first; small ones are not, which saves a kernel each (a
# decoding step of a 30-layer model runs about 1,500 kernels, each costing some 14 us to launch).
EXPLICIT_BROADCAST_ELEMENTS = 1 << 16


def broadcast_for(x, shape):
    """x broadcast to `shape` where an elementwise op's output of that shape is large (see above); else x."""
    size = 1
    for dim in shape:
        size *= dim
    return ops.broadcast_to(x, shape) if size > EXPLICIT_BROADCAST_ELEMENTS else x


class RMSNorm(nn.Cell):
    """x / rms(x) * weight, normalised in float32 as Hugging Face does, whatever the compute dtype."""

    def __init__(self, hidden_size: int, eps: float, param_dtype, compute_dtype):
        super().__init__()
        self.eps, self.compute_dtype = eps, compute_dtype
        self.weight = Parameter(initializer(One(), [hidden_size], param_dtype), name="weight")

    def construct(self, x):
        h = x.astype(ms.float32)
        h = h * broadcast_for(ops.rsqrt(ops.mean(h * h, -1, True) + self.eps), h.shape)
        return broadcast_for(self.weight.astype(self.compute_dtype), h.shape) * h.astype(self.compute_dtype)


def rotary_tables(head_dim: int, max_positions: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and signed sin [max_positions, D] for the rotate-half layout: frequencies repeated over both halves,
    and sin negated on the first half, so that rotate_half(x) * sin == swap_halves(x) * signed_sin."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    angles = np.outer(np.arange(max_positions, dtype=np.float32), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)
    sign = np.concatenate([-np.ones(head_dim // 2), np.ones(head_dim // 2)]).astype(np.float32)
    return np.cos(angles).astype(np.float32), sign * np.sin(angles).astype(np.float32)


HALVES_SWAPPED = Tensor(np.array([1, 0], np.int32))   # gather order of a head's two halves


class SelfInverseReorder(nn.Cell):
    """A reorder of elements by one gather that undoes itself, so its gradient is the same gather of dout.
    MindSpore's own gradient of a gather keeps several times the tensor's size in a training graph, or, along
    an inner axis, transposes twice, each transpose keeping an index table for the graph's life (see
    SwapAxes12)."""

    def bprop(self, x, out, dout):
        return (self.construct(dout),)


class SwapHalves(SelfInverseReorder):
    """[..., D] -> concat(x[D/2:], x[:D/2]) as one gather of contiguous half rows: slices and a concat would
    be three kernels, and a matmul by the permutation costs about four times as much for a decoding step."""

    def construct(self, x):
        half = x.shape[-1] // 2
        return ops.gather(x.reshape(x.shape[:-1] + (2, half)), HALVES_SWAPPED, x.ndim - 1).reshape(x.shape)


swap_halves = SwapHalves()


@functools.lru_cache(maxsize=None)
def _swapped_rows(a: int, c: int) -> Tensor:
    """Gather order of the rows of an [a, c] grid read as [c, a]: output row j*a + i is input row i*c + j."""
    out = np.arange(a * c)
    return Tensor(((out % a) * c + out // a).astype(np.int32))


class SwapAxes12(SelfInverseReorder):
    """[B, A, C, D] -> [B, C, A, D] (a (0, 2, 1, 3) transpose) as one gather of whole D-rows by a constant order
    of A*C entries. MindSpore's CPU Transpose kernel keeps an index table of 8 bytes per element for the life
    of the compiled graph, one per transpose of every layer; this gather keeps none, and runs as fast. Applied
    to the [B, C, A, D] result it swaps the axes back."""

    def construct(self, x):
        batch, a, c, d = x.shape
        if a == 1 or c == 1:
            return x.reshape(batch, c, a, d)   # the same order of elements (a decoding step's one token)
        return ops.gather(x.reshape(batch, a * c, d), _swapped_rows(a, c), 1).reshape(batch, c, a, d)


swap_axes_1_2 = SwapAxes12()


class SoftmaxLastAxis(nn.Cell):
    """softmax(x, -1), with its gradient y * dy - y * sum(y * dy) broadcast explicitly (`broadcast_for`):
    MindSpore's own subtracts the [..., 1] sum from [..., L] implicitly, whose index table a training graph keeps
    for good (38 MB a layer for SmolLM2-135M at 4 x 256 tokens)."""

    def construct(self, x):
        return ops.softmax(x, -1)

    def bprop(self, x, out, dout):
        weighted = out * dout
        return (weighted - out * broadcast_for(weighted.sum(-1, keepdims=True), out.shape),)


softmax_last_axis = SoftmaxLastAxis()


def apply_rotary(x, cos, signed_sin):
    """x [B, heads, S, D] rotated by position: x*cos + rotate_half(x)*sin, with rotate_half(x) =
    concat(-x[D/2:], x[:D/2]) computed as swap_halves(x) times the sign folded into signed_sin.
    cos/signed_sin of x's shape (see rotary_tables; LlamaModel says why not broadcast)."""
    return x * cos + swap_halves(x) * signed_sin


class Attention(nn.Cell):
    """Grouped-query attention: K kv heads, each shared by H/K query heads."""

    def __init__(self, config: ModelConfig, param_dtype, compute_dtype, weight_init=RANDOM):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.compute_dtype = compute_dtype
        hidden, kv_width = config.hidden_size, config.num_kv_heads * config.head_dim
        self.wq = Linear(hidden, hidden, param_dtype, compute_dtype, weight_init)
        self.wk = Linear(hidden, kv_width, param_dtype, compute_dtype, weight_init)
        self.wv = Linear(hidden, kv_width, param_dtype, compute_dtype, weight_init)
        self.wo = Linear(hidden, hidden, param_dtype, compute_dtype, weight_init)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.scores_matmul = ops.BatchMatMul(transpose_b=True)   # q @ k.T without materialising k.T
        # probs @ v: BatchMatMul's gradient multiplies with transposed operands in place, where `ops.matmul`'s
        # transposes probs and v first, each transpose keeping an index table for the life of a training graph
        # (see SwapAxes12): 41 MiB a layer of SmolLM2-135M at 4 x 256 tokens.
        self.probs_matmul = ops.BatchMatMul()
        self.write_cache = ops.ScatterUpdate()

    def _heads(self, x, heads):
        batch, seq, _ = x.shape
        return swap_axes_1_2(x.reshape(batch, seq, heads, self.head_dim))

    def construct(self, x, rotary, mask, kv_cache=None, cache_rows=None, prefix_kv=None):
        """x [B, S, E]; rotary ((cos, signed_sin) [B, H, S, D], the same [B, K, S, D]); mask additive float32
        [B, H, S, L]; kv_cache (keys, values), Parameters [B*K*cache_len, D] (`KVCache`) that the S new keys
        and values are written into, in place, at cache_rows int32 [B, K, S]. Returns the output [B, S, E]."""
        batch, seq, _ = x.shape
        kv_heads, groups = self.num_kv_heads, self.num_heads // self.num_kv_heads
        q = apply_rotary(self._heads(self.wq(x), self.num_heads), *rotary[0])
        k = apply_rotary(self._heads(self.wk(x), kv_heads), *rotary[1])
        v = self._heads(self.wv(x), kv_heads)
        if kv_cache is not None:
            # in place: a functional scatter returns a copy of the whole cache, every step and layer
            k = self.write_cache(kv_cache[0], cache_rows, k).reshape(batch, kv_heads, -1, self.head_dim)
            v = self.write_cache(kv_cache[1], cache_rows, v).reshape(batch, kv_heads, -1, self.head_dim)
        if prefix_kv is not None:
            k = ops.concat([prefix_kv[0].astype(self.compute_dtype), k], 2)
            v = ops.concat([prefix_kv[1].astype(self.compute_dtype), v], 2)
        # Grouped-query attention without repeating k and v: query head h uses kv head h // G (as in Hugging
        # Face), so the G query heads of one kv head are adjacent and stack along the query axis by a reshape,
        # [B, H, S, D] -> [B, K, G*S, D]. Repeating each kv head G times would copy the keys and values (at
        # decode, the whole cache) every step and layer.
        q = q.reshape(batch, kv_heads, groups * seq, self.head_dim)
        scores = self.scores_matmul(q, k) * self.scale                   # [B, K, G*S, L]
        probs = softmax_last_axis(scores.astype(ms.float32) + mask.reshape(scores.shape)).astype(self.compute_dtype)
        out = self.probs_matmul(probs, v).reshape(batch, self.num_heads, seq, self.head_dim)
        return self.wo(swap_axes_1_2(out).reshape(batch, seq, -1))


class FeedForward(nn.Cell):
    """SwiGLU: w2(silu(w1 x) * w3 x); MindFormers' w1/w3/w2 are HF's gate/up/down projections."""

    def __init__(self, config: ModelConfig, param_dtype, compute_dtype, weight_init=RANDOM):
        super().__init__()
        self.w1 = Linear(config.hidden_size, config.intermediate_size, param_dtype, compute_dtype, weight_init)
        self.w2 = Linear(config.intermediate_size, config.hidden_size, param_dtype, compute_dtype, weight_init)
        self.w3 = Linear(config.hidden_size, config.intermediate_size, param_dtype, compute_dtype, weight_init)

    def construct(self, x):
        return self.w2(ops.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Cell):
    def __init__(self, config: ModelConfig, param_dtype, compute_dtype, weight_init=RANDOM):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype, compute_dtype)
        self.attention = Attention(config, param_dtype, compute_dtype, weight_init)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype, compute_dtype)
        self.feed_forward = FeedForward(config, param_dtype, compute_dtype, weight_init)

    def construct(self, x, rotary, mask, kv_cache=None, cache_rows=None, prefix_kv=None):
        h = x + self.attention(self.attention_norm(x), rotary, mask, kv_cache, cache_rows, prefix_kv)
        return h + self.feed_forward(self.ffn_norm(h))


class LlamaModel(nn.Cell):
    """Embeddings, decoder layers and the final norm (MindFormers' `model.` prefix)."""

    def __init__(self, config: ModelConfig, param_dtype, compute_dtype, weight_init=RANDOM):
        super().__init__()
        self.compute_dtype, self.num_heads, self.num_kv_heads = compute_dtype, config.num_heads, config.num_kv_heads
        self.tok_embeddings = Embedding(config.vocab_size, config.hidden_size, param_dtype, compute_dtype,
                                        weight_init)
        self.layers = nn.CellList([DecoderLayer(config, param_dtype, compute_dtype, weight_init)
                                   for _ in range(config.num_layers)])
        self.norm_out = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype, compute_dtype)
        cos, signed_sin = rotary_tables(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.cos, self.signed_sin = Tensor(cos), Tensor(signed_sin)

    def construct(self, input_ids, positions, mask, kv_caches=None, cache_rows=None, prefix_key_values=None,
                  embedding_table=None):
        """positions int32 [B or 1, S] index the rotary tables; returns hidden [B, S, E]."""
        h = self.tok_embeddings(input_ids, embedding_table)
        batch, seq = input_ids.shape
        # Broadcast once here, so that the layers' elementwise ops see operands of one shape (see broadcast_for).
        mask = ops.broadcast_to(mask, (batch, self.num_heads, seq, mask.shape[-1]))
        cos = ops.gather(self.cos, positions, 0).astype(self.compute_dtype).expand_dims(1)   # [B or 1, 1, S, D]
        signed_sin = ops.gather(self.signed_sin, positions, 0).astype(self.compute_dtype).expand_dims(1)
        rotary = tuple((ops.broadcast_to(cos, (batch, heads, seq, -1)),
                        ops.broadcast_to(signed_sin, (batch, heads, seq, -1)))
                       for heads in (self.num_heads, self.num_kv_heads))
        for i, layer in enumerate(self.layers):
            kv_cache = None if kv_caches is None else (kv_caches.keys[i], kv_caches.values[i])
            prefix_kv = None if prefix_key_values is None else prefix_key_values[i]
            h = layer(h, rotary, mask, kv_cache, cache_rows, prefix_kv)
        return self.norm_out(h)


class LlamaForCausalLM(nn.Cell):
    """The decoder plus the output projection (`lm_head`, or the embedding when tied).

    `weight_init`: RANDOM to train from scratch; ZEROS where a checkpoint's weights replace them at once (drawing
    135M normal numbers takes about 4 s, zeroing them milliseconds)."""

    def __init__(self, config: ModelConfig, weight_init=RANDOM):
        super().__init__()
        self.config = config
        param_dtype = MS_DTYPES[config.param_dtype]
        self.compute_dtype = MS_DTYPES[config.compute_dtype]
        self.model = LlamaModel(config, param_dtype, self.compute_dtype, weight_init)
        self.lm_head = None if config.tie_word_embeddings else OutputProjection(
            config.hidden_size, config.vocab_size, param_dtype, self.compute_dtype, weight_init)
        self.vocab_matmul = ops.MatMul(transpose_b=True)

    def logits(self, hidden, embedding_table=None):
        """[..., E] -> float32 [..., V]; `embedding_table` as in `decode`."""
        if self.lm_head is not None:
            return self.lm_head(hidden).astype(ms.float32)
        if embedding_table is None:
            embedding_table = self.model.tok_embeddings.embedding_weight
        weight = embedding_table.astype(self.compute_dtype)
        out = self.vocab_matmul(hidden.reshape(-1, hidden.shape[-1]), weight)
        return out.reshape(hidden.shape[:-1] + (-1,)).astype(ms.float32)

    def construct(self, input_ids, prefix_key_values=None, only_at=None):
        """Causal forward pass over whole sequences: int32 [B, S] -> float32 logits [B, S, V], or with `only_at`
        (int32 [B, K], positions within each row) the logits at those positions only, [B, K, V]: a finetuning
        loss that scores a few answer tokens per row skips most of the output projection."""
        batch, seq = input_ids.shape
        prefix_len = 0 if prefix_key_values is None else prefix_key_values[0][0].shape[2]
        causal = ops.triu(ops.full((seq, seq), NEG_INF, dtype=ms.float32), 1)
        mask = ops.concat([ops.zeros((seq, prefix_len), ms.float32), causal], 1) if prefix_len else causal
        positions = ops.arange(seq, dtype=ms.int32).expand_dims(0)
        hidden = self.model(input_ids, positions, mask.reshape(1, 1, seq, -1),
                               prefix_key_values=prefix_key_values)
        if only_at is not None:
            rows = ops.arange(batch, dtype=ms.int32).reshape(batch, 1) * seq
            hidden = ops.gather(hidden.reshape(batch * seq, -1), (only_at + rows).reshape(-1), 0)
            hidden = hidden.reshape(batch, only_at.shape[1], -1)
        return self.logits(hidden)

    def decode(self, input_ids, positions, mask, cache_rows, kv_caches, prefix_key_values=None):
        """One prefill or decode step against the KV cache: input_ids [B, S], positions [B, S],
        mask [B, 1, S, L] additive float32, cache_rows int32 [B, K, S] and kv_caches a `KVCache` (see
        Attention). Returns float32 logits of the last position [B, V]; the cache is updated in place.
        Tied embeddings are read once, for the lookup and the output projection: in a graph that writes
        Parameters, MindSpore copies a Parameter on each of several reads (two 113 MB copies a step for
        SmolLM2-135M's table)."""
        # each use of a Parameter in a graph reads it anew; the reshape's output is a tensor, read once
        table = None if self.lm_head is not None else \
            self.model.tok_embeddings.embedding_weight.reshape(self.config.vocab_size, -1)
        hidden = self.model(input_ids, positions, mask, kv_caches, cache_rows, prefix_key_values, table)
        batch, seq, _ = hidden.shape
        # a decode step's single position by a reshape, which costs no kernel (a slice is one per step)
        last = hidden.reshape(batch, -1) if seq == 1 else hidden[:, -1]
        return self.logits(last, table)


class KVCache(nn.Cell):
    """Keys and values of every layer for `batch` rows of `length` slots: per layer two Parameters
    [B*K*length, D] in the compute dtype, rows in [B, K, length] order, so that a reshape gives the
    [B, K, length, D] attention reads and `ScatterUpdate` writes new slots in place (MindFormers keeps its
    cache as Parameters too). Slot (b, k, s) is row (b*K + k)*length + s: `rows_of(slots)`."""

    def __init__(self, config: ModelConfig, batch: int, length: int):
        super().__init__(auto_prefix=False)
        self.batch, self.kv_heads, self.length = batch, config.num_kv_heads, length
        shape, dtype = (batch * config.num_kv_heads * length, config.head_dim), MS_DTYPES[config.compute_dtype]
        self.keys, self.values = (
            ms.ParameterTuple([Parameter(initializer(ZEROS, shape, dtype), name=f"kv_cache.{i}.{kind}",
                                         requires_grad=False) for i in range(config.num_layers)])
            for kind in ("key", "value"))

    def rows_of(self, slots):
        """int32 [S] slots -> int32 [B, K, S] cache rows, the same slots in every row and kv head."""
        starts = ops.arange(self.batch * self.kv_heads, dtype=ms.int32) * self.length
        return starts.reshape(self.batch, self.kv_heads, 1) + slots.reshape(1, 1, -1)
