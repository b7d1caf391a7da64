"""The training loop: schedules, parameter groups, accumulation, locking, NaN handling, resume."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import cli_train, tiny_config
from polysense.data.loader import PairBatches, load_pairs
from polysense.errors import PolysenseError
from polysense.losses import ContrastiveLoss
from polysense.models.clip import CLIP
from polysense.train.loop import _accumulated_step, _embed, build_tokenizer, train
from polysense.train.optim import lr_factor, param_groups


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, warmup=4, total=14) == pytest.approx(0.25)
    assert lr_factor(3, warmup=4, total=14) == pytest.approx(1.0)
    assert lr_factor(4, warmup=4, total=14) == pytest.approx(1.0)
    # half-way through the cosine part: (9 - 4) / 10 = 0.5 -> 0.5 (1 + cos(pi/2)) = 0.5
    assert lr_factor(9, warmup=4, total=14) == pytest.approx(0.5)
    assert lr_factor(14, warmup=4, total=14, min_ratio=0.1) == pytest.approx(0.1)


def _model(cfg):
    torch.manual_seed(0)
    tok = build_tokenizer(cfg, [["a red circle", "a blue square", "a green square"]])
    return CLIP(cfg=cfg.model, tokenizer=tok)


def test_param_groups_no_decay_on_norms_biases_temperature_embeddings():
    cfg = tiny_config(
        "siglip-tiny", "train.lr_text=0.5", "train.lr_image=0.25", "train.weight_decay=0.2"
    )
    model = _model(cfg)
    groups = param_groups(model, cfg.train)
    decay_of = {n: g["weight_decay"] for g in groups for n in g["names"]}
    lr_of = {n: g["base_lr"] for g in groups for n in g["names"]}
    assert set(decay_of) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        no_decay = p.ndim < 2 or any(
            k in name for k in ("logit_", "token_embed", "pos_embed", "probe")
        )
        assert decay_of[name] == (0.0 if no_decay else 0.2), name
    assert decay_of["logit_scale"] == 0.0 and decay_of["logit_bias"] == 0.0
    assert lr_of["visual.blocks.0.attn.qkv.weight"] == 0.25
    assert lr_of["text_proj.weight"] == 0.5
    assert lr_of["logit_scale"] == cfg.train.lr


def test_gradient_accumulation_equals_full_batch(pairs_jsonl):
    cfg = tiny_config()
    pairs = load_pairs(pairs_jsonl, split=None, image_size=32)
    model = _model(cfg)
    batches = PairBatches(
        data=pairs,
        tokenizer=model.tokenizer,
        batch_size=16,
        seed=0,
        mean=cfg.model.vision.image_mean,
        std=cfg.model.vision.image_std,
    )
    images, ids = batches.batch(0)
    loss_fn = ContrastiveLoss(family="clip")

    img, txt, o = _embed(model, images, ids, "fp32")
    full = loss_fn(img, txt, o["logit_scale"].log(), None)
    full.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    loss, finite = _accumulated_step(model, loss_fn, images, ids, micro=4, precision="fp32")
    assert finite and loss.item() == pytest.approx(full.item(), rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_batches_are_a_function_of_step_and_ranks_split_the_global_batch(pairs_jsonl):
    cfg = tiny_config()
    pairs = load_pairs(pairs_jsonl, split=None, image_size=32)
    tok = build_tokenizer(cfg, pairs.captions)
    kw = dict(data=pairs, tokenizer=tok, batch_size=16, seed=3, mean=(0, 0, 0), std=(1, 1, 1))
    one = PairBatches(**kw)
    halves = [PairBatches(**kw, rank=r, world=2) for r in (0, 1)]
    for step in (0, 5, 4, 9):  # out of order: no hidden iterator state
        idx, cap = one.indices(step)
        parts = [h.indices(step) for h in halves]
        assert torch.equal(idx, torch.cat([p[0] for p in parts]))
        assert torch.equal(cap, torch.cat([p[1] for p in parts]))
    # one epoch visits every sample once
    seen = torch.cat([one.indices(s)[0] for s in range(one.steps_per_epoch)])
    assert len(set(seen.tolist())) == one.steps_per_epoch * 16


def _initial_weights(cfg, data) -> dict[str, torch.Tensor]:
    """The weights `train` starts from: same tokenizer build, same seed, same construction."""
    tok = build_tokenizer(cfg, load_pairs(data, split=None, image_size=32).captions)
    text = dataclasses.replace(cfg.model.text, vocab_size=tok.vocab_size)
    torch.manual_seed(cfg.train.seed)
    return CLIP(cfg=dataclasses.replace(cfg.model, text=text), tokenizer=tok).state_dict()


def test_locked_text_tower_is_bitwise_unchanged_and_unlocks_on_schedule(pairs_jsonl, tmp_path):
    cfg = tiny_config("clip-tiny", "train.lock_text=true", "train.steps=4", "train.ckpt_every=0")
    train(cfg, data=pairs_jsonl, out=tmp_path / "a", progress=False)
    init = _initial_weights(cfg, pairs_jsonl)
    state = torch.load(tmp_path / "a" / "state.pt", weights_only=False)["model"]
    text_keys = [k for k in init if k.startswith("text.")]
    assert text_keys and all(torch.equal(state[k], init[k]) for k in text_keys)
    for key in ("visual.blocks.0.attn.qkv.weight", "text_proj.weight"):  # the rest trains
        assert not torch.equal(state[key], init[key]), key

    cfg2 = tiny_config(
        "clip-tiny",
        "train.lock_text=true",
        "train.unlock_text_at=2",
        "train.steps=4",
        "train.ckpt_every=0",
    )
    train(cfg2, data=pairs_jsonl, out=tmp_path / "b", progress=False)
    state2 = torch.load(tmp_path / "b" / "state.pt", weights_only=False)["model"]
    assert not torch.equal(
        state2["text.blocks.0.attn.qkv.weight"], init["text.blocks.0.attn.qkv.weight"]
    )


def test_non_finite_loss_skips_steps_then_aborts(pairs_jsonl, tmp_path):
    cfg = tiny_config("clip-tiny", "model.init_logit_scale=nan", "train.max_bad_steps=3")
    with pytest.raises(PolysenseError, match="NaN/inf for 3 steps in a row"):
        train(cfg, data=pairs_jsonl, out=tmp_path, progress=False)


def test_training_lowers_the_loss_and_writes_a_loadable_checkpoint(pairs_jsonl, tmp_path):
    cfg = tiny_config("clip-tiny", "train.steps=30", "train.lr=3e-3")
    result = train(cfg, data=pairs_jsonl, out=tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.3, (first, last)
    assert result.steps == 30 and math.isfinite(result.final_loss)
    import polysense

    model = polysense.load(str(tmp_path))
    emb = model.encode_text(["a red circle"])
    assert emb.shape == (1, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(1))


def test_no_samples_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"image": "missing.png", "caption": "a red circle"}) + "\n")
    with pytest.raises(PolysenseError, match="no samples with both an image and a caption"):
        train(tiny_config(), data=empty, out=tmp_path / "run", progress=False)


@pytest.mark.slow
def test_kill_minus_9_then_resume_is_bitwise_equal_to_uninterrupted(pairs_jsonl, tmp_path):
    steps = [
        "--set",
        "train.steps=400",
        "--set",
        "train.ckpt_every=20",
        "--set",
        "train.log_every=20",
    ]
    ref = subprocess.run(
        cli_train(pairs_jsonl, tmp_path / "ref", *steps),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        cli_train(pairs_jsonl, out, *steps), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        state = out / "state.pt"
        if state.exists():
            metrics = out / "metrics.jsonl"
            if (
                metrics.exists() and len(metrics.read_text().splitlines()) >= 3
            ):  # past >= 1 checkpoint
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = len(metrics.read_text().splitlines()) * 20
                break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, "run ended before the kill"
    saved_step = torch.load(out / "state.pt", weights_only=False)["step"]
    assert 0 < saved_step < 400

    resumed = subprocess.run(
        cli_train(pairs_jsonl, out, *steps, "--resume"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps_logged = [
        json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps_logged == list(range(20, 401, 20))  # nothing lost, nothing logged twice


@pytest.mark.slow
def test_torchrun_two_processes_matches_one_process(pairs_jsonl, tmp_path):
    """DDP over 2 gloo processes with cross-process negatives follows the single-process run at
    the same global batch: same losses, same final weights (up to float reduction order). In fp32:
    under bf16 (the "auto" default with AMX) each process's half batch rounds differently."""
    args = [
        "--set",
        "train.steps=6",
        "--set",
        "train.ckpt_every=0",
        "--set",
        "train.precision=fp32",
    ]
    one = subprocess.run(
        cli_train(pairs_jsonl, tmp_path / "one", *args),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        *cli_train(pairs_jsonl, tmp_path / "two", *args)[2:],
    ]
    two = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert two.returncode == 0, two.stderr[-3000:]
    rows = [
        [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("one", "two")
    ]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == list(range(1, 7))
    for a, b in zip(*rows, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    wa, wb = (
        load_file(tmp_path / "one" / "model.safetensors"),
        load_file(tmp_path / "two" / "model.safetensors"),
    )
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-3, atol=1e-4, msg=key)


@pytest.mark.parametrize(
    "extra",
    [
        ("train.precision=bf16",),
        ("train.grad_checkpointing=true",),
        ("train.loss_chunk=5",),
        ("train.grad_accum=2",),
    ],
)
def test_training_options_run_and_learn(pairs_jsonl, tmp_path, extra):
    cfg = tiny_config(
        "siglip-tiny", "train.steps=20", "train.lr=3e-3", "train.ckpt_every=0", *extra
    )
    train(cfg, data=pairs_jsonl, out=tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert sum(r["loss"] for r in rows[-4:]) < sum(r["loss"] for r in rows[:4]), extra


def test_time_budget_stops_early_with_an_annealed_schedule(pairs_jsonl, tmp_path):
    cfg = tiny_config(
        "clip-tiny", "train.steps=100000", "train.max_minutes=0.05", "train.ckpt_every=0"
    )
    result = train(cfg, data=pairs_jsonl, out=tmp_path, progress=False)
    assert result.stopped_early and result.steps < 100000
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # the schedule followed the clock: the last logged lr is far below the peak
    assert rows[-1]["lr"] < 0.5 * cfg.train.lr


def test_time_limit_is_a_safety_net_that_never_bends_the_schedule(
    pairs_jsonl, tmp_path, monkeypatch
):
    """`train.time_limit_minutes` on a machine far too slow (a fake clock: every reading is 5 s
    later): the run stops at the limit and says so, and every logged lr is the step schedule's
    own, unlike `train.max_minutes`, whose decay follows the clock."""
    from polysense.train import log

    clock = iter(range(0, 10**6, 5))
    monkeypatch.setattr(log.time, "perf_counter", lambda: float(next(clock)))
    steps = 40
    cfg = tiny_config(
        "clip-tiny",
        f"train.steps={steps}",
        "train.time_limit_minutes=1",
        "train.ckpt_every=0",
        "train.log_every=1",
    )
    result = train(cfg, data=pairs_jsonl, out=tmp_path, progress=False)
    assert result.stopped_early and 0 < result.steps < steps
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    t = cfg.train
    for row in rows:
        expected = t.lr * lr_factor(
            row["step"] - 1, warmup=t.warmup_steps, total=steps, min_ratio=t.min_lr_ratio
        )
        assert row["lr"] == pytest.approx(expected, rel=1e-6)
    # the same clock under max_minutes=1: the decay runs ahead of the steps
    budget = dataclasses.replace(cfg, train=dataclasses.replace(t, time_limit_minutes=0.0))
    budget = dataclasses.replace(budget, train=dataclasses.replace(budget.train, max_minutes=1.0))
    clock = iter(range(0, 10**6, 5))
    train(budget, data=pairs_jsonl, out=tmp_path / "budget", progress=False)
    last = json.loads((tmp_path / "budget" / "metrics.jsonl").read_text().splitlines()[-1])
    follows_steps = t.lr * lr_factor(last["step"] - 1, warmup=t.warmup_steps, total=steps)
    assert last["lr"] < 0.5 * follows_steps


def test_progress_bar_follows_a_binding_time_budget(pairs_jsonl, tmp_path, monkeypatch):
    """Under `train.max_minutes` on a machine too slow for `steps` (the fake 5 s clock), the bar
    ends full (its position is the budget's share of the steps) although fewer steps ran; with
    no budget the bar's position is the step count."""
    from polysense.train import log

    positions: list[int] = []
    monkeypatch.setattr(log.TrainProgress, "update", lambda self, n, **f: positions.append(n))
    clock = iter(range(0, 10**6, 5))
    monkeypatch.setattr(log.time, "perf_counter", lambda: float(next(clock)))
    steps = 40
    cfg = tiny_config("clip-tiny", f"train.steps={steps}", "train.max_minutes=1",
                      "train.ckpt_every=0", "train.log_every=1")  # fmt: skip
    result = train(cfg, data=pairs_jsonl, out=tmp_path / "budget", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "budget" / "metrics.jsonl").read_text().splitlines()]
    assert result.steps < steps and positions[-1] == steps  # full when the clock ran out
    logged = positions[:-1]  # one update per record, then the one at the stop
    # the bar never trails the steps nor passes the end, never goes back, and runs ahead of the
    # steps once the budget binds (the exact share: test_bar_position_is_the_budget_share)
    assert logged == sorted(logged)
    assert all(row["step"] <= pos <= steps for row, pos in zip(rows, logged, strict=True))
    assert any(pos > row["step"] for row, pos in zip(rows, logged, strict=True))
    positions.clear()
    clock = iter(range(0, 10**6, 5))
    plain = tiny_config("clip-tiny", "train.steps=6", "train.ckpt_every=0", "train.log_every=1")
    train(plain, data=pairs_jsonl, out=tmp_path / "plain", progress=False)
    assert positions == [1, 2, 3, 4, 5, 6]


def test_bar_position_is_the_budget_share():
    """StepLog.position, by hand: with a 1-minute budget over 40 steps, 30 s elapsed is 20 steps'
    worth; the position is the larger of that and the steps done, capped at 40; without a budget
    it is the steps done."""
    from types import SimpleNamespace

    from polysense.train.log import StepLog

    sched = SimpleNamespace(steps=40, batch_size=8, log_every=1, max_minutes=1.0)
    budget = StepLog(train=sched, out=None, start=0, progress=False)
    assert budget.position(3, 30.0) == 20  # 30 / 60 x 40
    assert budget.position(25, 30.0) == 25  # the steps are ahead of the clock
    assert budget.position(3, 44.9) == 29  # int(44.9 / 60 x 40) = int(29.93)
    assert budget.position(3, 120.0) == 40  # past the budget: full, not 80
    plain = StepLog(train=SimpleNamespace(steps=40, batch_size=8, log_every=1), out=None, start=0,
                    progress=False)  # fmt: skip
    assert plain.position(3, 1000.0) == 3


def test_periodic_evaluation_joins_the_log(pairs_jsonl, tmp_path):
    calls = []

    def evaluate(model):
        calls.append(model.training)
        return {"probe": float(len(calls))}

    cfg = tiny_config("clip-tiny", "train.eval_every=4", "train.ckpt_every=0")
    train(cfg, data=pairs_jsonl, out=tmp_path, progress=False, evaluate=evaluate)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["probe"]) for r in rows if "probe" in r] == [
        (4, 1.0),
        (8, 2.0),
        (12, 3.0),
    ]
    assert len([r for r in rows if "loss" in r]) == 12


def test_bad_training_samples_are_skipped_and_listed(pairs_jsonl, tmp_path):
    data = tmp_path / "pairs.jsonl"
    lines = pairs_jsonl.read_text().splitlines()
    base = pairs_jsonl.parent
    rows = [json.loads(line) for line in lines]
    for row in rows:
        row["image"] = str(base / row["image"])
    rows.append({"image": str(base / "missing.png"), "caption": "a red circle"})
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = tiny_config("clip-tiny", "train.steps=2", "train.ckpt_every=0")
    train(cfg, data=data, out=tmp_path / "run", progress=False)
    rejects = [
        json.loads(line) for line in (tmp_path / "run" / "rejects.jsonl").read_text().splitlines()
    ]
    assert [r["reason"] for r in rejects] == ["missing_file"]
