"""Meta's release of Llama 2: consolidated.NN.pth shards (concatenated here) and params.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llama.config.model import ModelConfig, llama_intermediate_size
from llama.fileio import read_json
from llama.weights.entry import Entry, permute_qk
from llama.weights.names import IGNORED, NP_DTYPES, meta_to_ms_name
from llama.weights.torch_pickle import read_torch_index


def _read_meta(folder: Path) -> tuple[dict[str, Entry], ModelConfig]:
    """Meta's release: consolidated.NN.pth shards split for model parallelism, and params.json."""
    params = read_json(folder / "params.json", "Meta params.json")
    shards = [read_torch_index(p) for p in sorted(folder.glob("consolidated.*.pth"))]
    # Which axis each weight is split along across shards (norms are replicated).
    axis_of = {"tok_embeddings.weight": 1, "output.weight": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1,
               "w1": 0, "w3": 0, "w2": 1}
    entries = {}
    for name, first in shards[0].items():
        if IGNORED.fullmatch(name):
            continue
        key = name if name in axis_of else name.split(".")[-2]
        axis = axis_of.get(key)
        parts = [shard[name] for shard in shards]
        if axis is None or len(parts) == 1:
            entries[meta_to_ms_name(name)] = first
            continue
        shape = list(first.shape)
        shape[axis] = sum(p.shape[axis] for p in parts)
        entries[meta_to_ms_name(name)] = Entry(tuple(shape), first.dtype, lambda ps=parts, a=axis: np.concatenate(
            [p.read() for p in ps], axis=a))
    vocab = params.get("vocab_size", -1)
    if vocab <= 0:
        vocab = entries["model.tok_embeddings.embedding_weight"].shape[0]
    heads = params["n_heads"]
    config = ModelConfig.from_dict(dict(
        vocab_size=vocab, hidden_size=params["dim"], num_layers=params["n_layers"], num_heads=heads,
        num_kv_heads=params.get("n_kv_heads") or heads, rms_norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=params.get("rope_theta", 10000.0),
        intermediate_size=llama_intermediate_size(params["dim"], params.get("multiple_of", 256),
                                                  params.get("ffn_dim_multiplier")),
        param_dtype=str(first.dtype) if str(first.dtype) in NP_DTYPES else "float32"), f"{folder}/params.json")
    return permute_qk(entries, config), config

