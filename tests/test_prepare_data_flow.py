"""The data flow on the real Prefect (hermetic home, see conftest) and a real MLflow store."""

import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import yaml

from flows.prepare_data import prepare_data
from llama.data import records
from llama.data.tokenizer import Tokenizer
from llama.errors import PipelineError

pytestmark = pytest.mark.slow


def _config(tmp_path, fixtures, tokenizer):
    config = {
        "sources": str(fixtures.parent.parent / "configs" / "bundled_sources.yaml"),
        "tokenizer": str(tokenizer),
        "datasets": {
            "wiki_train": {"kind": "wiki", "input": "wiki_slice", "seq_length": 64, "mode": "mindformers"},
            "squad_eval": {"kind": "squad", "input": "squad_slice", "max_length": 256, "mode": "eval",
                           "questions": "all"},
        },
    }
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_rerun_executes_nothing_and_a_new_tokenizer_reruns_tokenization(tmp_path, fixtures):
    tokenizer = tmp_path / "tokenizer.model"
    shutil.copy(fixtures / "tok512.model", tokenizer)
    config, work = _config(tmp_path, fixtures, tokenizer), str(tmp_path / "work")

    first = prepare_data(config=config, work_dir=work)
    assert set(first["tasks"].values()) == {"ran"}
    for summary in first["datasets"].values():
        assert records.verify(summary["output"])["rows"] == summary["rows"] > 0

    second = prepare_data(config=config, work_dir=work)
    assert set(second["tasks"].values()) == {"cached"}
    assert second["datasets"] == first["datasets"]

    # Same path, new content: a different sentencepiece model trained on the wiki slice.
    spm.SentencePieceTrainer.train(input=str(fixtures / "wiki_slice.tokens"), model_prefix=str(tmp_path / "other"),
                                   vocab_size=400, model_type="bpe", bos_id=1, eos_id=2, unk_id=0)
    shutil.copy(tmp_path / "other.model", tokenizer)
    third = prepare_data(config=config, work_dir=work)
    assert third["tasks"] == {"download-wiki_slice": "cached", "download-squad_slice": "cached",
                              "preprocess-wiki_train": "ran", "preprocess-squad_eval": "ran"}
    for name, summary in third["datasets"].items():
        assert summary["output"] != first["datasets"][name]["output"]
        assert summary["tokenizer_sha256"] != first["datasets"][name]["tokenizer_sha256"]


def test_deleted_outputs_are_rebuilt(tmp_path, fixtures):
    config, work = _config(tmp_path, fixtures, fixtures / "tok512.model"), str(tmp_path / "work")
    first = prepare_data(config=config, work_dir=work)
    shutil.rmtree(first["datasets"]["wiki_train"]["output"])
    second = prepare_data(config=config, work_dir=work)
    assert second["tasks"]["preprocess-wiki_train"] == "ran"
    assert second["tasks"]["preprocess-squad_eval"] == "cached"
    assert records.verify(second["datasets"]["wiki_train"]["output"])


def test_a_tokenizer_from_the_caller_replaces_the_configs(tmp_path, fixtures):
    """The pipeline passes the converted model's tokenizer when the weights bring their own (a GGUF file)."""
    config, work = _config(tmp_path, fixtures, fixtures / "tok512.model"), str(tmp_path / "work")
    settings = yaml.safe_load(open(config))
    settings["tokenizer"] = None
    Path(config).write_text(yaml.safe_dump(settings))
    with pytest.raises(PipelineError, match="names no tokenizer"):
        prepare_data(config=config, work_dir=work)
    result = prepare_data(config=config, work_dir=work, tokenizer=str(fixtures / "tok512.model"))
    expected = Tokenizer(fixtures / "tok512.model").sha256
    assert {summary["tokenizer_sha256"] for summary in result["datasets"].values()} == {expected}
