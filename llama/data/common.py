"""What the dataset preprocessors share: argument checks, record fields, padding, the run around a builder."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

from llama.data.records import write_records
from llama.data.tokenizer import Tokenizer
from llama.errors import PipelineError
from llama.fileio import check_output_free, read_json, sha256_file
from llama.progress import Progress


def text_field(record, name: str, where: str, required: bool = True) -> str:
    """`record[name]` as a string, or a one-line error naming the record and the field."""
    if not isinstance(record, dict):
        raise PipelineError(f"{where} is not a JSON object")
    if name not in record:
        if required:
            raise PipelineError(f"{where} has no field '{name}'")
        return ""
    value = record[name]
    if not isinstance(value, str):
        raise PipelineError(f"{where} field '{name}' is not a string")
    return value


def list_field(record, name: str, where: str) -> list:
    """`record[name]` as a list, or a one-line error naming the record and the field."""
    if not isinstance(record, dict):
        raise PipelineError(f"{where} is not a JSON object")
    if not isinstance(record.get(name), list):
        raise PipelineError(f"{where} has no list field '{name}'")
    return record[name]


def check_length(length: int, what: str) -> None:
    """A row must hold at least one input and one target token."""
    if length < 2:
        raise PipelineError(f"{what} must be at least 2, got {length}")


def pad(ids: Sequence[int], length: int, value: int) -> list[int]:
    """`ids` cut or padded with `value` to exactly `length`."""
    return list(ids[:length]) + [value] * (length - len(ids))


def encode(tokenizer, texts: list[str], label: str) -> list[list[int]]:
    """Token ids of `texts` (no BOS/EOS), on every core, with a progress line."""
    with Progress(label, total=len(texts), unit="texts") as progress:
        return tokenizer.encode_batch(texts, progress=progress)


def run_preprocess(build, *, kind: str, input, tokenizer, seq_length: int, length_flag: str, output,
                   overwrite: bool) -> dict:
    """Check the arguments before any work, load tokenizer and input, build rows, write them atomically.

    `build(data, tokenizer, sidecar_dir)` returns (columns, stats, extra_files): file names → paths it wrote
    into `sidecar_dir` for the output folder.
    """
    check_length(seq_length, length_flag)
    check_output_free(output, overwrite)
    tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    data = read_json(input, f"{kind} input")
    with tempfile.TemporaryDirectory(prefix=f"llama2-{kind}-") as sidecar_dir:
        columns, stats, extra = build(data, tokenizer, Path(sidecar_dir))
        manifest = write_records(output, columns, kind=kind, seq_length=seq_length, tokenizer=tokenizer,
                                 sources={Path(input).name: sha256_file(input)}, stats=stats,
                                 overwrite=overwrite, extra_files=extra)
    return manifest


def add_io_arguments(parser, length_flag: str, length_help: str, input_help: str = "input JSON file") -> None:
    """The arguments every dataset takes."""
    parser.add_argument("--input", required=True, type=Path, help=input_help)
    parser.add_argument("--tokenizer", required=True, type=Path,
                        help="sentencepiece tokenizer.model, Hugging Face tokenizer.json, or a folder holding one")
    parser.add_argument(length_flag, required=True, type=int, help=length_help)
    parser.add_argument("--output", required=True, type=Path, help="output folder (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
