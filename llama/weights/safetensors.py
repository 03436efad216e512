"""safetensors files (Hugging Face's, and MindSpore's with MindFormers names): an 8-byte header length, a JSON
header, then the tensors' bytes. `read_safetensors_index` reads one lazily; `_safetensors_header` frames the
tensors `llama.weights.writer` streams after it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from llama.errors import PipelineError
from llama.weights.entry import Entry, _file_entry
from llama.weights.names import ST_DTYPES, ST_NAMES


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



def _safetensors_header(plan: list[tuple[str, tuple[int, ...], np.dtype]], metadata: dict) -> bytes:
    header, offset = {"__metadata__": metadata}, 0
    for name, shape, dtype in plan:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)                      # tensors start 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw

