"""Text generation with the KV cache: `generate(model, prompt_ids, ...)`; the CLI is `predict`/`generate`
(llama/eval/predict.py).

    generate(model, prompt_ids: list[list[int]], max_new_tokens, temperature=0.0, top_k=0, top_p=1.0,
             seed=0, eos_id=2, pad_id=0) -> list[list[int]]   # the new ids of each prompt (EOS included)

Prompts are left-padded into one batch. One prefill step writes every prompt position into a KV cache of
fixed length (longest prompt + max_new_tokens, rounded up to a bucket), then one decode step per new token
writes one slot. Both steps have static shapes, so each is compiled once by `mindspore.jit` and reused for
every token and for later calls of similar lengths (on this CPU a compiled step is about 100x faster than
PyNative). Padding slots are masked out of attention and
rotary positions count from each prompt's first real token, so a padded prompt decodes exactly as it does
alone. Sampling (temperature, top-k, top-p, seeded) runs in numpy on the last position's logits;
temperature 0 is greedy.
"""

from __future__ import annotations

import weakref

import numpy as np

from llama.errors import PipelineError

NEG_INF = -1e9
PROMPT_BUCKET = 16
CACHE_BUCKET = 64


def _sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng) -> np.ndarray:
    """Next token per row of float32 logits [B, V]."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.astype(np.float64) / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, -1)
        # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
        drop = np.cumsum(sorted_probs, -1) - sorted_probs >= top_p
        sorted_probs[drop] = 0.0
        probs = np.zeros_like(probs)
        np.put_along_axis(probs, order, sorted_probs, -1)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in probs])


_COMPILED = weakref.WeakKeyDictionary()


def _compiled_decode(model):
    """One `jit` wrapper per model, so its compiled prefill/decode graphs are reused across calls."""
    import mindspore as ms

    if model not in _COMPILED:
        _COMPILED[model] = ms.jit(model.decode)
    return _COMPILED[model]


def generate(model, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, eos_id: int | None = 2, pad_id: int = 0) -> list[list[int]]:
    """New token ids for each prompt; a row stops after `eos_id` (kept) or `max_new_tokens` (None: no EOS)."""
    import mindspore as ms

    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise PipelineError("every prompt needs at least one token (e.g. BOS)")
    if max_new_tokens < 1:
        return [[] for _ in prompt_ids]
    config = model.config
    batch, longest = len(prompt_ids), max(len(p) for p in prompt_ids)
    if longest + max_new_tokens > config.max_position_embeddings:
        raise PipelineError(f"prompt ({longest}) + max new tokens ({max_new_tokens}) exceeds the model's "
                            f"{config.max_position_embeddings} positions")
    # Round the padded prompt and the cache up to buckets, so calls with similar lengths share compiled graphs.
    prompt_len = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    length = -(-(prompt_len + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
    pads = np.array([prompt_len - len(p) for p in prompt_ids])
    tokens = np.full((batch, prompt_len), pad_id, dtype=np.int32)
    for row, ids in enumerate(prompt_ids):
        tokens[row, pads[row]:] = ids
    slots = np.arange(length)
    step = _compiled_decode(model)
    model.set_train(False)

    def run(input_ids, first_slot):
        """Feed tokens at slots first_slot.. (positions relative to each prompt's start) and get logits."""
        width = input_ids.shape[1]
        query_slots = first_slot + np.arange(width)
        positions = np.maximum(query_slots[None, :] - pads[:, None], 0).astype(np.int32)
        allowed = (slots[None, None, :] <= query_slots[None, :, None]) & (slots[None, None, :] >= pads[:, None, None])
        mask = np.where(allowed, 0.0, NEG_INF).astype(np.float32)[:, None]
        rows, heads, new_slots = np.meshgrid(np.arange(batch), np.arange(config.num_kv_heads), query_slots,
                                             indexing="ij")
        cache_index = np.stack([rows, heads, new_slots], -1).astype(np.int32)
        nonlocal caches
        # mutable: the caches are graph inputs, not constants that would force a recompile per step
        logits, caches = step(ms.Tensor(input_ids), ms.Tensor(positions), ms.Tensor(mask), ms.Tensor(cache_index),
                              ms.mutable(caches))
        return logits.asnumpy()

    caches = model.init_kv_cache(batch, length)
    rng = np.random.default_rng(seed)
    logits = run(tokens, 0)
    out = [[] for _ in prompt_ids]
    done = np.zeros(batch, dtype=bool)
    for i in range(max_new_tokens):
        next_ids = _sample(logits, temperature, top_k, top_p, rng)
        for row in np.flatnonzero(~done):
            out[row].append(int(next_ids[row]))
        if eos_id is not None:
            done |= next_ids == eos_id
        if done.all() or i == max_new_tokens - 1:
            break
        logits = run(next_ids.astype(np.int32)[:, None], prompt_len + i)
    return out
