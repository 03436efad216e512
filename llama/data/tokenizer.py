"""SentencePiece tokenization that reproduces MindFormers' `LlamaTokenizer`, fast.

MindFormers' tokenizer (a Hugging Face-style slow tokenizer in legacy mode) first splits the text on the
special-token strings `<unk>`, `<s>` and `</s>`, turns each of those into its id, and encodes every piece in
between separately with sentencepiece. Its special tokens have lstrip/rstrip off, so the whitespace around
them stays in the neighbouring pieces, and each piece gets sentencepiece's own dummy-prefix `▁`:
`" 000 <unk> x"` → `▁▁ 0 0 0 ▁ | <unk> | ▁ ▁x`. Pieces left empty by the split are skipped. Plain
sentencepiece instead spells `<unk>` as `<`, `unk`, `>`.

Batches go through sentencepiece's own threaded encoder in large blocks, so all cores work in C++ and
Python only splits the text and glues the id lists together.
"""

from __future__ import annotations

import os
import re
from itertools import chain
from pathlib import Path
from typing import Sequence

import numpy as np

from llama.errors import PipelineError
from llama.fileio import sha256_bytes

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(token) for token in SPECIAL_TOKENS) + ")")

# Texts per threaded sentencepiece call: large enough to keep every core busy, small enough for progress.
BLOCK = 4096


class Tokenizer:
    """A sentencepiece model with MindFormers' special-token handling; `sha256` identifies the model file."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece

        self.path = Path(path)
        if not self.path.is_file():
            raise PipelineError(f"tokenizer {self.path} does not exist")
        data = self.path.read_bytes()
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=data)
        except RuntimeError:
            self.sp = None
        if self.sp is None or self.sp.get_piece_size() == 0:
            raise PipelineError(f"tokenizer {self.path} is not a sentencepiece model")
        self.sha256 = sha256_bytes(data)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise PipelineError(f"tokenizer {self.path} has no BOS or EOS token")
        # MindFormers pads with its pad token "<unk>", i.e. the unknown-piece id (0 for Llama 2).
        self.pad_id = self.sp.unk_id()
        self.special_ids = {token: self.sp.piece_to_id(token) for token in SPECIAL_TOKENS}

    def encode(self, text: str, bos: bool = False, eos: bool = False, split_special: bool = True) -> list[int]:
        """MindFormers' ids for `text` (`split_special=False`: plain sentencepiece), optionally with BOS/EOS."""
        return self.encode_batch([text], bos, eos, split_special, workers=1)[0]

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False,
                     split_special: bool = True, workers: int | None = None, progress=None) -> list[list[int]]:
        """`encode` for many texts on `workers` threads (default: every core); `progress` counts texts."""
        chunks, starts = self._chunks(texts, bos, eos, split_special, workers, progress)
        return [list(chain.from_iterable(chunks[a:b])) for a, b in zip(starts, starts[1:])]

    def encode_flat(self, texts: Sequence[str], bos: bool = False, eos: bool = False,
                    split_special: bool = True, workers: int | None = None,
                    progress=None) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids as one int32 array, plus int64 offsets (len(texts) + 1) where each text starts.

        The fast path for streams such as WikiText: no per-text Python lists are built.
        """
        chunks, starts = self._chunks(texts, bos, eos, split_special, workers, progress)
        lengths = np.fromiter(map(len, chunks), dtype=np.int64, count=len(chunks))
        ends = np.concatenate(([0], np.cumsum(lengths)))
        ids = np.fromiter(chain.from_iterable(chunks), dtype=np.int32, count=int(ends[-1]))
        return ids, ends[starts]

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def _chunks(self, texts, bos, eos, split_special, workers, progress) -> tuple[list[list[int]], list[int]]:
        """Id lists that, concatenated in order, spell every text; `starts[i]` is text i's first chunk.

        Special tokens and BOS/EOS become one-element chunks; every piece of text between them is encoded
        in one threaded sentencepiece call per block of texts.
        """
        workers = workers or os.cpu_count() or 1
        bos_chunk, eos_chunk = [self.bos_id], [self.eos_id]
        special_chunks = {token: [token_id] for token, token_id in self.special_ids.items()}
        chunks: list[list[int]] = []
        starts: list[int] = []
        for first in range(0, len(texts), BLOCK):
            block = texts[first:first + BLOCK]
            pieces: list[str] = []
            layout: list = []  # per chunk: a constant id list, or None for "the next encoded piece"
            for text in block:
                starts.append(len(chunks) + len(layout))
                if bos:
                    layout.append(bos_chunk)
                parts = _SPECIAL_SPLIT.split(text) if split_special else [text]
                for index, part in enumerate(parts):
                    if index % 2:
                        layout.append(special_chunks[part])
                    elif part:
                        layout.append(None)
                        pieces.append(part)
                if eos:
                    layout.append(eos_chunk)
            encoded = iter(self.sp.encode(pieces, num_threads=workers))
            chunks.extend(next(encoded) if chunk is None else chunk for chunk in layout)
            if progress is not None:
                progress.update(len(block))
        starts.append(len(chunks))
        return chunks, starts
