"""Tokenizers: one interface (`llama.data.tokenizer_base`), two backends, picked from the path
(`Tokenizer(path)`). Import them from here: this module holds the sentencepiece backend and imports the other.

- sentencepiece (a `.model` file, or a folder holding only `tokenizer.model`): reproduces MindFormers'
  `LlamaTokenizer`, fast (`SentencePieceTokenizer`, below).
- Hugging Face `tokenizers` (a `tokenizer.json`, or a folder holding one, with its `tokenizer_config.json` and
  `special_tokens_map.json` when present): the ids transformers' `AutoTokenizer` gives (`llama.data.hf_tokenizer`).

Every backend encodes text without special tokens and adds BOS/EOS only where the caller asks, so each record
format keeps its MindFormers convention (e.g. BOS + paragraph + EOS) with the tokenizer's own ids.

MindFormers' tokenizer (a Hugging Face-style slow tokenizer in legacy mode) first splits the text on the
special-token strings `<unk>`, `<s>` and `</s>`, turns each of those into its id, and encodes every piece in
between separately with sentencepiece. Its special tokens have lstrip/rstrip off, so the whitespace around
them stays in the neighbouring pieces, and each piece gets sentencepiece's own dummy-prefix `▁`:
`" 000 <unk> x"` → `▁▁ 0 0 0 ▁ | <unk> | ▁ ▁x`. Pieces left empty by the split are skipped. Plain
sentencepiece instead spells `<unk>` as `<`, `unk`, `>`.

Large inputs are encoded word by word with each distinct word encoded once (`WordEncoder`, exact for
sentencepiece BPE models that qualify, and used for nothing else); everything else goes through
sentencepiece's own threaded encoder in large blocks, so all cores work in C++ and Python only splits the text
and glues the id lists together.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from llama.data.hf_tokenizer import HFTokenizer
from llama.data.tokenizer_base import (BLOCK, TOKENIZER_FILES, TOKENIZER_JSON, TOKENIZER_MODEL, Tokenizer,
                                       flatten_id_lists)
from llama.errors import PipelineError
from llama.fileio import sha256_bytes

__all__ = ["BLOCK", "TOKENIZER_FILES", "TOKENIZER_JSON", "TOKENIZER_MODEL", "HFTokenizer", "SentencePieceTokenizer",
           "Tokenizer", "WordEncoder", "load_tokenizer", "take_lists"]

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(token) for token in SPECIAL_TOKENS) + ")")

# Below this much text per call, sentencepiece alone is quicker than counting distinct words first.
WORD_ENCODER_MIN_CHARS = 1 << 18
_SPACE_MARK = "\N{LOWER ONE EIGHTH BLOCK}"  # sentencepiece's `▁`


def take_lists(values: np.ndarray, offsets: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The lists `values[offsets[i]:offsets[i + 1]]` for each i in `index`, concatenated (by Arrow, in C++)."""
    import pyarrow as pa

    lists = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(values))
    return lists.take(pa.array(index)).flatten().to_numpy()


class WordEncoder:
    """Sentencepiece BPE, exactly, at the cost of encoding each distinct word once.

    For a BPE model whose pieces never join a character to a following `▁` (Llama 2's never do), the ids
    of a text are the ids of its words, each taken with the spaces before it (`a  b` → `▁a`, `▁▁b`),
    concatenated: BPE merges only neighbours whose join is a piece, so no merge crosses such a boundary,
    and inside each word the merges happen in the same order as in the whole text. WikiText-2's 2.5M
    tokens come from about 116K distinct words. Splitting and counting words runs in Arrow's C++ kernels.

    Only models whose normalizer leaves the text alone qualify (`for_model` says None otherwise), and a
    text that contains `▁` itself or a NUL byte is left to sentencepiece (`encode` says None).
    """

    def __init__(self, sp_without_dummy_prefix):
        self.sp = sp_without_dummy_prefix

    @classmethod
    def for_model(cls, model_proto: bytes) -> WordEncoder | None:
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2

        model = sentencepiece_model_pb2.ModelProto()
        model.ParseFromString(model_proto)
        normalizer = model.normalizer_spec
        user_defined, unused = 4, 5  # ModelProto.SentencePiece.Type
        qualifies = (
            model.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
            and normalizer.name == "identity" and not normalizer.precompiled_charsmap
            and normalizer.add_dummy_prefix and normalizer.escape_whitespaces
            and not normalizer.remove_extra_whitespaces and not model.trainer_spec.treat_whitespace_as_suffix
            and not any(piece.type in (user_defined, unused) for piece in model.pieces)
            and not any(re.search(f"[^{_SPACE_MARK}]{_SPACE_MARK}", piece.piece) for piece in model.pieces))
        if not qualifies:
            return None
        # Texts are encoded as " " + text by a copy without the dummy prefix: the same `▁` + text.
        normalizer.add_dummy_prefix = False
        return cls(sentencepiece.SentencePieceProcessor(model_proto=model.SerializeToString()))

    def encode(self, texts: Sequence[str], workers: int) -> tuple[np.ndarray, np.ndarray] | None:
        """All texts' ids (each with the dummy prefix) as one int32 array plus int64 offsets (len + 1)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        encoded = [text.encode() for text in texts]
        data = b" " + b" ".join(encoded)  # every text with its dummy-prefix space in front
        if b"\0" in data or _SPACE_MARK.encode() in data:
            return None
        offsets = np.concatenate(([0], np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)) + 1)))
        array = pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(encoded),
                                                 [None, pa.py_buffer(offsets), pa.py_buffer(data)])
        # A NUL before every space that follows a non-space: words keep the spaces in front of them.
        marked = pc.replace_substring(pc.replace_substring(array, b" ", b"\0 "), b" \0", b" ")
        words = pc.split_pattern(marked, b"\0")
        codes = words.flatten().dictionary_encode()
        distinct_ids, distinct_offsets = flatten_id_lists(
            self.sp.encode(codes.dictionary.to_pylist(), num_threads=workers))
        word = codes.indices.to_numpy()
        word_ends = np.concatenate(([0], np.cumsum(np.diff(distinct_offsets)[word])))
        return take_lists(distinct_ids, distinct_offsets, word), word_ends[words.offsets.to_numpy()]


class SentencePieceTokenizer(Tokenizer, kind="sentencepiece"):
    """A sentencepiece model with MindFormers' special-token handling; `sha256` is the model file's."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece

        path = Path(path)
        self.path = path / TOKENIZER_MODEL if path.is_dir() else path
        if not self.path.is_file():
            raise PipelineError(f"tokenizer {self.path} does not exist")
        data = self.path.read_bytes()
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=data)
        except RuntimeError:
            self.sp = None
        if self.sp is None or self.sp.get_piece_size() == 0:
            raise PipelineError(f"tokenizer {self.path} is neither a sentencepiece model nor a {TOKENIZER_JSON}")
        self.files = {TOKENIZER_MODEL: self.path}
        self.sha256 = sha256_bytes(data)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise PipelineError(f"tokenizer {self.path} has no BOS or EOS token")
        # MindFormers pads with its pad token "<unk>", i.e. the unknown-piece id (0 for Llama 2), and its
        # LlamaTokenizer puts BOS, not EOS, in front of a text.
        self.pad_id = self.sp.unk_id()
        self.add_bos, self.add_eos = True, False
        self.special_ids = {token: self.sp.piece_to_id(token) for token in SPECIAL_TOKENS}

    @functools.cached_property
    def words(self) -> WordEncoder | None:
        """The word-by-word encoder for large inputs, where this model allows it (built on first use)."""
        return WordEncoder.for_model(self.sp.serialized_model_proto())

    def encode(self, text: str, bos: bool = False, eos: bool = False, split_special: bool = True) -> list[int]:
        return [token for part in self._parts(text, bos, eos, split_special)
                for token in ([part] if isinstance(part, int) else self.sp.encode(part))]

    def encode_flat(self, texts: Sequence[str], bos: bool = False, eos: bool = False,
                    split_special: bool = True, workers: int | None = None,
                    progress=None) -> tuple[np.ndarray, np.ndarray]:
        # The output as a list of chunks: a piece of text (its index) or a single token t (stored as ~t).
        pieces: list[str] = []
        chunks: list[int] = []
        text_chunks: list[int] = []  # each text's first chunk
        for text in texts:
            text_chunks.append(len(chunks))
            for part in self._parts(text, bos, eos, split_special):
                if isinstance(part, int):
                    chunks.append(~part)
                else:
                    chunks.append(len(pieces))
                    pieces.append(part)
        text_chunks.append(len(chunks))

        piece_ids, piece_offsets = self._encode_pieces(pieces, chunks, text_chunks, workers or os.cpu_count() or 1,
                                                       progress)
        # Each single token goes in front of the ids of the pieces that follow it.
        chunks = np.asarray(chunks, dtype=np.int64)
        token = chunks < 0
        pieces_before = np.concatenate(([0], np.cumsum(~token)))  # per chunk, and one past the last
        ids = np.insert(piece_ids, piece_offsets[pieces_before[:-1][token]], ~chunks[token])
        text_chunks = np.asarray(text_chunks)
        tokens_before = text_chunks - pieces_before[text_chunks]
        return ids, piece_offsets[pieces_before[text_chunks]] + tokens_before

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def _parts(self, text: str, bos: bool, eos: bool, split_special: bool):
        """`text` as MindFormers encodes it, in order: single token ids (int) and non-empty pieces of text."""
        if bos:
            yield self.bos_id
        for index, part in enumerate(_SPECIAL_SPLIT.split(text) if split_special else [text]):
            if index % 2:
                yield self.special_ids[part]
            elif part:
                yield part
        if eos:
            yield self.eos_id

    def _encode_pieces(self, pieces, chunks, text_chunks, workers, progress) -> tuple[np.ndarray, np.ndarray]:
        """Every piece's ids (with the dummy prefix) as one array plus offsets; `progress` counts texts."""
        texts = len(text_chunks) - 1
        if sum(map(len, pieces)) >= WORD_ENCODER_MIN_CHARS and self.words is not None:
            encoded = self.words.encode(pieces, workers)
            if encoded is not None:
                if progress is not None:
                    progress.update(texts)
                return encoded
        id_lists: list[list[int]] = []
        for first in range(0, texts, BLOCK):
            last = min(first + BLOCK, texts)
            # The pieces of texts [first, last): those referenced by their chunks.
            block = [c for c in chunks[text_chunks[first]:text_chunks[last]] if c >= 0]
            if block:
                id_lists.extend(self.sp.encode(pieces[block[0]:block[-1] + 1], num_threads=workers))
            if progress is not None:
                progress.update(last - first)
        return flatten_id_lists(id_lists)


def load_tokenizer(checkpoint: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> Tokenizer:
    """`tokenizer` if given, else the checkpoint folder's own (its tokenizer.json, else its tokenizer.model)."""
    if tokenizer is None:
        folder = Path(checkpoint)
        if not any((folder / name).is_file() for name in (TOKENIZER_JSON, TOKENIZER_MODEL)):
            raise PipelineError(f"checkpoint {checkpoint} has no {TOKENIZER_JSON} or {TOKENIZER_MODEL}; "
                                "pass one with --tokenizer")
        tokenizer = folder
    return Tokenizer(tokenizer)
