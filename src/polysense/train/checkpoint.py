"""Training state on disk: `state.pt` (everything a resume needs) beside the exported model.

`state.pt` holds the model and optimiser state, the step, the skipped-step counter and the RNG
state in one file written atomically, so a run killed at any instant resumes from a consistent
checkpoint. `model.safetensors` + `config.json` + `tokenizer.json` (the inference checkpoint that
`polysense.load` reads) are exported next to it after each save. A save on a full disk is a
one-line error (`polysense.fileio`), and the temp files that a save killed midway left behind
(`.state.pt.XXXXXXXX.tmp`, ...) are removed by the next resume or save once stale (unlocked and
unchanged for a minute: `polysense.fileio.remove_stale`), never a live writer's.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from polysense.errors import PolysenseError
from polysense.fileio import atomic_open, remove_stale

STATE = "state.pt"
METRICS = "metrics.jsonl"


def save_state(out: Path, state: dict[str, Any]) -> None:
    remove_stale(out)
    with atomic_open(out / STATE, "wb") as handle:
        torch.save(state, handle)


def load_state(out: Path) -> dict[str, Any]:
    """The resume state at `out`, read with torch's restricted unpickler (`weights_only=True`:
    tensors, containers and primitive types only), so a crafted `state.pt` cannot run code; a
    file holding anything else is refused with one line."""
    path = out / STATE
    remove_stale(out)
    if not path.exists():
        raise PolysenseError(f"{path} does not exist: nothing to resume; drop --resume to start")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise PolysenseError(
            f"{path} holds objects other than tensors and plain values "
            f"({str(exc).splitlines()[0][:120]}); it is not a polysense training state. Delete it "
            "and drop --resume to start afresh"
        ) from None


def trim_metrics(out: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from, so no step is logged twice."""
    path = out / METRICS
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
    with atomic_open(path, "w") as handle:
        handle.write("".join(line + "\n" for line in kept))


def append_metrics(out: Path, record: dict[str, Any]) -> None:
    with open(out / METRICS, "a") as handle:
        handle.write(json.dumps(record) + "\n")
