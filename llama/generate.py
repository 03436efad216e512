"""Text generation with the KV cache: `generate(model, prompt_ids, ...)`; the CLI is `predict`/`generate`
(llama/eval/predict.py).

    generate(model, prompt_ids: list[list[int]], max_new_tokens, temperature=0.0, top_k=0, top_p=1.0,
             seed=0, eos_id=2, pad_id=0, stop_ids=()) -> list[list[int]]   # each prompt's new ids (EOS included)

Prompts are left-padded into one batch. Prefill writes the prompt positions into a KV cache of fixed length
(longest prompt + max_new_tokens, rounded up to buckets; `llama.model.KVCache`, written in place and kept with
the graphs of its shape) in chunks of at most PREFILL_CHUNK tokens; then each decode step writes one slot. Steps
have static shapes, so each graph is compiled once by `mindspore.jit` and reused for every token and for later
calls of similar lengths (on this CPU a compiled step is about 100x faster than PyNative). Chunks keep the
number of graphs small: prompts of any length above a chunk share one prefill graph, and a caller that runs many
batches (SQuAD) sizes every batch's cache for its longest prompt (`longest_prompt`), so that one prefill and one
decode graph serve them all — for a 30-layer model each graph costs tens of seconds to compile. A step takes
only the tokens, the first cache slot they fill and each row's padding; positions, the attention mask and the
cache slots are computed in the graph. Padding slots are masked out of attention and rotary positions count from
each prompt's first real token, so a padded prompt decodes exactly as it does alone.

Greedy decoding (temperature 0) takes the argmax inside the graph (`GreedyStep`), so a step hands the host B
ids instead of [B, V] logits. Sampling (temperature, top-k, top-p, seeded) runs in numpy on the last
position's logits.
"""

from __future__ import annotations

from typing import Collection

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from llama.device import compiled_or_eager, runs_compiled
from llama.errors import PipelineError
from llama.model import NEG_INF, KVCache

PROMPT_BUCKET = 16
PREFILL_CHUNK = 64   # SmolLM2 on 24 SQuAD prompts of 75-431 tokens: 58 s against 70 s with 128 (less padding)
CACHE_BUCKET = 64


def check_sampling(max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> None:
    """One-line errors for settings that mean nothing, before a model is loaded: no new tokens, a negative
    temperature, a negative k, a nucleus outside (0, 1]."""
    if max_new_tokens < 1:
        raise PipelineError(f"max new tokens must be at least 1, got {max_new_tokens}")
    if not temperature >= 0 or temperature == float("inf"):
        raise PipelineError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if top_k < 0:
        raise PipelineError(f"top-k must be >= 0 (0: all tokens), got {top_k}")
    if not 0 < top_p <= 1:
        raise PipelineError(f"top-p must be in (0, 1], got {top_p}")


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


class DecodeStep(nn.Cell):
    """S new tokens per row, written to cache slots first_slot.. ; returns the last position's logits."""

    def __init__(self, model, cache: KVCache):
        super().__init__(auto_prefix=False)
        self.model, self.cache = model, cache

    def construct(self, input_ids, first_slot, pads):
        """input_ids int32 [B, S]; first_slot int32 scalar; pads int32 [B], each row's left padding.
        Returns float32 logits [B, V]."""
        batch, seq = input_ids.shape
        query_slots = first_slot + ops.arange(seq, dtype=ms.int32)                        # [S]
        # positions count from each row's first real token (a padding slot's, masked out, is clamped to 0)
        positions = ops.maximum(query_slots.reshape(1, seq) - pads.reshape(batch, 1), 0)
        key_slots = ops.arange(self.cache.length, dtype=ms.int32).reshape(1, 1, -1)
        allowed = ops.logical_and(key_slots <= query_slots.reshape(1, seq, 1), key_slots >= pads.reshape(batch, 1, 1))
        mask = ops.where(allowed, 0.0, NEG_INF).reshape(batch, 1, seq, -1)
        return self.model.decode(input_ids, positions, mask, self.cache.rows_of(query_slots), self.cache)


class GreedyStep(nn.Cell):
    """A decode step that returns its argmax: the host fetches B ids, not [B, V] logits. One step per call: a
    graph of several steps reads every weight several times between cache writes, and MindSpore copies a
    Parameter on each such read (the tiny model decoded 142 tokens/s that way against 302 at one step)."""

    def __init__(self, step: DecodeStep):
        super().__init__(auto_prefix=False)
        self.step = step
        self.argmax = ops.ArgMaxWithValue(axis=-1)   # first maximum, as argmax, in under half its time on CPU

    def construct(self, input_ids, first_slot, pads):
        """input_ids int32 [B, 1], the last chosen tokens, go to slot first_slot; returns the next tokens int32
        [B, 1]."""
        return self.argmax(self.step(input_ids, first_slot, pads))[0].astype(ms.int32).reshape(-1, 1)


class _Graphs:
    """A model's generation cells, jit-compiled (eager where their graphs would not fit: llama.device), the KV
    caches they write and the shapes they have run at. Kept on the model, so that later calls reuse them and
    they go with it."""

    def __init__(self, model):
        self.model = model
        self.cells = {}      # (rows, cache length, greedy) -> the cell's construct
        self.caches = {}     # (rows, cache length) -> KVCache, shared by that shape's cells
        self.shapes = []     # (rows, prefill chunk, cache length)

    @staticmethod
    def of(model) -> "_Graphs":
        if "_generation_graphs" not in vars(model):
            model._generation_graphs = _Graphs(model)
        return model._generation_graphs

    def cell(self, rows: int, length: int, greedy: bool = False):
        """The decode step over a rows x length cache (greedy: returning its argmax). Eagerly only this shape's
        cells and cache are kept: nothing is compiled, and a 7B model's cache is large."""
        if not runs_compiled(self.model):
            self.cells = {key: cell for key, cell in self.cells.items() if key[:2] == (rows, length)}
            self.caches = {key: cache for key, cache in self.caches.items() if key == (rows, length)}
        if (rows, length, greedy) not in self.cells:
            if (rows, length) not in self.caches:
                self.caches[rows, length] = KVCache(self.model.config, rows, length)
            step = DecodeStep(self.model, self.caches[rows, length])
            cell = GreedyStep(step) if greedy else step
            self.cells[rows, length, greedy] = compiled_or_eager(cell.construct, self.model)
        return self.cells[rows, length, greedy]

    def shape(self, batch: int, longest: int, chunk: int, length: int, decode_slots: int) -> tuple[int, int, int]:
        """(rows, prefill chunk, cache length) for a call that needs (batch, chunk, length): the smallest shape
        already compiled that holds it, since extra rows and padding cost far less than compiling a 30-layer
        model's prefill and decode graphs again (about 20 s); else its own, remembered. Eagerly, its own."""
        if not runs_compiled(self.model):
            return batch, chunk, length
        fitting = [(rows, c, cache) for rows, c, cache in self.shapes
                   if rows >= batch and cache >= length and _round_up(longest, c) + decode_slots <= cache]
        if fitting:
            return min(fitting, key=lambda shape: (shape[0] * shape[2], shape[1]))
        self.shapes.append((batch, chunk, length))
        return batch, chunk, length


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _padded_prompt(longest: int) -> tuple[int, int]:
    """(padded length, prefill chunk) for prompts of up to `longest` tokens: short prompts are one chunk
    rounded up to PROMPT_BUCKET; longer ones whole chunks of PREFILL_CHUNK."""
    chunk = min(PREFILL_CHUNK, _round_up(longest, PROMPT_BUCKET))
    return _round_up(longest, chunk), chunk


def generate(model, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, eos_id: int | None = 2, pad_id: int = 0,
             stop_ids: Collection[int] = (), longest_prompt: int | None = None) -> list[list[int]]:
    """New token ids for each prompt; a row stops after `eos_id` (kept) or `max_new_tokens` (None: no EOS), or
    after one of `stop_ids` (kept) that is not its first new token (e.g. line breaks: an answer may start on
    a new line). `longest_prompt` sizes the cache for prompts up to that length instead of this batch's
    longest, so that calls on batches of different lengths share compiled graphs."""
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise PipelineError("every prompt needs at least one token (e.g. BOS)")
    if max_new_tokens < 1:
        return [[] for _ in prompt_ids]
    config = model.config
    batch, longest = len(prompt_ids), max(len(p) for p in prompt_ids)
    reserved = max(longest, longest_prompt or 0)
    if reserved + max_new_tokens > config.max_position_embeddings:
        raise PipelineError(f"prompt ({reserved}) + max new tokens ({max_new_tokens}) exceeds the model's "
                            f"{config.max_position_embeddings} positions")
    greedy = temperature <= 0
    # Round the padded prompt and the cache up to buckets, so calls with similar lengths share compiled graphs.
    # After the prefill's token, each decode step writes one slot.
    reserved_len, prefill_chunk = _padded_prompt(reserved)
    decode_slots = max_new_tokens - 1
    graphs = _Graphs.of(model)
    rows, prefill_chunk, length = graphs.shape(batch, longest, prefill_chunk,
                                               _round_up(reserved_len + decode_slots, CACHE_BUCKET), decode_slots)
    prompt_ids = list(prompt_ids) + [prompt_ids[-1]] * (rows - batch)   # rows a graph has beyond the batch
    prompt_len = _round_up(longest, prefill_chunk)
    pads = np.array([prompt_len - len(p) for p in prompt_ids], dtype=np.int32)
    tokens = np.full((rows, prompt_len), pad_id, dtype=np.int32)
    for row, ids in enumerate(prompt_ids):
        tokens[row, pads[row]:] = ids
    model.set_train(False)
    step = graphs.cell(rows, length)
    greedy_step = graphs.cell(rows, length, greedy=True) if greedy else None
    pads = ms.Tensor(pads)
    # A cache's slots from an earlier call need no clearing: a step attends only to the slots this call has
    # written (the prompt's, then one per step), and the mask gives every other slot a probability of 0.
    for first in range(0, prompt_len, prefill_chunk):
        logits = step(ms.Tensor(tokens[:, first:first + prefill_chunk]), ms.Tensor(first, ms.int32), pads)

    out = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    emitted = 0
    stops = np.fromiter(stop_ids, dtype=np.int64)

    def emit(ids: np.ndarray) -> bool:
        """Append one token to every unfinished row; True once all rows are finished or long enough."""
        nonlocal emitted
        emitted += 1
        for row in np.flatnonzero(~done):
            out[row].append(int(ids[row]))
        if eos_id is not None:
            done[ids == eos_id] = True
        if emitted > 1:
            done[np.isin(ids, stops)] = True
        return done.all() or emitted == max_new_tokens

    def as_input(ids: np.ndarray) -> ms.Tensor:
        """int32 [rows, 1]: the batch's next tokens, extra rows repeating the last one's."""
        return ms.Tensor(np.concatenate([ids, np.repeat(ids[-1:], rows - batch)]).astype(np.int32)[:, None])

    # extra rows are dropped before sampling, so that they do not change what a seed draws
    rng = np.random.default_rng(seed)
    next_ids = _sample(logits.asnumpy()[:batch], temperature, top_k, top_p, rng)
    slot, finished = prompt_len, emit(next_ids)
    while not finished:
        inputs = (as_input(next_ids), ms.Tensor(slot, ms.int32), pads)
        if greedy:
            next_ids = greedy_step(*inputs).asnumpy()[:batch, 0]
        else:
            next_ids = _sample(step(*inputs).asnumpy()[:batch], temperature, top_k, top_p, rng)
        finished = emit(next_ids)
        slot += 1
    return out
