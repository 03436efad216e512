import os
import stat

import pytest

from llama.errors import PipelineError
from llama.fileio import (MANIFEST, atomic_dir, atomic_path, pipeline_manifest_files, read_json, verify_manifest,
                          write_json_atomic, write_manifest)


def test_atomic_dir_leaves_nothing_when_the_block_fails(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_only_with_overwrite_and_uses_normal_permissions(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(PipelineError, match="already exists"):
        with atomic_dir(target):
            pass
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "f.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert read_json(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


@pytest.mark.parametrize("content, words", [(b"", "is empty"), (b"{", "not valid JSON"), (b"\xff\xfe{", "not UTF-8")])
def test_read_json_errors_are_one_line(tmp_path, content, words):
    path = tmp_path / "in.json"
    path.write_bytes(content)
    with pytest.raises(PipelineError, match=words) as err:
        read_json(path)
    assert "\n" not in str(err.value)


def test_manifest_covers_subfolders_and_names_the_damaged_file(tmp_path):
    (tmp_path / "predictions").mkdir()
    (tmp_path / "predictions" / "rows.jsonl").write_text('{"id": 1}\n')
    (tmp_path / "result.json").write_text("{}")
    manifest = write_manifest(tmp_path, "test format", note="x")
    assert sorted(manifest["files"]) == ["predictions/rows.jsonl", "result.json"] and manifest["note"] == "x"
    assert verify_manifest(tmp_path, "test format", "test") == manifest
    assert pipeline_manifest_files(tmp_path) is None  # not a format this project writes
    assert pipeline_manifest_files(tmp_path / "predictions") is None  # no manifest at all
    with pytest.raises(PipelineError, match="not a test manifest"):
        verify_manifest(tmp_path, "other format", "test")
    ours = write_manifest(tmp_path, "llama2-pipeline test 1")
    assert pipeline_manifest_files(tmp_path) == ours["files"] == manifest["files"]
    (tmp_path / "predictions" / "rows.jsonl").write_text('{"id": 2}\n')  # same size, other bytes
    with pytest.raises(PipelineError, match="rows.jsonl does not match the sha256"):
        verify_manifest(tmp_path, "llama2-pipeline test 1", "test")


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/passwd", "a/../../b"])
def test_manifest_may_not_point_outside_its_folder(tmp_path, name):
    write_json_atomic(tmp_path / MANIFEST, {"format": "f", "files": {name: {"size": 1, "sha256": "0" * 64}}})
    with pytest.raises(PipelineError, match="outside its folder"):
        verify_manifest(tmp_path, "f", "test")
