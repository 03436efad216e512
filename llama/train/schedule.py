"""Per-step scalars kept on the host: the learning rate schedule and the loss scale."""

from __future__ import annotations

import math

from llama.config.train import TrainConfig


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
