"""Video-text retrieval on motion captions, beside a single-frame baseline.

A world video shows its objects translating in one direction; its caption names the objects and
the direction ("a red circle and a blue star moving left"). One frame cannot tell the direction,
so a model that only sees appearance is capped: the baseline here feeds the same model the clip's
still frame (`video_image_frame`, the scene image) repeated over time, i.e. no motion at all.

Retrieval runs over the samples whose motion caption is unique in the split (identical captions
of different videos would make a correct match count as a miss), with `eval.retrieval`'s Recall@K
semantics: `v2t_r{k}` (video query, caption candidates) and `t2v_r{k}`. `direction_accuracy` asks
the easier question directly: among the four captions that differ only in the direction, does
the video score its own highest (chance 0.25)?
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from polysense.data.loader import with_direction
from polysense.data.world import DIRECTIONS
from polysense.errors import PolysenseError
from polysense.eval.retrieval import retrieval_metrics
from polysense.eval.zeroshot import _check_embeddings, encode_texts, eval_mode, fraction

KS: tuple[int, ...] = (1, 5, 10)


def still_video(sample: dict[str, Any]) -> Tensor:
    """(T, H, W, 3) uint8: the sample's still frame repeated over all its frames (no motion)."""
    video = torch.as_tensor(sample["video"])
    frame = int(sample.get("video_image_frame", len(video) // 2))
    return video[frame : frame + 1].expand_as(video).contiguous()


def encode_videos(model: Any, videos: Sequence[Tensor], *, batch_size: int) -> Tensor:
    """(N, D) embeddings of uint8 (T, H, W, 3) clips, frames sampled to the model's count."""
    out = []
    with eval_mode(model):
        for start in range(0, len(videos), batch_size):
            chunk = torch.stack([torch.as_tensor(v) for v in videos[start : start + batch_size]])
            out.append(_check_embeddings(model.encode_video(chunk), len(chunk), "encode_video"))
    return F.normalize(torch.cat(out), dim=-1)


def _caption(sample: dict[str, Any]) -> str | None:
    caption = sample.get("motion_caption")
    if isinstance(caption, str) and caption.strip():
        return caption.strip()
    texts = sample.get("text") or []
    return texts[0] if texts else None


def video_retrieval(
    model: Any, samples: Sequence[dict[str, Any]], *, batch_size: int = 256
) -> dict[str, Any]:
    """Recall@K and direction accuracy of the video model and of its single-frame baseline."""
    seen: set[str] = set()
    dupes: set[str] = set()
    for s in samples:
        c = _caption(s) if s.get("video") is not None else None
        if c is not None:
            (dupes if c in seen else seen).add(c)
    kept = [s for s in samples if s.get("video") is not None and _caption(s) in seen - dupes]
    if len(kept) < 2:
        raise PolysenseError(
            f"video retrieval needs at least two videos with unique captions (got {len(kept)} of "
            f"{len(samples)} samples); world scenes carry 'motion_caption'"
        )
    captions = [_caption(s) for s in kept]
    text = F.normalize(encode_texts(model, captions, batch_size=batch_size), dim=-1)  # (N, D)
    owner = torch.arange(len(kept))
    directional = [s for s in kept if " moving " in _caption(s)]
    dir_text = None
    if directional:
        variants = [with_direction(_caption(s), d) for s in directional for d in DIRECTIONS]
        dir_text = F.normalize(encode_texts(model, variants, batch_size=batch_size), dim=-1)
        dir_text = dir_text.view(len(directional), len(DIRECTIONS), -1)  # (n, 4, D)
        truth = torch.tensor([DIRECTIONS.index(s["motion"]) for s in directional])

    out: dict[str, Any] = {"video_n_samples": len(kept)}
    for prefix, make in (("", lambda s: s["video"]), ("single_frame_", still_video)):
        emb = encode_videos(model, [make(s) for s in kept], batch_size=batch_size)  # (N, D)
        metrics = retrieval_metrics(emb, text, owner, KS)
        out |= {
            prefix + k.replace("i2t", "v2t").replace("t2i", "t2v"): v for k, v in metrics.items()
        }
        if dir_text is not None:
            index = {id(s): i for i, s in enumerate(kept)}
            sub = emb[torch.tensor([index[id(s)] for s in directional])]  # (n, D)
            scores = torch.einsum("nd,nkd->nk", sub, dir_text)  # (n, 4)
            out[prefix + "direction_accuracy"] = fraction(scores.argmax(1) == truth)
    return out


def eval_task(
    *,
    ckpt: Path,
    data: str,
    split: str | None,
    batch_size: int,
    limit: int | None,
    clip: Path | None,
) -> dict:
    """`polysense eval video`: video-text R@K on motion captions, single-frame baseline beside."""
    from polysense.data.readers import detect_format, read_samples
    from polysense.models.checkpoint import load_model

    model = load_model(ckpt)
    if not {"video", "text"} <= set(model.cfg.towers):
        raise PolysenseError(
            f"{ckpt}: the model has towers {', '.join(model.cfg.towers)}; video retrieval needs "
            "video and text (train video-clip-tiny)"
        )
    if split is None and detect_format(data) == "world":
        split = "test"
    samples = list(read_samples(data, split=split, limit=limit))
    return video_retrieval(model, samples, batch_size=batch_size) | {"n_samples": len(samples)}
