"""Perplexity under the three conventions people quote, each labelled in its metric names.

- `mindformers` (MindFormers' PerplexityMetric, on the verified wiki records of `preprocess wiki --mode
  mindformers`, rows of seq_length + 1): logits[:, :-1] against tokens[:, 1:]; targets equal to the pad id
  (0, which is also what MindFormers' tokenizer makes of WikiText's literal `<unk>`) are masked. MindFormers
  averages each eval batch's token mean and reports the mean of those batch means (`ppl_mindformers`), so
  its number depends on the eval batch size; `ppl_mindformers_token_weighted` is the plain token mean.
- `standard` (GPTQ/AWQ tables, "Llama-2-7B = 5.47" at 2048, 5.12 at 4096): the raw test file as Hugging Face's
  wikitext rows joined with blank lines, one BOS, non-overlapping windows of `window` tokens, tail dropped,
  `ppl_standard_ctx{window}` = exp(mean NLL of every window's last window - 1 tokens). From a raw text file it
  also computes lm-eval's `wikitext` task: per document (a top-level `= Title =` section), detokenized,
  encoded without BOS and scored in rolling windows (`rolling_windows`); `word_perplexity` =
  exp(-ΣLL / Σwords), `byte_perplexity` = exp(-ΣLL / Σbytes), counted on the original, undetokenized text.

Every forward pass runs one compiled graph at a fixed [rows, length] shape (short batches are padded and
the padding discarded), and returns per-token NLL, so no [tokens, vocab] array ever reaches numpy.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from llama.data.records import read_columns, verify
from llama.data.tokenizer import load_tokenizer
from llama.data.wiki import standard_ids, wikitext_detokenize
from llama.device import compiled_or_eager, runs_compiled
from llama.errors import PipelineError
from llama.eval.loading import load_model
from llama.fileio import read_text
from llama.progress import Progress

CONVENTIONS = ("mindformers", "standard")
MINDFORMERS_EVAL_BATCH = 1  # pretrain_llama2_7b.yaml: eval_dataset.batch_size comes from runner_config.batch_size
# rows per forward = this // (row length * vocab): bounds the float32 [rows, length, vocab] logits and their
# log-softmax to about 0.5 GB each (4096 tokens of a 32000-word vocabulary, 2666 of SmolLM2's 49152)
LOGITS_PER_FORWARD = 4096 * 32000
LENGTH_BUCKET = 64


class TokenNLL:
    """Compiled per-token negative log-likelihood of `targets` given `inputs`, both int32 [rows, length]."""

    def __init__(self, model, rows: int, length: int | None = None):
        """`rows` per forward; `length`: right-pad shorter inputs to it (a causal model's earlier positions do not
        see the padding), so that differently long inputs share one compiled graph."""
        import mindspore as ms

        model.set_train(False)
        self.rows, self.length, self.config, self._tensor = rows, length, model.config, ms.Tensor
        self._nll, self._shapes = _compiled_nll(model)
        self.padded = runs_compiled(model)   # fixed shapes serve a compiled graph; eagerly they only cost time

    def __call__(self, inputs: np.ndarray, targets: np.ndarray, progress: Progress | None = None) -> np.ndarray:
        """float64 [n, length] NLL for any number of rows, `self.rows` at a time."""
        self.config.check_fits("data", ids=inputs)
        self.config.check_fits("data", ids=targets)
        width = inputs.shape[1]
        columns = max(width, self.length or 0) if self.padded else width
        per_forward = self._rows_per_forward(len(inputs), columns)
        out = np.empty(inputs.shape, dtype=np.float64)
        for start in range(0, len(inputs), per_forward):
            stop = min(start + per_forward, len(inputs))
            count = per_forward if self.padded else stop - start
            batch_in, batch_tgt = (_pad(rows[start:stop], count, columns) for rows in (inputs, targets))
            nll = self._nll(self._tensor(batch_in), self._tensor(batch_tgt)).asnumpy()
            out[start:stop] = nll[:stop - start, :width]
            if progress is not None:
                progress.update(int(inputs[start:stop].size))
        return out

    def _rows_per_forward(self, count: int, columns: int) -> int:
        """Rows per forward. A graph already compiled for these columns serves, since compiling a 30-layer model's
        graph again costs as much as tens of forwards: the smallest that holds all the rows of a forward, else the
        largest, in more forwards (MindFormers' rows and the standard windows after them share one graph).
        Otherwise as few forwards as `self.rows` allows, of equal size: 8 rows at 5 a forward run as 4 + 4, not
        5 + 5 with two padded rows, and one row alone (a 7B-wide model's row padded to 8 cost 8x its forward)."""
        forwards = max(1, -(-count // self.rows))
        rows = max(1, -(-count // forwards))
        if not self.padded:
            return rows
        same = sorted(held for held, width in self._shapes if width == columns and held <= self.rows)
        if same:
            return next((held for held in same if held >= rows), same[-1])
        self._shapes.add((rows, columns))
        return rows


def _compiled_nll(model):
    """One jit function per model (eager where its graph would not fit: llama.device), kept on it with the
    (rows, columns) shapes compiled for it: a new one per TokenNLL would compile its graphs again."""
    if "_nll_graph" not in vars(model):
        from mindspore import ops

        def nll(inputs, targets):
            log_probs = ops.log_softmax(model(inputs), -1)
            return -ops.gather_elements(log_probs, -1, targets.expand_dims(-1)).squeeze(-1)

        model._nll_graph = compiled_or_eager(nll, model), set()
    return model._nll_graph


def _pad(rows: np.ndarray, count: int, columns: int) -> np.ndarray:
    """int32 [count, columns]: `rows` with zeros below and to the right."""
    if rows.shape == (count, columns):
        return np.ascontiguousarray(rows, dtype=np.int32)
    padded = np.zeros((count, columns), np.int32)
    padded[:rows.shape[0], :rows.shape[1]] = rows
    return padded


def forward_rows(length: int, vocab_size: int, logits_per_forward: int = LOGITS_PER_FORWARD) -> int:
    return max(1, logits_per_forward // (length * vocab_size))


def _loss_and_ppl(prefix: str, loss: float) -> dict:
    return {f"loss_{prefix}": loss, f"ppl_{prefix}": math.exp(loss)}


# --------------------------------------------------------------------------------------- mindformers

def mindformers_perplexity(nll_fn: TokenNLL, rows: np.ndarray, batch_size: int = MINDFORMERS_EVAL_BATCH,
                           pad_id: int = 0, progress: Progress | None = None) -> dict:
    """MindFormers' PerplexityMetric over rows of seq_length + 1 tokens, plus the token-weighted mean."""
    if batch_size < 1:
        raise PipelineError(f"batch size must be at least 1, got {batch_size}")
    targets = rows[:, 1:]
    mask = targets != pad_id
    nll = nll_fn(rows[:, :-1], targets, progress) * mask
    # MindFormers' CrossEntropyLoss divides by the mask sum + 1e-8: a fully masked batch counts as loss 0.
    batch_means = [nll[i:i + batch_size].sum() / (mask[i:i + batch_size].sum() + 1e-8)
                   for i in range(0, len(rows), batch_size)]
    scored = int(mask.sum())
    return {
        **_loss_and_ppl("mindformers", float(np.mean(batch_means))),
        **_loss_and_ppl("mindformers_token_weighted", float(nll.sum() / max(scored, 1))),
        "eval_batch_size": batch_size, "batches": len(batch_means), "rows": len(rows),
        "row_length": rows.shape[1], "tokens_scored": scored, "tokens_masked": int(mask.size - scored),
    }


# ------------------------------------------------------------------------------------------ standard

def standard_windows(ids: np.ndarray, window: int) -> np.ndarray:
    """Non-overlapping windows of `window` tokens; the tail that does not fill one is dropped."""
    count = len(ids) // window
    if count == 0:
        raise PipelineError(f"{len(ids)} tokens do not fill one window of {window}")
    return np.asarray(ids[:count * window], dtype=np.int32).reshape(count, window)


def standard_perplexity(nll_fn: TokenNLL, windows: np.ndarray, progress: Progress | None = None) -> dict:
    """GPTQ/AWQ token perplexity: every window predicts its own last window - 1 tokens."""
    window = windows.shape[1]
    nll = nll_fn(windows[:, :-1], windows[:, 1:], progress)
    return {**_loss_and_ppl(f"standard_ctx{window}", float(nll.mean())),
            "windows": len(windows), "window": window, "tokens_scored": int(nll.size)}


# ------------------------------------------------------------------------------------------- lm-eval

def wikitext_documents(text: str) -> list[str]:
    """lm-eval's `wikitext_document_level` pages: a new page at each top-level `= Title =` line."""
    pages, lines = [], []
    for line in text.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return pages


def rolling_windows(tokens: list[int], prefix_id: int, max_length: int) -> Iterator[tuple[list[int], list[int], int]]:
    """lm-eval's disjoint rolling windows (context_len 1): (inputs, targets, scored), targets the inputs
    shifted by one, of which the last `scored` are new. The first window starts from `prefix_id`; later
    ones see up to max_length tokens before their own, so every token is predicted exactly once."""
    if not tokens:
        return
    first = min(max_length, len(tokens))
    yield [prefix_id] + tokens[:first - 1], tokens[:first], first
    done = first
    while done < len(tokens):
        end = min(len(tokens), done + max_length)
        yield tokens[end - max_length - 1:end - 1], tokens[end - max_length:end], end - done
        done = end


def lm_eval_wikitext(nll_fn: TokenNLL, text: str, tokenizer, max_length: int,
                     progress: Progress | None = None) -> dict:
    """lm-eval's `wikitext` word and byte perplexity (and bits per byte) for one WikiText file."""
    documents = wikitext_documents(text)
    encoded = tokenizer.encode_batch([wikitext_detokenize(doc) for doc in documents])
    inputs, targets, scored_mask, owner = [], [], [], []
    for index, tokens in enumerate(encoded):
        for window_in, window_tgt, scored in rolling_windows(tokens, tokenizer.bos_id, max_length):
            pad = max_length - len(window_in)
            inputs.append(window_in + [tokenizer.pad_id] * pad)
            targets.append(window_tgt + [tokenizer.pad_id] * pad)
            scored_mask.append([False] * (len(window_tgt) - scored) + [True] * scored + [False] * pad)
            owner.append(index)
    nll = nll_fn(np.array(inputs, np.int32), np.array(targets, np.int32), progress)
    per_window = (nll * np.array(scored_mask)).sum(axis=1)
    loglikelihood = -np.bincount(owner, weights=per_window, minlength=len(documents))
    words = sum(len(re.split(r"\s+", doc)) for doc in documents)
    nbytes = sum(len(doc.encode("utf-8")) for doc in documents)
    total = float(loglikelihood.sum())
    return {"word_perplexity": math.exp(-total / words), "byte_perplexity": math.exp(-total / nbytes),
            "bits_per_byte": -total / nbytes / math.log(2), "documents": len(documents), "words": words,
            "bytes": nbytes, "rolling_window": max_length, "rolling_windows": len(inputs)}


# ------------------------------------------------------------------------------------------ top level

def evaluate_perplexity(checkpoint: str | os.PathLike, data: str | os.PathLike, convention: str = "mindformers", *,
                        batch_size: int = MINDFORMERS_EVAL_BATCH, window: int | None = None,
                        rolling_window: int | None = None, lm_eval: bool = True,
                        tokenizer: str | os.PathLike | None = None, dtype: str | None = None,
                        model_config: str | None = None, adapter: str | os.PathLike | None = None,
                        logits_per_forward: int = LOGITS_PER_FORWARD, show_progress: bool = True) -> dict:
    """Perplexity of a checkpoint under `convention` (see the module docstring); returns a flat result dict.

    mindformers: `data` is a records folder from `preprocess wiki --mode mindformers`; `batch_size` is
    MindFormers' eval batch. standard: `data` is a raw WikiText file (windows of `window` tokens, default the
    model's context, plus lm-eval's word/byte perplexity over `rolling_window` unless `lm_eval` is False) or
    a records folder from `preprocess wiki --mode standard` (its windows, token perplexity only).
    """
    if convention not in CONVENTIONS:
        raise PipelineError(f"unknown convention {convention!r} (choose from {', '.join(CONVENTIONS)})")
    for name, value in (("window", window), ("rolling window", rolling_window)):
        if value is not None and value < 2:  # None: the model's context
            raise PipelineError(f"{name} must hold at least 2 tokens, got {value}")
    data = Path(data)
    if not data.exists():
        raise PipelineError(f"data {data} does not exist")
    records = data.is_dir()
    if records:
        manifest = verify(data)
        mode = manifest.get("stats", {}).get("mode")
        if manifest.get("kind") != "wiki" or mode != convention:
            raise PipelineError(f"{data} holds {manifest.get('kind')} rows in mode {mode}, "
                                f"not wiki rows for the {convention} convention")
    elif convention == "mindformers":
        raise PipelineError(f"the mindformers convention reads a records folder from `preprocess wiki --mode "
                            f"mindformers`; {data} is a file")
    model, config = load_model(checkpoint, dtype, model_config, adapter)
    result = {"convention": convention, "checkpoint": str(checkpoint), "data": str(data)}

    def token_nll(length: int) -> TokenNLL:
        # columns rounded up to a multiple of LENGTH_BUCKET: evaluations of nearby lengths (MindFormers' rows of
        # 255, windows of 256) share one compiled graph, which a warm model keeps (llama.eval.loading)
        columns = max(length, min(-(-length // LENGTH_BUCKET) * LENGTH_BUCKET, config.max_position_embeddings))
        return TokenNLL(model, forward_rows(columns, config.vocab_size, logits_per_forward), columns)

    def run(label: str, rows_total: int, length: int, compute, nll: TokenNLL | None = None):
        config.check_fits(label, length=length)
        with Progress(f"perplexity ({label})", total=rows_total * length, unit="tokens",
                      enabled=show_progress) as progress:
            return compute(nll or token_nll(length), progress)

    if records:
        rows = read_columns(data)["input_ids"]
        length = rows.shape[1] - 1
        if convention == "mindformers":
            pad_id = manifest["tokenizer"]["pad_id"]
            result.update(run(convention, len(rows), length,
                              lambda fn, p: mindformers_perplexity(fn, rows, batch_size, pad_id, p)))
        else:
            result.update(run(convention, len(rows), length, lambda fn, p: standard_perplexity(fn, rows, p)))
        return result

    text = read_text(data, "data")
    tok = load_tokenizer(checkpoint, tokenizer)
    window = window if window is not None else config.max_position_embeddings
    ids = standard_ids(text, tok)  # as `preprocess wiki --mode standard`
    windows = standard_windows(ids, window)
    rolling = rolling_window if rolling_window is not None else config.max_position_embeddings
    if lm_eval:
        config.check_fits("rolling window", length=rolling)
    # the windows (window - 1 inputs) and lm-eval's rolling windows share one compiled graph
    nll = token_nll(max(window - 1, rolling if lm_eval else 0))
    result.update(run(f"ctx{window}", len(windows), window - 1, lambda fn, p: standard_perplexity(fn, windows, p),
                      nll))
    if lm_eval:
        with Progress("perplexity (lm-eval rolling)", unit="tokens", enabled=show_progress) as progress:
            result.update(lm_eval_wikitext(nll, text, tok, rolling, progress))
    return result

