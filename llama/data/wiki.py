"""WikiText-2 → MindRecord rows of token ids, in one of two conventions.

`mindformers` (training and MindFormers' PerplexityMetric) reproduces `llama_preprocess.py --dataset_type
wiki` record for record: lm-eval's WikiText detokenizer, paragraphs split on blank lines, headings (`=`)
dropped, every paragraph encoded with BOS and EOS by MindFormers' tokenizer (literal `<unk>` → id 0), all
concatenated and cut into rows of `seq_length + 1` tokens — the model reads `row[:-1]` and predicts
`row[1:]`, `seq_length` predictions per row.

`standard` (the GPTQ/AWQ perplexity behind "Llama-2-7B = 5.47"): the raw file's lines, as Hugging Face's
wikitext dataset yields them (blank lines as ""), joined with "\\n\\n", encoded once by plain sentencepiece
(no special-token splitting) with one BOS in front, and cut into non-overlapping windows of exactly
`seq_length` tokens — the model reads the whole window and its loss covers the last `seq_length - 1`.

Both drop the last partial row; `stats.dropped` counts its tokens.
"""

from __future__ import annotations

import functools
import io
import re
from pathlib import Path

import numpy as np

from llama.cli import add_command
from llama.data.records import summarize, write_records
from llama.data.tokenizer import Tokenizer
from llama.errors import PipelineError
from llama.data.common import add_io_arguments, check_length
from llama.fileio import check_output_free, read_text, sha256_file
from llama.progress import Progress

MODES = ("mindformers", "standard")


# The ASCII characters str.strip() strips (bytes.strip() keeps \x1c-\x1f); a non-ASCII byte may start a Unicode space.
_ASCII_WHITESPACE = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"


def _strip_inside(opener: str, closer: str):
    """lm-eval's `\\(\\s*([^\\)]*?)\\s*\\)` → `(\\1)` for one bracket pair, without its slow lazy backtracking.

    The inner class excludes the closer, so a match always runs from an opener to the first closer after
    it; stripping the text between them as str.strip does (it and the regex `\\s` agree on what whitespace
    is) gives the same result.
    """
    opener_bytes, closer_bytes = opener.encode(), closer.encode()
    pattern = re.compile(re.escape(opener_bytes) + b"([^" + re.escape(closer_bytes) + b"]*)" + re.escape(closer_bytes))

    def strip(match: re.Match) -> bytes:
        inner = match[1].strip(_ASCII_WHITESPACE)
        if inner and (inner[0] >= 0x80 or inner[-1] >= 0x80):
            inner = inner.decode().strip().encode()
        return opener_bytes + inner + closer_bytes

    return functools.partial(pattern.sub, strip)


def _rarity(byte: int) -> int:
    """How common a byte is in prose, roughly: punctuation and non-ASCII, newline, capitals and digits, lower
    case, space."""
    char = chr(byte)
    if byte >= 0x80 or not (char.isalnum() or char.isspace()):
        return 0
    return 1 if char == "\n" else 2 if char.isupper() or char.isdigit() else 3 if char.isalpha() else 4


# Beyond one match per this many bytes, bytes.replace itself is quicker than cutting and joining.
_DENSE = 256


def _replace(old: str, new: str):
    """`data.replace(old, new)` on UTF-8 bytes, found where the rarest byte of `old` occurs.

    bytes.replace spends a few ns on every byte (its skip table keys on the pattern's last byte, a space
    in most of these patterns); a vectorized compare for the rarest byte, then checking the rest of the
    pattern at those places, costs a fraction of that. Overlapping occurrences are taken leftmost first,
    as bytes.replace takes them.
    """
    old_bytes, new_bytes = old.encode(), new.encode()
    anchor = min(range(len(old_bytes)), key=lambda i: _rarity(old_bytes[i]))

    def replace(data: bytes) -> bytes:
        if len(data) < len(old_bytes):
            return data
        view = np.frombuffer(data, dtype=np.uint8)
        starts = np.flatnonzero(view[anchor:len(data) - len(old_bytes) + anchor + 1] == old_bytes[anchor])
        for offset, byte in enumerate(old_bytes):
            if offset != anchor:
                starts = starts[view[starts + offset] == byte]
        if len(starts) == 0:
            return data
        if len(starts) * _DENSE > len(data):
            return data.replace(old_bytes, new_bytes)
        if (np.diff(starts) < len(old_bytes)).any():  # overlapping occurrences: the leftmost of each run wins
            kept, free_from = [], 0
            for start in starts.tolist():
                if start >= free_from:
                    kept.append(start)
                    free_from = start + len(old_bytes)
            starts = np.array(kept)
        cuts = [0, *np.column_stack((starts, starts + len(old_bytes))).ravel().tolist(), len(data)]
        return new_bytes.join([data[begin:end] for begin, end in zip(cuts[::2], cuts[1::2])])

    return replace


# lm-eval's `wikitext_detokenizer` (which MindFormers copies as `clean_wikitext`), step for step, on UTF-8
# bytes, where replacing is faster than on str and gives the same result.
_DETOKENIZE = [
    _replace("s '", "s'"),
    functools.partial(re.compile(rb"/' [0-9]/").sub, rb"/'[0-9]/"),
    _replace(" @-@ ", "-"), _replace(" @,@ ", ","), _replace(" @.@ ", "."),
    _replace(" : ", ": "), _replace(" ; ", "; "), _replace(" . ", ". "), _replace(" ! ", "! "),
    _replace(" ? ", "? "), _replace(" , ", ", "),
    _strip_inside("(", ")"), _strip_inside("[", "]"), _strip_inside("{", "}"),
    _strip_inside('"', '"'), _strip_inside("'", "'"),
    _replace("= = = =", "===="), _replace("= = =", "==="), _replace("= =", "=="),
    _replace(" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    _replace(" \n", "\n"), _replace("\n ", "\n"),
    _replace(" N ", " 1 "), _replace(" 's", "'s"),
]


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenization spacing (`3 @.@ 5` → `3.5`, `( x )` → `(x)`) as lm-eval does."""
    data = text.encode()
    for step in _DETOKENIZE:
        data = step(data)
    return data.decode()


def mindformers_paragraphs(text: str) -> tuple[list[str], int]:
    """MindFormers' paragraphs (unstripped, whitespace-only ones kept) and the number of headings dropped."""
    kept, headings = [], 0
    for paragraph in wikitext_detokenize(text).split("\n\n"):
        if paragraph.strip().startswith("="):
            headings += 1
        elif paragraph:
            kept.append(paragraph)
    return kept, headings


def standard_text(text: str) -> str:
    """The GPTQ/AWQ evaluation text: Hugging Face wikitext rows (a line each, blank ones "") joined by blank lines."""
    return "\n\n".join(line if line.strip() else "" for line in io.StringIO(text))


def standard_ids(text: str, tokenizer: Tokenizer):
    """The standard convention's token stream: the raw text joined as above, one BOS, plain sentencepiece."""
    ids, _ = tokenizer.encode_flat([standard_text(text)], bos=True, split_special=False)
    return ids


def preprocess_wiki(input: str | Path, tokenizer: str | Path | Tokenizer, seq_length: int, output: str | Path,
                    mode: str = "mindformers", overwrite: bool = False, show_progress: bool = True) -> dict:
    """Tokenize a WikiText file into rows (see the module docstring) and write them; return the manifest."""
    input, output = Path(input), Path(output)
    if mode not in MODES:
        raise PipelineError(f"unknown wiki mode {mode!r} (choose from {', '.join(MODES)})")
    check_length(seq_length, "--seq-length")
    check_output_free(output, overwrite)
    text = read_text(input)
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer(tokenizer)

    if mode == "mindformers":
        paragraphs, headings = mindformers_paragraphs(text)
        with Progress("tokenize wiki", total=len(paragraphs), unit="paragraphs", enabled=show_progress) as progress:
            ids, _ = tokenizer.encode_flat(paragraphs, bos=True, eos=True, progress=progress)
        row_length = seq_length + 1
        counts = {"paragraphs": len(paragraphs), "headings": headings}
    else:
        ids = standard_ids(text, tokenizer)
        row_length = seq_length
        counts = {}

    rows = len(ids) // row_length
    if rows == 0:
        raise PipelineError(f"input {input} gives {len(ids)} tokens, fewer than one row of {row_length}")
    return write_records(
        output, {"input_ids": ids[:rows * row_length].reshape(rows, row_length)},
        kind="wiki", seq_length=seq_length, tokenizer=tokenizer, overwrite=overwrite, show_progress=show_progress,
        sources={input.name: sha256_file(input)},
        stats={"mode": mode, "tokens": int(len(ids)), "dropped": int(len(ids) - rows * row_length), **counts},
    )


def _run(args) -> dict:
    manifest = preprocess_wiki(args.input, args.tokenizer, args.seq_length, args.output, args.mode, args.overwrite)
    return summarize(args.output, manifest)


def register(subparsers) -> None:
    parser = add_command(subparsers, "wiki", _run, help="WikiText-2 → MindRecord rows for training or perplexity")
    add_io_arguments(parser, "--seq-length", "mindformers: rows of seq_length+1 tokens; standard: windows of seq_length",
                     input_help="a wiki.{train,valid,test}.tokens file")
    parser.add_argument("--mode", choices=MODES, default="mindformers",
                        help="mindformers: as llama_preprocess.py; standard: the GPTQ/AWQ perplexity windows")
