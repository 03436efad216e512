"""llama2.c checkpoints: the version 0 ("legacy") export, a 7-int32 header, then float32 weights."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from llama.config.model import ModelConfig
from llama.errors import PipelineError
from llama.weights.entry import Entry, _file_entry, permute_qk


LLAMA2C_HEADER = struct.Struct("<7i")


def read_llama2c(path: Path) -> tuple[dict[str, Entry], ModelConfig]:
    """llama2.c's legacy export: header (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab, seq_len),
    then float32 arrays in a fixed order; a negative vocab size means a separate classifier at the end."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(LLAMA2C_HEADER.size)
    if head[:4] == b"ak42":
        raise PipelineError(f"{path} is a llama2.c version 1/2 export; only the legacy (v0) format is supported")
    if len(head) < LLAMA2C_HEADER.size:
        raise PipelineError(f"{path} is too short for a llama2.c checkpoint")
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = LLAMA2C_HEADER.unpack(head)
    if min(dim, hidden, layers, heads, kv_heads, seq_len) <= 0 or dim % heads or heads % kv_heads:
        raise PipelineError(f"{path} does not start with a llama2.c v0 header")
    config = ModelConfig(vocab_size=abs(vocab), hidden_size=dim, intermediate_size=hidden, num_layers=layers,
                         num_heads=heads, num_kv_heads=kv_heads, max_position_embeddings=seq_len,
                         tie_word_embeddings=vocab > 0)
    kv, head_dim = kv_heads * (dim // heads), dim // heads
    blocks = [("tok", (abs(vocab), dim)), ("attention_norm.weight", (dim,)), ("attention.wq.weight", (dim, dim)),
              ("attention.wk.weight", (kv, dim)), ("attention.wv.weight", (kv, dim)),
              ("attention.wo.weight", (dim, dim)), ("ffn_norm.weight", (dim,)),
              ("feed_forward.w1.weight", (hidden, dim)), ("feed_forward.w2.weight", (dim, hidden)),
              ("feed_forward.w3.weight", (hidden, dim)), ("final", (dim,)),
              ("freq_cis", (2 * seq_len * head_dim // 2,))] + ([] if vocab > 0 else [("lm_head", (abs(vocab), dim))])
    entries, offset, f32 = {}, LLAMA2C_HEADER.size, np.dtype(np.float32)

    def add(name, shape):
        nonlocal offset
        nbytes = int(np.prod(shape)) * 4
        entries[name] = _file_entry(path, [(offset, nbytes)], f32, shape)
        offset += nbytes

    for block, shape in blocks:
        if block == "tok":
            add("model.tok_embeddings.embedding_weight", shape)
        elif block == "final":
            add("model.norm_out.weight", shape)
        elif block == "freq_cis":
            offset += int(np.prod(shape)) * 4          # precomputed rotary tables; the model makes its own
        elif block == "lm_head":
            add("lm_head.weight", shape)
        else:
            for i in range(layers):
                add(f"model.layers.{i}.{block}", shape)
    if offset != size:
        raise PipelineError(f"{path} has {size} bytes; its header describes {offset}"
                            + (" (truncated)" if offset > size else ""))
    return permute_qk(entries, config), config

