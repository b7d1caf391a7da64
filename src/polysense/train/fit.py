"""The one training loop: `fit(task, cfg, data, out, resume)` for every task family.

    task = T2ITask(...)                      # what is trained and its loss (train/task.py)
    result = fit(task, cfg.train, data=batches, out=Path("runs/t2i"), resume=False)

`fit` owns everything the families share, top to bottom (nanoGPT style):
- device placement (CUDA when present unless `POLYSENSE_DEVICE=cpu`) and, under torchrun,
  the process group and DistributedDataParallel around `task.model`;
- bf16 autocast when `cfg.precision` resolves to it (`Runtime.autocast`, used by the task
  around its forward, so each task keeps its loss in fp32);
- the time budget (`max_minutes`: the schedule follows whichever runs out first, steps or time)
  and the safety limit (`time_limit_minutes`: stops without touching the schedule);
- the warmup + cosine schedule, the optimizer (AdamW, fused where possible), clipping;
- the NaN policy: a non-finite loss skips its step; `max_bad_steps` in a row abort the run;
- the log and progress bar (`train/log.py`) and atomic checkpoints (`state.pt` plus the task's
  export) with exact resume: the data's batch for step s is a pure function of (seed, s), and
  the torch RNG, the optimizer and the task's own extra state are restored.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from polysense.errors import PolysenseError
from polysense.fileio import atomic_write_json
from polysense.precision import resolve_precision
from polysense.train.checkpoint import append_metrics, load_state, save_state, trim_metrics
from polysense.train.log import StepLog
from polysense.train.optim import adamw, set_lr
from polysense.train.task import Runtime, Task


class FitConfig(Protocol):
    """The fields of a train config that `fit` reads (`polysense.config.LoopConfig`)."""

    seed: int
    batch_size: int
    steps: int
    max_minutes: float
    time_limit_minutes: float
    lr: float
    min_lr_ratio: float
    betas: tuple[float, float]
    eps: float
    warmup_steps: int
    grad_clip: float
    precision: str
    log_every: int
    ckpt_every: int
    max_bad_steps: int


class StepData(Protocol):
    """What `fit` trains on: the batch of step `step`, a pure function of (seed, step)."""

    def batch(self, step: int) -> Any: ...


@dataclass
class FitResult:
    out: Path | None
    steps: int
    final_loss: float
    train_samples_per_s: float  # this run's (a resumed run counts only its own steps)
    seconds: float  # wall time of every run so far (resumes add up)
    skipped_steps: int
    stopped_early: bool  # a time budget (max_minutes) or limit (time_limit_minutes) ended it


def distributed() -> tuple[int, int]:
    """(rank, world size); initialises the default process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def device_for(rank: int) -> torch.device:
    """CUDA (this rank's GPU) when present unless `POLYSENSE_DEVICE=cpu`; else the CPU."""
    if torch.cuda.is_available() and os.environ.get("POLYSENSE_DEVICE", "auto") != "cpu":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def runtime(precision: str) -> Runtime:
    """Rank, world size, device and resolved precision of this process."""
    rank, world = distributed()
    device = device_for(rank)
    return Runtime(
        device=device, rank=rank, world=world, precision=resolve_precision(precision, device)
    )


def optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, *, grad_clip: float
) -> torch.Tensor:
    """Clip the gradients to `grad_clip` (0 = no clipping) and step: the one place polysense
    steps an optimizer (`fit`, and the benchmarks that time polysense's own step). Returns the
    total gradient norm before clipping (inf disables clipping but still measures it)."""
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    optimizer.step()
    return grad_norm


def fit(
    task: Task,
    cfg: FitConfig,
    *,
    data: StepData,
    out: Path | None,
    resume: bool = False,
    progress: bool = True,
    rt: Runtime | None = None,
    on_log: Callable[[dict[str, float]], None] | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    eval_every: int = 0,
) -> FitResult:
    """Train `task` for `cfg.steps` steps (or its time budget) on `data`; with `out`, write
    `state.pt`, `metrics.jsonl`, `train_summary.json` and the task's export there.

    `resume=True` continues from OUT/state.pt. `on_log(record)` sees each log record;
    `evaluate(model)` runs every `eval_every` steps on rank 0 and joins metrics.jsonl."""
    rt = rt or runtime(cfg.precision)
    if resume and out is None:
        raise PolysenseError("resume needs an output directory")
    if rt.world > 1 and not task.distributed:
        raise PolysenseError(
            f"{type(task).__name__} does not train under torchrun yet; run it in one process"
        )
    main = rt.rank == 0
    if out is not None and main:
        out.mkdir(parents=True, exist_ok=True)
    state = load_state(out) if resume and out is not None else None
    model = task.model.to(rt.device)
    task.attach(rt)
    optimizer = adamw(task.param_groups(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    start, skipped, elapsed_before = 0, 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed_before = state["step"], state["elapsed"]
        skipped = state.get("skipped_steps", 0)
        torch.set_rng_state(state["rng"])
        task.load_extra_state(state)
        if main:
            trim_metrics(out, start)
    elif out is not None and main:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    task.before_step(start)  # e.g. the trainable set at the start, before DDP registers it
    if rt.world > 1:
        task.net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)

    def save(step: int, seconds: float) -> None:
        if out is None or not main:
            return
        save_state(
            out,
            {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "skipped_steps": skipped,
                "elapsed": seconds,
                "rng": torch.get_rng_state(),
                **task.extra_state(),
            },
        )
        task.export(out)

    t0 = time.perf_counter()
    task.on_start()  # inside the clock: work the task does once (e.g. a frozen tower's features)
    log = StepLog(
        train=cfg, out=out, start=start, elapsed_before=elapsed_before, progress=progress and main
    )
    loss_value, step, stopped, bad_in_a_row = math.nan, start, False, 0
    model.train()
    with log:
        for step in range(start, cfg.steps):
            schedule_step = step
            if cfg.max_minutes or cfg.time_limit_minutes:
                elapsed = torch.tensor([elapsed_before + time.perf_counter() - t0])
                if rt.world > 1:  # every rank must stop at the same step
                    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                if cfg.max_minutes:
                    schedule_step = max(
                        step, int(elapsed.item() / (cfg.max_minutes * 60) * cfg.steps)
                    )
                if schedule_step >= cfg.steps or (
                    cfg.time_limit_minutes and elapsed.item() >= cfg.time_limit_minutes * 60
                ):
                    stopped = True
                    if main:  # the bar shows where the schedule stopped (full on a budget)
                        log.bar.update(log.position(step, elapsed.item()))
                    break
            task.before_step(step)
            # warmup always counts real steps; the decay may follow time
            sched = step if step < cfg.warmup_steps else schedule_step
            set_lr(optimizer, task.lr_factor(step, sched))
            optimizer.zero_grad(set_to_none=True)
            loss, logs, finite = task.backward(data.batch(step), step)
            if rt.world > 1:
                flag = torch.tensor([0.0 if finite else 1.0], device=rt.device)
                dist.all_reduce(flag)
                finite = flag.item() == 0
            if not finite:
                skipped += 1
                bad_in_a_row += 1
                optimizer.zero_grad(set_to_none=True)
                if bad_in_a_row >= cfg.max_bad_steps:
                    raise PolysenseError(
                        f"loss was NaN/inf for {bad_in_a_row} steps in a row (at step {step}); "
                        f"lower train.lr (now {cfg.lr}) or set train.precision=fp32"
                    )
                continue
            bad_in_a_row = 0
            grad_norm = optimizer_step(model, optimizer, grad_clip=cfg.grad_clip)
            task.after_step(step)
            if rt.world > 1:  # each rank's loss is its share; the batch loss is their mean
                loss = loss.detach().clone()
                dist.all_reduce(loss)
                loss /= rt.world
            loss_value = float(loss.detach())
            done = step + 1
            if main and log.due(done):
                log.batch_size = task.samples(step)
                record = log.write(
                    done,
                    loss=loss_value,
                    lr=optimizer.param_groups[0]["lr"],
                    **task.log_fields(),
                    grad_norm=float(grad_norm),
                    **logs,
                )
                if on_log is not None:
                    on_log(record)
            if evaluate and eval_every and done % eval_every == 0 and main and out is not None:
                figures = evaluate(model)
                seconds = elapsed_before + time.perf_counter() - t0
                append_metrics(out, {"step": done, **figures, "elapsed_s": seconds})
            if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < cfg.steps:
                save(done, elapsed_before + time.perf_counter() - t0)
        else:
            step = cfg.steps
    run_s = time.perf_counter() - t0
    save(step, elapsed_before + run_s)
    model.eval()
    result = FitResult(
        out=out,
        steps=step,
        final_loss=loss_value,
        train_samples_per_s=(step - start) * cfg.batch_size / max(run_s, 1e-9),
        seconds=elapsed_before + run_s,
        skipped_steps=skipped,
        stopped_early=stopped,
    )
    if out is not None and main:
        summary = dataclasses.asdict(result) | {"out": str(out)} | task.summary()
        atomic_write_json(out / "train_summary.json", summary)
    if rt.world > 1:
        dist.barrier()
    return result
