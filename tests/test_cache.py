"""Cache keys come from content, config values and code, never from paths."""

import shutil
from pathlib import Path

import pytest

from tasks.cache import CachedStage, content_key

STAGE = CachedStage("demo", calls=("tasks.cache",), file_params=("data",),
                    outputs_valid=lambda folder: (folder / "done").exists())


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


def _stage_versions() -> dict[str, str]:
    from tasks import data, evaluate, model, train

    stages = (data.PREPROCESS, model.CONVERT, train.TRAIN, train.MERGE, evaluate.PERPLEXITY, evaluate.SQUAD,
              evaluate.SAMPLES, model.REGISTER)
    return {stage.stage: stage.version for stage in stages}


@pytest.mark.parametrize("edited, reruns", [
    ("tasks/tracking.py", {"register"}),                          # MLflow logging: only registering logs with it
    ("llama/train/plan.py", {"train"}),                           # the memory plan: train checks it before compiling
    ("llama/model.py", {"train", "merge", "perplexity", "squad", "samples", "register"}),   # not conversion
    ("llama/data/wiki.py", {"records", "perplexity"}),            # standard perplexity reads raw WikiText too
    ("llama/eval/metrics.py", {"squad"}),
    ("llama/train/lora.py", {"train", "merge", "perplexity", "squad", "samples", "register"}),  # adapters load unmerged
    ("tasks/train.py", set()),                                    # outside its task bodies: plots, step logging
])
def test_an_edit_reruns_exactly_the_stages_whose_code_it_is(tmp_path, monkeypatch, edited, reruns):
    """Each stage is versioned by the library code it calls (with its imports) and its task body, not by its
    tasks module: edit one file of a copy of the code and see which stage versions change."""
    import tasks.cache as cache

    repo = Path(cache.__file__).resolve().parent.parent
    for package in cache.CODE_PACKAGES:
        shutil.copytree(repo / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(cache, "ROOT", tmp_path)
    cache._code_version.cache_clear()
    try:
        before = _stage_versions()
        with open(tmp_path / edited, "a", encoding="utf-8") as source:
            source.write("\n# an edit\n")
        cache._code_version.cache_clear()
        after = _stage_versions()
    finally:
        cache._code_version.cache_clear()
    assert {stage for stage in before if before[stage] != after[stage]} == reruns


def test_a_task_body_is_part_of_its_stage_version():
    stage = CachedStage("demo", calls=("tasks.cache",))
    unmarked = stage.version

    def body(x):
        return x + 1

    assert stage.body(body) is body and stage.version != unmarked


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
