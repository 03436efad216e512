"""Helpers for the training and merge tests (their fixtures, records and a base checkpoint, are in conftest)."""

import json

import numpy as np
import pytest

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


def sample_ids(rows: int = 2, length: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 512, size=(rows, length)).astype(np.int32)


def assert_recompute_changes_only_rounding(config: dict, tmp_path, steps: int = 3) -> None:
    """Train `config` for `steps` steps without and with training.recompute: the same losses and saved weights,
    up to float rounding (the recomputed graph sums gradients in another order; AdamW's first steps, about
    lr * sign(gradient), carry that to about 1e-5 of a weight)."""
    from llama.train.trainer import train
    from llama.weights.mindspore_ckpt import read_ckpt_index

    runs = {}
    for recompute in (False, True):
        run = tmp_path / f"recompute_{recompute}"
        train({**config, "training": {**config.get("training", {}), "max_steps": steps, "recompute": recompute}},
              run)
        losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        weights = read_ckpt_index(run / f"rank_0/step_{steps:08d}/weights.ckpt")
        runs[recompute] = losses, {name: entry.read() for name, entry in weights.items()}
    (losses, weights), (recomputed_losses, recomputed_weights) = runs[False], runs[True]
    assert len(losses) == steps and recomputed_losses == pytest.approx(losses, rel=1e-5)
    assert recomputed_weights.keys() == weights.keys()
    for name, weight in weights.items():
        weight = np.asarray(weight, dtype=np.float64)
        np.testing.assert_allclose(np.asarray(recomputed_weights[name], dtype=np.float64), weight, rtol=0,
                                   atol=1e-4 * np.abs(weight).max(), err_msg=name)
