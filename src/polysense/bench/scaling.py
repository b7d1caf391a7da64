"""`polysense bench scaling`: one process vs N processes under torchrun (gloo), same global batch.

Runs `polysense train PRESET` twice on the same data, seed and global batch: once as a plain
process with T threads, once as `torchrun --standalone --nproc_per_node N` with T / N threads per
process (same cores in total). The training loop already shards each global batch across ranks,
gathers negatives across processes and averages gradients with DDP, so the two loss curves must
agree to float tolerance; the bench reports the largest difference, and samples/s of each run
(from `train_summary.json`, the loop's own clock, which excludes start-up and data loading).
Both runs train in fp32 (`train.precision=fp32`): the comparison is of the sharding, and bf16
rounding (the "auto" default on CPUs with AMX) would differ between the two at ~1e-4 relative.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from polysense.bench.report import write_report
from polysense.errors import PolysenseError

DEFAULT_SETS = (
    "train.precision=fp32",
    "train.steps=60",
    "train.log_every=1",
    "train.ckpt_every=0",
    "train.warmup_steps=10",
)
QUICK_SETS = (
    "model.embed_dim=32",
    "model.vision.width=32",
    "model.vision.layers=1",
    "model.vision.heads=2",
    "model.text.width=32",
    "model.text.layers=1",
    "model.text.heads=2",
    "model.text.vocab_size=300",
    "train.batch_size=16",
    "train.precision=fp32",
    "train.steps=6",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.ckpt_every=0",
)


def train_command(preset: str, data: Path, out: Path, sets: tuple[str, ...]) -> list[str]:
    """`polysense train` as arguments, without the interpreter (torchrun or python prepends)."""
    args = ["-m", "polysense.cli", "train", preset, "--data", str(data), "--out", str(out)]
    args += ["--eval-splits", ""]
    for item in sets:
        args += ["--set", item]
    return args


def _run(cmd: list[str], threads: int, log: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "POLYSENSE_DEVICE": "cpu"}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise PolysenseError(f"{' '.join(cmd[:6])} ... failed; see {log}: " + " | ".join(tail))
    return time.perf_counter() - t0


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def run_scaling_bench(
    out: str | Path,
    *,
    data: str | Path,
    preset: str = "clip-tiny",
    sets: tuple[str, ...] = DEFAULT_SETS,
    nproc: int = 2,
    threads: int = 2,
) -> dict[str, Any]:
    """Train 1 and `nproc` processes on the same global batch; write out/scaling.{json,md,png}."""
    if threads % nproc:
        raise PolysenseError(f"threads={threads} must be a multiple of nproc={nproc}")
    out = Path(out)
    runs = out / "scaling-runs"
    runs.mkdir(parents=True, exist_ok=True)
    one, many = runs / "one", runs / f"torchrun{nproc}"
    wall_one = _run(
        [sys.executable, *train_command(preset, Path(data), one, sets)], threads, runs / "one.log"
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += ["--nproc_per_node", str(nproc)]
    wall_many = _run(
        [*torchrun, *train_command(preset, Path(data), many, sets)],
        threads // nproc,
        runs / f"torchrun{nproc}.log",
    )
    a, b = _losses(one), _losses(many)
    if sorted(a) != sorted(b):
        raise PolysenseError(f"the runs logged different steps: {sorted(a)} vs {sorted(b)}")
    diffs = [abs(a[s] - b[s]) for s in a]
    rel = [abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) for s in a]
    summaries = [json.loads((d / "train_summary.json").read_text()) for d in (one, many)]
    rate_one, rate_many = (s["train_samples_per_s"] for s in summaries)
    results = {
        "preset": preset,
        "sets": list(sets),
        "nproc": nproc,
        "threads_total": threads,
        "samples_per_s": {"1": rate_one, str(nproc): rate_many},
        "speedup": rate_many / rate_one,
        "wall_seconds": {"1": wall_one, str(nproc): wall_many},
        "max_abs_loss_diff": max(diffs),
        "max_rel_loss_diff": max(rel),
        "losses": {"1": [a[s] for s in sorted(a)], str(nproc): [b[s] for s in sorted(b)]},
        "steps": sorted(a),
        "final_loss": {"1": summaries[0]["final_loss"], str(nproc): summaries[1]["final_loss"]},
    }
    table = [
        {
            "processes": 1,
            "threads_each": threads,
            "samples_per_s": rate_one,
            "wall_s": wall_one,
            "final_loss": summaries[0]["final_loss"],
            "max_abs_loss_diff": 0.0,
        },
        {
            "processes": nproc,
            "threads_each": threads // nproc,
            "samples_per_s": rate_many,
            "wall_s": wall_many,
            "final_loss": summaries[1]["final_loss"],
            "max_abs_loss_diff": max(diffs),
        },
    ]

    def plot(ax: Any) -> None:
        steps = sorted(a)
        ax.plot(steps, [a[s] for s in steps], label=f"1 process ({rate_one:.0f} samples/s)")
        ax.plot(
            steps,
            [b[s] for s in steps],
            "--",
            label=f"torchrun {nproc} (gloo, {rate_many:.0f} samples/s)",
        )
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(f"{preset}: same global batch, max |diff| {max(diffs):.1e}")
        ax.legend()

    notes = (
        f"`polysense train {preset}` as 1 process ({threads} threads) and under torchrun "
        f"--nproc_per_node {nproc} ({threads // nproc} threads each), same global batch and seed. "
        f"Loss curves differ by at most {max(diffs):.2e} (relative {max(rel):.1e}); "
        f"throughput x{rate_many / rate_one:.2f}."
    )
    write_report(out, "scaling", results, table, plot, title="Multi-process scaling", notes=notes)
    return results
