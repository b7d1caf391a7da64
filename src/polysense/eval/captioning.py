"""Captioning metrics, BLEU-1..4 and CIDEr-D with several references per image, written by hand
and tested equal to pycocoevalcap (the reference implementation) to 1e-6; caption generation
and the two baselines a captioner must beat (nearest-neighbour caption, most frequent caption).

Both metrics follow pycocoevalcap exactly: BLEU is corpus-level with the "closest" reference
length for the brevity penalty; CIDEr-D uses document frequencies over the evaluated references,
clipped tf-idf n-gram vectors, the Gaussian length penalty (sigma 6) and the x10 scale. Like the
reference, the "length" in that penalty counts the bigrams of a sentence. Text is compared after
`tokenize` (lower case, punctuation removed), the job of the PTB tokenizer in the COCO toolkit.
CIDEr is not a fraction: it is reported on the reference's scale (a perfect consensus is ~10).

`read_coco_captions` reads a COCO captions file (captions_val2014.json: `images[]` of id and
file_name, `annotations[]` of image_id and caption); `evaluate_coco` scores the model's captions
against those references and returns them in the COCO results format ([{image_id, caption}]).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from polysense.data.loader import normalize
from polysense.decoding import consensus_index, ngram_counts
from polysense.errors import PolysenseError

_PUNCT = re.compile(r"[^\w\s']")
# How captions are decoded for evaluation (CIDEr, BLEU, CHAIR): beam search, as the COCO captioning
# papers report; `evaluate` reports greedy decoding beside it.
CAPTION_DECODING: dict[str, Any] = {"strategy": "beam", "num_beams": 3, "max_new_tokens": 40}


def tokenize(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces: 'Two shapes: a Red circle.' ->
    'two shapes a red circle'."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def bleu(refs: Sequence[Sequence[str]], hyps: Sequence[str], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of hypotheses against their references (pre-tokenised strings)."""
    _check(refs, hyps)
    correct, guess = [0] * n, [0] * n
    test_len = ref_len = 0
    for rs, h in zip(refs, hyps, strict=True):
        words = h.split()
        counts = ngram_counts(words, n)
        max_ref: dict[tuple, int] = {}
        lens = []
        for r in rs:
            rw = r.split()
            lens.append(len(rw))
            for g, c in ngram_counts(rw, n).items():
                max_ref[g] = max(max_ref.get(g, 0), c)
        test_len += len(words)
        ref_len += min((abs(x - len(words)), x) for x in lens)[1]  # closest, shorter on ties
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        for g, c in counts.items():
            correct[len(g) - 1] += min(max_ref.get(g, 0), c)
    tiny, small = 1e-15, 1e-9
    scores, prod = [], 1.0
    for k in range(n):
        prod *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(prod ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


class CiderD:
    """CIDEr-D scorer whose document frequencies come from a reference corpus (one list of
    pre-tokenised references per image). `cider_d` builds one over the evaluated references, as
    the COCO toolkit does; self-critical training builds one over the training references and
    scores sampled captions with it (its reward)."""

    def __init__(self, corpus: Sequence[Sequence[str]], *, n: int = 4, sigma: float = 6.0) -> None:
        self.n, self.sigma = n, sigma
        self.df: Counter = Counter()
        for rs in corpus:
            self.df.update({g for r in rs for g in ngram_counts(r.split(), n)})
        self.log_n = math.log(float(len(corpus)))

    def _vec(self, text: str) -> tuple[list[dict], list[float], int]:
        """tf-idf vectors per n-gram order, their norms, and the bigram count ("length")."""
        v: list[dict] = [{} for _ in range(self.n)]
        norms = [0.0] * self.n
        length = 0
        for g, tf in ngram_counts(text.split(), self.n).items():
            k = len(g) - 1
            v[k][g] = float(tf) * (self.log_n - math.log(max(1.0, self.df[g])))
            norms[k] += v[k][g] ** 2
            if k == 1:  # as in the reference code: the bigram count is the "length"
                length += tf
        return v, [math.sqrt(x) for x in norms], length

    def scores(self, refs: Sequence[str], hyps: Sequence[str]) -> list[float]:
        """CIDEr-D (x10 scale) of pre-tokenised hypotheses of one image against its references
        (the references are vectorised once for all of them)."""
        ref_vecs = [self._vec(r) for r in refs]
        out = []
        for hyp in hyps:
            vh, nh, lh = self._vec(hyp)
            total = np.zeros(self.n)
            for vr, nr, lr in ref_vecs:
                penalty = math.exp(-((lh - lr) ** 2) / (2 * self.sigma**2))
                for k in range(self.n):
                    val = sum(
                        min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items()
                    )
                    if nh[k] != 0 and nr[k] != 0:
                        val /= nh[k] * nr[k]
                    total[k] += val * penalty
            out.append(float(np.mean(total)) / len(refs) * 10.0)
        return out


def cider_d(
    refs: Sequence[Sequence[str]], hyps: Sequence[str], n: int = 4, sigma: float = 6.0
) -> tuple[float, np.ndarray]:
    """CIDEr-D (corpus mean, per-image scores) of pre-tokenised hypotheses; document frequencies
    over the evaluated references."""
    _check(refs, hyps)
    scorer = CiderD(refs, n=n, sigma=sigma)
    arr = np.array([scorer.scores(rs, [h])[0] for rs, h in zip(refs, hyps, strict=True)])
    return float(arr.mean()), arr


def _check(refs: Sequence[Sequence[str]], hyps: Sequence[str]) -> None:
    if len(refs) != len(hyps) or not hyps:
        raise PolysenseError(f"{len(hyps)} hypotheses for {len(refs)} reference sets")
    if any(len(rs) == 0 for rs in refs):
        raise PolysenseError("every image needs at least one reference caption")


def caption_metrics(refs: Sequence[Sequence[str]], hyps: Sequence[str]) -> dict[str, float]:
    """bleu1..bleu4 and cider (CIDEr-D) of raw captions (tokenised here)."""
    r = [[tokenize(x) for x in rs] for rs in refs]
    h = [tokenize(x) for x in hyps]
    b = bleu(r, h)
    return {f"bleu{k + 1}": b[k] for k in range(4)} | {"cider": cider_d(r, h)[0]}


# ---------------------------------------------------------------------------------------------
# baselines


def most_frequent_caption(train_captions: Sequence[Sequence[str]]) -> str:
    """The caption string seen most often in training (ties: the first seen)."""
    counts = Counter(tokenize(c) for caps in train_captions for c in caps)
    return counts.most_common(1)[0][0]


def nearest_neighbour_captions(
    query: torch.Tensor, bank: torch.Tensor, bank_captions: Sequence[Sequence[str]], k: int = 5
) -> list[str]:
    """For each query embedding (Q, D), the consensus caption of its k nearest training images
    (Devlin et al. 2015): among the k neighbours' captions, the one with the highest mean n-gram
    (1-4) cosine to the others."""
    q, b = F.normalize(query.float(), dim=-1), F.normalize(bank.float(), dim=-1)
    out = []
    for i in range(0, len(q), 1024):
        top = (q[i : i + 1024] @ b.T).topk(k, dim=-1).indices  # (q, k)
        for row in top.tolist():
            cands = [tokenize(c) for j in row for c in bank_captions[j]]
            out.append(cands[consensus_index([c.split() for c in cands])])
    return out


# ---------------------------------------------------------------------------------------------
# generation and evaluation


def scene_pixels(vision: Any, images: torch.Tensor) -> list[torch.Tensor]:
    """uint8 (N, H, W, 3) scenes -> per scene one tile (1, 3, H, W), normalised with the
    `VisionConfig`'s mean and std."""
    return list(normalize(images, vision.image_mean, vision.image_std)[:, None])


def generate_captions(
    model: Any, images: torch.Tensor, *, batch_size: int = 256, **decode_args: Any
) -> list[str]:
    """Captions of uint8 scenes (N, H, W, 3); `decode_args` go to `VLM.generate` (default
    `CAPTION_DECODING`: beam search with 3 beams, as captioning results are usually reported)."""
    from polysense.data.chat import CAPTION_INSTRUCTION, chat_prompt

    prompt = chat_prompt(CAPTION_INSTRUCTION)
    decode_args = CAPTION_DECODING | decode_args
    out: list[str] = []
    for i in range(0, len(images), batch_size):
        pix = scene_pixels(model.cfg.vision, images[i : i + batch_size])
        out += model.generate(pix, [prompt] * len(pix), **decode_args)
    return out


@torch.no_grad()
def pooled_features(model: Any, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The VLM's vision tower pooled as in its CLIP (cls token after the final LayerNorm)."""
    feats = []
    for pix in torch.cat(scene_pixels(model.cfg.vision, images)).split(batch_size):
        feats.append(model.visual(pix.to(model.device)).float().cpu())
    return torch.cat(feats)


def evaluate(
    model: Any, data: Any, *, train: Any, batch_size: int = 256, clip: Any = None
) -> dict[str, Any]:
    """Captions of `data` (a data.instruct.SplitData; `CAPTION_DECODING`) scored against its
    references, beside greedy captions (`metrics["greedy"]`) and the nearest-neighbour (over
    `train`, when given) and most-frequent-caption baselines. The neighbours are found with
    `clip.encode_image` when a CLIP model is given, else with the VLM's own ViT."""
    captions = generate_captions(model, data.images, batch_size=batch_size)
    metrics: dict[str, Any] = caption_metrics(data.captions, captions)
    greedy = generate_captions(model, data.images, batch_size=batch_size, strategy="greedy")
    metrics["greedy"] = caption_metrics(data.captions, greedy)
    if train is not None:  # a source without splits has no training captions to draw on
        if clip is not None:
            q, bank = clip_features(clip, data.images), clip_features(clip, train.images)
        else:
            q, bank = pooled_features(model, data.images), pooled_features(model, train.images)
        nn_caps = nearest_neighbour_captions(q, bank, train.captions)
        metrics["baseline_nn"] = caption_metrics(data.captions, nn_caps)
        frequent = most_frequent_caption(train.captions)
        metrics["baseline_most_frequent"] = caption_metrics(data.captions, [frequent] * len(data))
        metrics["baseline_most_frequent"]["caption"] = frequent
    metrics["examples"] = [
        {"key": k, "generated": c, "references": r}
        for k, c, r in zip(data.keys[:8], captions[:8], data.captions[:8], strict=False)
    ]
    metrics["captions"] = captions
    return metrics


@torch.no_grad()
def clip_features(clip: Any, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """CLIP image embeddings (N, D) of uint8 scenes."""
    pix = torch.cat(scene_pixels(clip.cfg.vision, images))
    return torch.cat([clip.encode_image(x).float().cpu() for x in pix.split(batch_size)])


def read_coco_captions(path: str | Path, *, limit: int | None = None) -> list[dict[str, Any]]:
    """The images of a COCO captions file that have captions, each with its file name and its
    reference captions (one-line errors name the file, the entry and the field)."""
    from polysense.eval.formats import field, read_json

    fix = "a COCO captions file has images[] of {id, file_name} and annotations[] of {image_id, caption}"
    doc = read_json(path, "a COCO captions JSON (captions_val2014.json)")
    refs: dict[Any, list[str]] = {}
    for i, a in enumerate(field(doc, "annotations", str(path), fix)):
        where = f"{path}: annotations[{i}]"
        refs.setdefault(field(a, "image_id", where, fix), []).append(
            str(field(a, "caption", where, fix))
        )
    out = []
    for i, im in enumerate(field(doc, "images", str(path), fix)):
        where = f"{path}: images[{i}]"
        image_id = field(im, "id", where, fix)
        if refs.get(image_id):
            file_name = str(field(im, "file_name", where, fix))
            out.append({"image_id": image_id, "file_name": file_name, "references": refs[image_id]})
    if not out:
        raise PolysenseError(f"{path}: no image has a caption in 'annotations'; {fix}")
    return out[:limit] if limit else out


def evaluate_coco(
    model: Any, items: Sequence[dict[str, Any]], image_root: Path | None, *, batch_size: int = 256
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """BLEU-1..4 and CIDEr-D of the model's captions (`CAPTION_DECODING`) of `read_coco_captions`'
    images against their references, and the captions as COCO results [{image_id, caption}]."""
    from polysense.data.chat import CAPTION_INSTRUCTION, chat_prompt
    from polysense.eval.formats import open_image

    prompt = chat_prompt(CAPTION_INSTRUCTION)
    captions: list[str] = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        images = [
            open_image(image_root, q["file_name"], f"image_id {q['image_id']}") for q in chunk
        ]
        captions += model.generate(images, [prompt] * len(images), **CAPTION_DECODING)
    metrics: dict[str, Any] = caption_metrics([q["references"] for q in items], captions)
    metrics["caption_n_images"] = len(items)
    results = [
        {"image_id": q["image_id"], "caption": c} for q, c in zip(items, captions, strict=True)
    ]
    return metrics, results


def eval_task(
    *,
    ckpt: Path,
    data: str,
    split: str | None,
    batch_size: int,
    limit: int | None,
    clip: Path | None,
    image_root: Path | None = None,
    results: Path | None = None,
) -> dict[str, Any]:
    """`polysense eval caption`: BLEU-1..4 and CIDEr-D on a split, with both baselines (trained
    on the source's train split); on a COCO captions file against its references."""
    from polysense.data.instruct import load_split
    from polysense.data.readers import detect_format
    from polysense.eval.formats import SPLIT_FORMATS, no_split
    from polysense.fileio import atomic_write_json
    from polysense.models.checkpoint import load_vlm

    fmt = detect_format(data)
    if fmt == "coco":
        no_split(split, data, "a COCO captions file")
        if clip is not None:
            raise PolysenseError("--clip finds the baseline's neighbours in a train split; a COCO "
                                 "captions file has none: drop --clip")  # fmt: skip
        items = read_coco_captions(data, limit=limit)
        with torch.no_grad():
            metrics, captions = evaluate_coco(
                load_vlm(ckpt), items, image_root, batch_size=batch_size
            )
        if results is not None:
            atomic_write_json(results, captions)
        return metrics | {"n_samples": len(items), "split": "all"}
    if fmt not in SPLIT_FORMATS:
        no_split(split, data, f"a {fmt} source")
    if image_root is not None or results is not None:
        raise PolysenseError(
            f"--image-root/--results go with a COCO captions file; {data} is a {fmt} source"
        )
    model = load_vlm(ckpt)
    size = model.cfg.vision.image_size
    split_data = load_split(data, split, image_size=size, limit=limit)
    train = load_split(data, "train", image_size=size) if fmt in SPLIT_FORMATS else None
    clip_model = None
    if clip is not None:
        from polysense.models.checkpoint import load_model

        clip_model = load_model(clip)
    with torch.no_grad():
        metrics = evaluate(model, split_data, train=train, batch_size=batch_size, clip=clip_model)
    metrics.pop("captions")
    return metrics | {"n_samples": len(split_data), "split": split or "all"}
