"""`polysense bench video-attention`: joint vs divided space-time attention as the frames grow.

For each frame count T and each attention kind, one training step (forward + backward) of the same
video ViT on a random batch: FLOPs from `torch.utils.flop_counter` (attention in its math form, so
its matrix products are counted; `attn_gflops` is their share), median latency of the step with
PyTorch's default attention kernel, and peak memory: the growth of the process's resident set
during a first step, each configuration in a fresh process (`ru_maxrss` only ever grows).

Joint attention over T N tokens costs O((T N)^2); divided attention O(T N^2 + N T^2), linear in T
while T is below N. `growth_exponent` is the log-log slope of a column between the smallest and
largest T (1 = linear, 2 = quadratic).
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

KINDS = ("joint", "divided")


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _build(kind: str, frames: int, spec: dict[str, int]) -> tuple[Any, Any]:
    import torch

    from polysense.config import VideoConfig
    from polysense.models.video import VideoTransformer

    cfg = VideoConfig(
        num_frames=frames,
        image_size=spec["image_size"],
        patch_size=spec["patch_size"],
        width=spec["width"],
        layers=spec["layers"],
        heads=spec["heads"],
        attention=kind,
    )
    torch.manual_seed(0)
    model = VideoTransformer(cfg=cfg)
    x = torch.randn(spec["batch_size"], frames, 3, spec["image_size"], spec["image_size"])
    return model, x


def _step(model: Any, x: Any) -> None:
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


def measure(kind: str, frames: int, spec: dict[str, int]) -> dict[str, float]:
    """One configuration's figures (run it in a fresh process for a clean peak memory)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(spec["threads"])
    model, x = _build(kind, frames, spec)
    before = _rss_mb()
    _step(model, x)  # the first step allocates the activations and gradients
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        _step(model, x)
        times.append(time.perf_counter() - start)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _step(model, x)
    total = counter.get_total_flops()
    # Under the math backend the attention products (QK^T, AV) are the only batched matmuls.
    counts = counter.get_flop_counts().get("Global", {})
    attn = sum(v for op, v in counts.items() if "bmm" in str(op))
    return {
        "gflops": total / 1e9,
        "attn_gflops": attn / 1e9,
        "latency_ms": statistics.median(times) * 1e3,
        "peak_mem_mb": max(peak, 0.0),
    }


def _measure_in_subprocess(kind: str, frames: int, spec: dict[str, int]) -> dict[str, float]:
    """`measure` in a fresh interpreter (`python -m polysense.bench.video_attention`)."""
    args = json.dumps({"kind": kind, "frames": frames, "spec": spec})
    cmd = [sys.executable, "-m", "polysense.bench.video_attention", args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        from polysense.errors import PolysenseError

        raise PolysenseError(
            f"video-attention: measuring {kind} T={frames} failed: {done.stderr[-500:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _growth(rows: list[dict[str, Any]], key: str) -> float:
    a, b = rows[0], rows[-1]
    return math.log(b[key] / a[key]) / math.log(b["frames"] / a["frames"])


def run_video_attention_bench(
    out: str | Path,
    *,
    frames: tuple[int, ...] = (4, 8, 16, 32),
    image_size: int = 64,
    patch_size: int = 8,
    width: int = 128,
    layers: int = 4,
    heads: int = 4,
    batch_size: int = 2,
    repeats: int = 3,
    threads: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure every (frames, kind), write out/video-attention.{json,md,png}; returns the results."""
    from polysense.bench.report import write_report

    spec = {
        "image_size": image_size,
        "patch_size": patch_size,
        "width": width,
        "layers": layers,
        "heads": heads,
        "batch_size": batch_size,
        "repeats": repeats,
        "threads": threads,
    }
    results: dict[str, dict[str, dict[str, float]]] = {}
    table: list[dict[str, Any]] = []
    jobs = [(t, k) for t in frames for k in KINDS]
    from polysense.eval.zeroshot import progress_bar

    with progress_bar(progress, "video-attention") as advance:
        for t, kind in jobs:
            figures = _measure_in_subprocess(kind, t, spec)
            results.setdefault(str(t), {})[kind] = figures
            table.append({"frames": t, "attention": kind, **figures})
            advance(1)
    n = (image_size // patch_size) ** 2
    growth = {
        kind: {
            key: _growth([r for r in table if r["attention"] == kind], key)
            for key in ("gflops", "attn_gflops", "latency_ms", "peak_mem_mb")
            if all(r[key] > 0 for r in table if r["attention"] == kind)
        }
        for kind in KINDS
    }

    def plot(ax: Any) -> None:
        for kind, style in zip(KINDS, ("o-", "s-"), strict=True):
            rows = [r for r in table if r["attention"] == kind]
            xs = [r["frames"] for r in rows]
            for key, color in (("attn_gflops", "C0"), ("gflops", "C1"), ("latency_ms", "C2")):
                ys = [r[key] / rows[0][key] for r in rows]
                ls = style if kind == "joint" else style.replace("-", "--")
                ax.plot(xs, ys, ls, color=color, label=f"{kind} {key}")
        base = frames[0]
        ax.plot(frames, [t / base for t in frames], ":", color="grey", label="linear (T)")
        ax.plot(
            frames, [(t / base) ** 2 for t in frames], "-.", color="grey", label="quadratic (T^2)"
        )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("frames T")
        ax.set_ylabel(f"cost relative to T={base}")
        ax.set_title(f"joint (solid) vs divided (dashed) attention, {n} patches/frame")
        ax.legend(fontsize=7, ncol=2)

    notes = (
        f"One training step (forward + backward) of a {layers}-layer, width-{width} video ViT on "
        f"{batch_size} clips of {image_size} px frames in {patch_size} px patches ({n} per frame). "
        "gflops and attn_gflops from torch.utils.flop_counter (attention in math form); latency "
        f"the median of {repeats} steps on {threads} threads; peak_mem_mb the resident-set growth "
        "of a first step in a fresh process. Growth exponent (log-log slope, first to last T): "
        + "; ".join(
            f"{kind}: " + ", ".join(f"{k} {v:.2f}" for k, v in growth[kind].items())
            for kind in KINDS
        )
    )
    payload = {"frames": results, "growth_exponent": growth, "settings": spec, "patches": n}
    write_report(
        out,
        "video-attention",
        payload,
        table,
        plot,
        title="Joint vs divided attention",
        notes=notes,
    )
    return payload


if __name__ == "__main__":  # one measurement, its figures as JSON on the last stdout line
    job = json.loads(sys.argv[1])
    print(json.dumps(measure(job["kind"], job["frames"], job["spec"])))
