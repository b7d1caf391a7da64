"""Image-text retrieval Recall@K with several captions per image (CLIP_benchmark semantics).

Image -> text: an image query is correct at K if ANY of its captions is among its top K texts.
Text -> image: a caption query is correct at K if its own image is among its top K images.
Scores are dot products (cosine similarity for the L2-normalised embeddings models return).

Ties are scored against the query: the rank of a query is the number of wrong candidates whose
score is greater than or equal to its best correct candidate, and the query is correct at K when
that rank is below K. A collapsed model (every score equal) therefore gets no credit.

Queries are processed in blocks so that the full (N, M) score matrix is never held at once:
peak extra memory is about `block_size * max(N, M) * 4` bytes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from polysense.errors import PolysenseError
from polysense.eval.zeroshot import encode_images, encode_texts, eval_mode, fraction, progress_bar

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


class SharedCaptionWarning(UserWarning):
    """The same caption text belongs to several images, so image->text ranks have ties."""


def shared_captions(texts: Sequence[str], owner: Sequence[int]) -> list[str]:
    """The caption texts that belong to more than one image, in first-seen order."""
    owners: dict[str, set[int]] = {}
    for text, image in zip(texts, owner, strict=True):
        owners.setdefault(text, set()).add(image)
    return [text for text, images in owners.items() if len(images) > 1]


def _check_inputs(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor) -> None:
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise PolysenseError(
            f"retrieval: image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)} "
            "must be (N, D) and (M, D) with the same D"
        )
    n, m = image_emb.shape[0], text_emb.shape[0]
    if n == 0 or m == 0:
        raise PolysenseError(f"retrieval needs at least one image and one caption (got {n}, {m})")
    if text_to_image.shape != (m,) or text_to_image.dtype not in (torch.int32, torch.int64):
        raise PolysenseError(
            f"retrieval: text_to_image must be an integer tensor of shape ({m},), "
            f"got {text_to_image.dtype} {tuple(text_to_image.shape)}"
        )
    if text_to_image.min() < 0 or text_to_image.max() >= n:
        raise PolysenseError(f"retrieval: text_to_image has image ids outside [0, {n})")
    orphans = (torch.bincount(text_to_image, minlength=n) == 0).nonzero().flatten()
    if len(orphans):
        raise PolysenseError(
            f"retrieval: {len(orphans)} images have no caption (first: {orphans[:5].tolist()}); "
            "every image needs at least one caption in text_to_image"
        )
    if not (torch.isfinite(image_emb).all() and torch.isfinite(text_emb).all()):
        raise PolysenseError("retrieval: embeddings contain NaN or inf")


def _count_at_least(scores: Tensor, threshold: Tensor) -> Tensor:
    """(b, K) scores, (b, 1) threshold -> (b,) how many scores are >= it; overwrites `scores`.

    An in-place compare and a float sum: several times faster on CPU than summing a bool tensor,
    and no second (b, K) buffer. A float32 sum of 0/1 values is exact below 2**24 candidates.
    """
    dtype = torch.float32 if scores.shape[1] < 2**24 else torch.float64
    return scores.ge_(threshold).sum(1, dtype=dtype).long()


def _captions_per_image(text_to_image: Tensor, n_images: int) -> Tensor:
    """(N, P) caption indices of each image, padded with -1 (P = most captions of any image)."""
    order = torch.argsort(text_to_image, stable=True)  # (M,) captions grouped by image
    counts = torch.bincount(text_to_image, minlength=n_images)  # (N,)
    starts = torch.cumsum(counts, 0) - counts  # (N,)
    owner = text_to_image[order]  # (M,)
    slot = torch.arange(len(order)) - starts[owner]  # (M,) position within its image
    index = torch.full((n_images, int(counts.max())), -1, dtype=torch.long)
    index[owner, slot] = order
    return index


def image_to_text_ranks(
    image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, *, block_size: int = 1024
) -> Tensor:
    """(N,) rank of each image's best caption: other images' captions scoring >= it."""
    captions = _captions_per_image(text_to_image.long(), image_emb.shape[0])  # (N, P)
    ranks = []
    for start in range(0, image_emb.shape[0], block_size):
        scores = image_emb[start : start + block_size] @ text_emb.T  # (b, M)
        own = captions[start : start + scores.shape[0]]  # (b, P)
        own_scores = scores.gather(1, own.clamp(min=0))  # (b, P)
        own_scores = own_scores.masked_fill(own < 0, float("-inf"))  # padding never counts
        best = own_scores.amax(1, keepdim=True)  # (b, 1)
        n_own_at_best = (own_scores >= best).sum(1)  # (b,) own captions tied with the best
        ranks.append(_count_at_least(scores, best) - n_own_at_best)  # (b,)
    return torch.cat(ranks)


def text_to_image_ranks(
    image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, *, block_size: int = 1024
) -> Tensor:
    """(M,) rank of each caption's image: other images scoring >= it."""
    text_to_image = text_to_image.long()
    ranks = []
    for start in range(0, text_emb.shape[0], block_size):
        scores = text_emb[start : start + block_size] @ image_emb.T  # (b, N)
        own = scores.gather(1, text_to_image[start : start + scores.shape[0], None])  # (b, 1)
        ranks.append(_count_at_least(scores, own) - 1)  # (b,), minus the own image
    return torch.cat(ranks)


def retrieval_metrics(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    block_size: int = 1024,
) -> dict[str, float]:
    """Recall@K both ways: ``i2t_r{k}`` over the N images, ``t2i_r{k}`` over the M captions.

    image_emb (N, D), text_emb (M, D), text_to_image (M,) the image index of each caption.
    Values are fractions in [0, 1]; a K at or above the number of candidates gives 1.0.
    """
    if block_size < 1:
        raise PolysenseError(f"block_size={block_size}: must be at least 1")
    _check_inputs(image_emb, text_emb, text_to_image)
    image_emb, text_emb = image_emb.float(), text_emb.float()
    i2t = image_to_text_ranks(image_emb, text_emb, text_to_image, block_size=block_size)  # (N,)
    t2i = text_to_image_ranks(image_emb, text_emb, text_to_image, block_size=block_size)  # (M,)
    out = {f"i2t_r{k}": fraction(i2t < k) for k in ks}
    out |= {f"t2i_r{k}": fraction(t2i < k) for k in ks}
    return out


def retrieval_eval(
    model: Any,
    samples: Iterable[dict[str, Any]],
    *,
    batch_size: int = 256,
    max_captions: int | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    block_size: int = 1024,
    progress: bool = False,
) -> dict[str, Any]:
    """Embed every sample's image and its captions (the first `max_captions` if given), then
    compute :func:`retrieval_metrics`.

    Adds ``n_samples`` (images), ``n_captions``, ``n_skipped`` (samples without an image or
    without a non-empty caption; they take no part in the ranking) and ``n_shared_captions``
    (caption texts of more than one image; a :class:`SharedCaptionWarning` says what they do).
    """
    if batch_size < 1:
        raise PolysenseError(f"batch_size={batch_size}: must be at least 1")
    if max_captions is not None and max_captions < 1:
        raise PolysenseError(f"max_captions={max_captions}: must be at least 1 (or None for all)")
    image_chunks: list[Tensor] = []
    pending: list[Any] = []
    texts: list[str] = []
    owner: list[int] = []
    n_images = n_skipped = 0
    with eval_mode(model), progress_bar(progress, "images") as advance:
        for sample in samples:
            captions = sample.get("text") or []
            if isinstance(captions, str):
                captions = [captions]
            captions = [c for c in captions if isinstance(c, str) and c.strip()][:max_captions]
            if sample.get("image") is None or not captions:
                n_skipped += 1
                continue
            pending.append(sample["image"])
            texts.extend(captions)
            owner.extend([n_images] * len(captions))
            n_images += 1
            if len(pending) == batch_size:
                image_chunks.append(encode_images(model, pending))  # (b, D)
                advance(len(pending))
                pending.clear()
        if pending:
            image_chunks.append(encode_images(model, pending))
            advance(len(pending))
    if n_images == 0:
        raise PolysenseError(
            f"retrieval evaluation got no sample with an image and a caption "
            f"({n_skipped} skipped): check --data and --split"
        )
    shared = shared_captions(texts, owner)
    if shared:
        warnings.warn(
            SharedCaptionWarning(
                f"{len(shared)} caption texts belong to more than one image (e.g. "
                f"{shared[0]!r}): an image's own caption ties with the same text under another "
                "image, and ties count against the query, so image->text recall reads lower "
                "than the model deserves (0 at K=1 when every caption is shared); make the "
                "captions of different images differ, or read i2t with this in mind"
            ),
            stacklevel=2,
        )
    image_emb = torch.cat(image_chunks)  # (N, D)
    text_emb = encode_texts(model, texts, batch_size=batch_size, progress=progress)  # (M, D)
    metrics: dict[str, Any] = retrieval_metrics(
        image_emb, text_emb, torch.tensor(owner), ks, block_size=block_size
    )
    metrics |= {"n_samples": n_images, "n_captions": len(texts), "n_skipped": n_skipped}
    metrics["n_shared_captions"] = len(shared)
    return metrics
