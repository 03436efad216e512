"""Shared set-up for the training and merge tests: tiny records made by the real preprocess stage, and a
tiny base checkpoint. Fixtures are imported by the test modules that use them."""

import numpy as np
import pytest

from llama.cli import run as cli

TINY = {"run_mode": "pretrain", "seed": 0, "model": {"config": "tiny", "compute_dtype": "float32"},
        "data": {"batch_size": 4}, "training": {"max_steps": 8},
        "optimizer": {"learning_rate": 3e-3}, "lr_schedule": {"warmup_steps": 2, "lr_end": 3e-4},
        "checkpoint": {"save_steps": 4, "keep_last": 2}}


def tiny_config(**sections) -> dict:
    """TINY with some sections' settings replaced, e.g. tiny_config(data={"train": path})."""
    config = {key: dict(value) if isinstance(value, dict) else value for key, value in TINY.items()}
    for section, values in sections.items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    return config


@pytest.fixture(scope="session")
def wiki_records(tmp_path_factory, fixtures):
    """WikiText-2 slice as rows of 129 tokens (tok512), via `preprocess wiki`."""
    out = tmp_path_factory.mktemp("records") / "wiki128"
    assert cli(["preprocess", "wiki", "--input", str(fixtures / "wiki_slice.tokens"), "--tokenizer",
                str(fixtures / "tok512.model"), "--seq-length", "128", "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def alpaca_records(tmp_path_factory, fixtures):
    """The Alpaca seed tasks as input_ids + labels rows of 385 tokens, via `preprocess alpaca`."""
    out = tmp_path_factory.mktemp("records") / "alpaca384"
    assert cli(["preprocess", "alpaca", "--input", str(fixtures / "alpaca_seed_tasks.json"), "--tokenizer",
                str(fixtures / "tok512.model"), "--seq-length", "384", "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory):
    """A tiny model with seeded random weights, saved as a verified checkpoint folder."""
    import mindspore as ms
    from llama.checkpoint import save_checkpoint
    from llama.config import ModelConfig
    from llama.model import LlamaForCausalLM

    ms.set_seed(7)
    config = ModelConfig.named("tiny")
    out = tmp_path_factory.mktemp("base") / "tiny"
    save_checkpoint(LlamaForCausalLM(config), out, config)
    return out


def sample_ids(rows: int = 2, length: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 512, size=(rows, length)).astype(np.int32)
