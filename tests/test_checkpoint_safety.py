"""Resuming never runs code from a checkpoint: a crafted `state.pt` whose unpickling would create a
file is refused with one line, by every training loop that resumes (contrastive, fusion, VLM
stages, text-to-image) and by `polysense train --resume` on the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polysense.errors import PolysenseError
from polysense.presets import get_preset
from polysense.train.checkpoint import STATE, load_state, save_state


class _Payload:
    """Unpickling this calls open(marker, "w"): the side effect an attacker's code would have."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _crafted(out: Path) -> Path:
    """`out/state.pt` holding the payload beside ordinary fields; returns the marker path."""
    out.mkdir(parents=True, exist_ok=True)
    marker = out.parent / f"{out.name}-pwned"
    torch.save({"step": 3, "model": {}, "payload": _Payload(marker)}, out / STATE)
    return marker


def test_the_payload_would_run_under_a_plain_unpickler(tmp_path):
    """The check below is meaningful: torch.load without the restriction does run it."""
    marker = _crafted(tmp_path / "run")
    torch.load(tmp_path / "run" / STATE, weights_only=False)
    assert marker.exists()


def test_load_state_refuses_the_payload_and_reads_a_real_state(tmp_path):
    marker = _crafted(tmp_path / "run")
    with pytest.raises(PolysenseError, match="not a polysense training state"):
        load_state(tmp_path / "run")
    assert not marker.exists()
    state = {"step": 7, "rng": torch.get_rng_state(), "config": {"lr": 1e-3, "betas": (0.9, 0.98)}}
    (tmp_path / "ok").mkdir()
    save_state(tmp_path / "ok", state)
    back = load_state(tmp_path / "ok")
    assert back["step"] == 7 and torch.equal(back["rng"], state["rng"])
    assert back["config"] == state["config"]


def _contrastive(out: Path) -> None:
    from polysense.train.loop import train

    train(get_preset("clip-tiny"), data=out.parent / "unused", out=out, resume=True, progress=False)


def _fusion(out: Path) -> None:
    from polysense.train.fusion import train_fusion

    train_fusion(get_preset("fusion-late-tiny"), None, out=out, resume=True, progress=False)


def _vlm(out: Path) -> None:
    from polysense.train.vlm import train_stage

    train_stage(
        get_preset("vlm-tiny-stage1"), data=out.parent, out=out, resume=True, progress=False
    )


def _t2i(out: Path) -> None:
    from polysense.train.t2i import train_t2i

    train_t2i(get_preset("t2i-tiny"), data=out.parent, out=out, resume=True, progress=False)


@pytest.mark.parametrize("resume", [_contrastive, _fusion, _vlm, _t2i], ids=lambda f: f.__name__)
def test_every_resume_path_refuses_a_crafted_state(tmp_path, resume):
    out = tmp_path / "run"
    marker = _crafted(out)
    with pytest.raises(PolysenseError, match="not a polysense training state"):
        resume(out)
    assert not marker.exists()


def test_cli_resume_with_a_crafted_state_is_a_one_line_error(tmp_path, pairs_jsonl):
    out = tmp_path / "run"
    marker = _crafted(out)
    run = subprocess.run(
        [
            *(sys.executable, "-m", "polysense.cli", "train", "clip-tiny"),
            *("--data", str(pairs_jsonl), "--out", str(out), "--resume", "--eval-splits", ""),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "not a polysense training state" in run.stderr
    assert not marker.exists()
