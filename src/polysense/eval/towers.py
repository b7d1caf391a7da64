"""Every evaluation a contrastive model's towers allow on one split: image-text retrieval and
zero-shot, audio zero-shot, audio-visual correspondence, video-text retrieval (the audio and
video presets' report, `train/av.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polysense.data.readers import detect_format, read_samples
from polysense.eval.audio import _classnames, audio_zeroshot, avc_eval
from polysense.eval.suite import evaluate
from polysense.eval.video import video_retrieval


def evaluate_towers(
    model: Any, data: str | Path, *, split: str, batch_size: int = 256
) -> dict[str, Any]:
    """Every evaluation the model's towers allow, on one split of `data`."""
    towers = set(model.cfg.towers)
    rate = model.cfg.audio.sample_rate if "audio" in towers else None
    samples = list(read_samples(data, split=split, sample_rate=rate))
    metrics: dict[str, Any] = {"n_samples": len(samples)}
    if {"image", "text"} <= towers:
        metrics |= evaluate(model, data, split=split, batch_size=batch_size)
    if {"audio", "text"} <= towers:
        classes = _classnames(str(data), samples)
        metrics |= audio_zeroshot(model, samples, classnames=classes, batch_size=batch_size)
    if {"audio", "image"} <= towers:
        calibration = None
        if detect_format(data) == "world" and split != "val":
            calibration = list(read_samples(data, split="val", sample_rate=rate))
        metrics |= avc_eval(model, samples, calibration=calibration, batch_size=batch_size)
    if {"video", "text"} <= towers:
        metrics |= video_retrieval(model, samples, batch_size=batch_size)
    return metrics
