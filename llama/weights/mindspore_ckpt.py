"""MindSpore .ckpt files: a stream of protobuf `Checkpoint.Value` records, one tensor or slice of a tensor each.

Parsed and framed here by hand (the format is simple) so that tensors stream from and to disk one at a time;
MindSpore's own saver needs the whole model in memory. The tests read our files back with MindSpore.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from llama.errors import PipelineError
from llama.weights.entry import Entry, _file_entry
from llama.weights.names import MS_NAMES, MS_TYPES

if TYPE_CHECKING:
    from llama.weights.writer import _HashingWriter

CKPT_SLICE_BYTES = 512 << 20   # MindSpore splits a tensor into protobuf records of at most this size


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

