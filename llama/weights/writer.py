"""`write_checkpoint`: stream a `Source` into a verified MindSpore or Hugging Face folder (the layout is in
llama/weights/__init__.py), hashing each file as it is written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from llama.data.tokenizer import TOKENIZER_FILES, Tokenizer
from llama.errors import PipelineError
from llama.fileio import atomic_dir, write_json_atomic, write_manifest
from llama.progress import Progress
from llama.weights.entry import Entry
from llama.weights.mindspore_ckpt import _write_ckpt_tensor
from llama.weights.names import FORMAT, MODEL_CONFIG, NONFINITE_BITS, NP_DTYPES, ms_to_hf_name
from llama.weights.safetensors import _safetensors_header
from llama.weights.source import Source

SHARD_BYTES = 4 << 30          # weights per output file; bigger models are written as several shards
COPY_CHUNK = 1 << 20           # tensors stored as-is are copied through buffers of this size (cache-sized)


class _HashingWriter:
    """Writes to a file while a second thread computes its sha256 (hashlib releases the GIL).

    The hash of one write overlaps that write and whatever the caller does until its next write (reading
    the next chunk), so a buffer handed to `write` may be refilled only after the following `write` returns.
    """

    def __init__(self, path: Path, pool: ThreadPoolExecutor):
        self.handle, self.digest, self.pool, self.size = open(path, "wb", buffering=0), hashlib.sha256(), pool, 0
        self.pending = None

    def write(self, data) -> None:
        data = memoryview(data).cast("B")
        if self.pending is not None:
            self.pending.result()
        self.pending = self.pool.submit(self.digest.update, data)
        self.size += len(data)
        while len(data):
            data = data[self.handle.write(data):]

    def close(self) -> dict:
        if self.pending is not None:
            self.pending.result()
        self.handle.close()
        return {"size": self.size, "sha256": self.digest.hexdigest()}



def _tensor_bytes(entry: Entry, target: np.dtype | None, buffers: list[memoryview]) -> Iterable[memoryview]:
    """A tensor's bytes in order: copied from its file through two alternating buffers when stored as-is
    (no full-size array, so little memory), else from the array `read()` returns (cast if asked)."""
    if entry.raw is not None and target in (None, entry.dtype):
        path, ranges = entry.raw
        with open(path, "rb", buffering=0) as handle:
            for offset, length in ranges:
                handle.seek(offset)
                while length:
                    buffer = buffers[0]
                    got = handle.readinto(buffer[:min(length, len(buffer))])
                    if not got:
                        raise PipelineError(f"{path} is truncated (a tensor ends past the end of the file)")
                    yield buffer[:got]
                    buffers.reverse()        # the other buffer may still be being hashed
                    length -= got
        return
    array = entry.read()
    if target is not None:
        array = array.astype(target, copy=False)
    yield memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def _noting_nonfinite(chunks: Iterable[memoryview], dtype: np.dtype, note: Callable[[], None]) -> Iterable[memoryview]:
    """Pass a tensor's byte chunks through, calling `note()` once if any float in them is NaN or Inf. Checked on
    the bits (about 1 GB/s) so that streaming stays cheap; chunks hold whole elements."""
    bits = NONFINITE_BITS.get(np.dtype(dtype))
    seen = bits is None
    for chunk in chunks:
        if not seen:
            uint, exponent = bits
            words = np.frombuffer(chunk, dtype=uint)
            if words.size and (words & (np.iinfo(uint).max >> 1)).max() >= exponent:
                seen = True
                note()
        yield chunk



def _shard_plan(items: list[tuple[str, Entry]], shard_bytes: int) -> list[list[tuple[str, Entry]]]:
    shards, size = [[]], 0
    for name, entry in items:
        if shards[-1] and size + entry.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, entry))
        size += entry.nbytes
    return shards


def _shard_names(count: int, stem: str, suffix: str) -> list[str]:
    if count == 1:
        return [f"{stem}{suffix}"]
    return [f"{stem}-{i:05d}-of-{count:05d}{suffix}" for i in range(1, count + 1)]


def write_checkpoint(source: Source, out_dir: str | os.PathLike, fmt: str = "ckpt", dtype: str | None = None,
                     tokenizer: str | os.PathLike | None = None, overwrite: bool = False,
                     shard_bytes: int = SHARD_BYTES, progress: bool = True, allow_nonfinite: bool = False) -> dict:
    """Write `source` as a MindSpore ("ckpt", "safetensors") or Hugging Face ("hf") folder; return its manifest.

    `dtype` casts every tensor (e.g. "bfloat16"); None keeps each tensor's own dtype. `tokenizer` (a
    tokenizer.model, a tokenizer.json or a folder holding one; default: the source's) is opened, so a bad one is
    refused before anything is written, and its files are copied (a folder's: every tokenizer file in it).
    Tensors holding NaN or Inf (damaged or diverged weights) are refused, naming them, unless
    `allow_nonfinite` (then a warning).
    """
    if fmt not in ("ckpt", "safetensors", "hf"):
        raise PipelineError(f"unknown output format {fmt!r} (ckpt, safetensors or hf)")
    target = NP_DTYPES[dtype] if dtype else None
    items = [(name, Entry(entry.shape, target or entry.dtype, entry.read)) for name, entry in source.entries.items()]
    config = source.config.replace(param_dtype=str(target or items[0][1].dtype))
    hf = fmt == "hf"
    names = {name: ms_to_hf_name(name) if hf else name for name, _ in items}
    shards = _shard_plan(items, shard_bytes)
    files = _shard_names(len(shards), "model", ".ckpt" if fmt == "ckpt" else ".safetensors")
    tokenizer_files = _tokenizer_files(Path(tokenizer) if tokenizer else source.tokenizer)
    total = sum(entry.nbytes for _, entry in items)
    buffers = [memoryview(bytearray(COPY_CHUNK)), memoryview(bytearray(COPY_CHUNK))]
    with atomic_dir(out_dir, overwrite) as tmp, ThreadPoolExecutor(1) as pool, \
            Progress("convert", total=total, unit="B", enabled=progress) as bar:
        digests, nonfinite = {}, []
        for file, shard in zip(files, shards):
            writer = _HashingWriter(tmp / file, pool)
            if fmt != "ckpt":
                plan = [(names[name], entry.shape, entry.dtype) for name, entry in shard]
                writer.write(_safetensors_header(plan, {"format": "pt" if hf else "ms"}))
            for name, entry in shard:
                chunks = _noting_nonfinite(_tensor_bytes(source.entries[name], target, buffers), entry.dtype,
                                           lambda name=name: nonfinite.append(name))
                if fmt == "ckpt":
                    _write_ckpt_tensor(writer, names[name], entry, chunks)
                else:
                    for chunk in chunks:
                        writer.write(chunk)
                bar.update(entry.nbytes)
            digests[file] = writer.close()
        if nonfinite:
            listed = ", ".join(nonfinite[:5]) + (f" and {len(nonfinite) - 5} more" if len(nonfinite) > 5 else "")
            if not allow_nonfinite:
                raise PipelineError(f"{source.path}: {len(nonfinite)} tensors hold NaN or Inf ({listed}); "
                                    "pass --allow-nonfinite to convert them anyway")
            print(f"warning: {len(nonfinite)} tensors hold NaN or Inf: {listed}", file=sys.stderr)
        if hf:
            write_json_atomic(tmp / "config.json", config.to_hf_config())
            write_json_atomic(tmp / "generation_config.json", {
                "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                "pad_token_id": config.pad_token_id})
            if len(files) > 1:
                write_json_atomic(tmp / "model.safetensors.index.json", {
                    "metadata": {"total_size": total},
                    "weight_map": {names[name]: file for file, shard in zip(files, shards) for name, _ in shard}})
        else:
            write_json_atomic(tmp / MODEL_CONFIG, config.to_dict())
        for name, file in tokenizer_files.items():
            shutil.copyfile(file, tmp / name)
        if not tokenizer_files:   # a GGUF's tokenizer, made from its metadata
            for name, data in source.tokenizer_files.items():
                (tmp / name).write_bytes(data)
        manifest = write_manifest(
            tmp, FORMAT, hashed=digests, kind="huggingface" if hf else "mindspore", weights=files,
            dtype=config.param_dtype, tensors=len(items),
            parameters=int(sum(np.prod(entry.shape) for _, entry in items)), model_config=config.to_dict(),
            source={"path": str(source.path), "kind": source.kind})
    return manifest


def _tokenizer_files(path: Path | None) -> dict[str, Path]:
    """The files to store for the tokenizer at `path`: a folder's tokenizer files, or a checked tokenizer's own."""
    if path is None:
        return {}
    tokenizer = Tokenizer(path)  # a bad tokenizer is refused before anything is written
    if not path.is_dir():
        return tokenizer.files
    return {name: path / name for name in TOKENIZER_FILES if (path / name).is_file()}

