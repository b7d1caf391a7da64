"""The log and progress bar of the training loop (`polysense.train.fit`): one record per
`train.log_every` steps in OUT/metrics.jsonl, and a rich bar with loss, lr and samples/s."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Protocol

from polysense.train.checkpoint import append_metrics


class TrainProgress:
    """A rich progress bar showing loss, learning rate and samples/s (no-op when disabled)."""

    def __init__(self, *, enabled: bool, total: int, start: int) -> None:
        self.enabled = enabled
        self.progress: Any = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(
                    "loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[rate]:.0f} samples/s"
                ),
                TimeRemainingColumn(),
                transient=False,
            )
            self.task = self.progress.add_task(
                "train", total=total, completed=start, loss=math.nan, lr=0.0, rate=0.0
            )

    def __enter__(self) -> TrainProgress:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, completed: int, **fields: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=completed, **fields)


class LogSchedule(Protocol):
    """The fields of a loop's train config that `StepLog` reads (every loop's config has them)."""

    steps: int
    batch_size: int
    log_every: int


class StepLog:
    """The log and progress bar every training loop keeps (a context manager, like the bar): at
    each `train.log_every`-th step and the last (`train.steps`), one record {step, loss, lr,
    **extra, samples_per_s, elapsed_s} is appended to OUT/metrics.jsonl (when `out` is set) and
    shown on the bar. samples/s covers the steps since the previous record; elapsed_s counts from
    the run's first start (`elapsed_before` = seconds of earlier runs)."""

    def __init__(
        self,
        *,
        train: LogSchedule,
        out: Path | None,
        start: int,
        elapsed_before: float = 0.0,
        progress: bool = True,
    ) -> None:
        self.bar = TrainProgress(enabled=progress, total=train.steps, start=start)
        self.out, self.every, self.total = out, train.log_every, train.steps
        self.batch_size, self.elapsed_before = train.batch_size, elapsed_before
        self.t0 = self.window_t = time.perf_counter()
        self.window_step = start
        # A time budget (max_minutes) that binds ends the run
        # before `steps`: the bar then follows the schedule's position, the larger of the step
        # and the budget's elapsed fraction, so it fills and its ETA counts down with the clock.
        minutes = float(getattr(train, "max_minutes", 0.0) or 0.0)
        self.budget_s = minutes * 60

    def __enter__(self) -> StepLog:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def due(self, done: int) -> bool:
        """Whether `done` completed steps call for a record."""
        return done % self.every == 0 or done == self.total

    def write(self, done: int, *, loss: float, lr: float, **extra: float) -> dict[str, float]:
        now = time.perf_counter()
        rate = (done - self.window_step) * self.batch_size / max(now - self.window_t, 1e-9)
        self.window_t, self.window_step = now, done
        record = {
            "step": done,
            "loss": loss,
            "lr": lr,
            **extra,
            "samples_per_s": rate,
            "elapsed_s": self.elapsed_before + now - self.t0,
        }
        if self.out is not None:
            append_metrics(self.out, record)
        self.bar.update(self.position(done, record["elapsed_s"]), loss=loss, lr=lr, rate=rate)
        return record

    def position(self, done: int, elapsed_s: float) -> int:
        """The bar's position: `done` steps, or the time budget's share of `steps` if ahead."""
        if not self.budget_s:
            return done
        return min(self.total, max(done, int(elapsed_s / self.budget_s * self.total)))
