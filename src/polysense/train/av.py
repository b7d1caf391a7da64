"""The audio and video presets' runner (`polysense train clap-tiny|video-clip-tiny|av-tiny|
imagebind-tiny`, presets/av.py): the contrastive loop, then every evaluation the towers allow on
each world split (`eval/towers.py`), written to OUT/metrics.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polysense.config import RunConfig, to_dict
from polysense.data.readers import detect_format
from polysense.eval.towers import evaluate_towers
from polysense.fileio import atomic_write_json
from polysense.models.checkpoint import load_model
from polysense.train.loop import train


def run(
    cfg: RunConfig, *, data: Path, out: Path, resume: bool, eval_splits: tuple[str, ...]
) -> dict[str, Any]:
    """Train `cfg` with the contrastive loop, evaluate each split, write OUT/metrics.json."""
    result = train(cfg, data=data, out=out, resume=resume)
    metrics: dict[str, Any] = {
        "train_samples_per_s": result.train_samples_per_s,
        "train_steps": result.steps,
        "train_seconds": result.seconds,
        "final_loss": result.final_loss,
        "skipped_steps": result.skipped_steps,
    }
    splits = eval_splits if detect_format(data) == "world" else ()
    if splits:
        model = load_model(out)
        first, *rest = splits
        metrics |= evaluate_towers(model, data, split=first) | {"split": first}
        for split in rest:
            metrics[split] = evaluate_towers(model, data, split=split)
    metrics["config"] = to_dict(cfg)
    atomic_write_json(Path(out) / "metrics.json", metrics)
    return metrics
