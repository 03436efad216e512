"""Batch prediction, the seed's `run_llama2_predict.sh` as one call: prompts in, completions out.

Each prompt is encoded with BOS where its tokenizer adds one (Llama 2's does, as MindFormers' predict), decoded
with the KV cache in batches, and returned as prompt, completion and full text; `output` writes them as JSON
lines, one per prompt in order.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from llama.data.tokenizer import load_tokenizer
from llama.errors import PipelineError
from llama.eval.loading import load_model
from llama.fileio import atomic_path, check_output_free


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a .jsonl file (objects with "prompt", or strings), else one per non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"prompts file {path} does not exist")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise PipelineError(f"{path} line {number} is not JSON: {err.msg}") from None
            prompt = record.get("prompt") if isinstance(record, dict) else record
            if not isinstance(prompt, str):
                raise PipelineError(f"{path} line {number} has no string \"prompt\"")
            prompts.append(prompt)
        lines = prompts
    if not lines:
        raise PipelineError(f"prompts file {path} has no prompts")
    return lines


def continuation(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text `new_ids` add after the prompt. Decoded together with the prompt, because sentencepiece
    drops a leading space when a piece list is decoded on its own ("Lily" + " and" would read "Lilyand")."""
    head, full = tokenizer.decode(prompt_ids), tokenizer.decode(prompt_ids + new_ids)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(new_ids)


class Predictor:
    """A model and its tokenizer loaded once, completing prompts on each call (the `predict` command, and the
    MLflow model the pipeline registers, whose `predict` is this)."""

    def __init__(self, checkpoint: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                 dtype: str | None = None, model_config: str | None = None,
                 adapter: str | os.PathLike | None = None):
        self.model, config = load_model(checkpoint, dtype, model_config, adapter)
        self.tokenizer = load_tokenizer(checkpoint, tokenizer)
        config.check_fits(f"tokenizer {self.tokenizer.path}", vocab_size=self.tokenizer.vocab_size)

    def complete(self, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, batch_size: int = 8, ignore_eos: bool = False) -> list[dict]:
        """One dict per prompt: prompt, completion, text, new_tokens, finished (stopped at EOS).
        Batch b samples with seed `seed + b * batch_size`, so a run is reproducible for the same batch size."""
        from llama.generate import generate

        if not prompts:
            raise PipelineError("no prompts given")
        if batch_size < 1:
            raise PipelineError(f"batch size must be at least 1, got {batch_size}")
        tok, completions = self.tokenizer, []
        for first in range(0, len(prompts), batch_size):
            batch = prompts[first:first + batch_size]
            encoded = [tok.encode(text, bos=tok.add_bos) for text in batch]
            outputs = generate(self.model, encoded, max_new_tokens, temperature, top_k, top_p, seed + first,
                               None if ignore_eos else tok.eos_id, tok.pad_id)
            for text, prompt_ids, ids in zip(batch, encoded, outputs):
                finished = bool(ids) and ids[-1] == tok.eos_id and not ignore_eos
                completion = continuation(tok, prompt_ids, ids[:-1] if finished else ids)
                completions.append({"prompt": text, "completion": completion, "text": text + completion,
                                    "new_tokens": len(ids), "finished": finished})
        return completions


def predict(checkpoint: str | os.PathLike, prompts: list[str], *, max_new_tokens: int = 64,
            temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
            ignore_eos: bool = False, tokenizer: str | os.PathLike | None = None, dtype: str | None = None,
            model_config: str | None = None, adapter: str | os.PathLike | None = None,
            output: str | os.PathLike | None = None, overwrite: bool = False) -> dict:
    """Complete every prompt; returns `completions` (dicts) and throughput, and writes `output` if given."""
    from llama.generate import check_sampling

    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if not prompts:
        raise PipelineError("no prompts given")
    if output is not None:
        check_output_free(output, overwrite)
    predictor = Predictor(checkpoint, tokenizer, dtype, model_config, adapter)
    start = time.monotonic()
    completions = predictor.complete(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                     top_p=top_p, seed=seed, batch_size=batch_size, ignore_eos=ignore_eos)
    seconds = time.monotonic() - start
    new_tokens = sum(c["new_tokens"] for c in completions)
    if output is not None:
        with atomic_path(output) as tmp:
            tmp.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in completions), encoding="utf-8")
    return {"completions": completions, "prompts": len(prompts), "new_tokens": new_tokens,
            "seconds": round(seconds, 3), "tokens_per_s": round(new_tokens / seconds, 1) if seconds else None,
            **({"output": str(output)} if output is not None else {})}
