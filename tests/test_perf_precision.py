"""The default precision ("auto"), the fused AdamW of `build_optimizer` and the bf16 inference
path of `CLIP.encode_image` / `encode_text`, each against a plain reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_config
from polysense import load, precision
from polysense.models.checkpoint import load_model, save_checkpoint
from polysense.models.clip import CLIP, build_model
from polysense.precision import native_bf16, resolve_precision
from polysense.train.loop import _autocast
from polysense.train.optim import build_optimizer, param_groups

NO_BF16 = {"amx_bf16": False, "avx512_bf16": False, "avx2": True}
AMX = {"amx_bf16": True, "avx512_bf16": True}


def _cpu(monkeypatch, caps: dict, aten: str = "AVX512") -> None:
    """Pretend the CPU has `caps` and ATen dispatches its kernels at capability `aten`."""
    monkeypatch.setattr(precision.torch.cpu, "get_capabilities", lambda: caps)
    monkeypatch.setattr(precision.torch.backends.cpu, "get_cpu_capability", lambda: aten)


def test_resolve_precision(monkeypatch):
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "meta") == "fp32"  # no bf16 matrix units known there
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        resolve_precision("fp16", "cpu")
    _cpu(monkeypatch, NO_BF16, "AVX2")
    assert not native_bf16("cpu") and resolve_precision("auto", "cpu") == "fp32"
    _cpu(monkeypatch, AMX)
    assert native_bf16("cpu") and resolve_precision("auto", "cpu") == "bf16"
    # an AMX chip with ATen capped at AVX2 (ATEN_CPU_CAPABILITY=avx2) cannot use its bf16 units
    _cpu(monkeypatch, AMX, "AVX2")
    assert not native_bf16("cpu") and resolve_precision("auto", "cpu") == "fp32"


def test_aten_capability_cap_turns_auto_to_fp32():
    """In a child process with ATEN_CPU_CAPABILITY=avx2 (the AVX2-only machine's dispatch),
    "auto" resolves to fp32 whatever the chip has."""
    import os
    import subprocess
    import sys

    code = (
        "from polysense.precision import resolve_precision; print(resolve_precision('auto', 'cpu'))"
    )
    env = os.environ | {"ATEN_CPU_CAPABILITY": "avx2"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "fp32"


@pytest.mark.parametrize(("caps", "dtype"), [(NO_BF16, torch.float32), (AMX, torch.bfloat16)])
def test_training_autocast_follows_auto(monkeypatch, caps, dtype):
    _cpu(monkeypatch, caps)
    lin = torch.nn.Linear(4, 4)
    with _autocast(torch.device("cpu"), "auto"):
        assert lin(torch.randn(2, 4)).dtype == dtype
    with _autocast(torch.device("cpu"), "fp32"):
        assert lin(torch.randn(2, 4)).dtype == torch.float32


def test_fused_adamw_equals_the_for_loop_step_and_bumps_versions():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg)
    ref_model = build_model(cfg)
    ref_model.load_state_dict(model.state_dict())
    opt = build_optimizer(model, cfg.train)
    assert opt.defaults["fused"]
    groups = [
        {k: v for k, v in g.items() if k != "names"} for g in param_groups(ref_model, cfg.train)
    ]
    t = cfg.train
    ref = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps, foreach=False)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
            # strides as autograd lays gradients out: the parameter's (channels-last conv stem)
            q.grad = torch.empty_like(q).normal_(generator=g)
            p.grad = q.grad.clone()
        versions = [p._version for p in model.parameters()]
        opt.step()
        ref.step()
        assert all(p._version > v for p, v in zip(model.parameters(), versions, strict=True))
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert opt.state_dict()["state"].keys() == ref.state_dict()["state"].keys()


@pytest.fixture()
def tiny_clip():
    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    model.inference_precision = "bf16"
    return model


def inputs(model: CLIP) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return x, model.tokenize(["a red circle", "two blue squares left of a star", "a ring"])


def fp32_reference(model: CLIP, x: torch.Tensor, ids: torch.Tensor):
    """The plain fp32 path: the towers and projections as they are, then L2 normalisation."""
    with torch.no_grad():
        img = F.normalize(model.image_proj(model.visual(x)), dim=-1)
        txt = F.normalize(model.text_proj(model.text(ids)), dim=-1)
    return img, txt


def test_bf16_inference_agrees_with_fp32_and_runs_in_bf16(tiny_clip):
    model = tiny_clip
    x, ids = inputs(model)
    seen = []
    with torch.no_grad():
        img, txt = model.encode_image(x), model.encode_text(ids)
        copies = [c for _, mods in model.__dict__["_inference_copies"].values() for c in mods]
        hooks = [c.register_forward_hook(lambda m, a, out: seen.append(out.dtype)) for c in copies]
        model.encode_image(x)
        model.encode_text(ids)
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {torch.bfloat16}  # the towers ran in bf16 ...
    assert img.dtype == txt.dtype == torch.float32  # ... and the embeddings are float32
    ref_img, ref_txt = fp32_reference(model, x, ids)
    assert not torch.equal(img, ref_img)
    assert F.cosine_similarity(img, ref_img).min() > 0.999
    assert F.cosine_similarity(txt, ref_txt).min() > 0.999
    assert set(model.state_dict()) == set(CLIP.state_dict(model))  # the copies are not state
    assert not any("_bf16" in k for k in model.state_dict())


def test_bf16_inference_leaves_training_and_a_callers_autocast_alone(tiny_clip):
    model = tiny_clip
    x, ids = inputs(model)
    ref_img, ref_txt = fp32_reference(model, x, ids)
    # gradients on (training): exactly the fp32 path
    torch.testing.assert_close(model.encode_image(x).detach(), ref_img, atol=0, rtol=0)
    torch.testing.assert_close(model.encode_text(ids).detach(), ref_txt, atol=0, rtol=0)
    # under the caller's autocast the caller's choice stands (not switched off, not replaced)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.encode_image(x)
        want = F.normalize(model.image_proj(model.visual(x)).float(), dim=-1)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # fp32 asked for, packed weights off: the fp32 path itself (packed: tests/test_packed.py)
    model.inference_precision = "fp32"
    model.inference_packed = False
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), ref_img, atol=0, rtol=0)


def test_bf16_copies_follow_the_weights(tiny_clip):
    """After an optimizer step (fused AdamW) or a load, the embeddings are those of the new
    weights: equal to a freshly built model holding them."""
    model = tiny_clip
    x, ids = inputs(model)
    with torch.no_grad():
        before = model.encode_image(x)
    opt = build_optimizer(model, tiny_config().train)
    model.train()
    out = model(x, ids)
    (out["image_embeds"].sum() + out["text_embeds"].sum()).backward()
    opt.step()
    model.eval()
    fresh = build_model(tiny_config()).eval()
    fresh.load_state_dict(model.state_dict())
    fresh.inference_precision = "bf16"
    with torch.no_grad():
        after, want = model.encode_image(x), fresh.encode_image(x)
        torch.testing.assert_close(after, want, atol=0, rtol=0)
        assert not torch.allclose(after, before, atol=1e-3)
        model.load_state_dict(fresh.state_dict() | {"image_proj.weight": -fresh.image_proj.weight})
        torch.testing.assert_close(model.encode_image(x), -want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("train_precision", ["fp32", "auto"])
def test_load_model_infers_in_the_checkpoints_precision(tmp_path, train_precision):
    cfg = tiny_config("clip-tiny", f"train.precision={train_precision}")
    ckpt = save_checkpoint(build_model(cfg), cfg, tmp_path / "ckpt")
    assert load_model(ckpt).inference_precision == train_precision
    assert load("clip-tiny").inference_precision == "auto"  # the preset's default
    assert dataclasses.replace(cfg.train).precision == train_precision
