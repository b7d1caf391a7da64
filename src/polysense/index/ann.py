"""faiss indexes over unit embeddings: exact inner product, IVF or HNSW, chosen by size.

Exact search (`IndexFlatIP`) is used up to `FLAT_MAX` vectors; beyond that an approximate index
whose search knob (IVF `nprobe`, HNSW `efSearch`) is tuned on the data: the smallest setting
whose recall@10 against exact search reaches `TARGET_RECALL` (plus a margin) on held-out
queries. Recall is tie-aware (a result counts when its score reaches the exact k-th score), so
duplicated captions do not depress it. faiss ids are row numbers. faiss is imported lazily so
`import polysense` stays light.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from polysense.errors import PolysenseError

INDEX_TYPES = ("auto", "flat", "ivf", "hnsw")
FLAT_MAX = 100_000  # exact search up to this many vectors per modality
TARGET_RECALL = 0.95
# The knob is tuned to TARGET_RECALL + TUNE_MARGIN on 500 held-out queries: recall varies from
# one query set to another (by cluster), and new queries should still get TARGET_RECALL.
TUNE_MARGIN = 0.02
TUNE_QUERIES = 500
IVF_TRAIN_PER_LIST = 64  # k-means training sample: this many vectors per list at most
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
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
    """An empty faiss index of `kind` for `vectors` (N, D) (IVF: trained on a sample of them)."""
    faiss = faiss_module()
    n, d = vectors.shape
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexFlatIP(d), {"type": "flat"}
    if kind == "ivf":
        nlist = ivf_nlist(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, ip)
        index.cp.seed = seed
        index.cp.min_points_per_centroid = 1  # small test indexes train without warnings
        n_train = min(n, nlist * IVF_TRAIN_PER_LIST)
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, n_train, replace=False)) if n_train < n else slice(None)
        index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))  # (n_train, D)
        return index, {"type": "ivf", "nlist": nlist, "nprobe": nlist, "n_train": int(n_train)}
    if kind == "hnsw":
        graph = faiss.IndexHNSWFlat(d, HNSW_M, ip)
        graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        params = {"type": "hnsw", "M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION}
        return faiss.IndexIDMap(graph), {**params, "ef_search": HNSW_EFS[-1]}  # ids = rows
    raise PolysenseError(f"unknown index type {kind!r}; one of flat, ivf, hnsw")


def build(
    vectors: np.ndarray,
    kind: str,
    *,
    cross_queries: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[Any, dict[str, Any]]:
    """A filled index of `kind` over `vectors` (faiss ids = row numbers), tuned if approximate."""
    index, params = create(vectors, kind, seed=seed)
    return index, extend(index, params, vectors, 0, cross_queries=cross_queries, seed=seed)


def _add_rows(index: Any, vectors: np.ndarray, rows: np.ndarray, chunk: int = 65_536) -> None:
    """Add `vectors[rows]` with ids = rows, in chunks (a memory map is never copied whole)."""
    flat = isinstance(index, faiss_module().IndexFlat)
    for start in range(0, len(rows), chunk):
        ids = rows[start : start + chunk]
        block = np.ascontiguousarray(vectors[ids], dtype=np.float32)  # (chunk, D)
        if flat:
            index.add(block)  # flat ids are positions: rows arrive in order
        else:
            index.add_with_ids(block, ids.astype(np.int64))


def extend(
    index: Any,
    params: dict[str, Any],
    vectors: np.ndarray,
    start: int,
    *,
    cross_queries: np.ndarray | None = None,
    k: int = 10,
    target: float = TARGET_RECALL + TUNE_MARGIN,
    n_queries: int = TUNE_QUERIES,
    seed: int = 0,
) -> dict[str, Any]:
    """Add rows `vectors[start:]` (the index holds the rows before) and return `params` with the
    search knob re-tuned: the smallest nprobe / efSearch whose recall@k against exact search
    reaches `target` on every query set.

    The query sets are held out: a random sample of the new rows, added only after tuning (a
    stored vector finds itself and its graph neighbours too easily), and `cross_queries` (the
    other modality's embeddings: text queries of an image index sit elsewhere, across the
    modality gap). The result carries `tuned_recall` (the lowest measured; None when there are
    too few rows to measure, and the search is then exhaustive) and `tuned_k`."""
    new = np.arange(start, len(vectors))
    if params["type"] == "flat":
        _add_rows(index, vectors, new)
        return params
    n_held = min(n_queries, len(new) // 5)
    if len(vectors) - n_held <= k:
        _add_rows(index, vectors, new)
        knob = (
            {"nprobe": params["nlist"]} if params["type"] == "ivf" else {"ef_search": HNSW_EFS[-1]}
        )
        return {**params, **knob, "tuned_recall": None, "tuned_k": k}
    rng = np.random.default_rng(seed)
    held = np.sort(rng.choice(new, n_held, replace=False))
    _add_rows(index, vectors, np.setdiff1d(new, held))
    sets = [np.ascontiguousarray(vectors[held], dtype=np.float32)] if n_held else []
    if cross_queries is not None and len(cross_queries):
        pick = rng.choice(len(cross_queries), min(n_queries, len(cross_queries)), replace=False)
        sets.append(np.ascontiguousarray(cross_queries[np.sort(pick)], dtype=np.float32))
    exact = [_exact_without(vectors, q, k, held) for q in sets]  # (Q, k) each
    if params["type"] == "ivf":
        name, grid = "nprobe", [p for p in IVF_NPROBES if p < params["nlist"]] + [params["nlist"]]
    else:
        name, grid = "ef_search", list(HNSW_EFS)
    best = params
    for value in grid:
        trial = {**params, name: value}
        recalls = [
            recall_at_k(search(index, trial, q, k)[0], e, k)
            for q, e in zip(sets, exact, strict=True)
        ]
        best = {**trial, "tuned_recall": round(min(recalls, default=1.0), 4), "tuned_k": k}
        if best["tuned_recall"] >= target:
            break
    _add_rows(index, vectors, held)
    return best


def search(
    index: Any, params: dict[str, Any], queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(Q, D) queries -> (Q, k) scores and (Q, k) row ids (-1 where fewer than k were found).

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
    """Brute-force (Q, k) top inner products and ids, without building an index (faiss.knn)."""
    faiss = faiss_module()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    return faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)


def _exact_without(
    vectors: np.ndarray, queries: np.ndarray, k: int, held: np.ndarray
) -> np.ndarray:
    """(Q, k) exact top scores over the rows of `vectors` not in `held` (those not indexed yet)."""
    scores, ids = exact_topk(vectors, queries, min(len(vectors), k + len(held)))  # (Q, k + H)
    scores = np.where(np.isin(ids, held), -np.inf, scores)
    return -np.sort(-scores, axis=1)[:, :k]


def recall_at_k(approx_scores: np.ndarray, exact_scores: np.ndarray, k: int) -> float:
    """Tie-aware recall@k: the fraction of the approximate top k (exact-valued scores, very
    negative for a missing result) that reach the exact k-th score of their query."""
    kth = exact_scores[:, k - 1 : k]  # (Q, 1)
    hits = approx_scores[:, :k] >= kth - 1e-6  # (Q, k)
    return float(hits.sum()) / hits.size
