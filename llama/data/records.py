"""MindRecord output with a manifest of checksums, and the only sanctioned ways to read it back.

MindRecord has no checksums of its own and a damaged file can crash MindSpore's reader, so every folder
written here carries `manifest.json` (rows, columns, tokenizer and source sha256s, statistics, and the size
and sha256 of every file), and `open_dataset`/`read_columns` check the files against it before MindSpore
opens them. The folder appears in one rename, so a reader never sees half of it.

Layout of a folder (kind "wiki", seq_length 4096):
    wiki4096.mindrecord, wiki4096.mindrecord.db   MindFormers' format: int32 columns of shape [-1]
    rows.parquet                                    the same rows, for tools without MindSpore
    manifest.json                                   written last
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from llama.data.tokenizer import Tokenizer
from llama.errors import PipelineError
from llama.fileio import MANIFEST, atomic_dir, verify_manifest, write_manifest
from llama.progress import Progress

FORMAT = "llama2-pipeline records 1"
PARQUET = "rows.parquet"
IGNORE_ID = -100  # label value MindFormers leaves out of the loss
UNLABELLED_WARNING = 0.5  # share of rows without a labelled token above which preprocess and train warn
WRITE_BATCH = 1024  # rows per FileWriter call
READ_BATCH = 4096  # rows per MindDataset batch in read_columns


def write_records(out_dir: str | os.PathLike, columns: dict[str, np.ndarray], *, kind: str, seq_length: int,
                  tokenizer: Tokenizer, sources: dict[str, str], stats: dict, overwrite: bool = False,
                  extra_files: dict[str, Path] | None = None, file_name: str | None = None,
                  show_progress: bool = True) -> dict:
    """Write `columns` (each [rows, row_length], same row count) as MindRecord plus manifest; return it.

    `file_name` defaults to MindFormers' habit, e.g. `wiki4096.mindrecord`. `stats` (the kind's own counts)
    go into the manifest next to `dropped`/`truncated`, which default to 0.
    """
    arrays = {name: _int32_rows(name, values) for name, values in columns.items()}
    row_counts = {len(values) for values in arrays.values()}
    if len(row_counts) > 1:
        raise ValueError(f"columns have different row counts: { {k: len(v) for k, v in arrays.items()} }")
    rows = row_counts.pop() if row_counts else 0
    if rows == 0:
        raise PipelineError(f"nothing to write to {out_dir}: no rows")
    file_name = file_name or f"{kind}{seq_length}.mindrecord"
    extra_files = extra_files or {}
    with atomic_dir(out_dir, overwrite) as tmp, ThreadPoolExecutor(max_workers=1) as background:
        parquet = background.submit(_write_parquet, tmp / PARQUET, arrays)  # Arrow writes without the GIL
        with Progress(f"write {file_name}", total=rows, unit="rows", enabled=show_progress) as progress:
            _write_mindrecord(tmp / file_name, arrays, kind, progress)
        parquet.result()
        for name, source in extra_files.items():
            shutil.copyfile(source, tmp / name)
        manifest = write_manifest(
            tmp, FORMAT, kind=kind, rows=rows, seq_length=seq_length,
            columns={name: _column_stats(values) for name, values in arrays.items()},
            tokenizer={"sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                       "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id},
            sources=dict(sources), stats={"dropped": 0, "truncated": 0, **stats}, mindrecord=file_name)
    return manifest


def summarize(out_dir: str | os.PathLike, manifest: dict) -> dict:
    """The few manifest facts a person or a flow wants after writing or checking a folder."""
    return {
        "output": str(out_dir),
        "kind": manifest["kind"],
        "rows": manifest["rows"],
        "row_length": {name: column["row_length"] for name, column in manifest["columns"].items()},
        "mindrecord": str(Path(out_dir) / manifest["mindrecord"]),
        "tokenizer_sha256": manifest["tokenizer"]["sha256"],
        # record lists (e.g. which rows were truncated) stay in the manifest; here they are counted
        **{key: len(value) if isinstance(value, list) else value for key, value in manifest["stats"].items()},
    }


def verify(out_dir: str | os.PathLike) -> dict:
    """Check every file listed in the manifest (sizes first, then sha256s) and return the manifest."""
    out = Path(out_dir)
    if not out.is_dir():
        raise PipelineError(f"records folder {out} does not exist")
    manifest = verify_manifest(out, FORMAT, "records")
    if manifest.get("mindrecord") not in manifest["files"]:
        raise PipelineError(f"{out / MANIFEST} names no MindRecord file among its files")
    return manifest


def open_dataset(out_dir: str | os.PathLike, columns: list[str] | None = None, shuffle: bool = False,
                 num_shards: int | None = None, shard_id: int | None = None):
    """A `mindspore.dataset.MindDataset` over the verified folder."""
    import mindspore.dataset as ds

    manifest = verify(out_dir)
    unknown = sorted(set(columns or ()) - set(manifest["columns"]))
    if unknown:
        raise PipelineError(f"{out_dir} has no column {', '.join(unknown)} (it has {', '.join(manifest['columns'])})")
    return ds.MindDataset(dataset_files=[str(Path(out_dir) / manifest["mindrecord"])], columns_list=columns,
                          shuffle=shuffle, num_shards=num_shards, shard_id=shard_id)


def read_columns(out_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every row of the verified folder, read by MindSpore, as one [rows, row_length] array per column."""
    dataset = open_dataset(out_dir).batch(READ_BATCH)  # batched in C++: rows are fixed-length per column
    parts = {name: [] for name in dataset.get_col_names()}
    for batch in dataset.create_dict_iterator(num_epochs=1, output_numpy=True):
        for name, values in batch.items():
            parts[name].append(values)
    return {name: np.concatenate(values) for name, values in parts.items()}


def check_labelled(labels: np.ndarray, where: str, hint: str) -> None:
    """Refuse training rows none of which has a labelled token (training on them learns nothing: loss 0,
    gradient 0), and warn on stderr when more than half have none. Position 0 is never a target."""
    unlabelled = int((labels[:, 1:] == IGNORE_ID).all(axis=1).sum())
    if unlabelled == len(labels):
        raise PipelineError(f"{where}: none of the {len(labels)} rows has a labelled token (every label is "
                            f"{IGNORE_ID}), so there is nothing to train on; {hint}")
    if unlabelled > UNLABELLED_WARNING * len(labels):
        print(f"warning: {where}: {unlabelled} of {len(labels)} rows ({unlabelled / len(labels):.0%}) have no "
              f"labelled token and teach nothing; {hint}", file=sys.stderr, flush=True)


def _int32_rows(name: str, values) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 2:
        raise ValueError(f"column {name} must be [rows, row_length], got shape {array.shape}")
    if array.size and (array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max):
        raise ValueError(f"column {name} has values outside int32")
    return array.astype(np.int32, copy=False)


def _column_stats(values: np.ndarray) -> dict:
    """Shape and token statistics of one column, for reports and sanity checks."""
    return {
        "dtype": "int32",
        "row_length": int(values.shape[1]),
        "min": int(values.min()) if values.size else None,
        "max": int(values.max()) if values.size else None,
        "ignored": int((values == IGNORE_ID).sum()),
    }


def _write_mindrecord(path: Path, arrays: dict[str, np.ndarray], kind: str, progress: Progress) -> None:
    """One MindRecord file (plus its .db index) as MindFormers writes it; MindSpore's writer works row by row."""
    from mindspore.mindrecord import FileWriter

    writer = FileWriter(file_name=str(path), shard_num=1)
    writer.add_schema({name: {"type": "int32", "shape": [-1]} for name in arrays}, kind)
    rows = len(next(iter(arrays.values())))
    try:
        for first in range(0, rows, WRITE_BATCH):
            last = min(first + WRITE_BATCH, rows)
            writer.write_raw_data([{name: values[i] for name, values in arrays.items()} for i in range(first, last)])
            progress.update(last - first)
        writer.commit()
    except RuntimeError as err:  # MindSpore reports a full disk as a page-long RuntimeError
        if "No free disk" in str(err):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path.parent)) from err
        raise


def _write_parquet(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({name: pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
                      for name, values in arrays.items()})
    pq.write_table(table, path)
