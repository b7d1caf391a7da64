"""Audio evaluation: zero-shot sound classification and audio-visual correspondence (AVC).

Zero-shot: each of the world's sound classes (colour x shape: the shape sets the pitch, the colour
the amplitude-modulation rate) is embedded through sound prompts ("the sound of a red circle."),
and a single-object scene's clip goes to the nearest class, exactly as image zero-shot does
(`eval.zeroshot`: prompt ensembling, ties scored as misses).

AVC (Arandjelovic & Zisserman, "Look, listen and learn"): does this sound belong to this scene?
Every clip is paired with its own image (positive) and with the image of a scene whose objects
differ (negative, drawn with a fixed seed). `avc_accuracy` is the accuracy of thresholding the
audio-image cosine on these balanced pairs, the threshold fitted on other data (the val split,
or the other half of the samples) so it is never tuned on what it scores; `avc_2afc` is how often
the clip scores its own image above the mismatched one (chance 0.5 for both).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from polysense.errors import PolysenseError
from polysense.eval.zeroshot import (
    _check_embeddings,
    encode_images,
    eval_mode,
    fraction,
    target_ranks,
    zeroshot_classifier,
)

SOUND_TEMPLATES: tuple[str, ...] = (
    "the sound of a {}.",
    "a {} making a sound.",
    "the sound a {} makes.",
    "a recording of a {}.",
    "a {}.",
)


def encode_clips(model: Any, samples: Sequence[dict[str, Any]], *, batch_size: int) -> Tensor:
    """(N, D) audio embeddings of the samples' clips (resampled and cropped to the model's)."""
    from polysense.models.audio import waves_to_tensor

    out = []
    with eval_mode(model):
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            waves = waves_to_tensor(
                [s["audio"] for s in chunk], [s["sample_rate"] for s in chunk], model.cfg.audio
            )
            out.append(_check_embeddings(model.encode_audio(waves), len(chunk), "encode_audio"))
    return torch.cat(out)  # (N, D)


def audio_zeroshot(
    model: Any,
    samples: Sequence[dict[str, Any]],
    *,
    classnames: Sequence[str],
    templates: Sequence[str] = SOUND_TEMPLATES,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Top-1 / top-5 accuracy of clips whose `label` is a class name (single-object scenes)."""
    index = {c: i for i, c in enumerate(classnames)}
    kept = [s for s in samples if s.get("audio") is not None and s.get("label") in index]
    if not kept:
        raise PolysenseError(
            f"no sample has audio and a label among the {len(classnames)} sound classes; "
            "zero-shot audio needs single-object world scenes (or samples with a 'label')"
        )
    classifier = zeroshot_classifier(model, classnames, templates, batch_size=batch_size)  # (C, D)
    emb = F.normalize(encode_clips(model, kept, batch_size=batch_size), dim=-1)  # (N, D)
    targets = torch.tensor([index[s["label"]] for s in kept])  # (N,)
    ranks = target_ranks(emb @ classifier.T, targets)  # (N,)
    per_class = {
        classnames[c]: fraction(ranks[targets == c] < 1) for c in targets.unique().tolist()
    }
    return {
        "audio_zeroshot_top1": fraction(ranks < 1),
        "audio_zeroshot_top5": fraction(ranks < 5),
        "audio_zeroshot_n_samples": len(kept),
        "audio_zeroshot_per_class": per_class,
    }


def _signature(sample: dict[str, Any]) -> tuple:
    """What a scene sounds like: its objects' (colour, shape, size), in any order."""
    return tuple(sorted((o["color"], o["shape"], o["size"]) for o in sample.get("objects") or []))


def _negatives(samples: Sequence[dict[str, Any]], seed: int) -> np.ndarray:
    """(N,) index of a scene with other objects for each sample (fixed-seed draw)."""
    rng = np.random.default_rng(seed)
    sigs = [_signature(s) for s in samples]
    out = np.empty(len(samples), dtype=np.int64)
    for i, sig in enumerate(sigs):
        for _ in range(100):
            j = int(rng.integers(len(samples)))
            if j != i and (sigs[j] != sig or not sig):
                break
        else:
            raise PolysenseError("AVC: could not find a mismatched scene; every scene looks alike")
        out[i] = j
    return out


def avc_scores(
    model: Any, samples: Sequence[dict[str, Any]], *, batch_size: int = 256, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """(positive, negative) audio-image cosines, (N,) each."""
    kept = [s for s in samples if s.get("audio") is not None and s.get("image") is not None]
    if len(kept) < 2:
        raise PolysenseError("AVC needs at least two samples with both audio and an image")
    audio = F.normalize(encode_clips(model, kept, batch_size=batch_size), dim=-1)  # (N, D)
    with eval_mode(model):
        image = torch.cat(
            [
                encode_images(model, [s["image"] for s in kept[i : i + batch_size]])
                for i in range(0, len(kept), batch_size)
            ]
        )
    image = F.normalize(image, dim=-1)  # (N, D)
    neg = torch.from_numpy(_negatives(kept, seed))
    return (audio * image).sum(1), (audio * image[neg]).sum(1)


def best_threshold(pos: Tensor, neg: Tensor) -> float:
    """The cosine threshold (score > t means 'same scene') with the best balanced accuracy."""
    scores = torch.cat([pos, neg]).sort().values
    cands = torch.cat([scores[:1] - 1, (scores[1:] + scores[:-1]) / 2, scores[-1:] + 1])  # (K,)
    acc = (pos[None, :] > cands[:, None]).float().mean(1) + (
        neg[None, :] <= cands[:, None]
    ).float().mean(1)
    return float(cands[int(acc.argmax())])


def _accuracy(pos: Tensor, neg: Tensor, t: float) -> float:
    return (int((pos > t).sum()) + int((neg <= t).sum())) / (len(pos) + len(neg))


def avc_eval(
    model: Any,
    samples: Sequence[dict[str, Any]],
    *,
    calibration: Sequence[dict[str, Any]] | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """AVC accuracy (threshold from `calibration`, else 2-fold across halves) and 2AFC."""
    pos, neg = avc_scores(model, samples, batch_size=batch_size, seed=seed)
    if calibration is not None:
        cpos, cneg = avc_scores(model, calibration, batch_size=batch_size, seed=seed + 1)
        t = best_threshold(cpos, cneg)
        acc = _accuracy(pos, neg, t)
    else:  # fit on one half, score the other, and the other way round
        half = len(pos) // 2
        a, b = slice(0, half), slice(half, None)
        t = best_threshold(pos[a], neg[a])
        t_b = best_threshold(pos[b], neg[b])
        acc = (
            _accuracy(pos[b], neg[b], t) * (len(pos) - half) + _accuracy(pos[a], neg[a], t_b) * half
        ) / len(pos)
    return {
        "avc_accuracy": acc,
        "avc_2afc": fraction(pos > neg),
        "avc_threshold": t,
        "avc_n_samples": len(pos),
    }


# ------------------------------------------------------------- `polysense eval audio` / `avc`


def _read(data: str, split: str | None, limit: int | None, model: Any) -> list[dict[str, Any]]:
    from polysense.data.readers import detect_format, read_samples

    if split is None and detect_format(data) == "world":
        split = "test"
    rate = model.cfg.audio.sample_rate
    return list(read_samples(data, split=split, limit=limit, sample_rate=rate))


def _classnames(data: str, samples: list[dict[str, Any]]) -> list[str]:
    from polysense.data.readers import detect_format

    if detect_format(data) == "world":
        from polysense.data.world import load_manifest

        return list(load_manifest(data)["classes"])
    return sorted({s["label"] for s in samples if isinstance(s.get("label"), str)})


def _load(ckpt: Path, towers: tuple[str, ...]) -> Any:
    from polysense.models.checkpoint import load_model

    model = load_model(ckpt)
    missing = [t for t in towers if t not in model.cfg.towers]
    if missing:
        raise PolysenseError(
            f"{ckpt}: the model has towers {', '.join(model.cfg.towers)} but this task needs "
            f"{', '.join(towers)}; train e.g. clap-tiny (audio) or av-tiny (audio + image)"
        )
    return model


def eval_task(
    *,
    ckpt: Path,
    data: str,
    split: str | None,
    batch_size: int,
    limit: int | None,
    clip: Path | None,
) -> dict:
    """`polysense eval audio`: zero-shot classification of single-object scenes' sounds."""
    model = _load(ckpt, ("audio", "text"))
    samples = _read(data, split, limit, model)
    out = audio_zeroshot(
        model, samples, classnames=_classnames(data, samples), batch_size=batch_size
    )
    return out | {"n_samples": len(samples)}


def eval_avc_task(
    *,
    ckpt: Path,
    data: str,
    split: str | None,
    batch_size: int,
    limit: int | None,
    clip: Path | None,
) -> dict:
    """`polysense eval avc`: audio-visual correspondence; on a world the threshold comes from val."""
    from polysense.data.readers import detect_format, read_samples

    model = _load(ckpt, ("audio", "image"))
    samples = _read(data, split, limit, model)
    calibration = None
    if detect_format(data) == "world" and (split or "test") != "val":
        rate = model.cfg.audio.sample_rate
        calibration = list(read_samples(data, split="val", limit=limit, sample_rate=rate))
    out = avc_eval(model, samples, calibration=calibration, batch_size=batch_size)
    return out | {"n_samples": len(samples)}
