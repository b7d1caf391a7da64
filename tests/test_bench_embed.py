"""`polysense bench embed`: the polysense index path and the plain Pillow + HF loop embed the same
files to the same vectors, the report's ratios are those of its own measured rates, and bad
options are one-line errors. No test asserts speed."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest

from polysense.bench.embed import (
    DIMS,
    hf_processor,
    image_paths,
    ours_pass,
    plain_pass,
    run_embed_bench,
    write_images,
)
from polysense.bench.throughput import build_pair
from test_cli_errors import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def pair():
    """clip-tiny's widths at 224 px (patch 32), ours and HF's with the same weights, fp32."""
    pair = build_pair("clip-tiny", batch=2, overrides=DIMS["clip-tiny"])
    pair.ours.inference_precision = "fp32"
    return pair


def test_index_path_and_plain_loop_give_the_same_vectors(tmp_path, pair):
    data = write_images(tmp_path, n=11)  # 320 x 256 JPEGs: resize and centre crop both run
    paths = image_paths(data)
    assert len(paths) == 11
    ours = ours_pass(pair.ours, data, batch=4, workers=2)  # (N, D), decode in 2 workers
    processor = hf_processor(pair.ours)
    plain = plain_pass(pair.hf, processor, paths, batch=3)
    with_workers = plain_pass(pair.hf, processor, paths, batch=5, workers=2)
    assert ours.shape == plain.shape == (11, pair.ours.cfg.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ours, plain, atol=1e-4)
    np.testing.assert_allclose(with_workers, plain, atol=1e-5)
    # different images give different vectors (a constant output would pass the above)
    assert np.abs(ours[0] - ours[1]).max() > 1e-2


def test_report_ratios_are_its_own_rates(tmp_path):
    results = run_embed_bench(
        tmp_path, n=6, dims="clip-tiny", batch=4, workers=1, seconds=0.01, precision="fp32"
    )
    saved = json.loads((tmp_path / "embed.json").read_text())
    assert saved["ratio"] == pytest.approx(results["ratio"])
    runs = saved["runs"]
    median = {}
    for name, passes in runs.items():
        assert len(passes) == saved["config"]["passes"] >= 2
        for p in passes:
            assert p["images"] == 6
            assert p["images_per_s"] == pytest.approx(p["images"] / p["seconds"])
        median[name] = statistics.median(p["images_per_s"] for p in passes)
    assert saved["images_per_s"] == pytest.approx(median)
    assert saved["ratio"] == pytest.approx(median["polysense"] / median["plain"])
    assert saved["ratio_vs_workers"] == pytest.approx(median["polysense"] / median["plain_workers"])
    best = {k: max(p["images_per_s"] for p in v) for k, v in runs.items()}
    assert saved["best_ratio"] == pytest.approx(best["polysense"] / best["plain"])
    assert saved["precision"] == {"polysense": "fp32", "hf": "fp32"}
    assert saved["max_abs_diff"] < 1e-4  # fp32: the three variants embed alike
    md = (tmp_path / "embed.md").read_text()
    assert f"{saved['ratio']:.4g}" in md and (tmp_path / "embed.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--dims", "clip-huge"], "--dims 'clip-huge'"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--n", "0"], "--n must be >= 1"),
        (["--num-workers", "-1"], "--num-workers must be >= 0"),
        (["--seconds", "0"], "--seconds must be > 0"),
        (["--precision", "fp16"], "--precision 'fp16'"),
        (["--data", "/no/such/data.csv"], "--data /no/such/data.csv does not exist"),
    ],
)
def test_bad_options_are_one_line_errors(capsys, tmp_path, args, needle):
    code, _, err = run_cli(capsys, "bench", "embed", "--out", str(tmp_path), *args)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "embed.json").exists()
