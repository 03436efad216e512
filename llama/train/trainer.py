"""Pretraining and finetuning on verified MindRecord rows: the entry point.

    result = train(config, "runs/tiny", resume=False, on_step=lambda step, metrics: ...)

`train` runs the loop in this process (llama.train.worker), or launches `parallel.data_parallel` workers
through msrun (llama.train.launch), each running the same loop as one rank. The run's folder is described in
llama.train.run_folder, its rows in llama.train.batches, the network in llama.train.network.
"""

from __future__ import annotations

import os
from pathlib import Path

from llama.config.train import TrainConfig, as_train_config
from llama.fileio import exclusive_lock
from llama.train.launch import run_data_parallel
from llama.train.plan import check_fits
from llama.train.run_folder import LOCK_FILE
from llama.train.worker import StepCallback, launched_by_msrun, run_worker


def train(config: TrainConfig | dict, output_dir: str | os.PathLike, resume: bool = False,
          on_step: StepCallback | None = None) -> dict:
    """Train as the config says; return the result summary (also written to <output_dir>/result.json).

    `on_step(step, metrics)` is called on every logged step with loss, lr, grad_norm, tokens_per_s,
    loss_scale and skipped (whether the update was skipped for non-finite gradients).

    One run at a time trains into a folder: a second one is refused at once, naming the holder's pid (it
    could only repeat or undo the first one's steps).
    """
    config = as_train_config(config)
    config.require_inputs()
    config.check_runnable()
    if launched_by_msrun():
        return run_worker(config, output_dir, resume, on_step)
    check_fits(config)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(output_dir / LOCK_FILE, f"training folder {output_dir}", wait=False):
        if config.parallel.data_parallel > 1:
            return run_data_parallel(config, output_dir, resume, on_step)
        return run_worker(config, output_dir, resume, on_step)
