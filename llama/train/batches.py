"""The rows a run trains on and the deterministic schedule that cuts them into steps: the data order of an
epoch is a permutation seeded by (seed, epoch), the global batch of step s is the next slice of it, and each
rank takes its part of each micro-batch."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from llama.config.train import TrainConfig
from llama.data.records import IGNORE_ID, check_labelled, read_columns, verify
from llama.errors import PipelineError
from llama.fileio import sha256_bytes


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


def scored_positions(input_ids: np.ndarray, labels: np.ndarray | None, pad_token_id: int) -> int | None:
    """The most positions any row's loss counts (CausalLMLoss's mask), rounded up to a multiple of 8, when that
    is at most half the row: finetuning rows of prompt + short answer. None otherwise (pretraining)."""
    if labels is None:
        return None
    counted = ((input_ids[:, :-1] != pad_token_id) & (labels[:, 1:] != IGNORE_ID)).sum(1).max()
    most = max(8, -(-int(counted) // 8) * 8)
    return most if 2 * most <= input_ids.shape[1] - 1 else None
