"""One contract over every registered preset (as timm's test_models does over every model): build,
train, save, reload and resume, through `polysense train` itself.

For each name in `available_presets()`, shrunk to a few tiny steps:
- a whole run of 3 steps, checkpointing after every step;
- the same run killed at the start of step 3 (after the checkpoint of step 2), then `--resume`d:
  its final weights must equal the whole run's bit for bit, and its log must hold steps 1, 2, 3
  once each (nothing lost, nothing logged twice);
- `polysense.load(out)` reloads the checkpoint: the loaded model's weights equal the ones saved in
  `model.safetensors`.
The module runs torch on one thread: with two, the VLM's multi-turn QA rows (stage 2) make two
uninterrupted runs differ by ~1e-7 (seen on main before the one loop too, and never with one
thread), so bitwise equality is only a property of the loop where the kernels are deterministic.
Presets that start from other checkpoints (a CLIP for fusion, the VLM stages and t2i; the LM for
stage 1; stage 1 for stage 2) get tiny ones trained by the same command in the fixtures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import polysense
from polysense.cli import app
from polysense.data.world import generate_world
from polysense.presets import available_presets

pytestmark = pytest.mark.slow

STEPS = 3
COMMON = (
    f"train.steps={STEPS}",
    "train.batch_size=4",
    "train.ckpt_every=1",
    "train.log_every=1",
    "train.warmup_steps=1",
    "train.max_minutes=0",
    "train.time_limit_minutes=0",
)
# Shrink each preset's model to a few layers of little width; a preset's own recipe (towers,
# pooling, losses, what is locked) stays.
SMALL_CLIP = ("model.vision.layers=1", "model.text.layers=1")
SHRINK: dict[str, tuple[str, ...]] = {
    "clip-small": SMALL_CLIP,
    "clip-vit-b16": (*SMALL_CLIP, "model.vision.image_size=64"),
    "clip-vit-b32": (*SMALL_CLIP, "model.vision.image_size=64"),
    "siglip-b16-224": (*SMALL_CLIP, "model.vision.image_size=64"),
    "vlm-tiny-stage2": ("train.scst.fraction=0",),
}
# Presets that start from another run: {key: fixture name of the checkpoint it needs}
NEEDS: dict[str, dict[str, str]] = {
    "fusion-late-clip": {"model.image_init": "clip", "model.text_init": "clip"},
    "fusion-late-clip-ft": {"model.image_init": "clip", "model.text_init": "clip"},
    "fusion-xattn-clip": {"model.image_init": "clip", "model.text_init": "clip"},
    "vlm-tiny-stage1": {"init.lm": "lm", "init.vision": "clip"},
    "vlm-tiny-stage2": {"init.vlm": "stage1", "init.vision": "clip"},
    "t2i-tiny": {"text_ckpt": "clip"},
    "vlm-tiny-stage1:qwen2": {"init.lm": "lm_qwen2", "init.vision": "clip"},
}
# Variants beyond the registered presets, as "preset:variant": the LM stage with a fresh
# transformers Qwen2 decoder, and stage 1 on the Qwen2 LM that stage wrote.
VARIANTS: dict[str, tuple[str, ...]] = {"lm-tiny:qwen2": ("decoder=qwen2",)}
CASES = [*available_presets(), "lm-tiny:qwen2", "vlm-tiny-stage1:qwen2"]


def _train(preset: str, data: Path, out: Path, sets: tuple[str, ...], *extra: str):
    name = preset.split(":")[0]  # a variant trains its preset
    args = ["train", name, "--data", str(data), "--out", str(out), "--eval-splits", ""]
    args += [a for s in (*COMMON, *sets) for a in ("--set", s)]
    return CliRunner().invoke(app, [*args, *extra], catch_exceptions=True)


def _ok(result) -> None:
    assert result.exit_code == 0, (result.output, repr(result.exception))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("contract-world")
    generate_world(root, n=160, seed=3, progress=False)
    return root


@pytest.fixture(scope="module")
def parents(world, tmp_path_factory) -> dict[str, Path]:
    """The tiny runs other presets start from: a CLIP with a text transformer, an LM, stage 1."""
    root = tmp_path_factory.mktemp("contract-parents")
    made = {n: root / n for n in ("clip", "lm", "lm_qwen2", "stage1")}
    _ok(_train("clip-tiny-full", world, made["clip"], ()))
    _ok(_train("lm-tiny", world, made["lm"], ()))
    _ok(_train("lm-tiny", world, made["lm_qwen2"], VARIANTS["lm-tiny:qwen2"]))
    sets = (f"init.lm={made['lm']}", f"init.vision={made['clip']}")
    _ok(_train("vlm-tiny-stage1", world, made["stage1"], sets))
    return made


def _sets(preset: str, parents: dict[str, Path]) -> tuple[str, ...]:
    needs = tuple(f"{k}={parents[v]}" for k, v in NEEDS.get(preset, {}).items())
    return (*SHRINK.get(preset, ()), *VARIANTS.get(preset, ()), *needs)


def _killed_at(step: int, monkeypatch) -> None:
    """Raise KeyboardInterrupt when the one loop sets the lr of `step` (after the checkpoint
    of `step`, since every step is checkpointed)."""
    import polysense.train.fit as fit_module

    original, calls = fit_module.set_lr, {"n": 0}

    def set_lr(optimizer, factor):
        calls["n"] += 1
        if calls["n"] == step + 1:
            raise KeyboardInterrupt
        return original(optimizer, factor)

    monkeypatch.setattr(fit_module, "set_lr", set_lr)


def _weights_of(model, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state of the loaded model, or of the part of it that `model.safetensors` holds (a
    text-to-image model saves its U-Net; its frozen text tower lives in text/)."""
    parts = [model, *model.children()]
    best = max(parts, key=lambda m: len(saved.keys() & m.state_dict().keys()))
    return {k: v.detach() for k, v in best.state_dict().items()}


@pytest.mark.parametrize("preset", CASES)
def test_preset_builds_steps_saves_reloads_and_resumes(
    preset, world, parents, tmp_path, monkeypatch
) -> None:
    sets = _sets(preset, parents)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _ok(_train(preset, world, whole, sets))

    with monkeypatch.context() as patch:
        _killed_at(2, patch)
        stopped = _train(preset, world, killed, sets)
    # click turns the interrupt into exit code 130, as a shell does for Ctrl-C
    assert stopped.exit_code == 130, (stopped.output, repr(stopped.exception))
    state = torch.load(killed / "state.pt", weights_only=True, map_location="cpu")
    assert state["step"] == 2
    _ok(_train(preset, world, killed, sets, "--resume"))

    a, b = load_file(whole / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    logged = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").open()]
    assert [s for s in logged if s] == [1, 2, 3]

    loaded = _weights_of(polysense.load(whole), a)
    shared = a.keys() & loaded.keys()
    assert len(shared) == len(a), f"{preset}: not loaded: {sorted(a.keys() - shared)[:5]}"
    for key in shared:
        assert torch.equal(loaded[key].float(), a[key].float()), key
