"""`polysense bench gpu` (scripts/gpu_check.sh) on the CPU fallback: the script CI can run.

Without CUDA the "device" runs are CPU runs, so two runs of each family must give the very same
losses (a check that every family's run is deterministic from its seed), and the contrastive
preset under torchrun with 2 gloo processes must match the single-process losses (the global
batch is split by rank and the negatives gathered across processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_gpu_check_runs_every_family_on_the_cpu_fallback(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    # the script runs `python` from PATH: the interpreter of this test run, activated or not
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    done = subprocess.run(
        ["bash", str(script), str(tmp_path), "--steps", "2", "--batch", "8", "--seconds", "1"],
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert set(report["families"]) == {"contrastive", "fusion", "lm", "vlm", "t2i"}
    work = tmp_path / "gpu-check" / "runs"
    for name, fam in report["families"].items():
        # the report's losses are the runs' own logs, 2 steps each, equal on both "devices"
        for where in ("device", "cpu"):
            rows = [json.loads(x) for x in (work / where / name / "metrics.jsonl").open()]
            assert [r["loss"] for r in rows if "loss" in r] == fam[f"losses_{where}"]
        assert len(fam["losses_cpu"]) == 2
        assert fam["losses_device"] == fam["losses_cpu"], name
    ddp = report["ddp"]
    assert ddp["processes"] == 2 and ddp["backend"] == "gloo"
    single = report["families"]["contrastive"]["losses_cpu"]
    assert ddp["losses"] == pytest.approx(single, rel=2e-3)
    assert report["all_parity"] is True
    speed = report["speed"]
    # the ratio is the one of the two measured rates
    rates = speed["train_samples_per_s"]
    assert speed["train_ratio_vs_hf"] == pytest.approx(
        rates["polysense"] / rates[speed["hf_best_train_mode"]]
    )
    assert (tmp_path / "gpu.md").is_file() and (tmp_path / "gpu.png").stat().st_size > 0


def test_gpu_check_help_teaches(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "polysense.cli", "bench", "gpu", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "scripts/gpu_check.sh" in done.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "polysense.cli",
            "bench",
            "gpu",
            "--out",
            str(tmp_path),
            "--steps",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "--steps" in bad.stderr and "Traceback" not in bad.stderr
