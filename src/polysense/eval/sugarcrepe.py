"""SugarCrepe (Hsieh et al. 2023): does a model prefer an image's caption to a hard negative?

SugarCrepe's files (`add_att.json`, `replace_rel.json`, `swap_obj.json` ...) each map an id to
`{"filename", "caption" (the positive), "negative_caption"}`, the images being COCO val2017's
(`--image-root val2017`). A pair is right when the model scores the positive caption above the
negative one (a tie is wrong): a CLIP by the cosine of image and caption, a VLM by the
log-likelihood of the caption after its captioning prompt (as `eval winoground` scores).
Accuracy is reported over all pairs (`sugarcrepe_accuracy`) and per file (`sugarcrepe_<stem>`,
e.g. `sugarcrepe_replace_att`); chance is 0.5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from polysense.errors import PolysenseError

FIELDS = ("filename", "caption", "negative_caption")
FIX = 'a SugarCrepe file maps each id to {"filename", "caption", "negative_caption"}'


@dataclass(frozen=True)
class Pair:
    """One image with its positive and its negative caption."""

    key: str
    filename: str
    positive: str
    negative: str


def _is_pairs(doc: Any) -> bool:
    first = next(iter(doc.values()), None) if isinstance(doc, dict) else None
    return isinstance(first, dict) and all(f in first for f in FIELDS)


def sugarcrepe_files(data: str | Path) -> list[Path]:
    """The SugarCrepe files `data` names: itself, or the SugarCrepe .json files of a folder
    (sorted); empty when it is neither."""
    from polysense.eval.formats import read_json

    p = Path(data)
    candidates = sorted(p.glob("*.json")) if p.is_dir() else [p]
    out = []
    for c in candidates:
        if c.suffix.lower() != ".json" or not c.is_file():
            continue
        try:
            if _is_pairs(read_json(c, FIX)):
                out.append(c)
        except PolysenseError:
            continue
    return out


def read_pairs(path: Path, *, limit: int | None = None) -> list[Pair]:
    """The pairs of one SugarCrepe file, in its order; one-line errors name the entry."""
    from polysense.eval.formats import field, read_json

    doc = read_json(path, FIX)
    if not isinstance(doc, dict):
        raise PolysenseError(f"{path}: not a JSON object; {FIX}")
    pairs = []
    for key, row in list(doc.items())[:limit]:
        where = f"{path}: entry {key!r}"
        values = [field(row, f, where, FIX) for f in FIELDS]
        if not all(isinstance(v, str) and v for v in values):
            raise PolysenseError(f"{where}: {', '.join(FIELDS)} must be non-empty strings")
        pairs.append(Pair(str(key), *values))
    if not pairs:
        raise PolysenseError(f"{path}: no pairs; {FIX}")
    return pairs


def pair_accuracy(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Fraction of pairs whose positive caption scores strictly above the negative (N,)."""
    return int((positive > negative).sum()) / len(positive)


Scorer = Callable[[Sequence[Image.Image], Sequence[str]], torch.Tensor]


def clip_scorer(clip: Any) -> Scorer:
    """Cosine of each (image, caption) under a dual encoder: (B,)."""

    def score(images: Sequence[Image.Image], captions: Sequence[str]) -> torch.Tensor:
        return (clip.encode_image(list(images)) * clip.encode_text(list(captions))).sum(-1).cpu()

    return score


def vlm_scorer(model: Any) -> Scorer:
    """log p(caption | image, captioning prompt) under a VLM (no end token): (B,)."""
    from polysense.data.chat import CAPTION_INSTRUCTION, chat_prompt

    prompt = chat_prompt(CAPTION_INSTRUCTION)

    def score(images: Sequence[Image.Image], captions: Sequence[str]) -> torch.Tensor:
        return model.score(list(images), [prompt] * len(images), list(captions)).float().cpu()

    return score


def score_pairs(
    score: Scorer, pairs: Sequence[Pair], image_root: Path | None, *, batch_size: int, source: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive scores (N,), negative scores (N,)); images are opened a batch at a time (an
    error names `source`, the file, and the entry)."""
    from polysense.eval.formats import open_images

    pos, neg = [], []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        images = open_images(
            image_root, [(p.filename, f"{source}: entry {p.key!r}") for p in chunk]
        )
        both = score([*images, *images], [p.positive for p in chunk] + [p.negative for p in chunk])
        pos.append(both[: len(chunk)])
        neg.append(both[len(chunk) :])
    return torch.cat(pos), torch.cat(neg)


def evaluate(
    score: Scorer,
    files: Sequence[Path],
    image_root: Path | None,
    *,
    batch_size: int,
    limit: int | None,
) -> dict[str, Any]:
    """Accuracy over all pairs of `files` and per file (keyed by the file's stem)."""
    metrics: dict[str, Any] = {}
    all_pos, all_neg = [], []
    for path in files:
        pairs = read_pairs(path, limit=limit)
        pos, neg = score_pairs(score, pairs, image_root, batch_size=batch_size, source=str(path))
        metrics[f"sugarcrepe_{path.stem}"] = pair_accuracy(pos, neg)
        metrics[f"sugarcrepe_n_{path.stem}"] = len(pos)
        all_pos.append(pos)
        all_neg.append(neg)
    pos, neg = torch.cat(all_pos), torch.cat(all_neg)
    return {"sugarcrepe_accuracy": pair_accuracy(pos, neg), "sugarcrepe_n": len(pos)} | metrics


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
    """`polysense eval sugarcrepe`: a CLIP or a VLM checkpoint on a SugarCrepe file or a folder
    of them; with `--clip`, the CLIP's accuracy beside the VLM's. `--limit` caps pairs per file."""
    from polysense.eval.formats import no_split
    from polysense.models.checkpoint import load_model, load_vlm, model_family

    files = sugarcrepe_files(data)
    if not files:
        raise PolysenseError(
            f"{data}: no SugarCrepe file (a .json, or a folder of them, like replace_att.json); {FIX}"
        )
    no_split(split, data, "SugarCrepe pairs")
    scorers: dict[str, Scorer] = {}
    if model_family(ckpt) == "vlm":
        scorers["vlm"] = vlm_scorer(load_vlm(ckpt))
    else:
        scorers["clip"] = clip_scorer(load_model(ckpt))
    if clip is not None:
        scorers["clip"] = clip_scorer(load_model(clip))
    with torch.no_grad():
        result = {
            name: evaluate(s, files, image_root, batch_size=batch_size, limit=limit)
            for name, s in scorers.items()
        }
    main = result["vlm" if "vlm" in result else "clip"]
    return main | {
        "side_by_side": result,
        "chance": 0.5,
        "n_samples": main["sugarcrepe_n"],
        "files": [str(f) for f in files],
    }
