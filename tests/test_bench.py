"""Bench reports (json + md + png) and the retrieval benchmark on a tiny size list."""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_pairs, tiny_config
from polysense.bench.report import markdown_table, write_report
from polysense.bench.retrieval import SPREAD, mixture, run_retrieval_bench, server_latency
from polysense.errors import PolysenseError
from polysense.index import ann, build_index
from polysense.models.checkpoint import save_checkpoint
from polysense.models.clip import build_model


def test_write_report_writes_three_files(tmp_path):
    table = [{"n": 10, "latency_ms": 0.123456}, {"n": 100, "index": "ivf"}]
    drawn = []

    def plot(ax):
        drawn.append(ax)
        ax.plot([1, 2], [3, 4])

    paths = write_report(tmp_path / "out", "demo", {"answer": 42}, table, plot, notes="Some notes.")
    assert sorted(paths) == ["json", "md", "png"] and len(drawn) == 1
    data = json.loads(paths["json"].read_text())
    assert data["answer"] == 42 and data["table"] == table and data["name"] == "demo"
    env = data["environment"]
    assert env["cpu_count"] >= 1 and env["versions"]["numpy"] == np.__version__
    assert {"torch", "faiss-cpu", "polysense"} <= set(env["versions"])
    md = paths["md"].read_text()
    assert md.startswith("# demo\n\nSome notes.\n")
    assert "| n | latency_ms | index |" in md and "| 10 | 0.1235 |  |" in md
    assert "| 100 |  | ivf |" in md
    with Image.open(paths["png"]) as png:
        assert png.format == "PNG" and png.size[0] > 100
    for path in paths.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "demo.json",
        "demo.md",
        "demo.png",
    ]  # no temporary files left behind
    assert "png" not in write_report(tmp_path / "noplot", "x", {}, table)


def test_markdown_table_columns_in_first_seen_order():
    text = markdown_table([{"b": 1, "a": 2.0}, {"c": None, "a": 1e-9}])
    assert text.splitlines() == [
        "| b | a | c |",
        "| --- | --- | --- |",
        "| 1 | 2 |  |",
        "|  | 1e-09 |  |",
    ]


def test_mixture_is_clustered_unit_vectors():
    x = mixture(3000, 64, seed=3)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(x, mixture(3000, 64, seed=3))
    assert not np.array_equal(x, mixture(3000, 64, seed=4))
    # a point's nearest neighbour is far closer than a random pair (clusters exist):
    # same-cluster cosine is about 1 / (1 + spread^2), a random pair's about 0
    sims = x[:200] @ x.T
    np.fill_diagonal(sims[:, :200], -1)
    assert np.median(sims.max(1)) > 0.5 / (1 + SPREAD**2)
    assert abs(float(np.median(sims))) < 0.1


def test_retrieval_bench_quick(tmp_path):
    result = run_retrieval_bench(tmp_path, sizes=(3000,), dim=32, n_queries=200, progress=False)
    rows = result["rows"]
    assert [r["index"] for r in rows] == ["flat", "ivf", "hnsw"]
    flat = rows[0]
    assert flat["recall_at_10"] == 1.0
    # an exact index stores n x dim float32 and little else
    assert flat["index_mb"] == pytest.approx(3000 * 32 * 4 / 2**20, rel=0.01)
    for row in rows:
        assert 0 < row["single_p50_ms"] <= row["single_p99_ms"] and row["batch_qps"] > 0
    for row in rows[1:]:  # tuned on held-out stored vectors, measured on fresh queries
        assert row["recall_at_10"] >= ann.TARGET_RECALL
    saved = json.loads((tmp_path / "retrieval.json").read_text())
    assert saved["rows"] == saved["table"] == json.loads(json.dumps(rows))
    assert saved["config"]["sizes"] == [3000]
    assert "| 3000 | flat |" in (tmp_path / "retrieval.md").read_text()
    assert (tmp_path / "retrieval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "kwargs",
    [{"sizes": ()}, {"sizes": (5,)}, {"approx": ("annoy",)}, {"n_queries": 0}],
)
def test_retrieval_bench_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(PolysenseError):
        run_retrieval_bench(tmp_path, **{"sizes": (100,), **kwargs})


def test_server_latency_over_a_tiny_index(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    torch.manual_seed(0)
    cfg = tiny_config()
    ckpt = save_checkpoint(build_model(cfg), cfg, tmp_path / "ckpt")
    build_index(ckpt, make_pairs(tmp_path / "pairs", 12), tmp_path / "index", progress=False)
    texts = ["a red circle", "a blue square", "green"]
    result = server_latency(tmp_path / "index", n_requests=24, concurrency=4, k=3, queries=texts)
    assert result["sent"] == 24 and result["errors"] == 0
    assert 0 < result["direct_search_p50_ms"] < result["direct_encode_search_p50_ms"]
    assert result["p50_ms"] <= result["p99_ms"] and result["throughput_rps"] > 0
    assert result["ratio_to_search"] == pytest.approx(
        result["sequential_p50_ms"] / result["direct_search_p50_ms"]
    )
    # both sequential clients got answers: every sequential request of each is counted
    assert result["sequential_httpx_p50_ms"] > 0 and result["ratio_httpx_to_encode_search"] > 0
    # bounded: past the time limit nothing more is sent, and nothing fails for it
    late = server_latency(tmp_path / "index", n_requests=50, queries=texts, time_limit_s=1e-6)
    assert late["sent"] == 0 and late["errors"] == 0
