import pytest

from llama.config.loader import apply_overrides, load_yaml
from llama.errors import PipelineError


def test_overrides_parse_values_and_create_sections():
    config = {"train": {"lr": 1e-4, "steps": 10}}
    out = apply_overrides(config, ["train.lr=3e-4", "train.steps=20", "lora.targets=[wq, wv]"])
    assert out == {"train": {"lr": 3e-4, "steps": 20}, "lora": {"targets": ["wq", "wv"]}}
    assert config["train"]["lr"] == 1e-4


@pytest.mark.parametrize("bad", ["novalue", "=3", "train.lr.x=1"])
def test_bad_overrides_are_one_line_errors(bad):
    with pytest.raises(PipelineError):
        apply_overrides({"train": {"lr": 1}}, [bad])


def test_bad_yaml_files(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    for name, words in [("list.yaml", "mapping"), ("broken.yaml", "not valid YAML"), ("none.yaml", "does not exist")]:
        with pytest.raises(PipelineError, match=words):
            load_yaml(tmp_path / name)


def test_nested_settings_round_trip_through_overrides():
    from llama.config.loader import as_overrides

    nested = {"model": {"config": None}, "optimizer": {"learning_rate": 2e-3}, "pet": {"target_modules": "wq|wv"}}
    assert apply_overrides({}, as_overrides(nested)) == nested
