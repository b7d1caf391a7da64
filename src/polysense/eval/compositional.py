"""Winoground-style compositional test built from the world (Thrush et al. 2022).

An example is two images and two captions with the same words in a different order:
- `binding`: "a red circle and a blue square" vs "a blue circle and a red square", the images
  being two-object scenes with exactly those objects;
- `relation`: "a red circle left of a blue square" vs "a blue square left of a red circle" (also
  "above"), two scenes with the same two objects in opposite arrangements.
Each example is scored with a score s(caption, image): the dual encoder's cosine similarity, or
the VLM's log-likelihood of the caption after the captioning prompt. text: both images prefer
their own caption; image: both captions prefer their own image; group: both. Chance is 0.25,
0.25 and 1/6 (the paper's values for random scores).

`read_winoground` reads Winoground's own examples file (JSON lines of caption_0, caption_1,
image_0, image_1 and collapsed_tag), images `<image_root>/<image_N>.png` as the dataset lays
them out; the kinds are then its tags (Object, Relation, Both).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polysense.data.world import relations_between
from polysense.errors import PolysenseError

CHANCE = {"winoground_text": 0.25, "winoground_image": 0.25, "winoground_group": 1 / 6}


@dataclass(frozen=True)
class WinoExample:
    image0: int
    image1: int
    caption0: str
    caption1: str
    kind: str  # binding / relation


def _a(color: str, shape: str) -> str:
    return ("an " if color[0] in "aeiou" else "a ") + f"{color} {shape}"


def build_examples(
    objects: Sequence[Sequence[dict[str, Any]]], *, max_per_kind: int = 200
) -> list[WinoExample]:
    """Minimal pairs among the two-object scenes of a split; each scene is used at most once."""
    two = [i for i, objs in enumerate(objects) if len(objs) == 2]
    used: set[int] = set()
    out: list[WinoExample] = []
    by_pairs: dict[frozenset, list[int]] = {}
    for i in two:
        by_pairs.setdefault(frozenset((o["color"], o["shape"]) for o in objects[i]), []).append(i)
    count = 0
    for i in two:  # attribute binding: swap the colours of the two shapes
        (c1, s1), (c2, s2) = ((o["color"], o["shape"]) for o in objects[i])
        if c1 == c2 or s1 == s2 or i in used or count >= max_per_kind:
            continue
        partner = [j for j in by_pairs.get(frozenset({(c2, s1), (c1, s2)}), []) if j not in used]
        if partner:
            j = partner[0]
            used |= {i, j}
            cap0 = f"{_a(c1, s1)} and {_a(c2, s2)}"
            cap1 = f"{_a(c2, s1)} and {_a(c1, s2)}"
            out.append(WinoExample(i, j, cap0, cap1, "binding"))
            count += 1
    count = 0
    for i in two:  # relation order: the same two objects, arranged the other way round
        if i in used or count >= max_per_kind:
            continue
        a, b = objects[i]
        for rel in ("left of", "above"):
            if rel in relations_between(a, b):
                first, second = a, b
            elif rel in relations_between(b, a):
                first, second = b, a
            else:
                continue
            key = frozenset((o["color"], o["shape"]) for o in objects[i])
            partner = []
            for j in by_pairs.get(key, []):
                if j in used or j == i:
                    continue
                x, y = objects[j]
                fx = x if (x["color"], x["shape"]) == (first["color"], first["shape"]) else y
                sy = y if fx is x else x
                if rel in relations_between(sy, fx):  # second is now left of / above first
                    partner.append(j)
            if partner:
                j = partner[0]
                used |= {i, j}
                f, s = _a(first["color"], first["shape"]), _a(second["color"], second["shape"])
                out.append(WinoExample(i, j, f"{f} {rel} {s}", f"{s} {rel} {f}", "relation"))
                count += 1
                break
    return out


def winoground_scores(scores: torch.Tensor) -> dict[str, float]:
    """scores (N, 2, 2): [n, caption c, image i] -> text, image and group scores."""
    s = scores
    text = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    image = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    return {
        "winoground_text": float(text.float().mean()),
        "winoground_image": float(image.float().mean()),
        "winoground_group": float((text & image).float().mean()),
    }


def evaluate(
    score_fn: Callable[[list[int], list[str]], torch.Tensor],
    examples: Sequence[WinoExample],
) -> dict[str, Any]:
    """`score_fn(image indices, captions) -> (n,)` scores each (image, caption) pair; overall
    and per-kind Winoground scores."""
    if not examples:
        raise PolysenseError(
            "no Winoground examples: the split has no two-object scenes forming a minimal pair; "
            "evaluate a larger split (a world of a few thousand scenes: --n 20000 gives ~200)"
        )
    imgs, caps = [], []
    for e in examples:
        for c in (e.caption0, e.caption1):
            for i in (e.image0, e.image1):
                imgs.append(i)
                caps.append(c)
    flat = score_fn(imgs, caps)
    scores = flat.view(len(examples), 2, 2)
    metrics: dict[str, Any] = winoground_scores(scores) | {"winoground_n": len(examples)}
    for kind in sorted({e.kind for e in examples}):
        idx = [k for k, e in enumerate(examples) if e.kind == kind]
        part = winoground_scores(scores[idx])
        metrics |= {f"{k}_{kind}": v for k, v in part.items()} | {f"winoground_n_{kind}": len(idx)}
    return metrics


def clip_score_fn(clip: Any, images: torch.Tensor, batch_size: int = 256) -> Callable:
    """Cosine similarity of the dual encoder; images: uint8 (N, H, W, 3)."""
    from polysense.eval.captioning import clip_features

    def fn(idx: list[int], captions: list[str]) -> torch.Tensor:
        img = clip_features(clip, images[idx], batch_size)
        txt = torch.cat(
            [
                clip.encode_text(captions[i : i + batch_size]).float()
                for i in range(0, len(captions), batch_size)
            ]
        )
        return (img * txt).sum(-1)

    return fn


def vlm_score_fn(model: Any, images: torch.Tensor, batch_size: int = 256) -> Callable:
    """log p(caption | image, captioning prompt) under the VLM (no end token)."""
    from polysense.data.chat import CAPTION_INSTRUCTION, chat_prompt
    from polysense.eval.captioning import scene_pixels

    def fn(idx: list[int], captions: list[str]) -> torch.Tensor:
        pix = scene_pixels(model.cfg.vision, images[idx])
        prompt = chat_prompt(CAPTION_INSTRUCTION)
        out = []
        for i in range(0, len(idx), batch_size):
            sl = slice(i, i + batch_size)
            out.append(model.score(pix[sl], [prompt] * len(pix[sl]), captions[sl]).cpu())
        return torch.cat(out)

    return fn


def is_winoground_file(data: str | Path) -> bool:
    """A JSON/JSONL file whose first entry has Winoground's caption_0 and image_0 fields."""
    from polysense.eval.formats import first_entry_has

    return first_entry_has(data, "caption_0", "image_0")


def read_winoground(
    path: str | Path, image_root: Path | None, *, image_size: int, limit: int | None = None
) -> tuple[list[WinoExample], torch.Tensor]:
    """Winoground's examples and their images (uint8 (2N, S, S, 3), resized and centre-cropped
    as a world split's): example k holds images 2k and 2k+1."""
    import numpy as np

    from polysense.data.transforms import resize_center_crop
    from polysense.eval.formats import field, open_image, read_json

    fix = "a Winoground line is {id, caption_0, caption_1, image_0, image_1, collapsed_tag}"
    rows = read_json(path, "a Winoground examples file (examples.jsonl)")
    rows = rows if isinstance(rows, list) else [rows]
    examples, images = [], []
    for n, row in enumerate(rows[:limit] if limit else rows, 1):
        where = f"{path}: line {n}"
        caps = [str(field(row, f"caption_{k}", where, fix)) for k in (0, 1)]
        for k in (0, 1):
            name = str(field(row, f"image_{k}", where, fix))
            name = name if Path(name).suffix else f"{name}.png"
            image = open_image(image_root, name, where)
            images.append(np.asarray(resize_center_crop(image, image_size), dtype=np.uint8))
        kind = str(row.get("collapsed_tag") or row.get("tag") or "all")
        examples.append(WinoExample(2 * n - 2, 2 * n - 1, caps[0], caps[1], kind))
    if not examples:
        raise PolysenseError(f"{path}: no examples; {fix}")
    return examples, torch.from_numpy(np.stack(images))


def eval_task(
    *,
    ckpt: Path,
    data: str,
    split: str | None,
    batch_size: int,
    limit: int | None,
    clip: Path | None,
    image_root: Path | None = None,
) -> dict[str, Any]:
    """`polysense eval winoground`: for a CLIP or a VLM checkpoint; with `--clip`, the CLIP's
    scores beside the VLM's. Chance levels are included."""
    from polysense.data.instruct import load_split
    from polysense.models.checkpoint import load_model, load_vlm, model_family

    family = model_family(ckpt)
    vlm = load_vlm(ckpt) if family == "vlm" else None
    clips = {"clip": load_model(ckpt)} if vlm is None else {}
    if clip is not None:
        clips["clip"] = load_model(clip)
    size = vlm.cfg.vision.image_size if vlm is not None else clips["clip"].cfg.vision.image_size
    if is_winoground_file(data):
        from polysense.eval.formats import no_split

        no_split(split, data, "a Winoground examples file")
        examples, images = read_winoground(data, image_root, image_size=size, limit=limit)
        n_samples = len(examples)
    else:
        if image_root is not None:
            raise PolysenseError(
                "--image-root goes with a Winoground examples file; a world holds its images"
            )
        split_data = load_split(data, split, image_size=size, limit=limit)
        examples, images = build_examples(split_data.objects), split_data.images
        n_samples = len(split_data)
    result: dict[str, Any] = {}
    with torch.no_grad():
        if vlm is not None:
            result["vlm"] = evaluate(vlm_score_fn(vlm, images, batch_size), examples)
        if "clip" in clips:
            result["clip"] = evaluate(clip_score_fn(clips["clip"], images, batch_size), examples)
    main = result["vlm" if vlm is not None else "clip"]
    metrics = {k: v for k, v in main.items()}
    metrics |= {"side_by_side": result, "chance": CHANCE}
    return metrics | {"n_samples": n_samples, "split": split or "all"}
