"""`preprocess squad`: SQuAD v1.1 → prompt/answer rows in MindFormers' `squad_data_process.py` layout.

Prompt: "Read the passage and answer the question below.\\n\\n### Instruction:\\n{context}\\n\\n### Input:\\n
{question}\\n\\n### Response:". MindFormers keeps the first question and first answer of each paragraph
(`questions="first"`); `questions="all"` keeps every question. Either way `answers.jsonl` in the output folder
lists, per row, the question id, the question and all gold answers, so evaluation can score the official way.

- eval rows (`max_length` tokens): input_ids = BOS + prompt padded with 0; labels = the first answer's ids,
  no special tokens, padded with 0. For every prompt that fits this is MindFormers' output.
- train rows (`max_length + 1` tokens, like every training row here): BOS + prompt + answer + EOS, labels
  -100 on BOS, the prompt and padding. The answer's ids are those it gets after "### Response:" and a space,
  so the prompt/answer boundary is exact and the answer reads as a model continues the prompt: with
  sentencepiece (its dummy prefix) these are the eval labels' ids; a byte-level BPE tokenizer puts the space
  into the answer's first token. (MindFormers encodes the joined string without a space, leaves the prompt's
  last token in the loss, masks rows that exactly fill the length and crashes on longer.)

`articles` selects SQuAD articles by position (`"0:6"`, `"6:"`, as a Python slice), so a model can be
finetuned on some articles of a file and evaluated on others it has not seen.

A prompt too long for its row loses the end of the context, so the question, "### Response:" and the answer
survive; such rows are counted as `truncated`. When even an empty context does not fit, the prompt loses its
beginning instead, keeping "### Response:" (and in train mode as much answer as fits); such rows, and eval
rows whose answer is longer than the row, are counted as `clipped`. No row is dropped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llama.cli import add_command
from llama.data.common import add_io_arguments, check_length, encode, list_field, pad, run_preprocess, text_field
from llama.data.records import IGNORE_ID, summarize
from llama.errors import PipelineError

RESPONSE = "### Response:"
PROMPT = ("Read the passage and answer the question below.\n\n### Instruction:\n{context}\n\n"
          "### Input:\n{question}\n\n" + RESPONSE)
MODES = ("eval", "train")
QUESTIONS = ("first", "all")
ANSWERS_FILE = "answers.jsonl"


@dataclass(frozen=True)
class Example:
    id: str
    context: str
    question: str
    answers: tuple[str, ...]

    def prompt(self, context: str | None = None) -> str:
        return PROMPT.format(context=self.context if context is None else context, question=self.question)


def parse_articles(text: str | None) -> slice:
    """`"START:STOP"` (either may be left out, as in a Python slice) → a slice of article positions; None: all."""
    if text is None:
        return slice(None)
    start, colon, stop = str(text).partition(":")
    try:
        bounds = [int(part) if part.strip() else None for part in (start, stop)]
    except ValueError:
        bounds = None
    if not colon or bounds is None or any(bound is not None and bound < 0 for bound in bounds):
        raise PipelineError(f"articles must be START:STOP with non-negative positions, e.g. 0:6 or 6:, got {text!r}")
    return slice(*bounds)


def read_squad(data, questions: str = "first", articles: str | None = None) -> list[Example]:
    """Validated examples in file order: each paragraph's first question, or all of them, of the articles
    `articles` selects (see `parse_articles`)."""
    if questions not in QUESTIONS:
        raise PipelineError(f"questions must be one of {', '.join(QUESTIONS)}, got {questions!r}")
    selection = parse_articles(articles)
    every_article = list_field(data, "data", "SQuAD input")
    positions = range(len(every_article))[selection]
    if every_article and not positions:
        raise PipelineError(f"articles {articles} selects none of the input's {len(every_article)} articles")
    examples = []
    for a in positions:
        article = every_article[a]
        for p, paragraph in enumerate(list_field(article, "paragraphs", f"data[{a}]")):
            where = f"data[{a}].paragraphs[{p}]"
            context = text_field(paragraph, "context", where)
            qas = list_field(paragraph, "qas", where)
            if not qas:
                raise PipelineError(f"{where} has no questions")
            for q, qa in enumerate(qas[:1] if questions == "first" else qas):
                answers = list_field(qa, "answers", f"{where}.qas[{q}]")
                if not answers:
                    raise PipelineError(f"{where}.qas[{q}] has no answers (SQuAD v1.1 has at least one)")
                examples.append(Example(
                    id=text_field(qa, "id", f"{where}.qas[{q}]"), context=context,
                    question=text_field(qa, "question", f"{where}.qas[{q}]"),
                    answers=tuple(text_field(answer, "text", f"{where}.qas[{q}].answers[{n}]")
                                  for n, answer in enumerate(answers))))
    if not examples:
        raise PipelineError("SQuAD input has no paragraphs")
    return examples


def squad_columns(examples: list[Example], tokenizer, max_length: int, mode: str = "eval"
                  ) -> tuple[dict[str, np.ndarray], dict]:
    """Rows for `examples` in `mode` (see the module docstring), and their statistics."""
    if mode not in MODES:
        raise PipelineError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    check_length(max_length, "max_length")
    train = mode == "train"
    row_length = max_length + 1 if train else max_length
    answer_texts = [f"{RESPONSE} {e.answers[0]}" if train else e.answers[0] for e in examples]
    encoded = encode(tokenizer, [e.prompt() for e in examples] + answer_texts, "tokenizing squad")
    prompts, answers = encoded[:len(examples)], encoded[len(examples):]
    if train:
        answers = _continuations(tokenizer, RESPONSE, answers)
    bos, eos, pad_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    stats = {"truncated": 0, "clipped": 0, "mode": mode}
    input_rows, label_rows = [], []
    for example, prompt, answer in zip(examples, prompts, answers):
        # Room for the prompt: the row less BOS, and in train mode less the answer and EOS.
        room = row_length - 1 - (len(answer) + 1 if train else 0)
        clipped = False
        if len(prompt) > room:
            shortened = _shorten_context(tokenizer, example, room)
            stats["truncated"] += shortened is not None
            clipped = shortened is None
            if clipped:  # not even the question fits: keep the prompt's end, with "### Response:"
                bare = tokenizer.encode(example.prompt(context=""))
                shortened = bare[len(bare) - max(room, 0):]
            prompt = shortened
        if train:
            ids = [bos] + prompt + answer + [eos]
            labels = [IGNORE_ID] * (1 + len(prompt)) + answer + [eos]
            input_rows.append(pad(ids, row_length, pad_id))
            label_rows.append(pad(labels, row_length, IGNORE_ID))
        else:
            clipped |= len(answer) > row_length
            input_rows.append(pad([bos] + prompt, row_length, pad_id))
            label_rows.append(pad(answer, row_length, pad_id))
        stats["clipped"] += clipped
    columns = {"input_ids": np.array(input_rows, dtype=np.int32).reshape(-1, row_length),
               "labels": np.array(label_rows, dtype=np.int32).reshape(-1, row_length)}
    return columns, stats


def _continuations(tokenizer, lead: str, encoded: list[list[int]]) -> list[list[int]]:
    """The ids after those of `lead` in each of `encoded` (the ids of `lead` + more text): what a model
    generates after `lead`."""
    lead_ids = tokenizer.encode(lead)
    if any(ids[:len(lead_ids)] != lead_ids for ids in encoded):
        raise PipelineError(f"tokenizer {tokenizer.path} merges {lead!r} with the answer after it; "
                            "train rows need a token boundary there")
    return [ids[len(lead_ids):] for ids in encoded]


def _shorten_context(tokenizer, example: Example, room: int) -> list[int] | None:
    """Prompt ids of at most `room` tokens, dropping context from its end; None if even no context is too long.

    The shortened context is decoded and the prompt re-encoded, so the ids are the ones its text gives.
    """
    context = tokenizer.encode(example.context)
    text = example.context
    while True:
        prompt = tokenizer.encode(example.prompt(context=text))
        excess = len(prompt) - room
        if excess <= 0:
            return prompt
        if not context:
            return None
        context = context[:max(len(context) - excess, 0)]
        text = tokenizer.decode(context).rstrip()


def write_answers(path: Path, examples: list[Example]) -> None:
    """One JSON line per row: row index, question id, question and every gold answer."""
    with open(path, "w", encoding="utf-8") as handle:
        for row, example in enumerate(examples):
            handle.write(json.dumps({"row": row, "id": example.id, "question": example.question,
                                     "answers": list(example.answers)}, ensure_ascii=False) + "\n")


def read_answers(path: str | os.PathLike) -> list[dict]:
    """The rows of an `answers.jsonl` written here."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def preprocess_squad(input: str | os.PathLike, tokenizer, max_length: int,
                     output: str | os.PathLike, *, mode: str = "eval", questions: str = "first",
                     articles: str | None = None, overwrite: bool = False) -> dict:
    """Tokenize a SQuAD v1.1 JSON file (the articles `articles` selects, default all) into a verified records
    folder with `answers.jsonl`; return its manifest."""
    parse_articles(articles)  # a bad selection fails before any work

    def build(data, tokenizer, sidecar_dir: Path):
        examples = read_squad(data, questions, articles)
        columns, stats = squad_columns(examples, tokenizer, max_length, mode)
        write_answers(sidecar_dir / ANSWERS_FILE, examples)
        return columns, {**stats, "questions": questions, "articles": articles or ":"}, \
            {ANSWERS_FILE: sidecar_dir / ANSWERS_FILE}

    return run_preprocess(build, kind="squad", input=input, tokenizer=tokenizer,
                          seq_length=max_length, length_flag="--max-length", output=output, overwrite=overwrite)


def _command(args) -> dict:
    manifest = preprocess_squad(args.input, args.tokenizer, args.max_length, args.output, mode=args.mode,
                                questions=args.questions, articles=args.articles, overwrite=args.overwrite)
    return summarize(args.output, manifest)


def register(subparsers) -> None:
    parser = add_command(subparsers, "squad", _command,
                         help="SQuAD v1.1 JSON → MindRecord prompt/answer rows, as MindFormers' squad_data_process")
    add_io_arguments(parser, "--max-length", "tokens per eval row (train rows hold max_length + 1)")
    parser.add_argument("--mode", choices=MODES, default="eval",
                        help="eval: prompt rows with answer labels; train: prompt + answer rows, prompt masked")
    parser.add_argument("--questions", choices=QUESTIONS, default="first",
                        help="first question of each paragraph (MindFormers' set) or all questions")
    parser.add_argument("--articles", metavar="START:STOP",
                        help="only these articles, by position as a Python slice (e.g. 0:6, or 6: for the rest); "
                             "default all")
