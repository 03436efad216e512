"""Cache keys come from content, config values and code, never from paths."""

import shutil

from tasks.cache import CachedStage, content_key

STAGE = CachedStage("demo", code="tasks.cache", file_params=("data",), outputs_valid=lambda folder: (folder / "done").exists())


def test_key_follows_content_not_path(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b" / "renamed.txt"
    first.write_text("same bytes")
    second.parent.mkdir()
    shutil.copy(first, second)
    assert STAGE.key({"data": first, "n": 1}) == STAGE.key({"data": second, "n": 1})
    second.write_text("other bytes")
    assert STAGE.key({"data": first, "n": 1}) != STAGE.key({"data": second, "n": 1})


def test_key_follows_config_values_but_not_ignored_ones(tmp_path):
    data = tmp_path / "a.txt"
    data.write_text("x")
    base = {"data": data, "n": 1, "work_dir": tmp_path / "w1", "run_id": "r1"}
    assert STAGE.key(base) == STAGE.key({**base, "work_dir": tmp_path / "w2", "run_id": "r2"})
    assert STAGE.key(base) != STAGE.key({**base, "n": 2})


def test_folder_inputs_hash_every_file(tmp_path):
    folder = tmp_path / "records"
    folder.mkdir()
    (folder / "part").write_bytes(b"\x00" * 10)
    before = content_key("s", {"data": folder}, ["data"])
    (folder / "part").write_bytes(b"\x00" * 9 + b"\x01")
    assert content_key("s", {"data": folder}, ["data"]) != before


def test_output_dir_is_named_by_the_key(tmp_path):
    data = tmp_path / "a.txt"
    data.write_text("x")
    params = {"data": data, "work_dir": tmp_path / "work"}
    out = STAGE.output_dir(params)
    assert out == tmp_path / "work" / "demo" / STAGE.key(params)[:16]


def test_code_version_follows_imports_only():
    from tasks.cache import code_version, _imported_modules, _module_file

    data_imports = _imported_modules(_module_file("tasks.data"))
    assert {"llama.data.wiki", "tasks.cache"} <= data_imports
    assert code_version("tasks.data") != code_version("tasks.cache")


def test_a_pipeline_folder_is_keyed_by_its_manifest_digests(tmp_path):
    """Its readers verify the files against the manifest, so the key uses the listed sha256s without
    hashing the files again; files the manifest does not list are still hashed."""
    from llama.fileio import write_manifest

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\x00" * 10)
    write_manifest(folder, "llama2-pipeline test 1")
    key = content_key("s", {"data": folder}, ["data"])
    (folder / "weights.bin").write_bytes(b"\x01" * 10)  # damaged behind the manifest's back: readers refuse it
    assert content_key("s", {"data": folder}, ["data"]) == key
    write_manifest(folder, "llama2-pipeline test 1")  # rewritten by the pipeline: new content, new key
    rewritten = content_key("s", {"data": folder}, ["data"])
    assert rewritten != key
    (folder / "notes.txt").write_text("not in the manifest")
    assert content_key("s", {"data": folder}, ["data"]) != rewritten
