"""faiss indexes over unit embeddings: exact inner product, IVF or HNSW, chosen by size.

Exact search (`IndexFlatIP`) is used up to `FLAT_MAX` vectors; beyond that an approximate index
whose search knob (IVF `nprobe`, HNSW `efSearch`) is tuned on the data itself: the smallest
setting whose recall@10 against exact search reaches `TARGET_RECALL`. The tuning queries are
stored vectors searched leave-one-out (the query itself is not counted), and recall is tie-aware
(a result counts when its score reaches the exact k-th score), so duplicated captions do not
depress it. faiss is imported lazily so `import polysense` stays light.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from polysense.errors import PolysenseError

INDEX_TYPES = ("auto", "flat", "ivf", "hnsw")
FLAT_MAX = 100_000  # exact search up to this many vectors (a 1e5 x 128 scan is ~10 ms)
TARGET_RECALL = 0.95
TUNE_QUERIES = 500
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
IVF_NPROBES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048)
HNSW_EFS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)


def faiss_module() -> Any:
    """The faiss module, or a PolysenseError saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise PolysenseError(
            "the embedding index needs faiss: pip install 'polysense[index]' (faiss-cpu)"
        ) from None
    return faiss


def choose_type(n: int, requested: str = "auto") -> str:
    """'flat' up to FLAT_MAX vectors, else 'ivf'; an explicit request wins."""
    if requested not in INDEX_TYPES:
        raise PolysenseError(
            f"index_type={requested!r} is not one of {', '.join(INDEX_TYPES)}; use --index-type"
        )
    if requested != "auto":
        return requested
    return "flat" if n <= FLAT_MAX else "ivf"


def ivf_nlist(n: int) -> int:
    """About 4 sqrt(N) inverted lists, and at least 39 training points per list."""
    return max(1, min(round(4 * math.sqrt(n)), n // 39))


def create(vectors: np.ndarray, kind: str, *, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """An untuned faiss index of `kind` holding `vectors` (N, D) float32, and its parameters."""
    faiss = faiss_module()
    n, d = vectors.shape
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        index, params = faiss.IndexFlatIP(d), {"type": "flat"}
    elif kind == "ivf":
        nlist = ivf_nlist(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, ip)
        index.cp.seed = seed
        index.cp.min_points_per_centroid = 1  # small test indexes train without warnings
        n_train = min(n, nlist * 64)
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, n_train, replace=False)) if n_train < n else slice(None)
        index.train(np.ascontiguousarray(vectors[rows]))  # (n_train, D)
        params = {"type": "ivf", "nlist": nlist, "nprobe": 1, "n_train": int(n_train)}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_M, ip)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        params = {"type": "hnsw", "M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION}
        params["ef_search"] = 16
    else:
        raise PolysenseError(f"unknown index type {kind!r}; one of flat, ivf, hnsw")
    add(index, vectors)
    return index, params


def add(index: Any, vectors: np.ndarray, *, chunk: int = 65_536) -> None:
    """Append `vectors` (N, D) in chunks, so a memory map is never copied whole."""
    for start in range(0, len(vectors), chunk):
        index.add(np.ascontiguousarray(vectors[start : start + chunk], dtype=np.float32))


def search(
    index: Any, params: dict[str, Any], queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(Q, D) queries -> (Q, k) scores and (Q, k) ids (-1 where fewer than k were found).

    The search knob goes in per call (thread-safe); HNSW's efSearch is raised to k when smaller.
    """
    faiss = faiss_module()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if params["type"] == "ivf":
        knob = faiss.SearchParametersIVF(nprobe=int(params["nprobe"]))
        return index.search(queries, k, params=knob)
    if params["type"] == "hnsw":
        knob = faiss.SearchParametersHNSW(efSearch=max(int(params["ef_search"]), k))
        return index.search(queries, k, params=knob)
    return index.search(queries, k)


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force (Q, k) top inner products, without building an index (faiss.knn)."""
    faiss = faiss_module()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    return faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)


def recall_at_k(approx_scores: np.ndarray, exact_scores: np.ndarray, k: int) -> float:
    """Tie-aware recall@k: the fraction of the approximate top k (exact-valued scores, -inf for
    a missing result) that reach the exact k-th score of their query."""
    kth = exact_scores[:, k - 1 : k]  # (Q, 1)
    hits = approx_scores[:, :k] >= kth - 1e-6  # (Q, k)
    return float(hits.sum()) / hits.size


def _drop_self(scores: np.ndarray, ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """(Q, k+1) results of stored vectors -> (Q, k) scores without the query's own row."""
    out = np.empty((len(scores), k), dtype=np.float32)
    for i, (s, row) in enumerate(zip(scores, ids, strict=True)):
        keep = row != self_ids[i]
        if keep.all():
            keep[-1] = False  # the query tied with duplicates and fell out: drop the last
        out[i] = np.where(row[keep] >= 0, s[keep], -np.inf)
    return out


def tune(
    index: Any,
    params: dict[str, Any],
    vectors: np.ndarray,
    *,
    cross_queries: np.ndarray | None = None,
    k: int = 10,
    target: float = TARGET_RECALL,
    n_queries: int = TUNE_QUERIES,
    seed: int = 0,
) -> dict[str, Any]:
    """Pick the smallest nprobe / efSearch whose recall@k reaches `target` on every query set:
    stored vectors searched leave-one-out, and `cross_queries` (the other modality's embeddings:
    text queries of an image index sit elsewhere in the space, across the modality gap).

    Returns `params` with the knob set, `tuned_recall` (the lowest measured) and `tuned_k`."""
    if params["type"] == "flat" or len(vectors) <= k + 1:
        return {**params, "tuned_recall": 1.0, "tuned_k": k}
    rng = np.random.default_rng(seed)
    sets = []  # (queries (Q, D), exact (Q, k) scores, the queries' own rows or None)
    rows = np.sort(rng.choice(len(vectors), min(n_queries, len(vectors)), replace=False))
    queries = np.ascontiguousarray(vectors[rows], dtype=np.float32)  # (Q, D)
    sets.append((queries, _drop_self(*exact_topk(vectors, queries, k + 1), rows, k), rows))
    if cross_queries is not None and len(cross_queries):
        pick = rng.choice(len(cross_queries), min(n_queries, len(cross_queries)), replace=False)
        queries = np.ascontiguousarray(cross_queries[np.sort(pick)], dtype=np.float32)
        sets.append((queries, exact_topk(vectors, queries, k)[0], None))
    if params["type"] == "ivf":
        name, grid = "nprobe", [p for p in IVF_NPROBES if p < params["nlist"]] + [params["nlist"]]
    else:
        name, grid = "ef_search", list(HNSW_EFS)
    best = params
    for value in grid:
        trial = {**params, name: value}
        recalls = []
        for queries, exact, own in sets:
            if own is None:
                approx = search(index, trial, queries, k)[0]
            else:
                approx = _drop_self(*search(index, trial, queries, k + 1), own, k)
            recalls.append(recall_at_k(approx, exact, k))
        best = {**trial, "tuned_recall": round(min(recalls), 4), "tuned_k": k}
        if best["tuned_recall"] >= target:
            break
    return best
