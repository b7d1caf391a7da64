"""Float32 inference on MKL-packed weights (`models/packed.py`) against the plain towers and a
float64 reference of the quick-GELU MLP it folds."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import tiny_config
from polysense.models.clip import CLIP, build_model
from polysense.models.packed import (
    PACK_MIN_WEIGHT,
    FoldedMLP,
    PackedLinear,
    PackedMLP,
    packed_copy,
    packing_available,
    worth_packing,
)
from polysense.models.vit import MLP, QuickGELU
from polysense.train.optim import build_optimizer

pytestmark = pytest.mark.skipif(not packing_available(), reason="torch built without MKL")

WIDE = ("model.vision.layers=2", "model.text.layers=2", "train.precision=fp32")


def model_with(act: str) -> CLIP:
    torch.manual_seed(0)
    cfg = tiny_config("clip-tiny", *WIDE, f"model.vision.act={act}", f"model.text.act={act}")
    model = build_model(cfg).eval()
    model.inference_precision = "fp32"
    model.inference_packed = True  # these towers are below the size "auto" packs
    return model


def images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))


def originals_called(module: nn.Module) -> list[str]:
    """Hooks on the plain linear layers and activations inside a packed copy (each
    `PackedLinear.linear`, each `PackedMLP.mlp`'s; not clip-tiny's convolutional stem, which
    packing leaves as it is): the names of those that ran."""
    ran: list[str] = []
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear | QuickGELU | nn.GELU) and not name.startswith("patch_embed"):
            m.register_forward_hook(lambda m, a, out, name=name: ran.append(name))
    return ran


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_packed_tower_equals_the_plain_tower_and_never_runs_its_layers(act):
    model = model_with(act)
    x = images(6)
    with torch.inference_mode():
        want = model.visual(x)  # (6, W), the plain tower
        packed = packed_copy(model.visual)
        ran = originals_called(packed)
        got = packed(x)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    assert not torch.equal(got, want) or act == "gelu"  # the fold rounds differently
    # every linear layer and every quick GELU ran packed / folded: no original layer was called
    # (GELU is not folded: its module runs on the packed fc1's output)
    assert all(name.endswith("act") and act == "gelu" for name in ran), ran
    linears = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert len(linears) == sum(isinstance(m, nn.Linear) for m in model.visual.modules())
    assert all(m._packed is not None for m in linears)


@pytest.mark.parametrize("fold", [PackedMLP, FoldedMLP])
def test_folded_mlp_matches_a_float64_reference_as_closely_as_the_plain_mlp(fold):
    """The fold computes fc2(silu(1.702 fc1(x)) / 1.702); the reference is the quick-GELU MLP,
    h * sigmoid(1.702 h), in float64. The folded float32 result is as close to it as the plain
    float32 MLP is."""
    torch.manual_seed(3)
    mlp = MLP(width=48, hidden=192, act="quick_gelu").eval()
    x = torch.randn(4, 10, 48)
    with torch.inference_mode():
        w1, b1 = mlp.fc1.weight.double(), mlp.fc1.bias.double()
        w2, b2 = mlp.fc2.weight.double(), mlp.fc2.bias.double()
        h = x.double() @ w1.T + b1
        ref = (h * torch.sigmoid(1.702 * h)) @ w2.T + b2
        plain = mlp(x)
        folded = fold(mlp=mlp)(x)
    err_plain = (plain.double() - ref).abs().max().item()
    err_folded = (folded.double() - ref).abs().max().item()
    assert err_folded < max(4 * err_plain, 1e-6), (err_folded, err_plain)
    assert err_folded < 1e-5


def test_other_row_counts_run_the_plain_layers_and_a_larger_one_repacks():
    model = model_with("quick_gelu")
    with torch.inference_mode():
        packed = packed_copy(model.visual)
        packed(images(6))  # packs for 6 images' rows
        ran = originals_called(packed)
        small = packed(images(2))  # fewer rows: the plain layers, exactly
        assert ran and torch.equal(small, model.visual(images(2)))
        ran.clear()
        big = packed(images(9))  # more rows: packed again, for 9
        assert not ran
        torch.testing.assert_close(big, model.visual(images(9)), atol=2e-6, rtol=1e-5)
    fc1 = next(m for m in packed.modules() if isinstance(m, PackedMLP)).fc1
    assert fc1._packed[0] == 9 * (1 + (32 // 8) ** 2)  # rows = images x tokens
    with pytest.raises(RuntimeError, match="packed row count"):
        fc1(torch.randn(3, fc1.linear.in_features))  # a scaled layer has no plain fallback


def test_clip_infers_on_packed_copies_that_follow_the_weights():
    """encode_image / encode_text in fp32 use the packed copies (equal to the plain path to
    float32 rounding), and after an optimizer step or a load they are those of the new weights.
    The copies are not state, and a deep copy of the model works and packs anew."""
    model = model_with("quick_gelu")
    x = images(5)
    ids = model.tokenize(["a red circle", "two blue squares left of a star", "a ring"])
    plain = copy.deepcopy(model)
    plain.inference_packed = False
    with torch.no_grad():
        img, txt = model.encode_image(x), model.encode_text(ids)
        torch.testing.assert_close(img, plain.encode_image(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(txt, plain.encode_text(ids), atol=1e-6, rtol=0)
    kinds = {kind for kind, _ in model.__dict__["_inference_copies"]}
    assert kinds == {"packed"}
    assert set(model.state_dict()) == set(plain.state_dict())

    opt = build_optimizer(model, tiny_config().train)
    model.train()
    out = model(x, ids)
    (out["image_embeds"].sum() + out["text_embeds"].sum()).backward()
    opt.step()
    model.eval()
    fresh = copy.deepcopy(model)  # after packing: the deep copy must not copy MKL tensors
    fresh.inference_packed = False
    with torch.no_grad():
        after = model.encode_image(x)
        torch.testing.assert_close(after, fresh.encode_image(x), atol=1e-6, rtol=0)
        assert not torch.allclose(after, img, atol=1e-4)
        flipped = fresh.state_dict() | {"image_proj.weight": -fresh.image_proj.weight}
        model.load_state_dict(flipped)
        torch.testing.assert_close(model.encode_image(x), -after, atol=1e-6, rtol=0)


def test_training_and_compile_leave_packing_alone():
    model = model_with("quick_gelu")
    x = images(4)
    want = F.normalize(model.image_proj(model.visual(x)), dim=-1)
    got = model.encode_image(x)  # gradients on: the modules themselves, exactly
    assert got.requires_grad and torch.equal(got, want)
    assert "_inference_copies" not in model.__dict__


def test_flop_count_of_the_packed_path_equals_the_plain_one():
    """`bench throughput` counts MKL's packed linear (FlopCounterMode does not know it) as the
    plain linear it replaces: equal totals for the packed and the plain encode."""
    from polysense.bench.throughput import count_flops

    model = model_with("quick_gelu")
    plain = copy.deepcopy(model)
    plain.inference_packed = False
    x = images(4)
    with torch.no_grad():
        model.encode_image(x)  # packs
        packed_flops = count_flops(lambda: model.encode_image(x))
        assert packed_flops == count_flops(lambda: plain.encode_image(x)) > 0
        assert {kind for kind, _ in model.__dict__["_inference_copies"]} == {"packed"}


def test_auto_packs_the_towers_of_vit_b_size_only():
    """inference_packed="auto": a tower with an MLP at width 512 or more is packed, a narrower
    one runs as it is (measured slower packed: models/packed.py); True packs both."""
    assert worth_packing(nn.Linear(512, 4 * 512))
    assert not worth_packing(nn.Linear(PACK_MIN_WEIGHT // 512 - 1, 512), nn.LayerNorm(4096))
    torch.manual_seed(0)
    cfg = tiny_config(
        "clip-tiny",
        *WIDE,
        "model.vision.width=512",
        "model.vision.heads=8",
        "model.vision.layers=1",
    )
    model = build_model(cfg).eval()
    model.inference_precision = "fp32"
    assert model.inference_packed == "auto"
    x = images(3)
    ids = model.tokenize(["a red circle", "a ring"])
    with torch.no_grad():
        img, txt = model.encode_image(x), model.encode_text(ids)
    assert [names for _, names in model.__dict__["_inference_copies"]] == [("visual", "image_proj")]
    model.inference_packed = True
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids), txt, atol=1e-6, rtol=0)
        torch.testing.assert_close(model.encode_image(x), img, atol=0, rtol=0)
    assert {names for _, names in model.__dict__["_inference_copies"]} == {
        ("visual", "image_proj"),
        ("text", "text_proj"),
    }


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_without_mkl_the_quick_gelu_mlps_run_folded_on_plain_linears(monkeypatch, act):
    """No MKL packing (ARM, macOS; as on a GPU): encode_image / encode_text run copies whose
    quick-GELU MLPs are folded (equal to the plain path to float32 rounding, no QuickGELU module
    runs) and that follow the weights; with another activation no copy is made."""
    import polysense.models.clip as clip_module

    monkeypatch.setattr(clip_module, "packing_available", lambda: False)
    model = model_with(act)
    plain = copy.deepcopy(model)
    plain.inference_packed = False
    x = images(5)
    ids = model.tokenize(["a red circle", "two blue squares left of a star"])
    ran: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, QuickGELU):
            m.register_forward_hook(lambda m, a, out, name=name: ran.append(name))
    with torch.no_grad():
        img, txt = model.encode_image(x), model.encode_text(ids)
        torch.testing.assert_close(img, plain.encode_image(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(txt, plain.encode_text(ids), atol=1e-6, rtol=0)
    copies = model.__dict__.get("_inference_copies", {})
    if act == "gelu":
        assert not copies
        return
    assert {kind for kind, _ in copies} == {"folded"}
    assert ran == []
    assert not torch.equal(img, plain.encode_image(x))  # the fold rounds differently
    with torch.no_grad():
        for m in (model, plain):
            m.visual.blocks[0].mlp.fc1.weight.mul_(-1.5)  # in place: the version counter moves
        moved = model.encode_image(x)
        torch.testing.assert_close(moved, plain.encode_image(x), atol=1e-6, rtol=0)
        assert not torch.allclose(moved, img, atol=1e-4)
