"""Every shipped pipeline config parses and refers to recipes, data configs, datasets and sources that exist."""

from pathlib import Path

import pytest

from llama.download import load_sources
from llama.pipeline_config import DataConfig, PipelineConfig, load_flow_config
from llama.train.config import load_train_config
from llama.yamlconfig import as_overrides, resolve_path

PIPELINES = sorted((Path(__file__).resolve().parent.parent / "configs" / "pipeline").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.stem)
def test_pipeline_config_is_consistent(path):
    settings, base = load_flow_config(str(path), schema=PipelineConfig)
    sources = load_sources(resolve_path(settings["sources"], base))
    data_path = resolve_path(settings["data"], base)
    data, _ = load_flow_config(str(data_path), schema=DataConfig)
    datasets = data["datasets"]
    if settings["model"].get("tokenizer"):
        assert settings["model"]["tokenizer"] in sources
        assert data["tokenizer"] in load_sources(resolve_path(data["sources"], data_path.parent))
    else:  # the weights bring their tokenizer (a GGUF file): the pipeline tokenizes the data with it
        assert data["tokenizer"] is None
    if "train" in settings:
        assert settings["train"]["dataset"] in datasets
        load_train_config(resolve_path(settings["train"]["recipe"], base), as_overrides(settings["train"].get("set") or {}))
    evaluate = settings["evaluate"]
    for options in list(evaluate.get("perplexity", {}).values()) + [evaluate["squad"]]:
        name = options["data"]
        assert name in datasets or name in sources or resolve_path(name, base).is_file()
    for options in list(evaluate.get("perplexity", {}).values()) + [evaluate.get(k, {}) for k in ("squad", "samples")]:
        assert set(options.get("models", [])) <= {"base", "finetuned"}  # the models an evaluation runs on
