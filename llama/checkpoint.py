"""Checkpoint I/O: read any supported format tensor by tensor, write verified folders, load a model.

    source = open_checkpoint(path, model_config=None)   # Source: MindFormers names -> lazy tensors + config
    manifest = write_checkpoint(source, out_dir, fmt="ckpt" | "safetensors" | "hf", tokenizer=None)
    model, config = load_checkpoint(path, model_config=None, dtype=None)
    save_checkpoint(model_or_params, out_dir, config, fmt="ckpt", tokenizer=None)

Readers (`open_checkpoint` picks one from what it finds at `path`):
- Hugging Face folder or file: `model.safetensors`, sharded with `model.safetensors.index.json`, or
  `pytorch_model.bin[.index.json]` (only where torch is installed; loaded with weights_only=True).
- Meta `consolidated.*.pth` + `params.json` (torch, same rule; model-parallel shards are concatenated).
- llama2.c `.bin`, version 0 ("legacy") export: 7-int32 header, then float32 weights.
- llama.cpp `.gguf` of the llama architecture, with its tokenizer (llama/weights/gguf.py).
- MindSpore/MindFormers `.ckpt` or `.safetensors` with MindFormers names, or a folder written here.
Meta, llama2.c and GGUF store q/k rows in the interleaved rotary layout; they are permuted to the rotate-half
layout of Hugging Face and MindFormers (which differ from each other only in names).

Folder layout written by `write_checkpoint` (one rename, so a reader never sees half of it):
    mindspore:   model.ckpt | model.safetensors (or model-00001-of-0000N.*), model_config.json,
                 [tokenizer files], manifest.json
    huggingface: model.safetensors (or shards + model.safetensors.index.json), config.json,
                 generation_config.json, [tokenizer files], manifest.json
The tokenizer files are those found next to the source weights or given (`llama.data.tokenizer.TOKENIZER_FILES`:
tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json).
`manifest.json` holds the size and sha256 of every file; `open_checkpoint` checks them before reading.

Memory: tensors stored as-is are copied file to file through one small buffer; a tensor that must change
(q/k permutation, dtype cast, Meta shard concatenation) is read whole only when written and dropped after,
so peak memory stays near the largest such tensor. The .ckpt and .safetensors containers are parsed and written
here (both are simple: a protobuf stream and a JSON header), because MindSpore's and safetensors' own
savers need the whole model in memory at once; the tests read our files back with both libraries.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes  # registers bfloat16 with numpy; must precede any bf16 read
import numpy as np

from llama.config import ModelConfig, llama_intermediate_size
from llama.errors import PipelineError
from llama.fileio import MANIFEST, atomic_dir, read_json, verify_manifest, write_json_atomic, write_manifest
from llama.progress import Progress

FORMAT = "llama2-pipeline checkpoint 1"
MODEL_CONFIG = "model_config.json"
SHARD_BYTES = 4 << 30          # weights per output file; bigger models are written as several shards
CKPT_SLICE_BYTES = 512 << 20   # MindSpore splits a tensor into protobuf records of at most this size
COPY_CHUNK = 1 << 20           # tensors stored as-is are copied through buffers of this size (cache-sized)

NP_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
             "bfloat16": np.dtype(ml_dtypes.bfloat16)}
ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
MS_TYPES = {"Float64": np.float64, "Float32": np.float32, "Float16": np.float16, "BFloat16": ml_dtypes.bfloat16,
            "Int64": np.int64, "Int32": np.int32, "Int16": np.int16, "Int8": np.int8, "UInt8": np.uint8,
            "Bool": np.bool_}
ST_NAMES = {np.dtype(v): k for k, v in ST_DTYPES.items()}
# A float is NaN or Inf when its exponent bits are all ones: (bits without the sign) >= this, per float dtype.
NONFINITE_BITS = {np.dtype(np.float64): (np.uint64, 0x7FF0000000000000), np.dtype(np.float32): (np.uint32, 0x7F800000),
                  np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80)}
MS_NAMES = {np.dtype(v): k for k, v in MS_TYPES.items()}

# Hugging Face <-> MindFormers names (MindFormers renames only; see docs/reference.md).
HF_GLOBAL = {"model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
             "model.norm.weight": "model.norm_out.weight", "lm_head.weight": "lm_head.weight"}
HF_LAYER = {"self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
            "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
            "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
            "mlp.up_proj.weight": "feed_forward.w3.weight", "input_layernorm.weight": "attention_norm.weight",
            "post_attention_layernorm.weight": "ffn_norm.weight"}
MS_TO_HF_GLOBAL = {v: k for k, v in HF_GLOBAL.items()}
MS_TO_HF_LAYER = {v: k for k, v in HF_LAYER.items()}
# Meta names are MindFormers' without the "model." prefix, apart from these three.
META_GLOBAL = {"tok_embeddings.weight": "model.tok_embeddings.embedding_weight",
               "norm.weight": "model.norm_out.weight", "output.weight": "lm_head.weight"}
# Tensors some checkpoints carry that are not weights: rotary tables, optimizer state, step counters.
IGNORED = re.compile(r"(.*rotary_emb\.inv_freq|rope\.freqs|adam_[mv]\..*|accu_grads\..*|global_step|"
                     r"scale_sense|epoch_num|step_num|loss_scale|current_iterator_step|last_overflow_iterator_step)$")
LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of `LlamaForCausalLM(config)`, in the model's order, with its shape in MindFormers'
    checkpoint layout (see llama.model.checkpoint_layout)."""
    hidden, inter, kv = config.hidden_size, config.intermediate_size, config.num_kv_heads * config.head_dim
    shapes = {"model.tok_embeddings.embedding_weight": (config.vocab_size, hidden)}
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        shapes.update({
            prefix + "attention_norm.weight": (hidden,),
            prefix + "attention.wq.weight": (hidden, hidden),
            prefix + "attention.wk.weight": (kv, hidden),
            prefix + "attention.wv.weight": (kv, hidden),
            prefix + "attention.wo.weight": (hidden, hidden),
            prefix + "ffn_norm.weight": (hidden,),
            prefix + "feed_forward.w1.weight": (inter, hidden),
            prefix + "feed_forward.w2.weight": (hidden, inter),
            prefix + "feed_forward.w3.weight": (inter, hidden),
        })
    shapes["model.norm_out.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def hf_to_ms_name(name: str) -> str:
    """MindFormers name of a Hugging Face tensor name (unchanged when it is not a Llama weight)."""
    if name in HF_GLOBAL:
        return HF_GLOBAL[name]
    match = LAYER_NAME.fullmatch(name)
    if match and match[2] in HF_LAYER:
        return f"model.layers.{match[1]}.{HF_LAYER[match[2]]}"
    return name


def ms_to_hf_name(name: str) -> str:
    if name in MS_TO_HF_GLOBAL:
        return MS_TO_HF_GLOBAL[name]
    match = LAYER_NAME.fullmatch(name)
    if match and match[2] in MS_TO_HF_LAYER:
        return f"model.layers.{match[1]}.{MS_TO_HF_LAYER[match[2]]}"
    return name


def meta_to_ms_name(name: str) -> str:
    return META_GLOBAL.get(name, "model." + name if name.startswith("layers.") else name)


@dataclass
class Entry:
    """One tensor of a checkpoint: its shape and dtype now, its values when `read()` is called."""
    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[], np.ndarray]
    raw: tuple[Path, list[tuple[int, int]]] | None = None   # (file, byte ranges) when stored as-is on disk

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


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


# ---------------------------------------------------------------------------------------------- reading

def _file_entry(path: Path, ranges: list[tuple[int, int]], dtype, shape) -> Entry:
    return Entry(tuple(shape), np.dtype(dtype), lambda: _read_range(path, ranges, dtype, shape), (path, ranges))


def _read_range(path: Path, ranges: list[tuple[int, int]], dtype, shape) -> np.ndarray:
    """Read byte ranges of a file straight into one new array (no mmap, so no file pages stay resident)."""
    array = np.empty(shape, dtype=dtype)
    buffer = memoryview(array.reshape(-1).view(np.uint8))
    filled = 0
    with open(path, "rb") as handle:
        for offset, length in ranges:
            handle.seek(offset)
            if handle.readinto(buffer[filled:filled + length]) != length:
                raise PipelineError(f"{path} is truncated (a tensor ends past the end of the file)")
            filled += length
    return array


def read_safetensors_index(path: Path) -> dict[str, Entry]:
    """Tensors of a .safetensors file, checked against the file size, read lazily."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if header_len is None or 8 + header_len > size:
            raise PipelineError(f"{path} is not a safetensors file or is truncated (header incomplete)")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PipelineError(f"{path} is not a safetensors file (its header is not JSON)") from None
    data_start, entries, data_end = 8 + header_len, {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = ST_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise PipelineError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
        shape, (begin, end) = tuple(info["shape"]), info["data_offsets"]
        if end - begin != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
            raise PipelineError(f"{path}: tensor {name} has {end - begin} bytes for shape {shape}")
        data_end = max(data_end, end)
        entries[name] = _file_entry(path, [(data_start + begin, end - begin)], dtype, shape)
    if data_start + data_end > size:
        raise PipelineError(f"{path} is truncated: its header needs {data_start + data_end} bytes, "
                            f"the file has {size}")
    return entries


def _varint(handle) -> int:
    result = shift = 0
    while True:
        byte = handle.read(1)
        if not byte:
            raise EOFError
        result |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return result
        shift += 7


def _parse_tensor_proto(handle, end: int) -> tuple[list[int], str, tuple[int, int]]:
    dims, type_name, content = [], None, None
    while handle.tell() < end:
        key = _varint(handle)
        if key == 0x08:                               # dims, one varint each
            dims.append(_varint(handle))
            continue
        length = _varint(handle)
        if key == 0x0A:                               # dims, packed
            stop = handle.tell() + length
            while handle.tell() < stop:
                dims.append(_varint(handle))
        elif key == 0x12:
            type_name = handle.read(length).decode()
        elif key == 0x1A:
            content = (handle.tell(), length)
            handle.seek(length, os.SEEK_CUR)
        else:
            raise ValueError(f"unexpected field {key >> 3}")
    return dims, type_name, content


def read_ckpt_index(path: Path) -> dict[str, Entry]:
    """Tensors of a MindSpore .ckpt (a stream of protobuf records, one tensor or slice each), read lazily."""
    size, tensors = path.stat().st_size, {}
    try:
        with open(path, "rb") as handle:
            while handle.tell() < size:
                start = handle.tell()
                if size - start == 17 and handle.read(7) == b"crc_num":   # MindSpore's optional trailer
                    break
                handle.seek(start)
                if _varint(handle) != 0x0A:
                    raise ValueError("not a checkpoint record")
                end = _varint(handle) + handle.tell()
                if end > size:
                    raise EOFError
                name, tensor = None, None
                while handle.tell() < end:
                    key, length = _varint(handle), _varint(handle)
                    if key == 0x0A:
                        name = handle.read(length).decode()
                    elif key == 0x12:
                        tensor = _parse_tensor_proto(handle, handle.tell() + length)
                    else:
                        raise ValueError("map tensors or encrypted checkpoints are not supported")
                if name is None or tensor is None or tensor[1] not in MS_TYPES or tensor[2] is None:
                    raise ValueError(f"record {name!r} has no plain tensor")
                dims, type_name, content = tensor
                slices = tensors.setdefault(name, (tuple(dims) if dims != [0] else (), type_name, []))[2]
                slices.append(content)
    except EOFError:
        raise PipelineError(f"{path} is truncated (a checkpoint record ends past the end of the file)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise PipelineError(f"{path} is not a MindSpore checkpoint this pipeline can read: {err}") from None
    entries = {}
    for name, (shape, type_name, slices) in tensors.items():
        dtype = np.dtype(MS_TYPES[type_name])
        entry = _file_entry(path, slices, dtype, shape)
        if sum(n for _, n in slices) != entry.nbytes:
            raise PipelineError(f"{path}: tensor {name} has {sum(n for _, n in slices)} bytes for shape {shape}")
        entries[name] = entry
    return entries


def read_torch_index(path: Path) -> dict[str, Entry]:
    """A torch pickle (pytorch_model.bin, consolidated.*.pth), loaded safely: weights_only, memory-mapped."""
    try:
        import torch
    except ImportError:
        raise PipelineError(f"reading {path.name} needs torch, which is not installed; "
                            f"convert it to safetensors first or install torch") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise PipelineError(f"{path}: refused: it holds more than tensors, and an untrusted pickle is never run "
                            "(torch.load with weights_only)") from None
    except RuntimeError as err:
        raise PipelineError(f"{path} is not a readable torch checkpoint ({str(err).splitlines()[0][:120]})") from None

    def entry(tensor) -> Entry:
        dtype = NP_DTYPES.get(str(tensor.dtype).removeprefix("torch."))
        if dtype is None:
            raise PipelineError(f"{path}: unsupported tensor dtype {tensor.dtype}")
        as_bits = {np.dtype(ml_dtypes.bfloat16): torch.int16}.get(dtype)
        return Entry(tuple(tensor.shape), dtype, lambda: (tensor.view(as_bits).numpy().view(dtype) if as_bits
                                                          else tensor.numpy()).copy())
    return {name: entry(tensor) for name, tensor in state.items()}


def _interleaved_to_half(weight: np.ndarray, heads: int) -> np.ndarray:
    """Meta/llama2.c q/k rows (pairs per frequency) -> rotate-half order; what HF's converter's permute does."""
    rows, cols = weight.shape
    return np.ascontiguousarray(weight.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols))


def _permuted(entry: Entry, heads: int) -> Entry:
    return Entry(entry.shape, entry.dtype, lambda: _interleaved_to_half(entry.read(), heads))


def permute_qk(entries: dict[str, Entry], config: ModelConfig) -> dict[str, Entry]:
    """q/k weights in the interleaved rotary layout (Meta, llama2.c, GGUF) -> rotate-half, lazily."""
    heads = {"attention.wq.weight": config.num_heads, "attention.wk.weight": config.num_kv_heads}
    out = {}
    for name, entry in entries.items():
        match = LAYER_NAME.fullmatch(name)
        out[name] = _permuted(entry, heads[match[2]]) if match and match[2] in heads else entry
    return out


LLAMA2C_HEADER = struct.Struct("<7i")


def read_llama2c(path: Path) -> tuple[dict[str, Entry], ModelConfig]:
    """llama2.c's legacy export: header (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab, seq_len),
    then float32 arrays in a fixed order; a negative vocab size means a separate classifier at the end."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(LLAMA2C_HEADER.size)
    if head[:4] == b"ak42":
        raise PipelineError(f"{path} is a llama2.c version 1/2 export; only the legacy (v0) format is supported")
    if len(head) < LLAMA2C_HEADER.size:
        raise PipelineError(f"{path} is too short for a llama2.c checkpoint")
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = LLAMA2C_HEADER.unpack(head)
    if min(dim, hidden, layers, heads, kv_heads, seq_len) <= 0 or dim % heads or heads % kv_heads:
        raise PipelineError(f"{path} does not start with a llama2.c v0 header")
    config = ModelConfig(vocab_size=abs(vocab), hidden_size=dim, intermediate_size=hidden, num_layers=layers,
                         num_heads=heads, num_kv_heads=kv_heads, max_position_embeddings=seq_len,
                         tie_word_embeddings=vocab > 0)
    kv, head_dim = kv_heads * (dim // heads), dim // heads
    blocks = [("tok", (abs(vocab), dim)), ("attention_norm.weight", (dim,)), ("attention.wq.weight", (dim, dim)),
              ("attention.wk.weight", (kv, dim)), ("attention.wv.weight", (kv, dim)),
              ("attention.wo.weight", (dim, dim)), ("ffn_norm.weight", (dim,)),
              ("feed_forward.w1.weight", (hidden, dim)), ("feed_forward.w2.weight", (dim, hidden)),
              ("feed_forward.w3.weight", (hidden, dim)), ("final", (dim,)),
              ("freq_cis", (2 * seq_len * head_dim // 2,))] + ([] if vocab > 0 else [("lm_head", (abs(vocab), dim))])
    entries, offset, f32 = {}, LLAMA2C_HEADER.size, np.dtype(np.float32)

    def add(name, shape):
        nonlocal offset
        nbytes = int(np.prod(shape)) * 4
        entries[name] = _file_entry(path, [(offset, nbytes)], f32, shape)
        offset += nbytes

    for block, shape in blocks:
        if block == "tok":
            add("model.tok_embeddings.embedding_weight", shape)
        elif block == "final":
            add("model.norm_out.weight", shape)
        elif block == "freq_cis":
            offset += int(np.prod(shape)) * 4          # precomputed rotary tables; the model makes its own
        elif block == "lm_head":
            add("lm_head.weight", shape)
        else:
            for i in range(layers):
                add(f"model.layers.{i}.{block}", shape)
    if offset != size:
        raise PipelineError(f"{path} has {size} bytes; its header describes {offset}"
                            + (" (truncated)" if offset > size else ""))
    return permute_qk(entries, config), config


def _read_meta(folder: Path) -> tuple[dict[str, Entry], ModelConfig]:
    """Meta's release: consolidated.NN.pth shards split for model parallelism, and params.json."""
    params = read_json(folder / "params.json", "Meta params.json")
    shards = [read_torch_index(p) for p in sorted(folder.glob("consolidated.*.pth"))]
    # Which axis each weight is split along across shards (norms are replicated).
    axis_of = {"tok_embeddings.weight": 1, "output.weight": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1,
               "w1": 0, "w3": 0, "w2": 1}
    entries = {}
    for name, first in shards[0].items():
        if IGNORED.fullmatch(name):
            continue
        key = name if name in axis_of else name.split(".")[-2]
        axis = axis_of.get(key)
        parts = [shard[name] for shard in shards]
        if axis is None or len(parts) == 1:
            entries[meta_to_ms_name(name)] = first
            continue
        shape = list(first.shape)
        shape[axis] = sum(p.shape[axis] for p in parts)
        entries[meta_to_ms_name(name)] = Entry(tuple(shape), first.dtype, lambda ps=parts, a=axis: np.concatenate(
            [p.read() for p in ps], axis=a))
    vocab = params.get("vocab_size", -1)
    if vocab <= 0:
        vocab = entries["model.tok_embeddings.embedding_weight"].shape[0]
    heads = params["n_heads"]
    config = ModelConfig.from_dict(dict(
        vocab_size=vocab, hidden_size=params["dim"], num_layers=params["n_layers"], num_heads=heads,
        num_kv_heads=params.get("n_kv_heads") or heads, rms_norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=params.get("rope_theta", 10000.0),
        intermediate_size=llama_intermediate_size(params["dim"], params.get("multiple_of", 256),
                                                  params.get("ffn_dim_multiplier")),
        param_dtype=str(first.dtype) if str(first.dtype) in NP_DTYPES else "float32"), f"{folder}/params.json")
    return permute_qk(entries, config), config


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
        from llama.weights.gguf import read_gguf
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
    from llama.data.tokenizer import TOKENIZER_FILES

    return path if any((path / name).is_file() for name in TOKENIZER_FILES) else None


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


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


# ---------------------------------------------------------------------------------------------- writing

class _HashingWriter:
    """Writes to a file while a second thread computes its sha256 (hashlib releases the GIL).

    The hash of one write overlaps that write and whatever the caller does until its next write (reading
    the next chunk), so a buffer handed to `write` may be refilled only after the following `write` returns.
    """

    def __init__(self, path: Path, pool: ThreadPoolExecutor):
        import hashlib
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


def _proto_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _ckpt_record_head(name: str, shape: tuple[int, ...], type_name: str, content_len: int) -> bytes:
    """Protobuf framing of one Checkpoint.Value record up to (not including) its tensor bytes."""
    tensor = b"".join(b"\x08" + _proto_varint(d) for d in (shape or (0,)))
    tensor += b"\x12" + _proto_varint(len(type_name)) + type_name.encode()
    tensor_head = tensor + b"\x1a" + _proto_varint(content_len)
    tag = name.encode()
    value_len = 1 + len(_proto_varint(len(tag))) + len(tag) + 1 + len(_proto_varint(len(tensor_head) + content_len)) \
        + len(tensor_head) + content_len
    return (b"\x0a" + _proto_varint(value_len) + b"\x0a" + _proto_varint(len(tag)) + tag
            + b"\x12" + _proto_varint(len(tensor_head) + content_len) + tensor_head)


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


def _write_ckpt_tensor(writer: _HashingWriter, name: str, entry: Entry, chunks: Iterable[memoryview]) -> None:
    """MindSpore's record stream: records of at most CKPT_SLICE_BYTES, each with the full shape and type."""
    total, written, left_in_record = entry.nbytes, 0, 0
    for chunk in chunks:
        while len(chunk):
            if not left_in_record:
                left_in_record = min(CKPT_SLICE_BYTES, total - written)
                writer.write(_ckpt_record_head(name, entry.shape, MS_NAMES[entry.dtype], left_in_record))
            part = chunk[:left_in_record]
            writer.write(part)
            written += len(part)
            left_in_record -= len(part)
            chunk = chunk[len(part):]
    if not total:
        writer.write(_ckpt_record_head(name, entry.shape, MS_NAMES[entry.dtype], 0))


def _safetensors_header(plan: list[tuple[str, tuple[int, ...], np.dtype]], metadata: dict) -> bytes:
    header, offset = {"__metadata__": metadata}, 0
    for name, shape, dtype in plan:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)                      # tensors start 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


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
    from llama.data.tokenizer import TOKENIZER_FILES, Tokenizer

    if path is None:
        return {}
    tokenizer = Tokenizer(path)  # a bad tokenizer is refused before anything is written
    if not path.is_dir():
        return tokenizer.files
    return {name: path / name for name in TOKENIZER_FILES if (path / name).is_file()}


def _param_array(param) -> np.ndarray:
    """A MindSpore tensor as numpy; MindSpore's own bfloat16 numpy type is re-viewed as ml_dtypes'."""
    array = param.asnumpy()
    return array.view(np.uint16).view(ml_dtypes.bfloat16) if array.dtype.name == "bfloat16" else array


def params_source(model_or_params, config: ModelConfig) -> Source:
    """A Source over an in-memory model (nn.Cell; its tensors are read out in the checkpoint layout) or a
    {name: numpy array or MindSpore tensor} dict that is in the checkpoint layout already."""
    is_model = hasattr(model_or_params, "parameters_and_names")
    params = dict(model_or_params.parameters_and_names()) if is_model else model_or_params
    entries = {}
    for name, value in params.items():
        if isinstance(value, np.ndarray):
            entries[name] = Entry(value.shape, value.dtype, lambda v=value: v)
        else:
            entries[name] = Entry(tuple(value.shape), np.dtype(MS_TYPES[str(value.dtype)]),
                                  lambda v=value: _param_array(v))
    if is_model:
        from llama.model import checkpoint_layout, transposed_in_model

        for name, entry in list(entries.items()):
            if transposed_in_model(name):
                entries[name] = Entry(entry.shape[::-1], entry.dtype,
                                      lambda n=name, e=entry: checkpoint_layout(n, e.read()))
    check_tensors(entries, config, "model")
    return Source(Path("<memory>"), "mindspore", {n: entries[n] for n in expected_shapes(config)}, config)


def save_checkpoint(model_or_params, out_dir: str | os.PathLike, config: ModelConfig, fmt: str = "ckpt",
                    tokenizer: str | os.PathLike | None = None, dtype: str | None = None,
                    overwrite: bool = False) -> dict:
    """Save a model or parameter dict as a verified folder (see the module docstring); return its manifest.
    Non-finite weights (a diverged run being merged) are saved as they are, with a warning naming them."""
    return write_checkpoint(params_source(model_or_params, config), out_dir, fmt, dtype, tokenizer, overwrite,
                            progress=False, allow_nonfinite=True)


def load_checkpoint(path: str | os.PathLike, model_config: ModelConfig | None = None, dtype: str | None = None,
                    into=None):
    """Build `LlamaForCausalLM` from any supported checkpoint (checksums verified first); return (model, config).

    `dtype` sets how weights are stored (float32, float16, bfloat16); it is also the compute dtype where the
    device computes in it (llama.device). None keeps the checkpoint's dtype. `into`: a model of the same
    config whose weights are overwritten in place instead of building a new one, so that the graphs already
    compiled for it serve the new weights (ignored where the configs differ).
    """
    from llama.device import compute_dtype_here
    from llama.model import LlamaForCausalLM

    source = open_checkpoint(path, model_config)
    config = source.config
    if dtype is not None:
        if dtype not in NP_DTYPES:
            raise PipelineError(f"unknown dtype {dtype!r} (float32, float16 or bfloat16)")
        config = config.replace(param_dtype=dtype, compute_dtype=dtype)
    config = config.replace(compute_dtype=compute_dtype_here(config.compute_dtype))
    reuse = into is not None and into.config == config
    model = into if reuse else LlamaForCausalLM(config)
    assign_weights(model, source, in_place=reuse)
    return model, config


def assign_weights(model, source: Source, in_place: bool = False) -> None:
    """Set every weight of `model` from the checkpoint's tensor of the same name, cast to the model's dtype
    and converted to the model's layout. `in_place` copies into the existing parameter memory (ops.assign):
    a compiled graph reads its parameters from there, and would keep reading the old weights after
    `set_data`, which gives a parameter new memory."""
    import mindspore as ms
    from mindspore import ops
    from llama.model import checkpoint_layout

    params = dict(model.parameters_and_names())
    if in_place and set(params) != set(source.entries):
        raise PipelineError(f"{source.path} does not hold exactly the model's weights")
    wanted = NP_DTYPES[model.config.param_dtype]
    for name, entry in source.entries.items():
        value = ms.Tensor(checkpoint_layout(name, entry.read().astype(wanted, copy=False)))
        if in_place:
            ops.assign(params[name], value)
        else:
            params[name].set_data(value)
