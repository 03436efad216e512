"""Helpers for the training and merge tests (their fixtures, records and a base checkpoint, are in conftest)."""

import numpy as np

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
