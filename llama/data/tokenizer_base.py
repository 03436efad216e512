"""The tokenizer interface every stage uses, and what its backends share: `Tokenizer(path)` opens the backend
that `path` names. Open tokenizers through `llama.data.tokenizer`, which imports every backend.
"""

from __future__ import annotations

import os
from itertools import chain
from pathlib import Path
from typing import Sequence

import numpy as np

from llama.errors import PipelineError

# Texts per threaded sentencepiece call: large enough to keep every core busy, small enough for progress.
BLOCK = 4096
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
# The files that make up a tokenizer, in the names transformers gives them; `convert` copies those it finds.
TOKENIZER_FILES = (TOKENIZER_MODEL, TOKENIZER_JSON, "tokenizer_config.json", "special_tokens_map.json")


def flatten_id_lists(id_lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Id lists as one int32 array, plus int64 offsets (len + 1) where each list starts."""
    lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    return np.fromiter(chain.from_iterable(id_lists), dtype=np.int32, count=int(offsets[-1])), offsets


class Tokenizer:
    """The interface every stage uses. `Tokenizer(path)` opens the backend `path` names (see
    llama.data.tokenizer); each backend sets the attributes below.

    `sha256` identifies the tokenizer in record manifests and cache keys; `files` maps the names it is stored
    under in a checkpoint folder to the files it was read from. `add_bos`/`add_eos`: whether the tokenizer's own
    convention puts BOS/EOS around a text (used where no MindFormers convention applies, e.g. predict prompts).
    `pad_id` fills rows; the loss and the metrics leave padded positions out.
    """

    path: Path
    files: dict[str, Path]
    sha256: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    add_bos: bool
    add_eos: bool

    backends: dict[str, type[Tokenizer]] = {}   # by kind, as each backend class declares itself

    def __init_subclass__(cls, kind: str, **options):
        super().__init_subclass__(**options)
        Tokenizer.backends[kind] = cls

    def __new__(cls, path: str | os.PathLike | None = None):
        if cls is Tokenizer:
            cls = Tokenizer.backends[backend_kind(Path(path))]
        return super().__new__(cls)

    def encode(self, text: str, bos: bool = False, eos: bool = False, split_special: bool = True) -> list[int]:
        """The ids of `text`, with BOS/EOS if asked. `split_special`: a special token's text in `text` becomes
        its id (MindFormers' and transformers' default); False spells it as plain text."""
        raise NotImplementedError

    def encode_flat(self, texts: Sequence[str], bos: bool = False, eos: bool = False,
                    split_special: bool = True, workers: int | None = None,
                    progress=None) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids as one int32 array, plus int64 offsets (len(texts) + 1) where each text starts.

        The fast path for streams such as WikiText: no per-text Python lists are built. `workers` threads
        (default: every core); `progress` counts texts.
        """
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False,
                     split_special: bool = True, workers: int | None = None, progress=None) -> list[list[int]]:
        """`encode` for many texts, on every core."""
        ids, offsets = self.encode_flat(texts, bos, eos, split_special, workers, progress)
        return [part.tolist() for part in np.split(ids, offsets[1:-1])] if texts else []

    def decode(self, ids) -> str:
        """The text of `ids`, special tokens left out."""
        raise NotImplementedError


def backend_kind(path: Path) -> str:
    """The backend for a tokenizer path: a folder by the files it holds, a file by its name or its content."""
    if path.is_dir():
        if (path / TOKENIZER_JSON).is_file():
            return "huggingface"
        if (path / TOKENIZER_MODEL).is_file():
            return "sentencepiece"
        raise PipelineError(f"tokenizer folder {path} holds neither {TOKENIZER_JSON} nor {TOKENIZER_MODEL}")
    if not path.is_file():
        raise PipelineError(f"tokenizer {path} does not exist")
    if path.suffix == ".json":
        return "huggingface"
    with open(path, "rb") as handle:
        looks_like_json = handle.read(64).lstrip().startswith(b"{")
    return "huggingface" if looks_like_json else "sentencepiece"
