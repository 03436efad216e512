"""`open_checkpoint`: tell a checkpoint's format from what is at its path, open it with the reader of that format,
and check its tensors against the model config (`check_tensors`); the result is a `Source`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from llama.config.model import ModelConfig
from llama.data.tokenizer import TOKENIZER_FILES
from llama.errors import PipelineError
from llama.fileio import MANIFEST, read_json, verify_manifest
from llama.weights.entry import Entry
from llama.weights.gguf import read_gguf
from llama.weights.llama2c import read_llama2c
from llama.weights.meta import _read_meta
from llama.weights.mindspore_ckpt import read_ckpt_index
from llama.weights.names import FORMAT, IGNORED, MODEL_CONFIG, expected_shapes, hf_to_ms_name
from llama.weights.safetensors import read_safetensors_index
from llama.weights.torch_pickle import read_torch_index


@dataclass
class Source:
    """An opened checkpoint: tensors under MindFormers names, and the model config when it carries one."""
    path: Path
    kind: str                                   # huggingface, meta, llama2c, gguf or mindspore
    entries: dict[str, Entry]
    config: ModelConfig | None = None
    tokenizer: Path | None = None               # the folder holding its tokenizer files, if any
    manifest: dict | None = field(default=None, repr=False)
    tokenizer_files: dict[str, bytes] = field(default_factory=dict, repr=False)   # made from metadata (GGUF)



def _read_hf(path: Path) -> tuple[dict[str, Entry], ModelConfig | None]:
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        files = _hf_weight_files(folder)
    else:
        files = [path]
    raw = {}
    for file in files:
        raw.update(read_safetensors_index(file) if file.suffix == ".safetensors" else read_torch_index(file))
    config = ModelConfig.from_hf_config(folder / "config.json") if (folder / "config.json").is_file() else None
    return {hf_to_ms_name(name): entry for name, entry in raw.items() if not IGNORED.fullmatch(name)}, config


def _hf_weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index_name).is_file():
            weight_map = read_json(folder / index_name, "checkpoint index").get("weight_map", {})
            files = [folder / name for name in dict.fromkeys(weight_map.values())]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise PipelineError(f"{folder / index_name} lists missing files: {', '.join(missing)}")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise PipelineError(f"{folder} has no model.safetensors, pytorch_model.bin or index of shards")


def _read_mindspore(files: Iterable[Path]) -> dict[str, Entry]:
    entries = {}
    for file in files:
        raw = read_ckpt_index(file) if file.suffix == ".ckpt" else read_safetensors_index(file)
        entries.update({name: entry for name, entry in raw.items() if not IGNORED.fullmatch(name)})
    return entries


def _is_hf_safetensors(path: Path) -> bool:
    return any(name.startswith("model.embed_tokens") or ".self_attn." in name
               for name in read_safetensors_index(path))


def verify_folder(folder: Path) -> dict:
    """Check every file in a folder's manifest (sizes first, then sha256s); return the manifest."""
    return verify_manifest(folder, FORMAT, "checkpoint")


def open_checkpoint(path: str | os.PathLike, model_config: ModelConfig | None = None) -> Source:
    """Open any supported checkpoint (see the module docstring) and check its tensors against the config.

    `model_config` overrides the config found with the weights; a bare .ckpt/.safetensors file needs it.
    """
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"checkpoint {path} does not exist")
    manifest, tokenizer, config, tokenizer_files = None, None, None, {}
    if path.is_dir() and (path / MANIFEST).is_file():
        manifest = verify_folder(path)
        if manifest["kind"] == "huggingface":
            kind, (entries, config) = "huggingface", _read_hf(path)
        else:
            kind = "mindspore"
            entries = _read_mindspore(path / name for name in manifest["weights"])
            config = ModelConfig.from_dict(read_json(path / MODEL_CONFIG, "model config"), str(path / MODEL_CONFIG))
        tokenizer = _tokenizer_folder(path)
    elif path.is_dir() and any(path.glob("consolidated.*.pth")):
        kind, (entries, config) = "meta", _read_meta(path)
        tokenizer = _tokenizer_folder(path)
    elif path.is_dir():
        ckpts = sorted(path.glob("*.ckpt"))
        if ckpts and not any(path.glob("*.safetensors")):
            kind, entries = "mindspore", _read_mindspore(ckpts)
        else:
            kind, (entries, config) = "huggingface", _read_hf(path)
        tokenizer = _tokenizer_folder(path)
    elif path.suffix == ".ckpt" or (path.suffix == ".safetensors" and not _is_hf_safetensors(path)):
        kind, entries = "mindspore", _read_mindspore([path])
    elif path.suffix in (".safetensors", ".bin") and (path.suffix == ".safetensors" or _is_zip(path)):
        kind, (entries, config) = "huggingface", _read_hf(path)
    elif path.suffix == ".bin":
        kind, (entries, config) = "llama2c", read_llama2c(path)
    elif path.suffix == ".gguf":
        kind, (entries, config, tokenizer_files) = "gguf", read_gguf(path)
    else:
        raise PipelineError(f"cannot tell the format of {path} (expected a folder, .safetensors, .ckpt, .bin, "
                            f".gguf)")
    config = model_config or config
    if config is None:
        raise PipelineError(f"{path} carries no model config; pass one with --model-config")
    check_tensors(entries, config, path)
    ordered = {name: entries[name] for name in expected_shapes(config)}
    return Source(path, kind, ordered, config, tokenizer, manifest, tokenizer_files)


def _tokenizer_folder(path: Path) -> Path | None:
    """`path` if it holds tokenizer files (which `write_checkpoint` copies), else None."""
    return path if any((path / name).is_file() for name in TOKENIZER_FILES) else None


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def entries_source(entries: dict[str, Entry], config: ModelConfig) -> Source:
    """A Source over tensors already in the checkpoint layout (a merge's, read one at a time as written),
    checked against `config` and ordered as the model lists them."""
    check_tensors(entries, config, "model")
    return Source(Path("<memory>"), "mindspore", {name: entries[name] for name in expected_shapes(config)}, config)


def check_tensors(entries: dict[str, Entry], config: ModelConfig, path: Path | str) -> None:
    """One error naming every missing, unexpected and misshaped tensor, with the shape the config expects."""
    expected = expected_shapes(config)
    problems = [f"missing {name} {list(shape)}" for name, shape in expected.items() if name not in entries]
    problems += [f"unexpected {name} {list(entries[name].shape)}" for name in entries if name not in expected]
    problems += [f"{name} is {list(entries[name].shape)}, expected {list(shape)}"
                 for name, shape in expected.items() if name in entries and entries[name].shape != shape]
    if problems:
        shown = "; ".join(problems[:12]) + (f"; and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise PipelineError(f"{path} does not match the model config: {shown}")

