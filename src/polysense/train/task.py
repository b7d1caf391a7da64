"""The Task contract: what one family adds to the one training loop (`polysense.train.fit`).

A task holds its model and says how a batch becomes a loss; `fit` does everything else. The
hooks below default to nothing, so a task writes only what it really adds (an EMA update, a
staged unfreeze, a phase change with the schedule, extra resume state, its export).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polysense.train.optim import lr_factor


@dataclass(frozen=True)
class Runtime:
    """Where and how this process trains: device, rank, world size, resolved precision."""

    device: torch.device
    rank: int
    world: int
    precision: str  # "fp32" or "bf16" (already resolved from "auto")

    def autocast(self) -> torch.autocast:
        """bf16 autocast on this device when the precision is bf16 (a no-op otherwise)."""
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"
        )


class Task:
    """Base of every family's task. Subclasses set `model` (every weight the optimizer trains and
    `state.pt` keeps) and the train config `cfg`, and implement `param_groups`, `loss` and
    `export`. `fit` sets `rt` (`attach`) and `net` (`model`, or its DDP wrapper)."""

    model: nn.Module
    cfg: Any  # the family's train config (a polysense.config.LoopConfig)
    distributed: bool = False  # whether the task slices its batches by rank under torchrun

    def attach(self, rt: Runtime) -> None:
        self.rt = rt
        self.net: nn.Module = self.model

    def param_groups(self) -> list[dict]:
        """AdamW groups, each with "params", "weight_decay" and "base_lr" ("lr" is set per step)."""
        raise NotImplementedError

    def loss(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss of `batch` at `step` and extra figures to log."""
        raise NotImplementedError

    def backward(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float], bool]:
        """Gradients of one step: (loss, logs, finite). Back-propagates only a finite loss; a
        task that accumulates (a feature cache) overrides this."""
        loss, logs = self.loss(batch, step)
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
        return loss, logs, finite

    def lr_factor(self, step: int, schedule_step: int) -> float:
        """The learning-rate multiplier of `step`; `schedule_step` is where the schedule stands
        (ahead of `step` when a time budget binds). Warmup, then cosine to `min_lr_ratio`."""
        c = self.cfg
        return lr_factor(
            schedule_step, warmup=c.warmup_steps, total=c.steps, min_ratio=c.min_lr_ratio
        )

    def before_step(self, step: int) -> None:
        """Called before each step (and once before the first, before DDP wraps the model)."""

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (e.g. an EMA update, a clamp)."""

    def on_start(self) -> None:
        """Called once when the clock starts, before the first step."""

    def samples(self, step: int) -> int:
        """Samples one step consumes, for samples/s (the batch size unless a phase differs)."""
        return self.cfg.batch_size

    def log_fields(self) -> dict[str, float]:
        """Figures of the model itself to log with each record (e.g. the temperature)."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Tensors and plain values `state.pt` keeps beyond model, optimizer, step and RNG."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` saved."""

    def export(self, out: Path) -> None:
        """Write the inference checkpoint (config.json, model.safetensors, ...) to `out`."""
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """Extra fields for OUT/train_summary.json."""
        return {}
