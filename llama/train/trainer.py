"""Pretraining and finetuning on verified MindRecord rows, in one process or as one msrun worker.

    result = train(config, "runs/tiny", resume=False, on_step=lambda step, metrics: ...)

`train` launches `parallel.data_parallel` workers through msrun when asked for more than one (see
launch.py); each worker runs `run_worker`. What a step does is fixed by (config, seed, step): the data order of
an epoch is a permutation seeded by (seed, epoch), the global batch of step s is the next slice of it, each
rank takes its part of each micro-batch, and dropout keys come from (seed, rank, step, micro-batch). A resumed
run therefore repeats exactly what the interrupted run would have done, and its weights end bit-identical.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from llama.errors import PipelineError
from llama.fileio import (checkpoint_identity, exclusive_lock, read_json, remove_partials, sha256_bytes,
                          write_json_atomic)
from llama.progress import Progress
from llama.train import checkpointing
from llama.train.config import TrainConfig, as_train_config
from llama.train.plan import check_fits

CONFIG_FILE, METRICS_FILE, RESULT_FILE = "train_config.json", "metrics.jsonl", "result.json"
LOCK_FILE = ".train.lock"   # held by the process that trains into the folder (the launcher of msrun workers)
# Settings a resumed run may change: how long it runs and how it checkpoints and logs.
RESUMABLE_CHANGES = {("training", "epochs"), ("training", "max_steps"), ("training", "log_every"),
                     ("checkpoint", "save_steps"), ("checkpoint", "keep_last")}

StepCallback = Callable[[int, dict], None]


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
            from llama.train.launch import run_data_parallel
            return run_data_parallel(config, output_dir, resume, on_step)
        return run_worker(config, output_dir, resume, on_step)


def launched_by_msrun() -> bool:
    """True in the processes msrun starts: the workers, and its scheduler, which runs the same command and
    whose `init()` serves the cluster until the workers finish, then ends the process."""
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED")


def prepare_output(config: TrainConfig, output_dir: Path, resume: bool) -> int:
    """Record the config of a new run, or check a resumed one against it; return the step to start from.

    Temporaries of a killed run's unfinished writes are removed first. A folder with a config but no
    checkpoint (a run that failed or was killed before its first one) holds nothing to keep: a new run
    starts over in it.
    """
    saved_path = output_dir / CONFIG_FILE
    world = config.parallel.data_parallel
    for folder in (output_dir, *(checkpointing.rank_dir(output_dir, rank) for rank in range(world))):
        remove_partials(folder)
    if resume:
        if not saved_path.is_file():
            raise PipelineError(f"nothing to resume in {output_dir}: it has no {CONFIG_FILE}")
        changed = _changed_settings(read_json(saved_path, "train config"), config.to_dict())
        if changed:
            raise PipelineError(f"--resume with different settings than the run in {output_dir}: "
                                f"{', '.join(changed)} (start a new output folder instead)")
        return checkpointing.latest_common_step(output_dir, world) or 0
    if any(checkpointing.list_steps(output_dir, rank) for rank in range(world)):
        raise PipelineError(f"{output_dir} already holds a training run; pass --resume to continue it, "
                            "or choose a new output folder")
    write_json_atomic(saved_path, config.to_dict())
    (output_dir / METRICS_FILE).unlink(missing_ok=True)
    return 0


def _changed_settings(saved: dict, current: dict) -> list[str]:
    return sorted(f"{section}.{key}" for section, values in current.items() if isinstance(values, dict)
                  for key, value in values.items()
                  if (section, key) not in RESUMABLE_CHANGES and saved.get(section, {}).get(key) != value) + \
        sorted(key for key, value in current.items() if not isinstance(value, dict) and saved.get(key) != value)


# ---------------------------------------------------------------------------------------------- data

@dataclass
class Batches:
    """The rows of a records folder and the deterministic schedule that cuts them into steps."""
    input_ids: np.ndarray
    labels: np.ndarray | None
    records_sha256: str
    seed: int
    shuffle: bool
    micro_batch: int        # rows per worker per micro-batch
    accumulation: int
    world_size: int
    pad_id: int             # the id the rows' tokenizer pads with (their manifest says): left out of the loss

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return len(self.input_ids) // self.global_batch

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, first row of the step within that epoch's order) before `step` (0-based) runs."""
        return step // self.steps_per_epoch, (step % self.steps_per_epoch) * self.global_batch

    def micro_batches(self, step: int, rank: int) -> list[tuple[np.ndarray, np.ndarray]]:
        epoch, first = self.position(step)
        order = (np.random.default_rng([self.seed, epoch]).permutation(len(self.input_ids)) if self.shuffle
                 else np.arange(len(self.input_ids)))
        rows = order[first:first + self.global_batch].reshape(self.accumulation, self.world_size, self.micro_batch)
        labels = self.labels if self.labels is not None else self.input_ids
        return [(self.input_ids[r], labels[r]) for r in rows[:, rank]]


def load_batches(config: TrainConfig, world_size: int) -> Batches:
    from llama.data.records import check_labelled, read_columns, verify

    manifest = verify(config.data.train)
    missing = [c for c in config.columns if c not in manifest["columns"]]
    if missing:
        raise PipelineError(f"{config.data.train} has no {', '.join(missing)} column: run_mode {config.run_mode} "
                            f"needs {', '.join(config.columns)} (finetuning reads `preprocess alpaca` output)")
    columns = read_columns(config.data.train)
    batches = Batches(columns["input_ids"], columns.get("labels") if config.run_mode == "finetune" else None,
                      sha256_bytes(json.dumps(manifest["files"], sort_keys=True).encode()), config.seed,
                      config.data.shuffle, config.data.batch_size, config.training.gradient_accumulation_steps,
                      world_size, manifest["tokenizer"]["pad_id"])
    if batches.labels is not None:
        check_labelled(batches.labels, f"training records {config.data.train}",
                       "were they cut too short at preprocess (--seq-length)?")
    if batches.steps_per_epoch == 0:
        raise PipelineError(f"{config.data.train} has {len(batches.input_ids)} rows, fewer than one global batch "
                            f"of {batches.global_batch} (batch_size x gradient_accumulation_steps x data_parallel)")
    return batches


def count_steps(config: TrainConfig, rows: int) -> int:
    """Optimizer steps of the whole run: full global batches per epoch x epochs, capped by max_steps."""
    global_batch = config.data.batch_size * config.training.gradient_accumulation_steps * \
        config.parallel.data_parallel
    total = rows // global_batch * config.training.epochs
    return min(total, config.training.max_steps) if config.training.max_steps else total


# ---------------------------------------------------------------------------------------------- schedule

def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """MindFormers' CosineWithWarmUpLR for 0-based `step`: linear warmup, then cosine down to lr_end."""
    peak, schedule = config.optimizer.learning_rate, config.lr_schedule
    warmup = schedule.warmup_steps if schedule.warmup_steps is not None else int(schedule.warmup_ratio * total_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule.type == "constant":
        return peak
    progress = (step - warmup) / max(1, total_steps - warmup)
    return schedule.lr_end + (peak - schedule.lr_end) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class LossScaler:
    """Static or dynamic loss scale (MindSpore's DynamicLossScaleUpdateCell rule), kept on the host."""

    def __init__(self, kind: str, value: float, factor: float, window: int):
        self.kind, self.factor, self.window = kind, factor, window
        self.scale = value if kind != "none" else 1.0
        self.good_steps = 0

    def update(self, finite: bool) -> None:
        if self.kind != "dynamic":
            return
        if not finite:
            self.scale, self.good_steps = max(self.scale / self.factor, 1.0), 0
            return
        self.good_steps += 1
        if self.good_steps >= self.window:
            self.scale, self.good_steps = self.scale * self.factor, 0

    def state(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


# ---------------------------------------------------------------------------------------------- model

@dataclass
class Network:
    net: object                  # the nn.Cell trained: LlamaForCausalLM, LoRA-wrapped, or PrefixTunedLM
    model_config: object         # llama.config.ModelConfig
    kind: str                    # full, lora or prefix
    base: dict | None            # the starting checkpoint: path and sha256

    def saved_weights(self) -> list:
        """Adapters save only what trains; full runs save every model weight."""
        if self.kind == "full":
            return list(self.net.get_parameters())
        return list(self.net.trainable_params())


def build_network(config: TrainConfig) -> Network:
    """The model (seeded init or loaded weights), wrapped for LoRA or prefix tuning as configured."""
    import mindspore as ms
    from llama.weights.load import assign_weights
    from llama.weights.source import open_checkpoint
    from llama.config import ModelConfig
    from llama.device import compute_dtype_here
    from llama.model import RANDOM, ZEROS, LlamaForCausalLM

    ms.set_seed(config.seed)
    model_config = ModelConfig.load(config.model.config) if config.model.config else None
    source = open_checkpoint(config.model.checkpoint, model_config) if config.model.checkpoint else None
    model_config = source.config if source else model_config
    if model_config is None:
        raise PipelineError("train config: set model.config (or model.checkpoint with its config)")
    model_config = model_config.replace(compute_dtype=compute_dtype_here(
        config.model.compute_dtype or model_config.compute_dtype,
        "model.compute_dtype" if config.model.compute_dtype else None))
    # Trainable weights are float32 masters whatever the checkpoint holds (MindFormers' param_init_type);
    # the frozen base of an adapter stays as stored. model_config keeps the stored dtype, which exports use.
    trains_all = config.pet.type == "none"
    model = LlamaForCausalLM(model_config.replace(param_dtype="float32") if trains_all else model_config,
                             RANDOM if source is None else ZEROS)
    base = None
    if source is not None:
        assign_weights(model, source)
        base = {"path": str(Path(config.model.checkpoint).resolve()),
                "sha256": checkpoint_identity(config.model.checkpoint)}
    pet = config.pet
    if pet.type == "lora":
        from llama.train.lora import apply_lora
        apply_lora(model, pet.lora_rank, pet.lora_alpha, pet.lora_dropout, pet.target_modules)
        return Network(model, model_config, "lora", base)
    if pet.type == "prefix":
        from llama.train.prefix import PrefixTunedLM
        return Network(PrefixTunedLM(model, pet.prefix_token_num, pet.mid_dim, pet.dropout_rate),
                       model_config, "prefix", base)
    return Network(model, model_config, "full", base)


# ---------------------------------------------------------------------------------------------- the loop

def run_worker(config: TrainConfig, output_dir: str | os.PathLike, resume: bool = False,
               on_step: StepCallback | None = None, start_step: int | None = None) -> dict:
    """Train in this process: alone, or as rank k of an msrun job (then `start_step` comes from the launcher)."""
    from llama.train.dropout import set_dropout_key, step_key
    from llama.train.step import Stepper, scored_positions

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
        _truncate_metrics(output_dir / METRICS_FILE, start_step)

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
                _append_metrics(output_dir / METRICS_FILE, done, metrics)
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


def _append_metrics(path: Path, step: int, metrics: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"step": step, **metrics}) + "\n")
        handle.flush()


def _truncate_metrics(path: Path, start_step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: drop their lines from the interrupted run."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= start_step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
