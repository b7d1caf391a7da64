"""Text-to-image: Fréchet distance, probes, exact resume, eval keys, generate and the sweep bench."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from polysense.cli import app
from polysense.config import apply_overrides
from polysense.errors import PolysenseError
from polysense.eval.t2i import fid_embed, fit_linear_probe, frechet_distance
from polysense.presets import get_preset


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is faster, and avoids OpenMP spin-waits on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_T2I = [
    "model.channels=8,16,16",
    "model.heads=2",
    "model.timesteps=50",
    "train.batch_size=4",
    "train.steps=4",
    "train.warmup_steps=1",
    "train.ckpt_every=2",
    "train.log_every=1",
    "train.max_minutes=0",
    "train.threads=0",
]


def test_frechet_distance_matches_hand_computed_cases():
    # 1-D: (m1 - m2)^2 + s1 + s2 - 2 sqrt(s1 s2) = 4 + 4 + 9 - 2 * 6 = 5
    assert frechet_distance(
        np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])
    ) == pytest.approx(5.0)
    # diagonal: sum over dims of (m1 - m2)^2 + (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expect = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # 5 + 4 + 1 = 10
    assert expect == pytest.approx(10.0)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect)
    # a rotation of both covariances (non-diagonal, commuting) leaves the distance unchanged
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    got = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expect)


def test_fid_embed_is_zero_for_identical_sets_and_grows_with_a_shift():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert abs(fid_embed(x, x)) < 1e-6
    assert fid_embed(x, x + 1.0) == pytest.approx(8.0, rel=1e-6)  # ||shift||^2, same covariance


def test_linear_probe_separates_separable_classes():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    labels = torch.arange(200) % 4
    feats = centres[labels] + 0.3 * torch.randn(200, 16, generator=g)
    probe = fit_linear_probe(feats[:100], labels[:100], 4)
    assert (probe(feats[100:]).argmax(-1) == labels[100:]).float().mean() == 1.0


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from polysense.data.world import generate_world

    out = tmp_path_factory.mktemp("t2i_world")
    generate_world(out, n=200, modalities=("image", "text"), workers=1, progress=False)
    return out


def _clip(path: Path, seed: int) -> Path:
    from helpers import tiny_config
    from polysense.models.checkpoint import save_checkpoint
    from polysense.models.clip import build_model

    cfg = tiny_config("clip-tiny", "model.text.context_length=32")
    torch.manual_seed(seed)
    return save_checkpoint(build_model(cfg), cfg, path)


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> tuple[Path, Path]:
    """A conditioning text tower and a separately initialised judge (random tiny CLIPs)."""
    root = tmp_path_factory.mktemp("towers")
    return _clip(root / "tower", 0), _clip(root / "judge", 1)


def _cfg(tower: Path, *extra: str):
    return apply_overrides(get_preset("t2i-tiny"), [*TINY_T2I, f"text_ckpt={tower}", *extra])


@pytest.fixture(scope="module")
def trained(world, towers, tmp_path_factory) -> Path:
    from polysense.train.t2i import train_t2i

    out = tmp_path_factory.mktemp("t2i_run")
    train_t2i(_cfg(towers[0]), data=world, out=out, progress=False)
    return out


def test_resume_reproduces_the_uninterrupted_run(world, towers, trained, tmp_path):
    from safetensors.torch import load_file

    from polysense.train.t2i import train_t2i

    out = tmp_path / "resumed"
    train_t2i(_cfg(towers[0], "train.steps=2"), data=world, out=out, progress=False)
    summary = train_t2i(_cfg(towers[0]), data=world, out=out, resume=True, progress=False)
    assert summary["train_steps"] == 4
    a = load_file(trained / "model.safetensors")
    b = load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    full = torch.load(trained / "state.pt", weights_only=False)["model"]
    half = torch.load(out / "state.pt", weights_only=False)["model"]
    assert all(torch.equal(full[k], half[k]) for k in full)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_time_budget_stops_and_saves(world, towers, tmp_path):
    from polysense.train.t2i import train_t2i

    summary = train_t2i(
        _cfg(towers[0], "train.max_minutes=1e-9", "train.steps=100"),
        data=world,
        out=tmp_path,
        progress=False,
    )
    assert summary["stopped_early"] and summary["train_steps"] == 0
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "text/config.json").is_file()


def test_generator_is_seeded_and_batch_independent(trained):
    from polysense.models.checkpoint import load_generator

    gen = load_generator(trained)
    prompts = ["a red circle", "a blue star", "a green square"]
    a = gen.generate(prompts, steps=2, seed=3, batch_size=3)
    b = gen.generate(prompts, steps=2, seed=3, batch_size=2)
    c = gen.generate(prompts, steps=2, seed=4, batch_size=3)
    assert a.shape == (3, 32, 32, 3) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eval_task_writes_the_keys(trained, towers, world):
    from polysense.eval.t2i import eval_task

    m = eval_task(ckpt=trained, data=str(world), split=None, batch_size=8, limit=3, clip=towers[1])
    keys = ["attribute_accuracy", "attribute_accuracy_unguided", "clip_score", "fid_embed"]
    for part in (m, m["test_novel"]):
        for key in [*keys, "probe_accuracy_real", "clip_score_real", "fid_embed_real"]:
            assert math.isfinite(part[key]), key
        for key in ("attribute_accuracy", "attribute_accuracy_unguided", "probe_accuracy_real"):
            assert 0.0 <= part[key] <= 1.0
        assert part["n_prompts"] == 3
    assert m["split"] == "test"


def test_eval_refuses_the_generators_own_tower_as_judge(trained, towers, world):
    from polysense.eval.t2i import eval_task

    with pytest.raises(PolysenseError, match="same weights"):
        eval_task(ckpt=trained, data=str(world), split=None, batch_size=8, limit=2, clip=towers[0])
    with pytest.raises(PolysenseError, match="--clip"):
        eval_task(ckpt=trained, data=str(world), split=None, batch_size=8, limit=2, clip=None)


def test_generate_command_writes_a_labelled_grid(trained, tmp_path):
    out = tmp_path / "grid.png"
    args = ["generate", "--ckpt", str(trained), "a red circle", "--n", "3", "--out", str(out)]
    res = CliRunner().invoke(app, [*args, "--seed", "1", "--steps", "2", "--columns", "2"])
    assert res.exit_code == 0, res.output
    grid = Image.open(out)
    # the title wraps to two 14 px lines at 44 characters, then 2 x 2 cells of 4x scale, labelled
    assert grid.size == (2 * (128 + 4) + 4, 2 * 14 + 2 * (128 + 14 + 4) + 4)
    res = CliRunner().invoke(app, ["generate", "--ckpt", str(tmp_path), "x", "--out", str(out)])
    assert isinstance(res.exception, PolysenseError)  # cli.main prints it in one line, exit 2
    assert "not a text-to-image checkpoint" in str(res.exception)


def test_bench_t2i_guidance_writes_report(trained, towers, world, tmp_path):
    args = ["bench", "t2i-guidance", "--ckpt", str(trained), "--clip", str(towers[1])]
    args += ["--data", str(world), "--out", str(tmp_path), "--limit", "2", "--steps", "2"]
    res = CliRunner().invoke(app, [*args, "--scales", "0,1,3"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "t2i-guidance.json").read_text())
    assert [(r["split"], r["guidance"]) for r in report["table"]] == [
        (s, g) for s in ("test", "test_novel") for g in (0.0, 1.0, 3.0)
    ]
    assert (tmp_path / "t2i-guidance.png").stat().st_size > 1000


def test_silhouette_keeps_the_shape_and_drops_the_colour():
    from polysense.data.world import BACKGROUND, COLORS
    from polysense.eval.t2i import silhouette

    img = torch.full((2, 8, 8, 3), BACKGROUND, dtype=torch.uint8)
    img[:, 2:5, 3:6] = torch.tensor(COLORS["blue"], dtype=torch.uint8)
    img[1, 2:5, 3:6] = torch.tensor(COLORS["yellow"], dtype=torch.uint8)  # same shape, other colour
    img[:, 0, 0] = BACKGROUND - 3  # background noise stays background
    out = silhouette(img)
    assert torch.equal(out[0], out[1])
    red = torch.tensor(COLORS["red"], dtype=torch.uint8)
    assert (out[0, 2:5, 3:6] == red).all()
    assert (out[0, 0, 0] == BACKGROUND).all() and int((out[0] == red).all(-1).sum()) == 9


def test_train_command_runs_the_t2i_runner_and_evaluates(world, towers, tmp_path):
    out = tmp_path / "run"
    sets = [*TINY_T2I, f"text_ckpt={towers[0]}", f"eval.clip={towers[1]}", "eval.limit=2"]
    sets += ["eval.steps=2", "train.steps=2"]
    args = ["train", "t2i-tiny", "--data", str(world), "--out", str(out)]
    res = CliRunner().invoke(app, [*args, *(x for s in sets for x in ("--set", s))])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 2 and metrics["config"]["name"] == "t2i-tiny"
    assert 0.0 <= metrics["test_novel"]["attribute_accuracy"] <= 1.0
    assert {"config.json", "model.safetensors", "state.pt", "metrics.jsonl"} <= {
        p.name for p in out.iterdir()
    }
