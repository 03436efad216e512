"""SQuAD v1.1 by generation, as MindFormers evaluates Llama 2, scored under both conventions.

Each question's prompt is MindFormers' squad eval record (BOS + "Read the passage and answer the question
below. ... ### Response:", built by `llama.data.squad`, whose context-side truncation keeps prompts within
the model's context less `max_new_tokens`). The model answers greedily with the KV cache
(`llama.generate.generate`, batched, prompts sorted by length), up to `max_new_tokens` (MindFormers: 20), EOS,
or the end of its first line: the answer is its first non-blank line (MindFormers' metric reads only the
first line too, and a model that goes on past its answer only adds words to it). Every answer is scored by
the official SQuAD scorer (all gold answers) and by MindFormers' EmF1Metric (first gold answer), see
`llama.eval.metrics`.

Written to the output folder (atomically): predictions.parquet and predictions.jsonl (id, question,
prediction, gold answers, per-question scores under both conventions), worst_answers.md (the lowest-F1
answers) and results.json (the returned metrics).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llama.data.records import read_columns, verify
from llama.data.squad import ANSWERS_FILE, QUESTIONS, read_answers, read_squad, squad_columns
from llama.data.tokenizer import load_tokenizer
from llama.errors import PipelineError
from llama.eval.loading import load_model
from llama.eval.metrics import score_answer, squad_totals
from llama.fileio import atomic_dir, check_output_free, read_json, write_json_atomic
from llama.progress import Progress

MAX_NEW_TOKENS = 20  # MindFormers' squad evaluation
PREDICTIONS_JSONL, PREDICTIONS_PARQUET = "predictions.jsonl", "predictions.parquet"
WORST_FILE, RESULTS_FILE = "worst_answers.md", "results.json"


@dataclass
class Question:
    id: str
    question: str
    answers: list[str]
    prompt_ids: list[int]


def load_questions(data: str | os.PathLike, tokenizer, questions: str, max_prompt_length: int,
                   limit: int | None = None) -> tuple[list[Question], dict]:
    """The first `limit` (default all) questions with prompt ids from a SQuAD v1.1 JSON file, or from a
    verified `preprocess squad --mode eval` records folder (whose `answers.jsonl` holds the gold answers);
    plus the truncation counts of the prepared rows (a records folder's cover all of its rows)."""
    data = Path(data)
    if not data.exists():
        raise PipelineError(f"data {data} does not exist")
    if not data.is_dir():
        examples = read_squad(read_json(data, "SQuAD file"), questions)[:limit]
        columns, stats = squad_columns(examples, tokenizer, max_prompt_length, "eval")
        golds = [{"id": e.id, "question": e.question, "answers": list(e.answers)} for e in examples]
        rows = columns["input_ids"]
    else:
        manifest = verify(data)
        stats = manifest.get("stats", {})
        if manifest.get("kind") != "squad" or stats.get("mode") != "eval":
            raise PipelineError(f"{data} holds {manifest.get('kind')} rows in mode {stats.get('mode')}, "
                                "not squad eval rows")
        if manifest["tokenizer"]["sha256"] != tokenizer.sha256:
            raise PipelineError(f"{data} was tokenized with another tokenizer than {tokenizer.path}")
        rows, golds = read_columns(data)["input_ids"], read_answers(data / ANSWERS_FILE)
        if len(golds) != len(rows):
            raise PipelineError(f"{data}: {len(rows)} rows but {len(golds)} entries in {ANSWERS_FILE}")
        rows, golds = rows[:limit], golds[:limit]
    result = [Question(g["id"], g["question"], list(g["answers"]), _unpadded(row, tokenizer.pad_id))
              for g, row in zip(golds, rows)]
    too_long = sum(len(q.prompt_ids) > max_prompt_length for q in result)
    if too_long:
        raise PipelineError(f"{data}: {too_long} prompts exceed {max_prompt_length} tokens, the model's context "
                            f"less max new tokens; preprocess with --max-length {max_prompt_length}")
    counts = {"questions_set": stats.get("questions", questions),
              "truncated_prompts": int(stats.get("truncated", 0)), "clipped_prompts": int(stats.get("clipped", 0))}
    return result, counts


def _unpadded(row: np.ndarray, pad_id: int) -> list[int]:
    """BOS + prompt without its right padding (a prompt ends in "### Response:", never in a pad id)."""
    real = np.flatnonzero(row != pad_id)
    return row[:real[-1] + 1].tolist() if len(real) else []


def answer_questions(model, tokenizer, questions: list[Question], max_new_tokens: int = MAX_NEW_TOKENS,
                     batch_size: int = 8, show_progress: bool = True) -> tuple[list[str], int]:
    """Greedy answers in question order, and the number of tokens generated."""
    from llama.generate import generate

    if batch_size < 1:
        raise PipelineError(f"batch size must be at least 1, got {batch_size}")
    # Sorted by length, so that a batch pads little; every batch sizes its cache for the longest prompt, so
    # that one prefill and one decode graph serve all (a short last batch runs in the first batch's graphs).
    order = sorted(range(len(questions)), key=lambda i: len(questions[i].prompt_ids))
    longest = len(questions[order[-1]].prompt_ids) if order else 0
    answers, generated = [""] * len(questions), 0
    line_breaks = [i for i in range(tokenizer.vocab_size) if "\n" in tokenizer.decode([i])]
    with Progress("squad", total=len(questions), unit="questions", enabled=show_progress) as progress:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            prompts = [questions[i].prompt_ids for i in batch]
            outputs = generate(model, prompts, max_new_tokens,
                               eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, stop_ids=line_breaks,
                               longest_prompt=longest)
            for index, ids in zip(batch, outputs):
                generated += len(ids)
                text = tokenizer.decode(ids[:-1] if ids and ids[-1] == tokenizer.eos_id else ids)
                answers[index] = next((line.strip() for line in text.split("\n") if line.strip()), "")
            progress.update(len(batch))
    return answers, generated


def evaluate_squad(checkpoint: str | os.PathLike, data: str | os.PathLike, output_dir: str | os.PathLike, *,
                   questions: str = "first", max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 8,
                   limit: int | None = None, worst: int = 10, tokenizer: str | os.PathLike | None = None,
                   dtype: str | None = None, model_config: str | None = None,
                   adapter: str | os.PathLike | None = None, overwrite: bool = False,
                   show_progress: bool = True) -> dict:
    """Answer SQuAD questions with a checkpoint, score them both ways, write the output folder; return metrics.

    `questions`: "first" (each paragraph's first question: MindFormers' 2067-question set) or "all" (10570);
    a records folder brings its own set. `limit` keeps the first N questions.
    """
    if questions not in QUESTIONS:
        raise PipelineError(f"questions must be one of {', '.join(QUESTIONS)}, got {questions!r}")
    from llama.generate import check_sampling

    check_sampling(max_new_tokens)
    if limit is not None and limit < 1:
        raise PipelineError(f"limit must be at least 1 question, got {limit}")
    check_output_free(output_dir, overwrite)
    model, config = load_model(checkpoint, dtype, model_config, adapter)
    tok = load_tokenizer(checkpoint, tokenizer)
    config.check_fits(f"tokenizer {tok.path}", vocab_size=tok.vocab_size)
    items, counts = load_questions(data, tok, questions, config.max_position_embeddings - max_new_tokens, limit)
    start = time.monotonic()
    predictions, generated = answer_questions(model, tok, items, max_new_tokens, batch_size, show_progress)
    seconds = time.monotonic() - start
    scores = [score_answer(p, q.answers) for q, p in zip(items, predictions)]
    rows = [{"id": q.id, "question": q.question, "prediction": p, "answers": q.answers, **s,
             "prompt_tokens": len(q.prompt_ids)} for q, p, s in zip(items, predictions, scores)]
    result = {
        **squad_totals(scores),
        "questions": len(rows), **counts, "max_new_tokens": max_new_tokens, "generated_tokens": generated,
        "seconds": round(seconds, 3), "tokens_per_s": round(generated / seconds, 1) if seconds else None,
        "checkpoint": str(checkpoint), "data": str(data), "output": str(output_dir),
    }
    _write_outputs(Path(output_dir), rows, result, worst, overwrite)
    return result


def worst_answers(rows: list[dict], count: int) -> list[dict]:
    """The `count` answers with the lowest official F1 (then MindFormers F1), in that order."""
    ranked = sorted(range(len(rows)), key=lambda i: (rows[i]["f1_official"], rows[i]["f1_mindformers"], i))
    return [rows[i] for i in ranked[:count]]


def _cell(value, width: int = 80) -> str:
    text = " ".join(str(value).split()).replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


def _worst_table(rows: list[dict]) -> str:
    lines = ["| id | question | prediction | gold answers | F1 official | F1 MindFormers |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['id']} | {_cell(r['question'])} | {_cell(r['prediction'])} | "
              f"{_cell(' / '.join(r['answers']))} | {r['f1_official']:.2f} | {r['f1_mindformers']:.2f} |"
              for r in rows]
    return "# Worst answers\n\n" + "\n".join(lines) + "\n"


def _write_outputs(out: Path, rows: list[dict], result: dict, worst: int, overwrite: bool) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_dir(out, overwrite) as tmp:
        with open(tmp / PREDICTIONS_JSONL, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        pq.write_table(pa.Table.from_pylist(rows), tmp / PREDICTIONS_PARQUET)
        (tmp / WORST_FILE).write_text(_worst_table(worst_answers(rows, worst)), encoding="utf-8")
        write_json_atomic(tmp / RESULTS_FILE, result)
