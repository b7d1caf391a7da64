"""`polysense bench loss-memory`: peak memory and time of the contrastive losses as the batch grows.

For InfoNCE (CLIP) and SigLIP at global batch B (1k -> 64k embeddings of dim 512), three forms of
`polysense.losses`: `naive` (the float64 reference, the formula written over B x B), `dense` (the
fused float32 B x B form most code uses) and `chunked` (peak O(B x chunk)). Each measurement is
forward + backward in a child process of its own, so one probe's peak cannot hide in another's,
and with its address space capped (`RLIMIT_AS`) at what this machine can give without swapping or
waking the OOM killer: a form that does not fit fails its allocation in the child and is reported
as not fitting. Sizes whose B x B matrices alone exceed the cap are not even tried.

Peak memory = the child's peak RSS (VmHWM, reset just before the loss) minus its RSS then (inputs
already allocated).
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from polysense.bench.report import write_report

SIZES = (1024, 4096, 16384, 32768, 65536)
QUICK_SIZES = (2048,)
CHUNKS = (256, 1024, 4096)  # the chunk-size series, at B = CHUNK_SERIES_B
CHUNK_SERIES_B = 8192
LOSSES = ("clip", "siglip")
FORMS = ("naive", "dense", "chunked")
GIB = 1024**3


def mem_available() -> int:
    """MemAvailable from /proc/meminfo in bytes (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def square_bytes(form: str, n: int) -> int:
    """A lower bound on the bytes a form needs at batch n: the B x B matrices that must be alive
    together (naive: float64 logits and their exp; dense: float32 logits and log-probabilities
    or the sign matrix). The chunked forms have none."""
    if form == "naive":
        return 2 * 8 * n * n
    if form == "dense":
        return 2 * 4 * n * n
    return 0


def _vm_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _hwm_bytes() -> int:
    """Peak RSS (VmHWM) of this process since start or since `_reset_hwm`."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_hwm() -> None:
    """Reset the peak RSS to the current RSS (Linux: "5" > /proc/self/clear_refs), so the peak
    read later is the loss's, not the import's."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def probe(loss: str, form: str, n: int, dim: int, chunk: int, budget: int, threads: int) -> dict:
    """Run in the child: forward + backward of one loss form at batch n, address space capped at
    the current size + `budget` bytes. Returns peak bytes above the inputs and seconds."""
    import torch
    import torch.nn.functional as F

    from polysense import losses

    torch.set_num_threads(threads)

    def make(m: int):
        torch.manual_seed(0)
        img = F.normalize(torch.randn(m, dim), dim=-1).requires_grad_()  # (B, D)
        txt = F.normalize(torch.randn(m, dim), dim=-1).requires_grad_()  # (B, D)
        scale = torch.tensor(math.log(10.0), requires_grad=True)
        bias = torch.tensor(-10.0, requires_grad=True)
        c = min(chunk, m)
        fns = {
            ("clip", "naive"): lambda: losses.clip_loss_naive(img, txt, scale),
            ("clip", "dense"): lambda: losses.clip_loss(img, txt, scale),
            ("clip", "chunked"): lambda: losses.clip_loss_chunked(img, txt, scale, chunk=c),
            ("siglip", "naive"): lambda: losses.siglip_loss_naive(img, txt, scale, bias),
            ("siglip", "dense"): lambda: losses.siglip_loss(img, txt, scale, bias),
            ("siglip", "chunked"): lambda: losses.siglip_loss_chunked(
                img, txt, scale, bias, chunk=c
            ),
        }
        return fns[(loss, form)]

    make(64)().backward()  # warm-up: thread pool, BLAS buffers, allocator, before the baseline
    fn = make(n)
    _reset_hwm()
    rss0 = _rss_bytes()
    cap = _vm_bytes() + budget
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    t0 = time.perf_counter()
    try:
        value = fn()
        value.backward()
    except (RuntimeError, MemoryError) as exc:
        text = str(exc)
        if isinstance(exc, MemoryError) or "alloc" in text.lower() or "memory" in text.lower():
            return {"fits": False, "error": text.splitlines()[0][:200]}
        raise
    seconds = time.perf_counter() - t0
    peak = _hwm_bytes() - rss0
    return {"fits": True, "peak_bytes": max(peak, 0), "seconds": seconds, "loss": float(value)}


def run_probe(
    loss: str,
    form: str,
    n: int,
    *,
    dim: int,
    chunk: int,
    budget: int,
    threads: int,
    timeout: float | None = None,
) -> dict:
    """`probe` in a fresh Python process; a child killed or crashed counts as not fitting, one
    past `timeout` seconds as not measured."""
    args = json.dumps([loss, form, n, dim, chunk, budget, threads])
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "polysense.bench.loss_memory", args],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            # one malloc arena: per-thread arenas reserve 64 MiB of address space each, which
            # the RLIMIT_AS cap would count although it is never touched
            env={**os.environ, "MALLOC_ARENA_MAX": "1"},
        )
    except subprocess.TimeoutExpired:
        return {"fits": None, "error": f"not measured: over the {timeout:.0f} s time limit"}
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return {"fits": False, "error": tail[0][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_loss_memory_bench(
    out: str | Path,
    *,
    sizes: tuple[int, ...] = SIZES,
    dim: int = 512,
    chunk: int = 1024,
    chunks: tuple[int, ...] = CHUNKS,
    chunk_series_b: int = CHUNK_SERIES_B,
    budget_gib: float | None = None,
    threads: int = 2,
    timeout: float | None = 600.0,
    max_total_seconds: float = 25 * 60,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure every (loss, form, size) and the chunk-size series; write out/loss-memory.*.

    Sizes go smallest first (SigLIP before InfoNCE at each), the chunk series last; a probe is not
    started once `max_total_seconds` have passed (so a run under a shared lock stays bounded),
    and is reported as not measured."""
    available = mem_available()
    # Leave 4 GiB for everyone else on the machine; never more than the 24 GiB of the issue.
    budget = int(budget_gib * GIB) if budget_gib else int(min(24 * GIB, available - 4 * GIB))
    if budget <= 0:
        raise MemoryError(f"only {available / GIB:.1f} GiB available; free some memory first")
    rows: list[dict[str, Any]] = []
    jobs = [(lo, fo, n, chunk) for n in sorted(sizes) for lo in LOSSES[::-1] for fo in FORMS]
    jobs += [(lo, "chunked", chunk_series_b, c) for lo in LOSSES for c in chunks]
    start = time.perf_counter()
    for i, (loss, form, n, c) in enumerate(jobs):
        need = square_bytes(form, n)
        row: dict[str, Any] = {"loss": loss, "form": form, "batch": n, "chunk": c}
        if form != "chunked":
            row["chunk"] = None
        if need > budget:
            row |= {"fits": False, "note": f"skipped: B x B matrices need >= {need / GIB:.1f} GiB"}
        elif time.perf_counter() - start > max_total_seconds:
            row |= {
                "fits": None,
                "note": f"not measured: past the {max_total_seconds:.0f} s budget",
            }
        else:
            res = run_probe(
                loss, form, n, dim=dim, chunk=c, budget=budget, threads=threads, timeout=timeout
            )
            row |= {"fits": res["fits"]}
            if res["fits"]:
                row |= {
                    "peak_mib": res["peak_bytes"] / 2**20,
                    "seconds": res["seconds"],
                    "loss_value": res["loss"],
                }
            else:
                row["note"] = res.get("error", "")
        if progress:
            print(f"[{i + 1}/{len(jobs)}] {row}", file=sys.stderr, flush=True)
        rows.append(row)

    def largest(loss: str, form: str) -> int | None:
        ok = [r["batch"] for r in rows if r["loss"] == loss and r["form"] == form and r["fits"]]
        return max(ok) if ok else None

    summary = {
        loss: {f"largest_{form}_batch": largest(loss, form) for form in FORMS} for loss in LOSSES
    }
    results = {
        "dim": dim,
        "chunk": chunk,
        "budget_gib": budget / GIB,
        "mem_available_gib": available / GIB,
        "threads": threads,
        "summary": summary,
    }

    def plot(ax: Any) -> None:
        for loss in LOSSES:
            for form, style in zip(FORMS, (":", "--", "-"), strict=True):
                pts = [
                    (r["batch"], r["peak_mib"])
                    for r in rows
                    if r["loss"] == loss
                    and r["form"] == form
                    and r["fits"]
                    and (form != "chunked" or r["chunk"] == chunk)
                ]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, marker="o", label=f"{loss} {form}")
        ax.axhline(budget / 2**20, color="grey", lw=0.8)
        ax.text(sizes[0], budget / 2**20, f" cap {budget / GIB:.0f} GiB", va="bottom", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global batch (embeddings)")
        ax.set_ylabel("peak memory above inputs (MiB)")
        ax.set_title(f"forward + backward, dim {dim}, chunk {chunk}")
        ax.legend(fontsize=8)

    notes = (
        f"Each probe in its own process, address space capped at {budget / GIB:.2f} GiB above "
        f"its inputs (MemAvailable {available / GIB:.1f} GiB minus 4 GiB, at most 24 GiB). "
        + " ".join(
            f"{loss}: largest naive {s['largest_naive_batch']}, dense {s['largest_dense_batch']}, "
            f"chunked {s['largest_chunked_batch']}."
            for loss, s in summary.items()
        )
    )
    write_report(
        out, "loss-memory", results, rows, plot, title="Contrastive loss memory", notes=notes
    )
    return results


if __name__ == "__main__":  # the child of run_probe
    print(json.dumps(probe(*json.loads(sys.argv[1]))))
