"""`polysense bench gpu` (what `scripts/gpu_check.sh` runs): the GPU path of every task family in
one short run, written to DIR/gpu.json, .md and .png.

On a CUDA machine:
1. **Parity.** Each family (contrastive `clip-tiny-full`, fusion `fusion-late-tiny`, the VLM's
   `lm-tiny` then `vlm-tiny-stage1`, text-to-image `t2i-tiny`) trains a few steps through
   `polysense train` on the GPU and again on the CPU (`POLYSENSE_DEVICE=cpu`), both in fp32 with
   TF32 off, from the same seed and data. The logged losses are compared step by step.
2. **DDP.** The contrastive preset trains under `torchrun` over the visible GPUs (NCCL); its
   losses are compared with the single-process CPU run's (the global batch and the gathered
   negatives are the same, so only float rounding may differ).
3. **Speed.** ViT-B/16 (`clip-vit-b16`, full depth) training and inference samples/s against HF
   `CLIPModel` at identical dims, in bf16 where the GPU has it, and MFU against the matmul peak
   measured on the same GPU in the same run (`bench throughput`'s code, on the GPU).

Without CUDA the same sequence runs on the CPU, so CI can run the script: every "device" run is
a CPU run (parity then checks only that two runs agree), DDP is 2 gloo processes, and the speed
part uses the one-layer `--quick` dims. Those figures say the script works, not what a GPU does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polysense.bench.report import write_report
from polysense.errors import PolysenseError

# Loss parity tolerance: the relative difference of the logged losses, GPU vs CPU, at fp32 with
# TF32 off. Reductions run in another order on the GPU, so the losses differ at float rounding,
# which a few optimizer steps amplify a little; a wrong device path (a missed .to(), autocast on
# the wrong device, a frozen part training) moves them by far more.
PARITY_RTOL = 2e-3


@dataclass(frozen=True)
class FamilyRun:
    """One `polysense train` of the check: `needs` names earlier runs whose output directories
    fill `{name}` placeholders in the overrides."""

    name: str
    preset: str
    data: str  # "world" (image + text) or "world_all" (every modality)
    overrides: tuple[str, ...] = ()


FAMILIES = (
    FamilyRun(name="contrastive", preset="clip-tiny-full", data="world"),
    FamilyRun(name="fusion", preset="fusion-late-tiny", data="world_all"),
    FamilyRun(name="lm", preset="lm-tiny", data="world_all"),
    FamilyRun(
        name="vlm",
        preset="vlm-tiny-stage1",
        data="world_all",
        overrides=("init.lm={lm}", "init.vision={contrastive}"),
    ),
    FamilyRun(name="t2i", preset="t2i-tiny", data="world", overrides=("text_ckpt={contrastive}",)),
)


def _train_args(run: FamilyRun, *, steps: int, batch: int, seed: int) -> list[str]:
    common = (
        f"train.steps={steps}",
        f"train.batch_size={batch}",
        "train.log_every=1",
        "train.precision=fp32",
        "train.warmup_steps=1",
        "train.max_minutes=0",
        f"train.seed={seed}",
    )
    return [a for o in (*common, *run.overrides) for a in ("--set", o)]


def _losses(out: Path) -> list[float]:
    """The logged training losses of a run, in step order."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in sorted(rows, key=lambda r: r["step"]) if "loss" in r]


def _run(cmd: list[str], *, env: dict[str, str], log: Path) -> float:
    """Run one command, its output to `log`; seconds taken. A failure names the log."""
    t0 = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text()[-2000:]
        raise PolysenseError(
            f"{' '.join(cmd[2:6])} failed (exit {done.returncode}); {log}:\n{tail}"
        )
    return time.perf_counter() - t0


def _relative_gap(a: list[float], b: list[float]) -> float:
    if len(a) != len(b) or not a:
        return float("inf")
    return max(abs(x - y) / max(abs(y), 1e-8) for x, y in zip(a, b, strict=True))


def run_gpu_check(
    out: str | Path,
    *,
    steps: int = 4,
    batch: int = 16,
    seed: int = 0,
    dims: str | None = None,
    seconds: float = 20.0,
    world_n: int = 400,
) -> dict[str, Any]:
    """Run the check and write out/gpu.{json,md,png}; returns the results. `dims` is the speed
    part's preset (default: clip-vit-b16 on CUDA, the quick one-layer dims on the CPU)."""
    from polysense.bench.throughput import QUICK_OVERRIDES, bench_dims, matmul_peak
    from polysense.data.world import generate_world
    from polysense.precision import native_bf16

    out = Path(out)
    work = out / "gpu-check"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    n_gpu = torch.cuda.device_count() if cuda else 0
    generate_world(
        work / "world", n=world_n, seed=seed, modalities=("image", "text"), progress=False
    )
    generate_world(work / "world_all", n=world_n, seed=seed, progress=False)
    base = dict(os.environ, NVIDIA_TF32_OVERRIDE="0", PYTHONUNBUFFERED="1")
    cli = [sys.executable, "-m", "polysense.cli"]
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (no CUDA: the fallback)",
        "gpus": n_gpu,
        "torch": torch.__version__,
        "families": {},
    }
    table: list[dict[str, Any]] = []
    outs: dict[str, dict[str, Path]] = {"device": {}, "cpu": {}}
    for run in FAMILIES:
        losses, secs = {}, {}
        for where in ("device", "cpu"):
            target = work / "runs" / where / run.name
            fill = {k: str(v) for k, v in outs[where].items()}
            args = _train_args(run, steps=steps, batch=batch, seed=seed)
            args = [a.format(**fill) if "{" in a else a for a in args]
            env = dict(base, POLYSENSE_DEVICE="cpu") if where == "cpu" else base
            cmd = [*cli, "train", run.preset, "--data", str(work / run.data), "--out", str(target)]
            secs[where] = _run(
                [*cmd, "--eval-splits", "", *args], env=env, log=work / f"{run.name}-{where}.log"
            )
            outs[where][run.name] = target
            losses[where] = _losses(target)
        gap = _relative_gap(losses["device"], losses["cpu"])
        results["families"][run.name] = {
            "preset": run.preset,
            "losses_device": losses["device"],
            "losses_cpu": losses["cpu"],
            "max_relative_gap": gap,
            "parity": gap <= PARITY_RTOL,
            "seconds": secs,
        }
        table.append(
            {
                "check": f"{run.name} ({run.preset})",
                "device_loss_last": losses["device"][-1],
                "cpu_loss_last": losses["cpu"][-1],
                "max_rel_gap": gap,
                "ok": gap <= PARITY_RTOL,
            }
        )
    # DDP: the contrastive run under torchrun, every visible GPU (2 gloo processes on the CPU)
    nproc = n_gpu if cuda else 2
    ddp_out = work / "runs" / "ddp" / "contrastive"
    contrastive = FAMILIES[0]
    env = dict(base) if cuda else dict(base, POLYSENSE_DEVICE="cpu", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "polysense.cli",
        "train",
        contrastive.preset,
        "--data",
        str(work / contrastive.data),
        "--out",
        str(ddp_out),
        "--eval-splits",
        "",
        *_train_args(contrastive, steps=steps, batch=batch, seed=seed),
    ]
    ddp_seconds = _run(cmd, env=env, log=work / "ddp.log")
    ddp_losses = _losses(ddp_out)
    single = results["families"]["contrastive"]["losses_cpu"]
    gap = _relative_gap(ddp_losses, single)
    results["ddp"] = {
        "processes": nproc,
        "backend": "nccl" if cuda else "gloo",
        "losses": ddp_losses,
        "losses_single_process_cpu": single,
        "max_relative_gap": gap,
        "parity": gap <= PARITY_RTOL,
        "seconds": ddp_seconds,
    }
    table.append(
        {
            "check": f"contrastive DDP x{nproc} ({'nccl' if cuda else 'gloo'})",
            "device_loss_last": ddp_losses[-1],
            "cpu_loss_last": single[-1],
            "max_rel_gap": gap,
            "ok": gap <= PARITY_RTOL,
        }
    )
    # speed: ViT-B/16 against HF CLIPModel, MFU against this device's measured matmul peak
    speed_dims = dims or ("clip-vit-b16" if cuda else "clip-tiny")
    overrides = () if cuda or dims else QUICK_OVERRIDES
    sizes = (1024, 2048, 4096, 8192) if cuda else (128, 256)
    peaks = {"fp32": matmul_peak(torch.float32, sizes=sizes, seconds=0.5, device=device)["gflops"]}
    if native_bf16(device):
        peaks["bf16"] = matmul_peak(torch.bfloat16, sizes=sizes, seconds=0.5, device=device)[
            "gflops"
        ]
    speed, speed_rows = bench_dims(
        speed_dims,
        batch=64 if cuda else 8,
        repeats=20,
        peaks=peaks,
        overrides=("train.precision=bf16",) * ("bf16" in peaks) + overrides,
        extra=True,
        seconds=seconds,
        device=device,
    )
    results["speed"] = {"dims": speed_dims, "peak_gflops": peaks, **speed, "rows": speed_rows}
    results["all_parity"] = all(f["parity"] for f in results["families"].values()) and bool(
        results["ddp"]["parity"]
    )

    def plot(ax: Any) -> None:
        names = [r["check"] for r in table]
        ax.barh(names, [max(r["max_rel_gap"], 1e-12) for r in table])
        ax.axvline(PARITY_RTOL, color="red", linestyle="--", label=f"tolerance {PARITY_RTOL:g}")
        ax.set_xscale("log")
        ax.set_xlabel("max relative loss gap vs the CPU run (fp32)")
        ax.legend(fontsize=8)
        ax.set_title(f"GPU check on {results['device']}")

    s = results["speed"]
    notes = (
        f"Device: {results['device']}, {n_gpu} GPU(s), torch {torch.__version__}. Every family "
        f"trained {steps} steps of {batch} at fp32 (TF32 off) on the device and on the CPU; "
        f"parity {'holds' if results['all_parity'] else 'FAILS'} (tolerance {PARITY_RTOL:g}). "
        f"{speed_dims}: train x{s['train_ratio_vs_hf']:.2f} vs HF CLIPModel "
        f"({s['train_samples_per_s']['polysense']:.1f} samples/s, precision "
        f"{s['precision_resolved']}), inference x{s['infer_ratio_vs_hf']:.2f}, MFU "
        f"{100 * s['mfu']:.0f}% of the fp32 peak"
        + (
            f", {100 * s['mfu_bf16_peak']:.0f}% of the bf16 peak."
            if s["mfu_bf16_peak"] is not None
            else "."
        )
    )
    write_report(out, "gpu", results, table, plot, title="GPU check", notes=notes)
    return results
