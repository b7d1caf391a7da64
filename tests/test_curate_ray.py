"""The Ray Data engine maps the same per-shard functions: same shards, byte for byte."""

from __future__ import annotations

import dataclasses
import json

import pytest

from polysense.data.curate import ContaminationConfig, CurateConfig, run_curate, verify_manifest
from polysense.data.noisy import build_noisy_corpus
from polysense.data.world import generate_world


@pytest.mark.slow
def test_ray_engine_matches_local(tmp_path):
    ray = pytest.importorskip("ray")
    world = tmp_path / "world"
    generate_world(world, n=600, seed=4, modalities=("image", "text"), workers=1, progress=False)
    build_noisy_corpus(world, tmp_path / "noisy", n_base=150, shard_size=40)
    cfg = CurateConfig(
        source=str(tmp_path / "noisy"),
        out=str(tmp_path / "local"),
        stages=("dedup", "safety", "recaption", "contamination", "shard"),
        shard_size=40,
        contamination=ContaminationConfig(eval_source=str(world)),
    )
    local = run_curate(cfg)
    try:
        distributed = run_curate(
            dataclasses.replace(cfg, out=str(tmp_path / "ray"), engine="ray", workers=2)
        )
    finally:
        ray.shutdown()
    assert {k: {**v, "samples_per_s": 0, "seconds": 0} for k, v in local["stages"].items()} == {
        k: {**v, "samples_per_s": 0, "seconds": 0} for k, v in distributed["stages"].items()
    }
    a, b = verify_manifest(tmp_path / "local"), verify_manifest(tmp_path / "ray")
    assert a["shards"] == b["shards"]  # same counts and sha256: the same bytes
    rejects = [(tmp_path / d / "rejects.jsonl").read_text() for d in ("local", "ray")]
    assert [json.loads(x) for x in rejects[0].splitlines()] == [
        json.loads(x) for x in rejects[1].splitlines()
    ]
