"""The Hugging Face `tokenizers` backend: a `tokenizer.json` read as transformers' `AutoTokenizer` (fast) reads it.

transformers builds its fast tokenizer from `tokenizer.json`, then applies `tokenizer_config.json` (overridden
key by key by `special_tokens_map.json` when the config predates `added_tokens_decoder`): tokens it declares
(`added_tokens_decoder`, the special tokens) that `tokenizer.json` lacks are added, and a config
`add_prefix_space` replaces the pre-tokenizer's.
The same is done here, so the ids are transformers' ids; the tests compare them on real corpora.

Special tokens, for the record formats that put them around texts:
- BOS/EOS: the config's `bos_token`/`eos_token`, else the ones the post-processor puts around a text. A
  tokenizer without a BOS token (GPT-2 style) starts texts with EOS instead, as lm-eval's rolling windows do.
  A tokenizer without an EOS token cannot end records: an error.
- pad: the config's `pad_token`, else its `unk_token` (MindFormers pads with its unknown token), else EOS. The
  loss and the metrics leave padded positions out by this id, so when it is EOS, inputs that are EOS are
  left out of the training loss too.
- `add_bos`/`add_eos` (what `AutoTokenizer(text)` adds): the config's `add_bos_token`/`add_eos_token`, else
  what the post-processor adds.

Batches go through `tokenizers`' own multi-threaded `encode_batch_fast` (its thread count is the
`RAYON_NUM_THREADS` environment variable, every core by default); nothing is encoded any other way.
`decode` leaves special tokens out and does not apply transformers' `clean_up_tokenization_spaces`, so
decoding then encoding gives the same text back.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np

from llama.data.tokenizer_base import BLOCK, TOKENIZER_JSON, Tokenizer, flatten_id_lists
from llama.errors import PipelineError
from llama.fileio import sha256_file

CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class HFTokenizer(Tokenizer, kind="huggingface"):
    """A `tokenizer.json` with its config files; `sha256` covers all of them (names and contents)."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        self.path = path / TOKENIZER_JSON if path.is_dir() else path
        if not self.path.is_file():
            raise PipelineError(f"tokenizer {self.path} does not exist")
        try:
            self.hf = Backend.from_str(self.path.read_text(encoding="utf-8"))
        except Exception as err:  # tokenizers raises a plain Exception for JSON it cannot read
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise PipelineError(f"tokenizer {self.path} is neither a sentencepiece model nor a {TOKENIZER_JSON} "
                                f"({reason})") from None
        self.files = {TOKENIZER_JSON: self.path}
        self.files.update({name: self.path.parent / name for name in (CONFIG, SPECIAL_TOKENS_MAP)
                           if (self.path.parent / name).is_file()})
        self.sha256 = hashlib.sha256("".join(
            f"{name}\0{sha256_file(file)}\0" for name, file in sorted(self.files.items())).encode()).hexdigest()
        config = self._config()
        try:
            self._apply_config(config)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise PipelineError(f"tokenizer {self.path}: {CONFIG} declares tokens it cannot add ({err!r})") from None
        self.vocab_size = max(self.hf.get_vocab(with_added_tokens=True).values()) + 1

        special = {key: self._token_id(config.get(key)) for key in ("bos_token", "eos_token", "unk_token",
                                                                    "pad_token")}
        added_bos, added_eos = self._post_processor_tokens()
        self.eos_id = special["eos_token"] if special["eos_token"] is not None else added_eos
        if self.eos_id is None:
            raise PipelineError(f"tokenizer {self.path} names no EOS token (eos_token in tokenizer_config.json)")
        bos = special["bos_token"] if special["bos_token"] is not None else added_bos
        self.bos_id = bos if bos is not None else self.eos_id
        self.pad_id = next(i for i in (special["pad_token"], special["unk_token"], self.eos_id) if i is not None)
        self.add_bos = bool(config.get("add_bos_token", added_bos is not None))
        self.add_eos = bool(config.get("add_eos_token", added_eos is not None))

    def encode(self, text: str, bos: bool = False, eos: bool = False, split_special: bool = True) -> list[int]:
        with self._special_tokens(split_special):
            ids = self.hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_flat(self, texts: Sequence[str], bos: bool = False, eos: bool = False,
                    split_special: bool = True, workers: int | None = None,
                    progress=None) -> tuple[np.ndarray, np.ndarray]:
        before, after = [self.bos_id] * bos, [self.eos_id] * eos
        id_lists: list[list[int]] = []
        with self._special_tokens(split_special):
            for first in range(0, len(texts), BLOCK):
                block = list(texts[first:first + BLOCK])
                id_lists.extend(before + encoding.ids + after
                                for encoding in self.hf.encode_batch_fast(block, add_special_tokens=False))
                if progress is not None:
                    progress.update(len(block))
        return flatten_id_lists(id_lists)

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    @contextmanager
    def _special_tokens(self, split: bool):
        """Special tokens' text becomes their ids (`split`), or is spelled as plain text."""
        self.hf.encode_special_tokens = not split
        try:
            yield
        finally:
            self.hf.encode_special_tokens = False

    def _config(self) -> dict:
        """tokenizer_config.json, with special_tokens_map.json's entries over it where transformers reads them:
        only for a config without `added_tokens_decoder` (additional special tokens are merged, not replaced)."""
        config = _read_json_object(self.files[CONFIG]) if CONFIG in self.files else {}
        if SPECIAL_TOKENS_MAP in self.files and "added_tokens_decoder" not in config:
            for key, value in _read_json_object(self.files[SPECIAL_TOKENS_MAP]).items():
                if key == "additional_special_tokens" and isinstance(value, list):
                    merged = list(config.get(key) or [])
                    value = merged + [token for token in value if token not in merged]
                config[key] = value
        return config

    def _token_id(self, token) -> int | None:
        """The id of a special token of the config (`_apply_config` has added every one of them)."""
        content = _content(token)
        return None if content is None else self.hf.token_to_id(content)

    def _apply_config(self, config: dict) -> None:
        """What transformers' fast tokenizer does with the config: add the tokens it declares that
        tokenizer.json lacks (as one `add_tokens` call, in the same order), and set `add_prefix_space`."""
        from tokenizers import AddedToken, pre_tokenizers

        known = {repr(token) for token in self.hf.get_added_tokens_decoder().values()}
        declared = sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda item: int(item[0]))
        to_add = [token for token in (_added_token(entry) for _, entry in declared) if repr(token) not in known]
        specials = [token for key in SPECIAL_TOKEN_KEYS if (token := config.get(key)) is not None]
        specials += config.get("additional_special_tokens") or []
        names = {token.content for token in self.hf.get_added_tokens_decoder().values()} | \
            {token.content for token in to_add}
        for token in specials:
            content = _content(token)
            if content is not None and content not in names:
                to_add.append(_added_token(token) if isinstance(token, dict) else AddedToken(content, special=True))
                names.add(content)
        special_contents = {_content(token) for token in specials}
        for token in to_add:
            token.special = token.special or token.content in special_contents
        if to_add:
            self.hf.add_tokens(to_add)

        wanted = config.get("add_prefix_space", False)
        try:
            state = json.loads(self.hf.pre_tokenizer.__getstate__()) if self.hf.pre_tokenizer else {}
        except Exception:  # a pre-tokenizer that does not serialize: transformers leaves it alone too
            return
        if isinstance(wanted, bool) and state.get("add_prefix_space", wanted) != wanted:
            kind = state.pop("type")
            state["add_prefix_space"] = wanted
            self.hf.pre_tokenizer = getattr(pre_tokenizers, kind)(**state)

    def _post_processor_tokens(self) -> tuple[int | None, int | None]:
        """The special ids the post-processor puts before and after a text, if any."""
        plain = self.hf.encode("a", add_special_tokens=False).ids
        full = self.hf.encode("a", add_special_tokens=True).ids
        start = full.index(plain[0]) if plain and plain[0] in full else 0
        before, after = full[:start], full[start + len(plain):]
        return (before[0] if before else None), (after[-1] if after else None)


def _read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PipelineError(f"{path} is not JSON: {err}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path} is not a JSON object")
    return data


def _content(token) -> str | None:
    """A token as the config files write it: a string, or an AddedToken object with `content`."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _added_token(entry: dict):
    from tokenizers import AddedToken

    flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
    return AddedToken(entry["content"], **{flag: entry[flag] for flag in flags if flag in entry})
