"""Records folders: real MindRecord and Parquet files, a manifest that catches damage before MindSpore reads."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from llama.data.records import MANIFEST, PARQUET, open_dataset, read_columns, verify, write_records
from llama.data.tokenizer import Tokenizer
from llama.errors import PipelineError
from llama.fileio import sha256_file


@pytest.fixture(scope="module")
def tok(tok512):
    return Tokenizer(tok512)


def _columns(rows=6, length=9):
    ids = np.arange(rows * length, dtype=np.int64).reshape(rows, length) % 512
    labels = np.where(ids % 3 == 0, -100, ids)
    return {"input_ids": ids, "labels": labels}


def _write(out, tok, columns=None, **kwargs):
    return write_records(out, columns or _columns(), kind="qa", seq_length=8, tokenizer=tok,
                         sources={"data.json": "ab" * 32}, stats={"examples": 7, "dropped": 1}, **kwargs)


@pytest.fixture
def written(tmp_path, tok):
    out = tmp_path / "records"
    return out, _write(out, tok)


def test_round_trip_through_mindspore_and_parquet(written, tok):
    out, manifest = written
    columns = _columns()
    read = read_columns(out)
    assert set(read) == {"input_ids", "labels"}
    for name, values in columns.items():
        assert read[name].dtype == np.int32
        np.testing.assert_array_equal(read[name], values)
    table = pq.read_table(out / PARQUET)
    np.testing.assert_array_equal(np.array(table["labels"].to_pylist()), columns["labels"])


def test_manifest_describes_the_files(written, tok):
    out, manifest = written
    assert manifest == json.loads((out / MANIFEST).read_text())
    assert manifest["kind"] == "qa" and manifest["rows"] == 6 and manifest["seq_length"] == 8
    assert manifest["mindrecord"] == "qa8.mindrecord"
    assert set(manifest["files"]) == {"qa8.mindrecord", "qa8.mindrecord.db", PARQUET}
    for name, info in manifest["files"].items():
        assert info == {"size": (out / name).stat().st_size, "sha256": sha256_file(out / name)}
    assert manifest["tokenizer"]["sha256"] == tok.sha256
    assert manifest["sources"] == {"data.json": "ab" * 32}
    assert manifest["stats"] == {"dropped": 1, "truncated": 0, "examples": 7}
    labels = manifest["columns"]["labels"]
    assert (labels["row_length"], labels["min"], labels["ignored"]) == (9, -100, 18)


def test_extra_files_are_copied_and_checksummed(tmp_path, tok):
    extra = tmp_path / "notes.txt"
    extra.write_text("sidecar")
    manifest = _write(tmp_path / "out", tok, extra_files={"notes.txt": extra})
    assert (tmp_path / "out" / "notes.txt").read_text() == "sidecar"
    assert manifest["files"]["notes.txt"]["size"] == 7


def test_existing_output_needs_overwrite(written, tok):
    out, manifest = written
    with pytest.raises(PipelineError, match="already exists"):
        _write(out, tok, columns=_columns(rows=3))
    assert verify(out) == manifest
    assert _write(out, tok, columns=_columns(rows=3), overwrite=True)["rows"] == 3
    assert len(read_columns(out)["input_ids"]) == 3


def test_failed_write_leaves_nothing(tmp_path, tok):
    with pytest.raises(FileNotFoundError):
        _write(tmp_path / "out", tok, extra_files={"x": tmp_path / "missing"})
    assert list(tmp_path.iterdir()) == []


def test_bad_columns(tmp_path, tok):
    with pytest.raises(ValueError, match="different row counts"):
        _write(tmp_path / "a", tok, columns={"input_ids": np.zeros((2, 3)), "labels": np.zeros((3, 3))})
    with pytest.raises(PipelineError, match="no rows"):
        _write(tmp_path / "b", tok, columns={"input_ids": np.zeros((0, 3))})


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damage_is_caught_before_mindspore_reads(written, damage):
    out, manifest = written
    record = out / manifest["mindrecord"]
    if damage == "flip":
        _flip_byte(record, record.stat().st_size - 100)
        message = "does not match the sha256"
    elif damage == "truncate":
        with open(record, "r+b") as handle:
            handle.truncate(record.stat().st_size // 2)
        message = "bytes, the manifest says"
    else:
        record.unlink()
        message = "is missing"
    for read in (verify, read_columns, open_dataset):
        with pytest.raises(PipelineError, match=message) as err:
            read(out)
        assert str(record) in str(err.value)


def test_missing_or_foreign_manifest(written, tmp_path):
    out, _ = written
    (out / MANIFEST).write_text('{"files": {}}')
    with pytest.raises(PipelineError, match="not a records manifest"):
        verify(out)
    (out / MANIFEST).unlink()
    with pytest.raises(PipelineError, match="does not exist"):
        read_columns(out)
    with pytest.raises(PipelineError, match="does not exist"):
        verify(tmp_path / "nowhere")


def test_open_dataset_columns_and_shards(written):
    out, _ = written
    shard = open_dataset(out, columns=["input_ids"], num_shards=2, shard_id=1)
    assert shard.get_col_names() == ["input_ids"]
    assert shard.get_dataset_size() == 3
    with pytest.raises(PipelineError, match="no column attention_mask"):
        open_dataset(out, columns=["attention_mask"])
