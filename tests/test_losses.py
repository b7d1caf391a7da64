"""Contrastive losses: naive == dense == chunked (values and gradients), hand-computed cases,
hard negatives, the chunked form's memory, and the errors of the front door."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from polysense.errors import PolysenseError
from polysense.losses import (
    ContrastiveLoss,
    clip_loss,
    clip_loss_chunked,
    clip_loss_distributed,
    clip_loss_naive,
    siglip_loss,
    siglip_loss_chunked,
    siglip_loss_naive,
)

B, D, H = 7, 5, 3


def _inputs(dtype: torch.dtype, *, scale: float = 4.0, seed: int = 0, n: int = B) -> dict:
    """Leaf tensors: L2-normalised img/txt (n, D), hard captions (n, H, D), ln(scale), bias."""
    torch.manual_seed(seed)
    return {
        "img": F.normalize(torch.randn(n, D, dtype=dtype), dim=1).requires_grad_(),
        "txt": F.normalize(torch.randn(n, D, dtype=dtype), dim=1).requires_grad_(),
        "hard": F.normalize(torch.randn(n, H, D, dtype=dtype), dim=2).requires_grad_(),
        "logit_scale": torch.tensor(math.log(scale), dtype=dtype).requires_grad_(),
        "logit_bias": torch.tensor(-2.0, dtype=dtype).requires_grad_(),
    }


def _loss_and_grads(family: str, form: str | int, x: dict, hard: bool) -> dict:
    """Run one form (naive, dense, or a chunk size) and collect the loss and every gradient."""
    h = x["hard"] if hard else None
    if family == "clip":
        if form == "naive":
            loss = clip_loss_naive(x["img"], x["txt"], x["logit_scale"], h)
        elif form == "dense":
            loss = clip_loss(x["img"], x["txt"], x["logit_scale"], h)
        else:
            loss = clip_loss_chunked(x["img"], x["txt"], x["logit_scale"], h, chunk=form)
    else:
        args = (x["img"], x["txt"], x["logit_scale"], x["logit_bias"], h)
        if form == "naive":
            loss = siglip_loss_naive(*args)
        elif form == "dense":
            loss = siglip_loss(*args)
        else:
            loss = siglip_loss_chunked(*args, chunk=form)
    keys = ["img", "txt", "logit_scale"] + (["hard"] if hard else [])
    keys += ["logit_bias"] if family == "siglip" else []
    grads = torch.autograd.grad(loss, [x[k] for k in keys])
    return {"loss": loss.detach(), **dict(zip(keys, grads, strict=True))}


# chunk 1, one that does not divide B=7, B itself, and one larger than B
FORMS = ["dense", 1, 3, B, 11]


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    ("dtype", "tol"),
    [
        (torch.float64, {"rtol": 1e-10, "atol": 1e-12}),
        (torch.float32, {"rtol": 1e-5, "atol": 1e-6}),
    ],
)
def test_forms_match_naive(family: str, hard: bool, form, dtype, tol) -> None:
    ref = _loss_and_grads(family, "naive", _inputs(dtype), hard)
    got = _loss_and_grads(family, form, _inputs(dtype), hard)
    assert set(got) == set(ref)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], **tol, msg=f"{family} {form} {key}")


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_chunked_matches_at_clip_max_scale(family: str) -> None:
    """scale 100 (CLIP's clamp): logits up to 100, the chunked log-sum-exp must stay exact."""
    ref = _loss_and_grads(family, "naive", _inputs(torch.float64, scale=100.0), True)
    got = _loss_and_grads(family, 2, _inputs(torch.float64, scale=100.0), True)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-10, atol=1e-12)


def _py_clip(img, txt, s, hard=None) -> float:
    """InfoNCE in plain Python floats, row by row."""
    n = len(img)

    def dot(a, b):
        return sum(p * q for p, q in zip(a, b, strict=True))

    logit = [[s * dot(img[i], txt[j]) for j in range(n)] for i in range(n)]
    i2t = t2i = 0.0
    for i in range(n):
        denom = sum(math.exp(v) for v in logit[i])
        if hard is not None:
            denom += sum(math.exp(s * dot(img[i], c)) for c in hard[i])
        i2t -= math.log(math.exp(logit[i][i]) / denom)
    for j in range(n):
        t2i -= math.log(math.exp(logit[j][j]) / sum(math.exp(logit[i][j]) for i in range(n)))
    return (i2t / n + t2i / n) / 2


def _py_siglip(img, txt, s, b, hard=None) -> float:
    """SigLIP in plain Python floats, pair by pair."""
    n = len(img)

    def dot(a, c):
        return sum(p * q for p, q in zip(a, c, strict=True))

    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += math.log1p(math.exp(-z * (s * dot(img[i], txt[j]) + b)))
        for c in hard[i] if hard is not None else []:
            total += math.log1p(math.exp(s * dot(img[i], c) + b))
    return total / n


@pytest.mark.parametrize("hard", [False, True])
def test_naive_matches_plain_python(hard: bool) -> None:
    x = _inputs(torch.float64, n=4)
    s, b = math.exp(x["logit_scale"].item()), x["logit_bias"].item()
    img, txt, hrd = x["img"].tolist(), x["txt"].tolist(), x["hard"].tolist() if hard else None
    h = x["hard"] if hard else None
    got_clip = clip_loss_naive(x["img"], x["txt"], x["logit_scale"], h).item()
    got_sig = siglip_loss_naive(x["img"], x["txt"], x["logit_scale"], x["logit_bias"], h).item()
    assert got_clip == pytest.approx(_py_clip(img, txt, s, hrd), rel=1e-12)
    assert got_sig == pytest.approx(_py_siglip(img, txt, s, b, hrd), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# 2 x 2 by hand: img = txt = the two axes, so <img_i, txt_j> is 1 on the diagonal, 0 elsewhere

ALL_FORMS = ["naive", "dense", 1, 2, 5]


def _axes() -> dict:
    eye = torch.eye(2, dtype=torch.float64)
    return {
        "img": eye.clone().requires_grad_(),
        "txt": eye.clone().requires_grad_(),
        "logit_scale": torch.tensor(math.log(2.0), dtype=torch.float64, requires_grad=True),
        "logit_bias": torch.tensor(-1.0, dtype=torch.float64, requires_grad=True),
    }


@pytest.mark.parametrize("form", ALL_FORMS)
def test_clip_2x2_by_hand(form) -> None:
    # each row and column: softmax over (s, 0): loss = log(1 + e^-s), s = 2
    # d loss / d ln(s) = s * d/ds = -s e^-s / (1 + e^-s) = -s / (1 + e^s)
    x = _axes()
    got = _loss_and_grads("clip", form, x, hard=False)
    s = 2.0
    assert got["loss"].item() == pytest.approx(math.log(1 + math.exp(-s)), rel=1e-12)
    assert got["logit_scale"].item() == pytest.approx(-s / (1 + math.exp(s)), rel=1e-12)


@pytest.mark.parametrize("form", ALL_FORMS)
def test_clip_2x2_swapped_captions_by_hand(form) -> None:
    # captions swapped: the positive logit is 0 and the negative is s: loss = log(1 + e^s)
    x = _axes()
    x["txt"] = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    got = _loss_and_grads("clip", form, x, hard=False)
    assert got["loss"].item() == pytest.approx(math.log(1 + math.exp(2.0)), rel=1e-12)


@pytest.mark.parametrize("form", ALL_FORMS)
def test_siglip_2x2_by_hand(form) -> None:
    # diagonal pairs: logit s + b with z = +1; off-diagonal: logit b with z = -1
    # loss = [2 log(1 + e^-(s+b)) + 2 log(1 + e^b)] / 2
    # d/db = -sigmoid(-(s+b)) + sigmoid(b);  d/d ln(s) = -s sigmoid(-(s+b))
    s, b = 2.0, -1.0
    got = _loss_and_grads("siglip", form, _axes(), hard=False)

    def sig(v: float) -> float:
        return 1 / (1 + math.exp(-v))

    expected = math.log(1 + math.exp(-(s + b))) + math.log(1 + math.exp(b))
    assert got["loss"].item() == pytest.approx(expected, rel=1e-12)
    assert got["logit_bias"].item() == pytest.approx(-sig(-(s + b)) + sig(b), rel=1e-12)
    assert got["logit_scale"].item() == pytest.approx(-s * sig(-(s + b)), rel=1e-12)


def _axes_with_hard() -> dict:
    # image 0's hard caption equals its positive; image 1's points away from it
    x = _axes()
    x["hard"] = torch.tensor([[[1.0, 0.0]], [[0.0, -1.0]]], dtype=torch.float64).requires_grad_()
    return x


@pytest.mark.parametrize("form", ALL_FORMS)
def test_clip_2x2_hard_negatives_by_hand(form) -> None:
    # i2t row 0: -log(e^s / (e^s + 1 + e^s)) = log(2 + e^-s)
    # i2t row 1: -log(e^s / (e^s + 1 + e^-s)) = log(1 + e^-s + e^-2s)
    # t2i columns do not see hard captions: log(1 + e^-s) each
    s = 2.0
    got = _loss_and_grads("clip", form, _axes_with_hard(), hard=True)
    i2t = (math.log(2 + math.exp(-s)) + math.log(1 + math.exp(-s) + math.exp(-2 * s))) / 2
    expected = (i2t + math.log(1 + math.exp(-s))) / 2
    assert got["loss"].item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("form", ALL_FORMS)
def test_siglip_2x2_hard_negatives_by_hand(form) -> None:
    # two extra negative pairs: logits s + b (hard == positive) and -s + b
    s, b = 2.0, -1.0
    got = _loss_and_grads("siglip", form, _axes_with_hard(), hard=True)
    base = 2 * math.log(1 + math.exp(-(s + b))) + 2 * math.log(1 + math.exp(b))
    extra = math.log(1 + math.exp(s + b)) + math.log(1 + math.exp(-s + b))
    assert got["loss"].item() == pytest.approx((base + extra) / 2, rel=1e-12)


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("form", ["naive", "dense", 3])
def test_close_hard_negatives_raise_the_loss(family: str, form) -> None:
    """Hard captions nearer the image than its caption cost much more than far ones."""
    x = _inputs(torch.float64)
    torch.manual_seed(1)
    img = x["img"].detach()
    close = F.normalize(img[:, None, :] + 0.05 * torch.randn(B, H, D, dtype=torch.float64), dim=2)
    sim_pos = (img * x["txt"].detach()).sum(1)  # (B,)
    sim_close = torch.einsum("bd,bhd->bh", img, close)  # (B, H)
    assert (sim_close > sim_pos[:, None]).all()  # truly closer than the positive
    far = -close  # pointing away from the image
    plain = _loss_and_grads(family, form, x, hard=False)["loss"]
    with_far = _loss_and_grads(family, form, {**x, "hard": far.requires_grad_()}, True)["loss"]
    with_close = _loss_and_grads(family, form, {**x, "hard": close.requires_grad_()}, True)["loss"]
    assert plain < with_far < with_close
    assert with_close - plain > 5 * (with_far - plain)


# ---------------------------------------------------------------------------------------------
# memory of the chunked form


class _PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages created by ops while active (checked after each op)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def _peak_bytes(family: str, form: str | int, n: int) -> int:
    x = _inputs(torch.float32, n=n, seed=3)
    with _PeakTensorBytes() as meter:
        _loss_and_grads(family, form, x, hard=False)
    return meter.peak


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_chunked_peak_memory_grows_linearly(family: str) -> None:
    # the meter itself: the dense form holds B x B logits, quadrupling when B doubles
    dense = [_peak_bytes(family, "dense", n) for n in (512, 1024)]
    assert dense[1] > 3.5 * dense[0]
    assert dense[1] > 1024 * 1024 * 4  # at least one (B, B) float32 matrix
    # the chunked form at a fixed chunk: doubling B at most doubles the peak (plus slack)
    sizes = (1024, 2048, 4096)
    chunked = [_peak_bytes(family, 64, n) for n in sizes]
    for small, big in itertools.pairwise(chunked):
        assert big < 2.2 * small
    assert chunked[-1] < 0.15 * 4096 * 4096 * 4  # far below one (B, B) float32 matrix


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_chunked_saves_no_pairwise_tensor_for_backward(family: str) -> None:
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    n = 256
    x = _inputs(torch.float32, n=n)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss_and_grads(family, 16, x, hard=True)
    assert saved and max(saved) <= n * H * D  # nothing of size n x n (or n x chunk)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss_and_grads(family, "dense", _inputs(torch.float32, n=n), hard=True)
    assert max(saved) >= n * n  # the dense form does keep the logits


# ---------------------------------------------------------------------------------------------
# the front door


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("chunk", [0, 4])
def test_module_equals_functions(family: str, chunk: int) -> None:
    x = _inputs(torch.float64)
    loss_fn = ContrastiveLoss(family=family, chunk=chunk)
    bias = x["logit_bias"] if family == "siglip" else None
    got = loss_fn(x["img"], x["txt"], x["logit_scale"], bias, hard_txt=x["hard"])
    ref = _loss_and_grads(family, "naive", _inputs(torch.float64), hard=True)["loss"]
    assert got.dim() == 0
    torch.testing.assert_close(got.detach(), ref, rtol=1e-10, atol=1e-12)


def _err(match: str):
    return pytest.raises(PolysenseError, match=match)


def test_errors_name_the_argument() -> None:
    x = _inputs(torch.float32)
    img, txt, ls, lb = x["img"], x["txt"], x["logit_scale"], x["logit_bias"]
    with _err("logit_bias is required"):
        ContrastiveLoss(family="siglip")(img, txt, ls)
    with _err("InfoNCE has no bias"):
        ContrastiveLoss(family="clip")(img, txt, ls, lb)
    with _err(r"img \(7, 5\) and txt \(6, 5\) differ"):
        ContrastiveLoss(family="clip")(img, txt[:6], ls)
    with _err("must be \\(B, D\\)"):
        clip_loss(img[None], txt[None], ls)
    with _err("hard_txt must be"):
        ContrastiveLoss(family="clip")(img, txt, ls, hard_txt=x["hard"][:, :, :3])
    with _err("logit_scale must be a one-element tensor"):
        siglip_loss(img, txt, torch.ones(2), lb)
    with _err("cast both"):
        clip_loss(img, txt.double(), ls)
    with _err("chunk must be a positive int"):
        clip_loss_chunked(img, txt, ls, chunk=0)
    with _err("chunk must be a positive int"):
        ContrastiveLoss(family="siglip", chunk=-2)
    with _err("family must be"):
        ContrastiveLoss(family="cosine")  # type: ignore[arg-type]
    with _err("not initialised"):
        clip_loss_distributed(img, txt, ls)
    with _err("not initialised"):
        ContrastiveLoss(family="siglip", distributed=True)(img, txt, ls, lb)
