"""`preprocess alpaca`: Alpaca records → the `input_ids`/`labels` rows MindFormers' `qa` preprocessing writes.

MindFormers first runs `alpaca_converter.py` (the Stanford Alpaca prompt becomes the human turn, the
output the gpt turn), then `llama_preprocess.py --dataset_type qa`: the turns are rendered with FastChat's
`vicuna_v1.1` template, the text is split into rounds on `</s>`, and every round is encoded with BOS and
EOS, keeping its ids after BOS. A row is BOS + those ids, truncated or padded with 0 to `seq_length + 1`.
Labels are -100 on BOS, on each round's instruction part and on padding.

MindFormers finds the instruction part by splitting strings and finds the padding by looking for id 0, so
texts that contain `</s>`, `<unk>` or " ASSISTANT: " throw its bookkeeping off, and it then sets the whole
row's labels to -100 without a word. Here the labels come from the real token positions (the answer starts
after the tokens of the text up to the template's "ASSISTANT: ", less the "▁" that Llama 2 merges into the
answer's first token, exactly MindFormers' offset; the true row length ends it), MindFormers' bookkeeping is
replayed next to them, and rows where the two disagree are counted and reported. `on_mismatch="keep"` (the
default) keeps such rows with the real labels; `"skip"` drops them. Every other row is identical to
MindFormers'. Rows longer than `seq_length + 1` are truncated as MindFormers does and counted; rows left with
no answer token at all (a prompt longer than the row) are listed, since they teach nothing.
"""

from __future__ import annotations

import os

import numpy as np

from llama.cli import add_command
from llama.data.common import add_io_arguments, check_length, encode, run_preprocess, text_field
from llama.data.records import IGNORE_ID, check_labelled, summarize
from llama.errors import PipelineError

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
TEMPLATE = "vicuna_v1.1"
ON_MISMATCH = ("keep", "skip")


def alpaca_prompt(record: dict) -> str:
    """The human turn `alpaca_converter.py` builds (an empty or missing input selects the shorter prompt)."""
    return (PROMPT_INPUT if record.get("input", "") != "" else PROMPT_NO_INPUT).format_map(record)


def conversation(human: str, gpt: str) -> tuple[str, str]:
    """The `vicuna_v1.1` rendering of one exchange, and the part of it before the answer."""
    from fastchat.conversation import get_conv_template

    conv = get_conv_template(TEMPLATE)
    conv.append_message(conv.roles[0], human)
    conv.append_message(conv.roles[1], gpt)
    text = conv.get_prompt()
    return text, text[:len(text) - len(gpt) - len(conv.sep2)]


def _separators() -> tuple[str, str]:
    """MindFormers' round separator (`</s>`) and instruction/answer separator (" ASSISTANT: ")."""
    from fastchat.conversation import get_conv_template

    conv = get_conv_template(TEMPLATE)
    return conv.sep2, conv.sep + conv.roles[1] + ": "


def rounds(text: str, round_sep: str) -> list[str]:
    """The rounds MindFormers encodes: split on `</s>`, up to the first empty one."""
    parts = text.split(round_sep)
    return parts[:parts.index("")] if "" in parts else parts


def read_alpaca(data) -> list[dict]:
    """Validated Alpaca records: a list of objects with string `instruction` and `output` (`input` optional)."""
    if not isinstance(data, list):
        raise PipelineError("Alpaca input must be a JSON list of records")
    if not data:
        raise PipelineError("Alpaca input has no records")
    records = []
    for index, record in enumerate(data):
        where = f"record {index}"
        records.append({"instruction": text_field(record, "instruction", where),
                        "input": text_field(record, "input", where, required=False),
                        "output": text_field(record, "output", where)})
    return records


def alpaca_columns(records: list[dict], tokenizer, seq_length: int, on_mismatch: str = "keep"
                   ) -> tuple[dict[str, np.ndarray], dict]:
    """Rows of `seq_length + 1` tokens for `records` (see the module docstring), and their statistics."""
    if on_mismatch not in ON_MISMATCH:
        raise PipelineError(f"on_mismatch must be one of {', '.join(ON_MISMATCH)}, got {on_mismatch!r}")
    check_length(seq_length, "seq_length")
    round_sep, answer_sep = _separators()
    row_length = seq_length + 1
    bos, eos = tokenizer.bos_id, tokenizer.eos_id

    # Every string MindFormers encodes, once: rounds of the conversation and of the part before the answer,
    # and for its bookkeeping each round's instruction part.
    plans, unique = [], {}
    for record in records:
        text, before_answer = conversation(alpaca_prompt(record), record["output"])
        plan = (rounds(text, round_sep), rounds(before_answer, round_sep))
        plans.append(plan)
        for piece in plan[0] + plan[1] + _instruction_parts(plan[0], answer_sep):
            unique.setdefault(piece, len(unique))
    encoded = encode(tokenizer, list(unique), "tokenizing alpaca")
    ids_of = {text: encoded[index] for text, index in unique.items()}

    input_ids = np.full((len(plans), row_length), tokenizer.pad_id, dtype=np.int32)
    labels = np.full((len(plans), row_length), IGNORE_ID, dtype=np.int32)
    stats = {"truncated": 0, "dropped": 0, "mismatched": 0, "mismatched_records": [], "no_answer_records": [],
             "on_mismatch": on_mismatch}
    row = 0
    for index, (text_rounds, prompt_rounds) in enumerate(plans):
        ids = [bos] + [t for piece in text_rounds for t in ids_of[piece] + [eos]]
        kept = min(len(ids), row_length)
        input_ids[row, :kept] = ids[:kept]
        # BOS + the prompt's rounds with their EOS, less the last EOS and the "▁" that "ASSISTANT: " ends with
        # (in the full text that space belongs to the answer's first token): MindFormers' own offsets.
        answer_start = 1 + sum(len(ids_of[piece]) + 1 for piece in prompt_rounds) - 2
        labels[row, answer_start:kept] = input_ids[row, answer_start:kept]
        mindformers = _mindformers_labels(ids, text_rounds, ids_of, answer_sep, row_length, tokenizer.pad_id)
        if not np.array_equal(mindformers, labels[row]):
            stats["mismatched"] += 1
            stats["mismatched_records"].append(index)
            if on_mismatch == "skip":
                stats["dropped"] += 1
                input_ids[row], labels[row] = tokenizer.pad_id, IGNORE_ID
                continue
        stats["truncated"] += len(ids) > row_length
        if (labels[row] == IGNORE_ID).all():
            stats["no_answer_records"].append(index)
        row += 1
    return {"input_ids": input_ids[:row], "labels": labels[:row]}, stats


def _instruction_parts(text_rounds: list[str], answer_sep: str) -> list[str]:
    return [parts[0] + answer_sep for parts in (piece.split(answer_sep) for piece in text_rounds)
            if len(parts) == 2]


def _mindformers_labels(ids: list[int], text_rounds: list[str], ids_of: dict, answer_sep: str,
                        row_length: int, pad_id: int) -> np.ndarray:
    """The labels `llama_preprocess.py` computes, bookkeeping faults included (whole row set to -100)."""
    target = np.full(max(len(ids), row_length), pad_id, dtype=np.int32)
    target[:len(ids)] = ids
    real_length = len(ids) - ids.count(pad_id)  # its padding test, fooled by a real <unk>
    target[0] = IGNORE_ID
    position = 1
    for piece in text_rounds:
        parts = piece.split(answer_sep)
        if len(parts) != 2:
            break
        instruction = len(ids_of[parts[0] + answer_sep]) - 1
        target[position:position + max(instruction, 0)] = IGNORE_ID
        position += len(ids_of[piece]) + 1
    target[position:] = IGNORE_ID
    if position < row_length and position != real_length:
        target[:] = IGNORE_ID
    return target[:row_length]


def preprocess_alpaca(input: str | os.PathLike, tokenizer, seq_length: int,
                      output: str | os.PathLike, *, on_mismatch: str = "keep", overwrite: bool = False) -> dict:
    """Tokenize an Alpaca JSON file into a verified records folder; return its manifest."""

    def build(data, tokenizer, _sidecar_dir):
        columns, stats = alpaca_columns(read_alpaca(data), tokenizer, seq_length, on_mismatch)
        check_labelled(columns["labels"], f"alpaca rows of {input} at --seq-length {seq_length}",
                       "their prompts fill the whole row (a longer --seq-length leaves room for the answers)")
        return columns, stats, {}

    return run_preprocess(build, kind="alpaca", input=input, tokenizer=tokenizer,
                          seq_length=seq_length, length_flag="--seq-length", output=output, overwrite=overwrite)


def _command(args) -> dict:
    manifest = preprocess_alpaca(args.input, args.tokenizer, args.seq_length, args.output,
                                 on_mismatch=args.on_mismatch, overwrite=args.overwrite)
    return summarize(args.output, manifest)


def register(subparsers) -> None:
    parser = add_command(subparsers, "alpaca", _command,
                         help="Alpaca JSON → MindRecord rows of input_ids/labels, as MindFormers' qa preprocessing")
    add_io_arguments(parser, "--seq-length", "tokens per row, less one (rows hold seq_length + 1 tokens)")
    parser.add_argument("--on-mismatch", choices=ON_MISMATCH, default="keep",
                        help="rows where MindFormers' label bookkeeping fails (it would mask the whole row): "
                             "keep them with labels from the real token positions (default) or skip them")
