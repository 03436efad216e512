"""Every shipped pipeline config parses and refers to recipes, data configs, datasets and sources that exist."""

import json
import os
from pathlib import Path

import pytest

from llama.config.loader import as_overrides, resolve_path
from llama.config.pipeline import DataConfig, PipelineConfig, load_flow_config
from llama.config.train import load_train_config
from llama.download import load_sources

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PIPELINES = sorted((CONFIGS / "pipeline").glob("*.yaml"))


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


def _cli_json(capfd, *argv) -> dict:
    from llama.cli import run

    capfd.readouterr()
    assert run([*argv, "--json"]) == 0
    return json.loads(capfd.readouterr().out.splitlines()[-1])


def test_configs_lists_every_shipped_config_with_what_it_is(capfd):
    listed = _cli_json(capfd, "configs")
    shipped = {f"{path.parent.name}/{path.stem}" for path in CONFIGS.glob("*/*.yaml")}
    assert set(listed) == shipped and all(listed.values())
    assert set(_cli_json(capfd, "configs", "train")) == {name for name in shipped if name.startswith("train/")}


def test_a_config_may_be_given_by_its_shipped_name_from_any_folder(capfd, tmp_path, monkeypatch):
    by_path = _cli_json(capfd, "plan", "--config", str(CONFIGS / "train" / "lora_llama2_7b.yaml"),
                       "--device-memory", "64GiB")
    monkeypatch.chdir(tmp_path)
    assert _cli_json(capfd, "plan", "--config", "lora_llama2_7b", "--device-memory", "64GiB") == by_path
    assert load_flow_config("demo", schema=PipelineConfig) == load_flow_config(
        str(CONFIGS / "pipeline" / "demo.yaml"), schema=PipelineConfig)
    assert load_flow_config("tiny")[0] == load_flow_config(str(CONFIGS / "data" / "tiny.yaml"))[0]


def test_an_unknown_config_name_is_one_line_listing_the_shipped_ones(capfd):
    from llama.cli import run

    capfd.readouterr()
    assert run(["plan", "--config", "lora_llama2_8b"]) == 1
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no train config named 'lora_llama2_8b' (shipped: ")
    assert "lora_llama2_7b" in err and "tiny_lora" in err


def test_a_wheel_ships_every_config_and_finds_them_by_name(tmp_path):
    """Built from a copy of the sources (nothing is written into the checkout), installed with `--prefix`,
    imported from there: `--config NAME` resolves to the installed copy."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "source"
    for folder in ("llama", "tasks", "flows", "configs"):
        shutil.copytree(CONFIGS.parent / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(CONFIGS.parent / file, source / file)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", source],
                   check=True, capture_output=True)
    wheel, = (tmp_path / "dist").glob("*.whl")
    shipped = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")}
    in_wheel = {name.split("/configs/", 1)[1] for name in zipfile.ZipFile(wheel).namelist() if "/configs/" in name}
    assert in_wheel == shipped
    prefix = tmp_path / "prefix"
    # --ignore-installed: else pip first uninstalls this environment's own (editable) install of the project
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--ignore-installed", "--prefix", prefix, wheel],
                   check=True, capture_output=True)
    site, = prefix.glob("lib/python*/site-packages")
    found = subprocess.run([sys.executable, "-c", "from llama.config.loader import config_file\n"
                            "print(config_file('tiny_lora', 'train'))"], cwd=tmp_path, capture_output=True,
                           text=True, check=True, env={**os.environ, "PYTHONPATH": str(site)})
    assert Path(found.stdout.strip()) == prefix.resolve() / "share/llama2-pipeline/configs/train/tiny_lora.yaml"
