"""`polysense bench quickstart`: the quickstart recipe's time to quality, per precision.

The `clip-tiny` preset is trained for its fixed step schedule once per precision (fp32 always;
bf16 only where the hardware multiplies bf16 natively, else reported as "no bf16 units"), in this
one process, one after the other, with zero-shot top-1 on the world's val split every
`eval_every` steps. The report holds each curve (val zero-shot against training seconds), the
seconds to reach `target`, and the bf16 / fp32 speed-up to that target, which is the figure
that compares across machines (absolute seconds do not).

To see the AVX2-only case on a CPU with AVX-512 or AMX, cap the kernels before the process starts:
`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2` (then "auto"
resolves to fp32 and bf16 is skipped, as on such a machine).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from polysense.precision import native_bf16


def time_to(curve: list[dict[str, float]], target: float) -> float | None:
    """Training seconds of the first point of `curve` ({elapsed_s, val_zeroshot_top1}, in step
    order) whose val zero-shot reaches `target`; None when none does."""
    for point in curve:
        if point["val_zeroshot_top1"] >= target:
            return point["elapsed_s"]
    return None


def _curve(metrics_jsonl: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line]
    return [
        {k: r[k] for k in ("step", "elapsed_s", "val_zeroshot_top1")}
        for r in rows
        if "val_zeroshot_top1" in r
    ]


def run_quickstart_bench(
    out: str | Path,
    *,
    world: str | Path,
    precisions: tuple[str, ...] = ("fp32", "bf16"),
    target: float = 0.95,
    eval_every: int = 100,
    seed: int = 0,
    overrides: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Train the quickstart recipe in each of `precisions` on `world` and write
    OUT/quickstart.json, .md and .png (val zero-shot against seconds)."""
    from polysense.bench.report import write_report
    from polysense.config import apply_overrides
    from polysense.eval.suite import evaluate_splits, val_zeroshot
    from polysense.models.checkpoint import load_model
    from polysense.presets import get_preset
    from polysense.train.loop import train

    out = Path(out)
    probe = val_zeroshot(world)
    runs: dict[str, Any] = {}
    for precision in precisions:
        if precision == "bf16" and not native_bf16("cpu"):
            runs[precision] = {"skipped": "no bf16 units"}
            continue
        cfg = apply_overrides(
            get_preset("clip-tiny"),
            [
                f"train.precision={precision}",
                f"train.seed={seed}",
                f"train.eval_every={eval_every}",
                *overrides,
            ],
        )
        run_dir = out / f"quickstart-{precision}"
        start = time.perf_counter()
        result = train(cfg, data=world, out=run_dir, evaluate=probe, progress=False)
        wall = time.perf_counter() - start
        test = evaluate_splits(load_model(str(run_dir)), world, splits=("test", "test_novel"))
        curve = _curve(run_dir / "metrics.jsonl")
        runs[precision] = {
            "steps": result.steps,
            "train_seconds": result.seconds,
            "wall_seconds": wall,
            "train_samples_per_s": result.train_samples_per_s,
            "seconds_to_target": time_to(curve, target),
            "test_zeroshot_top1": test["zeroshot_top1"],
            "test_novel_zeroshot_top1": test["test_novel"]["zeroshot_top1"],
            "curve": curve,
        }
    fp32, bf16 = runs.get("fp32", {}), runs.get("bf16", {})
    speedup = (
        fp32["seconds_to_target"] / bf16["seconds_to_target"]
        if fp32.get("seconds_to_target") and bf16.get("seconds_to_target")
        else None
    )
    table = [
        {
            "precision": name,
            **(
                {"note": r["skipped"]}
                if "skipped" in r
                else {
                    "steps": r["steps"],
                    "train s": r["train_seconds"],
                    "samples/s": r["train_samples_per_s"],
                    f"s to val {target}": r["seconds_to_target"],
                    "test zero-shot": r["test_zeroshot_top1"],
                    "test_novel zero-shot": r["test_novel_zeroshot_top1"],
                }
            ),
        }
        for name, r in runs.items()
    ]

    def plot(ax: Any) -> None:
        for name, r in runs.items():
            if "curve" in r:
                xs = [p["elapsed_s"] for p in r["curve"]]
                ax.plot(xs, [p["val_zeroshot_top1"] for p in r["curve"]], marker="o", label=name)
        ax.axhline(target, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("training seconds")
        ax.set_ylabel("val zero-shot top-1")
        ax.set_ylim(0, 1.02)
        ax.set_title("clip-tiny (the quickstart recipe): time to quality")
        ax.legend()

    results = {"target": target, "seed": seed, "runs": runs, "bf16_speedup_to_target": speedup}
    notes = (
        f"The quickstart recipe (`clip-tiny`, its fixed step schedule) per precision, seed {seed}; "
        f"val zero-shot every {eval_every} steps. bf16 / fp32 time to val {target}: "
        + (f"{speedup:.2f}x" if speedup else "n/a")
    )
    write_report(out, "quickstart", results, table, plot, title="bench quickstart", notes=notes)
    return results
