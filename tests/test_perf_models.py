"""The fast paths in models/vit.py and models/text.py compute the exact same function as the
plain ones: trimmed padding and `is_causal` in the pooled text forward, and the written-out
low-precision attention against SDPA."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from polysense.config import TextConfig
from polysense.models.text import TextTransformer
from polysense.models.vit import Attention, low_precision_attention

CFG = TextConfig(vocab_size=50, context_length=12, width=32, layers=2, heads=4)


def padded_ids(seed: int, *, pad: int = 0, eot: int = 2, eot_is_pad: bool = False) -> torch.Tensor:
    """(6, 12) rows of [bos, random tokens, eot] then trailing padding; one row fills the context."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for length in (3, 5, 4, 7, 12, 6):
        row = torch.full((12,), pad)
        row[0] = 1
        row[1 : length - 1] = torch.randint(3, 50, (length - 2,), generator=g)
        row[length - 1] = pad if eot_is_pad else eot
        rows.append(row)
    return torch.stack(rows)


def reference(model: TextTransformer, ids: torch.Tensor) -> torch.Tensor:
    """The plain path: full-length tokens with the explicit mask, then pooling."""
    return model.pool(model.forward_features(ids), ids)


@pytest.mark.parametrize(
    ("causal", "mask_padding", "pool", "eot_is_pad"),
    [
        (True, True, "eot", False),  # CLIP as polysense trains it: trim + is_causal, no mask
        (True, False, "eot", False),  # HF-imported CLIP
        (True, True, "eot", True),  # HF tokenizers whose pad id is the eot id
        (False, True, "mean", False),  # bidirectional, padding masked: trim, mask kept
        (True, True, "mean", False),
        (False, False, "last", False),  # SigLIP: padding attended and pooled: no fast path
        (True, True, "cls", False),
    ],
)
def test_pooled_forward_equals_pooling_the_full_features(causal, mask_padding, pool, eot_is_pad):
    torch.manual_seed(0)
    pad = 2 if eot_is_pad else 0
    cfg = dataclasses.replace(
        CFG, causal=causal, mask_padding=mask_padding, pool=pool, pad_id=pad, eot_id=2
    )
    model = TextTransformer(cfg=cfg).train()
    ids = padded_ids(1, pad=pad, eot_is_pad=eot_is_pad)
    fast = model(ids)
    ref = reference(model, ids)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    # and the gradients of every parameter
    g = torch.randn_like(ref)
    grads_fast = torch.autograd.grad((fast * g).sum(), list(model.parameters()), allow_unused=True)
    grads_ref = torch.autograd.grad((ref * g).sum(), list(model.parameters()), allow_unused=True)
    for a, b in zip(grads_fast, grads_ref, strict=True):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_trimming_drops_the_padding_columns_no_row_needs():
    model = TextTransformer(cfg=CFG)
    ids = padded_ids(2)[:, :]
    ids = ids[[0, 1, 2]]  # longest row has 5 tokens
    trimmed, causal_only = model._fast_inputs(ids)
    assert trimmed.shape == (3, 5) and causal_only
    assert torch.equal(trimmed, ids[:, :5])
    # padding in the middle of a row: trimmed, but the mask stays
    ids2 = ids.clone()
    ids2[0, 1] = CFG.pad_id
    trimmed, causal_only = model._fast_inputs(ids2)
    assert trimmed.shape == (3, 5) and not causal_only
    torch.testing.assert_close(model(ids2), reference(model, ids2), atol=1e-5, rtol=1e-5)
    siglip = TextTransformer(cfg=dataclasses.replace(CFG, pool="last", mask_padding=False))
    assert siglip._fast_inputs(ids) is None


def test_empty_batch_keeps_working():
    model = TextTransformer(cfg=CFG).eval()
    assert model(torch.zeros(0, 12, dtype=torch.long)).shape == (0, CFG.width)


def test_is_causal_flag_equals_the_explicit_lower_triangular_mask():
    torch.manual_seed(0)
    attn = Attention(width=32, heads=4).eval()
    x = torch.randn(3, 7, 32)
    tril = torch.ones(7, 7, dtype=torch.bool).tril()[None, None]
    torch.testing.assert_close(attn(x, causal=True), attn(x, tril), atol=1e-6, rtol=1e-5)


def naive_attention(q, k, v, mask):
    s = q.double() @ k.double().transpose(-2, -1) / q.shape[-1] ** 0.5
    s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1) @ v.double()


@pytest.mark.parametrize("masking", ["none", "causal", "bool", "float"])
def test_low_precision_attention_matches_float64_reference(masking):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16) for _ in range(3))
    full = torch.ones(9, 9, dtype=torch.bool)
    mask, causal, ref_mask = None, False, full
    if masking == "causal":
        causal, ref_mask = True, full.tril()
    elif masking in ("bool", "float"):
        keys = torch.rand(2, 1, 1, 9) > 0.3
        keys[..., 0] = True
        ref_mask = keys.expand(2, 1, 9, 9)
        mask = keys if masking == "bool" else torch.zeros(2, 1, 1, 9).masked_fill(~keys, -1e9)
    ref = naive_attention(q, k, v, ref_mask)
    out32 = low_precision_attention(q, k, v, mask, causal=causal)
    torch.testing.assert_close(out32.double(), ref, atol=1e-5, rtol=1e-5)
    out16 = low_precision_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, causal=causal)
    assert out16.dtype == torch.bfloat16
    assert (out16.double() - ref).abs().max() < 0.05  # bf16 inputs: ~3 significant digits


def test_bf16_autocast_block_uses_the_written_out_attention_and_agrees_with_fp32():
    torch.manual_seed(0)
    attn = Attention(width=64, heads=4)
    x = torch.randn(4, 10, 64, requires_grad=True)
    ref = attn(x, causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x, causal=True)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.02 * ref.abs().max()
    out.float().sum().backward()  # the bf16 path has a gradient
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_autocast_inference_runs_the_blocks_in_bf16_and_returns_the_usual_dtypes():
    from polysense.config import VisionConfig
    from polysense.models.vit import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(cfg=VisionConfig(width=32, layers=2, heads=2, patch_size=8)).eval()
    text = TextTransformer(cfg=CFG).eval()
    seen = []
    vit.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    text.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    x, ids = torch.randn(3, 3, 32, 32), padded_ids(3)
    with torch.inference_mode():
        ref_img, ref_txt = vit(x), text(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = vit.forward_features(x)
            img, txt = vit(x), text(ids)
    assert seen == [torch.float32, torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16]
    assert tokens.dtype == ref_img.dtype == torch.float32  # cast back: callers see no change
    cos = torch.nn.functional.cosine_similarity
    assert cos(img.float(), ref_img).min() > 0.999 and cos(txt.float(), ref_txt).min() > 0.999
    # with gradients (training) the residual stream stays float32
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vit(x)
    assert seen == [torch.float32]


def test_bf16_inference_attention_uses_sdpa_and_agrees_with_fp32(monkeypatch):
    """Without gradients the bf16 block keeps SDPA (its forward is the fast one); the written-out
    path is for training only. Both agree with the fp32 block."""
    import polysense.models.vit as vit

    torch.manual_seed(0)
    attn = Attention(width=64, heads=4)
    x = torch.randn(4, 10, 64)
    calls = []
    real = vit.low_precision_attention
    monkeypatch.setattr(
        vit, "low_precision_attention", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    with torch.no_grad():
        ref = attn(x, causal=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(x, causal=True)
    assert calls == [] and out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.02 * ref.abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn(x.requires_grad_(), causal=True)
    assert calls == [1]


@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_cls_pooled_forward_equals_pooling_the_full_features(grad_ckpt):
    """The last block computes the cls token alone: same pooled vector and same gradients as
    pooling `forward_features` (which runs every token through every block)."""
    from polysense.config import VisionConfig
    from polysense.models.vit import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(cfg=VisionConfig(width=32, layers=3, heads=2, patch_size=8))
    vit.set_grad_checkpointing(grad_ckpt)
    x = torch.randn(4, 3, 32, 32)
    fast = vit(x)
    grads = torch.autograd.grad(fast.square().sum(), list(vit.parameters()))
    full = vit.pool(vit.forward_features(x))
    ref = torch.autograd.grad(full.square().sum(), list(vit.parameters()))
    torch.testing.assert_close(fast, full, atol=1e-6, rtol=1e-5)
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
