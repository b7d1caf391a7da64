"""`polysense bench retrieval`: exact vs approximate search on synthetic clustered embeddings.

For each database size N: unit vectors drawn from a Gaussian mixture (so that approximate search
meets the structure it relies on, as with real embeddings), held-out queries from the same
mixture, and for the exact index (`IndexFlatIP`) and each approximate one (IVF, HNSW, built and
tuned exactly as `polysense index build` does): build and tuning time, index bytes, the process
RSS growth, single-query latency p50/p99, batched throughput, and recall@k against exact search.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from polysense.bench.report import write_report
from polysense.errors import PolysenseError
from polysense.index import ann

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (2_000, 20_000)
N_CLUSTERS = 1000
SPREAD = 0.75  # norm of the within-cluster noise relative to a unit centre
N_SINGLE = 200  # single-query latency samples


def mixture(
    n: int, dim: int, *, seed: int, n_clusters: int = N_CLUSTERS, spread: float = SPREAD
) -> np.ndarray:
    """(n, dim) float32 unit vectors: a random unit centre (fixed by `seed`) plus Gaussian noise of
    norm about `spread`, renormalised. Generated in chunks; point i depends on (seed, i // chunk)."""
    centers = np.random.default_rng(seed).standard_normal((n_clusters, dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float32)
    chunk = 100_000
    for c, start in enumerate(range(0, n, chunk)):
        rng = np.random.default_rng([seed, 1, c])
        m = min(chunk, n - start)
        noise = rng.standard_normal((m, dim), dtype=np.float32) * (spread / np.sqrt(dim))
        x = centers[rng.integers(0, n_clusters, m)] + noise  # (m, dim)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _latency(
    index: Any, params: dict[str, Any], queries: np.ndarray, k: int
) -> tuple[dict[str, float], np.ndarray]:
    """Single-query p50/p99 (ms) over the first N_SINGLE queries, with one faiss thread (as a
    server running each request in its own thread: faiss's OpenMP team of 2 made an HNSW single
    query take ~8 ms instead of 0.05 on a loaded 2-core machine); then one batched call over
    all queries with every faiss thread."""
    faiss = ann.faiss_module()
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    times = []
    try:
        for q in queries[:N_SINGLE]:
            start = time.perf_counter()
            ann.search(index, params, q[None], k)
            times.append((time.perf_counter() - start) * 1000)
    finally:
        faiss.omp_set_num_threads(threads)
    start = time.perf_counter()
    scores, _ = ann.search(index, params, queries, k)  # (Q, k)
    batch_s = time.perf_counter() - start
    stats = {
        "single_p50_ms": float(np.percentile(times, 50)),
        "single_p99_ms": float(np.percentile(times, 99)),
        "batch_ms_per_query": batch_s * 1000 / len(queries),
        "batch_qps": len(queries) / batch_s,
    }
    return stats, scores


def _index_bytes(index: Any) -> int:
    return int(ann.faiss_module().serialize_index(index).nbytes)


def _measure(
    kind: str, data: np.ndarray, queries: np.ndarray, exact: np.ndarray | None, k: int
) -> tuple[dict[str, Any], np.ndarray]:
    rss = _rss_bytes()
    start = time.perf_counter()
    index, params = ann.build(data, kind)  # tuned on held-out stored vectors, not on `queries`
    build_s = time.perf_counter() - start
    rss_delta = _rss_bytes() - rss
    stats, scores = _latency(index, params, queries, k)
    knob = {"ivf": f"nlist={params.get('nlist')} nprobe={params.get('nprobe')}"}
    knob["hnsw"] = f"M={params.get('M')} efSearch={params.get('ef_search')}"
    row = {
        "n": len(data),
        "index": kind,
        "params": knob.get(kind, ""),
        "build_s": build_s,
        "index_mb": _index_bytes(index) / 2**20,
        "rss_delta_mb": rss_delta / 2**20,
        **stats,
        "tuned_recall": params.get("tuned_recall"),
        f"recall_at_{k}": 1.0 if exact is None else ann.recall_at_k(scores, exact, k),
    }
    return row, scores


def run_retrieval_bench(
    out: str | Path,
    *,
    sizes: Sequence[int] = DEFAULT_SIZES,
    dim: int = 128,
    n_queries: int = 1000,
    k: int = 10,
    approx: Sequence[str] = ("ivf", "hnsw"),
    seed: int = 0,
    progress: bool = True,
    index_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run the benchmark for each size, write `out/retrieval.{json,md,png}`, return the results.
    `build_s` includes IVF training and the tuning of the search knob.

    The whole default run (1e4, 1e5, 1e6 at dim 128) takes several minutes on 2 CPU cores and
    about 2 GB of memory; `sizes=QUICK_SIZES` takes seconds. With `index_dir` (a built index),
    `server_latency` also loads the HTTP service over it (needs the `serve` extra)."""
    if not sizes or any(int(n) < 2 * k for n in sizes):
        raise PolysenseError(f"sizes={list(sizes)}: each must be at least 2k = {2 * k}")
    if any(a not in ("ivf", "hnsw") for a in approx):
        raise PolysenseError(f"approx={list(approx)}: choose among 'ivf' and 'hnsw'")
    if n_queries < 1 or dim < 2 or k < 1:
        raise PolysenseError(f"n_queries={n_queries}, dim={dim}, k={k}: must be positive")
    rows = []
    for n in sorted(int(s) for s in sizes):
        start = time.perf_counter()
        points = mixture(n + n_queries, dim, seed=seed)
        data, queries = points[:n], points[n:]  # held-out queries from the same mixture
        gen_s = time.perf_counter() - start
        flat, exact = _measure("flat", data, queries, None, k)
        rows.append({**flat, "data_s": gen_s})
        if progress:
            print(f"bench retrieval: n={n} flat p50 {flat['single_p50_ms']:.2f} ms", flush=True)
        for kind in approx:
            row, _ = _measure(kind, data, queries, exact, k)
            rows.append(row)
            if progress:
                print(
                    f"bench retrieval: n={n} {kind} build {row['build_s']:.1f} s, "
                    f"recall@{k} {row[f'recall_at_{k}']:.3f}, p50 {row['single_p50_ms']:.2f} ms",
                    flush=True,
                )
        del points, data, queries
    largest = max(int(s) for s in sizes)
    at_largest = [r for r in rows if r["n"] == largest and r["index"] != "flat"]
    results = {
        "config": {
            "sizes": sorted(int(s) for s in sizes),
            "dim": dim,
            "n_queries": n_queries,
            "k": k,
            "approx": list(approx),
            "n_clusters": N_CLUSTERS,
            "spread": SPREAD,
            "seed": seed,
            "target_recall": ann.TARGET_RECALL,
            "single_query_faiss_threads": 1,
            "batch_faiss_threads": ann.faiss_module().omp_get_max_threads(),
        },
        "meets_target_at_largest": {
            r["index"]: r[f"recall_at_{k}"] >= ann.TARGET_RECALL for r in at_largest
        },
        "rows": rows,
    }

    def plot(ax: Any) -> None:
        for kind in ("flat", *approx):
            mine = [r for r in rows if r["index"] == kind]
            ax.plot([r["n"] for r in mine], [r["single_p50_ms"] for r in mine], "o-", label=kind)
        ax.set(xscale="log", yscale="log", xlabel="vectors in the index")
        ax.set(ylabel="single-query latency p50 (ms)", title=f"top-{k} search, dim {dim}")
        ax.legend()

    notes = (
        f"Synthetic unit vectors (Gaussian mixture: {N_CLUSTERS} clusters, noise norm {SPREAD}), "
        f"dim {dim}, {n_queries} held-out queries, recall@{k} against exact search; approximate "
        "indexes tuned as `polysense index build` does: the smallest nprobe / efSearch reaching "
        f"recall {ann.TARGET_RECALL} + {ann.TUNE_MARGIN} on {ann.TUNE_QUERIES} held-out stored "
        "vectors (`tuned_recall`; the grid ends at nprobe = nlist, efSearch = 1024). Single "
        "queries run with one faiss thread, batches with all."
    )
    if index_dir is not None:
        server = results["server"] = server_latency(index_dir, k=k)
        notes += (
            f"\n\nHTTP service over {index_dir} (text queries, k={k}): one request at a time "
            f"p50 {server['sequential_p50_ms']:.2f} ms (http.client; httpx "
            f"{server['sequential_httpx_p50_ms']:.2f} ms) against "
            f"{server['direct_encode_search_p50_ms']:.2f} ms for encode + search in process "
            f"({server['ratio_to_encode_search']:.2f}x; httpx "
            f"{server['ratio_httpx_to_encode_search']:.2f}x) and "
            f"{server['direct_search_p50_ms']:.3f} ms for the search alone; "
            f"{server['concurrency']} concurrent clients: p50 {server['p50_ms']:.1f} ms, "
            f"p99 {server['p99_ms']:.1f} ms, {server['throughput_rps']:.0f} requests/s, "
            f"{server['errors']} errors."
        )
    write_report(out, "retrieval", results, rows, plot, title="bench retrieval", notes=notes)
    return results


# --------------------------------------------------------------------- the HTTP service


def _percentiles(ms: Sequence[float]) -> tuple[float | None, float | None]:
    if not ms:
        return None, None
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def server_latency(
    index_dir: str | Path,
    *,
    n_requests: int = 400,
    concurrency: int = 8,
    k: int = 10,
    queries: Sequence[str] | None = None,
    time_limit_s: float = 120.0,
    max_wait_ms: float | None = None,
    repeats: int = 3,
) -> dict[str, Any]:
    """Loopback load on the search service over the index in `index_dir`: uvicorn in a
    background thread on a free 127.0.0.1 port, clients posting text queries to /search.

    Measures one request at a time (sequential p50, `repeats` passes over the queries) over one
    keep-alive connection of the standard library's `http.client` (what the server adds, with
    the least client cost: the ratio) and with httpx (`sequential_httpx_p50_ms`: a typical
    Python client, ~0.5-1 ms more here), then `n_requests` requests from `concurrency` threads
    sharing an httpx client: p50/p99, throughput, errors. Baselines in this process: the faiss
    search alone (`index.search` on a ready embedding) and the same work without HTTP
    (`index.search_text`: encode + search). No request is sent after `time_limit_s`.
    `max_wait_ms` overrides the service's micro-batching wait (None: its default)."""
    import http.client
    import json
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import torch

    from polysense.index import EmbeddingIndex
    from polysense.models.clip import bootstrap_captions
    from polysense.serve.app import Batching, create_app, serve_in_thread

    if n_requests < 1 or concurrency < 1 or time_limit_s <= 0:
        raise PolysenseError("server_latency: n_requests, concurrency, time_limit_s must be > 0")
    texts = list(queries) if queries else bootstrap_captions()[::7][:64]
    index = EmbeddingIndex.open(index_dir)

    def timed(fn: Any, *args: Any, **kwargs: Any) -> float:
        start = time.perf_counter()
        fn(*args, **kwargs)
        return (time.perf_counter() - start) * 1000

    with torch.inference_mode():
        embs = index.model.encode_text(texts).float().numpy()  # (Q, D)
    search_ms = [timed(index.search, embs[i : i + 1], k=k) for i in range(len(texts))]
    deadline = time.monotonic() + time_limit_s
    batching = Batching() if max_wait_ms is None else Batching(max_wait_ms=max_wait_ms)
    with (
        serve_in_thread(create_app(index, batching=batching)) as url,
        httpx.Client(base_url=url, timeout=30.0) as client,
    ):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30.0)

        def request(i: int, *, lean: bool = False) -> tuple[float, int] | None:
            """(ms, HTTP status, -1 for a transport error), None once past the deadline.
            `lean`: over the keep-alive `http.client` connection instead of httpx."""
            if time.monotonic() > deadline:
                return None
            body = {"text": texts[i % len(texts)], "k": k}
            start = time.perf_counter()
            try:
                if lean:
                    conn.request(
                        "POST", "/search", json.dumps(body), {"Content-Type": "application/json"}
                    )
                    answer = conn.getresponse()
                    answer.read()
                    status = answer.status
                else:
                    status = client.post("/search", json=body).status_code
            except (httpx.HTTPError, http.client.HTTPException, OSError):
                status = -1
            return (time.perf_counter() - start) * 1000, status

        for i in range(10):  # warm-up: first-call costs stay out of the numbers
            request(i)
            request(i, lean=True)
            index.search_text([texts[i % len(texts)]], k=k)
        # One at a time, each query in process (encode + search) then over HTTP with each
        # client, interleaved so that load from elsewhere on the machine hits all sides alike.
        direct_ms, sequential, sequential_httpx = [], [], []
        for rep in range(repeats):
            for i, text in enumerate(texts):
                direct_ms.append(timed(index.search_text, [text], k=k))
                if (answer := request(rep * len(texts) + i, lean=True)) is not None:
                    sequential.append(answer)
                if (answer := request(rep * len(texts) + i)) is not None:
                    sequential_httpx.append(answer)
        conn.close()
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            loaded = [r for r in pool.map(request, range(n_requests)) if r is not None]
        wall_s = time.perf_counter() - start
    index.close()
    ok_ms = [ms for ms, status in loaded if status == 200]
    p50, p99 = _percentiles(ok_ms)
    seq_p50, _ = _percentiles([ms for ms, status in sequential if status == 200])
    httpx_p50, _ = _percentiles([ms for ms, status in sequential_httpx if status == 200])
    search_p50, _ = _percentiles(search_ms)
    direct_p50, _ = _percentiles(direct_ms)
    return {
        "index_dir": str(index_dir),
        "k": k,
        "concurrency": concurrency,
        "n_requests": n_requests,
        "sent": len(loaded),
        "errors": sum(status != 200 for _, status in [*sequential, *sequential_httpx, *loaded]),
        "p50_ms": p50,
        "p99_ms": p99,
        "throughput_rps": len(ok_ms) / wall_s,
        "sequential_p50_ms": seq_p50,
        "sequential_httpx_p50_ms": httpx_p50,
        "direct_search_p50_ms": search_p50,
        "direct_encode_search_p50_ms": direct_p50,
        "ratio_to_search": seq_p50 / search_p50 if seq_p50 and search_p50 else None,
        "ratio_to_encode_search": seq_p50 / direct_p50 if seq_p50 and direct_p50 else None,
        "ratio_httpx_to_encode_search": httpx_p50 / direct_p50
        if httpx_p50 and direct_p50
        else None,
        "goal_ratio": 1.5,
        "max_wait_ms": batching.max_wait_ms,
    }
