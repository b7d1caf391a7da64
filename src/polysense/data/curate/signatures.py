"""Per-sample signatures for duplicate and leak search, and the searches themselves.

* exact: 64-bit content hashes of the decoded pixels (robust to re-encoding the same pixels) and
  of the normalised text (lower case, punctuation and extra spaces removed);
* perceptual: the 64-bit pHash of imagehash, searched at a Hamming radius with a faiss binary
  index, each candidate pair verified by the correlation of 16 x 16 RGB thumbnails (on small
  flat images the pHash alone also matches distinct scenes with the same coarse layout);
* embedding: L2-normalised image embeddings of a polysense checkpoint, searched with a faiss
  range search at a cosine threshold (exact flat search up to ``exact_limit`` vectors, an IVF
  index beyond it, so a million vectors need no n x n matrix).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from polysense.data.curate.embed import Embedder

THUMB = 16  # thumbnail side for the verification of perceptual candidates
_PUNCT = re.compile(r"[^\w\s]+")
_SPACE = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    return _SPACE.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def _h64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big", signed=True)


@dataclass
class Signatures:
    """Signatures of N samples; `emb` is (N, D) float32 or None."""

    keys: list[str]
    image_hash: np.ndarray  # (N,) int64; hash of the pixels, or of the text for text-only samples
    text_hash: np.ndarray  # (N,) int64
    phash: np.ndarray  # (N, 8) uint8 pHash bits, zeros without an image
    thumb: np.ndarray  # (N, 16*16*3) uint8
    has_image: np.ndarray  # (N,) bool
    emb: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def save(self, path: Path) -> None:
        from polysense.fileio import atomic_open

        arrays = {
            "keys": np.asarray(self.keys, dtype=str),
            "image_hash": self.image_hash,
            "text_hash": self.text_hash,
            "phash": self.phash,
            "thumb": self.thumb,
            "has_image": self.has_image,
        }
        if self.emb is not None:
            arrays["emb"] = self.emb.astype(np.float16)  # half the disk; cosines to ~1e-3
        with atomic_open(path, "wb") as fh:
            np.savez(fh, **arrays)

    @classmethod
    def load(cls, path: Path) -> Signatures:
        with np.load(path, allow_pickle=False) as z:
            return cls(
                keys=[str(k) for k in z["keys"]],
                image_hash=z["image_hash"],
                text_hash=z["text_hash"],
                phash=z["phash"],
                thumb=z["thumb"],
                has_image=z["has_image"],
                emb=z["emb"].astype(np.float32) if "emb" in z else None,
            )

    @classmethod
    def concat(cls, parts: Sequence[Signatures]) -> Signatures:
        embs = [p.emb for p in parts]
        return cls(
            keys=[k for p in parts for k in p.keys],
            image_hash=np.concatenate([p.image_hash for p in parts]),
            text_hash=np.concatenate([p.text_hash for p in parts]),
            phash=np.concatenate([p.phash for p in parts]),
            thumb=np.concatenate([p.thumb for p in parts]),
            has_image=np.concatenate([p.has_image for p in parts]),
            emb=None if any(e is None for e in embs) else np.concatenate(embs),  # type: ignore[arg-type]
        )


def compute_signatures(
    keys: Sequence[str],
    images: Sequence[Image.Image | None],
    texts: Sequence[Sequence[str]],
    *,
    embed: Embedder | None = None,
) -> Signatures:
    """Signatures of a batch of samples; embeddings only with an `embed`der."""
    import imagehash

    n = len(keys)
    image_hash = np.zeros(n, dtype=np.int64)
    text_hash = np.zeros(n, dtype=np.int64)
    phash = np.zeros((n, 8), dtype=np.uint8)
    thumb = np.zeros((n, THUMB * THUMB * 3), dtype=np.uint8)
    has_image = np.zeros(n, dtype=bool)
    for i, (im, caps) in enumerate(zip(images, texts, strict=True)):
        text = normalise_text(" | ".join(caps))
        text_hash[i] = _h64(text.encode())
        if im is None:
            image_hash[i] = text_hash[i]
            continue
        has_image[i] = True
        pixels = np.asarray(im, dtype=np.uint8)
        image_hash[i] = _h64(f"{pixels.shape}".encode() + pixels.tobytes())
        phash[i] = np.packbits(np.asarray(imagehash.phash(im).hash, dtype=bool).ravel())
        thumb[i] = np.asarray(im.resize((THUMB, THUMB), Image.BOX), dtype=np.uint8).ravel()
    emb = None
    if embed is not None:
        with_image = [i for i in range(n) if has_image[i]]
        vectors = embed.images([images[i] for i in with_image])  # (M, D)
        emb = np.zeros((n, vectors.shape[1]), dtype=np.float32)
        emb[with_image] = vectors
    return Signatures(
        keys=list(keys),
        image_hash=image_hash,
        text_hash=text_hash,
        phash=phash,
        thumb=thumb,
        has_image=has_image,
        emb=emb,
    )


def thumb_corr(thumb_a: np.ndarray, thumb_b: np.ndarray) -> np.ndarray:
    """Pearson correlation of paired thumbnails: (P, 768) x (P, 768) -> (P,)."""
    a = thumb_a.astype(np.float32)
    b = thumb_b.astype(np.float32)
    a -= a.mean(1, keepdims=True)
    b -= b.mean(1, keepdims=True)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(den, 1e-6)


# ---------------------------------------------------------------------------------------------
# searches: each returns pairs (i, j, score) with i indexing the queries and j the database


def _range_pairs(search, queries: np.ndarray, chunk: int) -> tuple[np.ndarray, ...]:
    qi, di, ds = [], [], []
    for start in range(0, len(queries), chunk):
        lims, dist, ids = search(queries[start : start + chunk])
        counts = np.diff(lims).astype(np.int64)
        qi.append(np.repeat(np.arange(start, start + len(counts)), counts))
        di.append(ids)
        ds.append(dist)
    if not qi:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(qi), np.concatenate(di).astype(np.int64), np.concatenate(ds)


def hamming_pairs(
    queries: np.ndarray,
    database: np.ndarray,
    radius: int,
    *,
    flat_limit: int = 200_000,
    chunk: int = 4096,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (q, d) with Hamming(query q, database d) <= radius; codes are (N, 8) uint8.

    A flat binary index up to `flat_limit` codes; beyond, multi-index hashing (radius + 1 substrings,
    so any pair within the radius agrees exactly on one of them: still exact, far fewer pairs).
    """
    import faiss

    if len(database) <= flat_limit:
        index = faiss.IndexBinaryFlat(64)
    else:
        nhash = min(radius + 1, 8)
        index = faiss.IndexBinaryMultiHash(64, nhash, 64 // nhash)
        index.nflip = max(0, radius // nhash)
    index.add(np.ascontiguousarray(database))
    # faiss's binary range search keeps distances strictly below the radius it is given
    q, d, dist = _range_pairs(
        lambda x: index.range_search(np.ascontiguousarray(x), radius + 1), queries, chunk
    )
    return q, d, dist.astype(np.float32)


def cosine_pairs(
    queries: np.ndarray,
    database: np.ndarray,
    threshold: float,
    *,
    exact_limit: int = 200_000,
    nprobe: int = 16,
    chunk: int = 4096,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (q, d) with cosine >= threshold (rows L2-normalised): exact flat inner-product range
    search up to `exact_limit` database vectors, IVF (sqrt(n) * 4 lists, `nprobe` probed) above:
    approximate, a pair whose vectors fall in lists not probed is missed (measured in the docs)."""
    import faiss

    dim = database.shape[1]
    database = np.ascontiguousarray(database, dtype=np.float32)
    if len(database) <= exact_limit:
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = int(4 * np.sqrt(len(database)))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = database[rng.choice(len(database), min(len(database), 40 * nlist), replace=False)]
        index.train(sample)
        index.nprobe = nprobe
    index.add(database)
    return _range_pairs(
        lambda x: index.range_search(np.ascontiguousarray(x, dtype=np.float32), threshold),
        queries,
        chunk,
    )
