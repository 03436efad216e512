"""The training loop of one process: alone, or as one rank of an msrun job (llama/train/launch.py starts those).

What a step does is fixed by (config, seed, step): the rows (llama.train.batches), the learning rate and loss
scale (llama.train.schedule) and the dropout keys, from (seed, rank, step, micro-batch). A resumed run therefore
repeats exactly what the interrupted run would have done, and its weights end bit-identical.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable

from llama.config.train import TrainConfig
from llama.errors import PipelineError
from llama.fileio import write_json_atomic
from llama.progress import Progress
from llama.train import checkpointing
from llama.train.batches import count_steps, load_batches, scored_positions
from llama.train.dropout import set_dropout_key, step_key
from llama.train.network import build_network
from llama.train.run_folder import (CONFIG_FILE, METRICS_FILE, RESULT_FILE, append_metrics, prepare_output,
                                    truncate_metrics)
from llama.train.schedule import LossScaler, learning_rate
from llama.train.step import Stepper

StepCallback = Callable[[int, dict], None]


def launched_by_msrun() -> bool:
    """True in the processes msrun starts: the workers, and its scheduler, which runs the same command and
    whose `init()` serves the cluster until the workers finish, then ends the process."""
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED")


def run_worker(config: TrainConfig, output_dir: str | os.PathLike, resume: bool = False,
               on_step: StepCallback | None = None, start_step: int | None = None) -> dict:
    """Train in this process: alone, or as rank k of an msrun job (then `start_step` comes from the launcher)."""
    output_dir = Path(output_dir)
    rank, world = 0, 1
    if launched_by_msrun():
        from mindspore.communication import get_group_size, get_rank, init
        init()
        rank, world = get_rank(), get_group_size()
        if world != config.parallel.data_parallel:
            raise PipelineError(f"msrun started {world} workers, the config asks for {config.parallel.data_parallel}")
    # Inputs and model are checked before the run is recorded, so bad settings leave nothing behind.
    batches = load_batches(config, world)
    total_steps = count_steps(config, len(batches.input_ids))
    network = build_network(config)
    network.model_config.check_fits(f"records {config.data.train}", ids=batches.input_ids,
                                    length=batches.input_ids.shape[1] - 1)  # rows are inputs + the next token
    if start_step is None:
        output_dir.mkdir(parents=True, exist_ok=True)
        start_step = prepare_output(config, output_dir, resume)
    net = network.net
    net.set_train(True)
    stepper = Stepper(net, batches.pad_id, config.optimizer, config.training.max_grad_norm,
                      config.training.gradient_accumulation_steps, world,
                      scored_positions(batches.input_ids, batches.labels, batches.pad_id))
    scaler = LossScaler(config.loss_scale.type, config.loss_scale.value, config.loss_scale.factor,
                        config.loss_scale.window)
    weights, optimizer_state = network.saved_weights(), stepper.optimizer_state()

    last_checkpoint = first_loss = None
    if start_step:
        last_checkpoint = checkpointing.step_dir(output_dir, rank, start_step)
        state = checkpointing.verify(last_checkpoint)
        if state.get("records_sha256") != batches.records_sha256:
            raise PipelineError(f"the records in {config.data.train} changed since {last_checkpoint} was written")
        checkpointing.restore(weights, checkpointing.load_tensors(last_checkpoint / checkpointing.WEIGHTS),
                              str(last_checkpoint))
        checkpointing.restore(optimizer_state, checkpointing.load_tensors(last_checkpoint / checkpointing.OPTIMIZER),
                              str(last_checkpoint))
        scaler.load(state["loss_scale"])
        first_loss = state.get("first_loss")
    if rank == 0:
        truncate_metrics(output_dir / METRICS_FILE, start_step)

    def save(step: int, metrics: dict) -> Path:
        epoch, first_row = batches.position(step)
        state = {
            "step": step, "total_steps": total_steps, "epoch": epoch, "next_row_in_epoch": first_row,
            "rank": rank, "world_size": world, "records_sha256": batches.records_sha256,
            "loss_scale": scaler.state(),
            "rng": {"seed": config.seed, "data_order": "permutation seeded by (seed, epoch)",
                    "dropout": "keys from (seed, rank, step, micro-batch)"},
            "metrics": metrics, "first_loss": first_loss, "kind": network.kind,
            "model_config": network.model_config.to_dict(),
            "pet": config.to_dict()["pet"] if network.kind != "full" else None, "base": network.base,
        }
        return checkpointing.save(output_dir, rank, step, weights, optimizer_state, state,
                                  config.checkpoint.keep_last)

    has_dropout = network.kind != "full"
    seq_length = batches.input_ids.shape[1] - 1
    tokens_per_step = batches.global_batch * seq_length
    last_metrics = None
    timed_steps, timed_seconds = 0, 0.0
    progress = Progress("train", total=total_steps - start_step, unit="steps", enabled=rank == 0)
    with progress:
        for step in range(start_step, total_steps):
            lr = learning_rate(config, step, total_steps)
            began = time.perf_counter()
            loss, grad_norm, finite = stepper.step(
                batches.micro_batches(step, rank), lr, scaler.scale,
                before_micro=(lambda micro: set_dropout_key(net, step_key(config.seed, rank, step, micro)))
                if has_dropout else None)
            seconds = time.perf_counter() - began
            if not math.isfinite(loss):
                where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else \
                    "no checkpoint was written yet"
                raise PipelineError(f"loss became {loss} at step {step + 1}; training stopped ({where})")
            if step > start_step:           # the first step of a process includes compiling
                timed_steps, timed_seconds = timed_steps + 1, timed_seconds + seconds
            metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / seconds,
                       "loss_scale": scaler.scale, "skipped": not finite}
            scaler.update(finite)
            first_loss = loss if first_loss is None else first_loss
            done = step + 1
            progress.update(1, extra=f"step {done}/{total_steps}  loss {loss:.4f}  lr {lr:.2e}  "
                                     f"{metrics['tokens_per_s']:,.0f} tokens/s")
            if rank == 0 and (done % config.training.log_every == 0 or done == total_steps):
                append_metrics(output_dir / METRICS_FILE, done, metrics)
                if on_step:
                    on_step(done, metrics)
            if done % config.checkpoint.save_steps == 0 or done == total_steps:
                last_checkpoint = save(done, metrics)
            last_metrics = metrics

    result = {
        "output_dir": str(output_dir), "run_mode": config.run_mode, "kind": network.kind,
        "steps": total_steps, "resumed_from": start_step or None, "world_size": world,
        "global_batch": batches.global_batch, "seq_length": seq_length,
        "first_loss": first_loss, "final_loss": last_metrics["loss"] if last_metrics else None,
        "tokens_per_s": tokens_per_step * timed_steps / timed_seconds if timed_seconds else None,
        "checkpoint": str(checkpointing.step_dir(output_dir, rank, total_steps)),
    }
    if rank == 0:
        write_json_atomic(output_dir / RESULT_FILE, result)
        checkpointing.write_run_manifest(output_dir, (CONFIG_FILE, METRICS_FILE, RESULT_FILE))
    return result
