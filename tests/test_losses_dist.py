"""Distributed losses on real gloo process groups: the rank losses and DDP-averaged gradients equal
the single-process full-batch loss and gradients (computed here by the float64 naive references).

Convention checked: DDP averages gradients over the W ranks, so
  loss:            mean_r loss_r                          == full-batch loss
  embedding grads: (grad of rank r's local rows) / W       == full-batch grad of those rows
  logit_scale/bias: mean_r grad_r                          == full-batch grad
and, end to end, the DDP-wrapped model's averaged parameter grads == full-batch parameter grads.
"""

from __future__ import annotations

import math
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from polysense.losses import ContrastiveLoss, clip_loss_naive, siglip_loss_naive

B_LOCAL, D, H = 3, 4, 2
IN_IMG, IN_TXT = 6, 5
TIMEOUT_S = 60

# name -> (family, chunk, bidir, with hard negatives)
CASES = {
    "clip_dense": ("clip", 0, True, False),
    "clip_chunked": ("clip", 2, True, False),
    "clip_hard": ("clip", 0, True, True),
    "clip_hard_chunked": ("clip", 4, True, True),
    "siglip_bidir": ("siglip", 0, True, False),
    "siglip_ring": ("siglip", 0, False, False),
    "siglip_chunked": ("siglip", 2, True, False),
    "siglip_hard": ("siglip", 0, True, True),
    "siglip_hard_chunked_ring": ("siglip", 2, False, True),
}


def _full_batch(n: int) -> dict[str, torch.Tensor]:
    """The same full batch on every rank and in the parent (fixed seed), float64."""
    g = torch.Generator().manual_seed(1234)
    return {
        "img": F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1),
        "txt": F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1),
        "hard": F.normalize(torch.randn(n, H, D, generator=g, dtype=torch.float64), dim=2),
        "logit_scale": torch.tensor(math.log(4.0), dtype=torch.float64),
        "logit_bias": torch.tensor(-1.5, dtype=torch.float64),
        "x_img": torch.randn(n, IN_IMG, generator=g, dtype=torch.float64),
        "x_txt": torch.randn(n, IN_TXT, generator=g, dtype=torch.float64),
    }


class _Tiny(nn.Module):
    """Two linear towers + learned scale (and bias): the smallest model DDP can average."""

    def __init__(self, *, family: str, distributed: bool) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.img_proj = nn.Linear(IN_IMG, D, dtype=torch.float64)
        self.txt_proj = nn.Linear(IN_TXT, D, dtype=torch.float64)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(5.0), dtype=torch.float64))
        self.logit_bias = (
            nn.Parameter(torch.tensor(-2.0, dtype=torch.float64)) if family == "siglip" else None
        )
        self.loss = ContrastiveLoss(family=family, distributed=distributed)  # type: ignore[arg-type]

    def forward(self, x_img: torch.Tensor, x_txt: torch.Tensor) -> torch.Tensor:
        img = F.normalize(self.img_proj(x_img), dim=1)  # (b, D)
        txt = F.normalize(self.txt_proj(x_txt), dim=1)  # (b, D)
        return self.loss(img, txt, self.logit_scale, self.logit_bias)


def _worker(rank: int, world: int, store: str, out_dir: str, cases: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=TIMEOUT_S),
    )
    full = _full_batch(world * B_LOCAL)
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    results: dict[str, dict[str, torch.Tensor]] = {}
    for name in cases:
        family, chunk, bidir, hard = CASES[name]
        img = full["img"][rows].clone().requires_grad_()
        txt = full["txt"][rows].clone().requires_grad_()
        hard_txt = full["hard"][rows].clone().requires_grad_() if hard else None
        scale = full["logit_scale"].clone().requires_grad_()
        bias = full["logit_bias"].clone().requires_grad_() if family == "siglip" else None
        loss_fn = ContrastiveLoss(family=family, chunk=chunk, distributed=True, bidir=bidir)
        loss = loss_fn(img, txt, scale, bias, hard_txt)
        loss.backward()
        out = {"loss": loss.detach(), "img": img.grad, "txt": txt.grad, "logit_scale": scale.grad}
        if hard_txt is not None:
            out["hard"] = hard_txt.grad
        if bias is not None:
            out["logit_bias"] = bias.grad
        results[name] = out
    for family in ("clip", "siglip"):
        model = nn.parallel.DistributedDataParallel(_Tiny(family=family, distributed=True))
        model(full["x_img"][rows], full["x_txt"][rows]).backward()
        results[f"ddp_{family}"] = {n: p.grad.clone() for n, p in model.module.named_parameters()}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _run(world: int, tmp: Path, cases: list[str]) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Spawn `world` gloo ranks with a bounded wait; return each rank's saved results."""
    ctx = mp.start_processes(
        _worker,
        args=(world, str(tmp / "store"), str(tmp), cases),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S + 30
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{world}-rank gloo run did not finish in {TIMEOUT_S + 30} s")
    return [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


def _reference(name: str, n: int) -> dict[str, torch.Tensor]:
    """Single process, full batch, naive formula: loss and gradients."""
    family, _, _, hard = CASES[name]
    full = _full_batch(n)
    img = full["img"].clone().requires_grad_()
    txt = full["txt"].clone().requires_grad_()
    hard_txt = full["hard"].clone().requires_grad_() if hard else None
    scale = full["logit_scale"].clone().requires_grad_()
    bias = full["logit_bias"].clone().requires_grad_()
    if family == "clip":
        loss = clip_loss_naive(img, txt, scale, hard_txt)
    else:
        loss = siglip_loss_naive(img, txt, scale, bias, hard_txt)
    loss.backward()
    out = {"loss": loss.detach(), "img": img.grad, "txt": txt.grad, "logit_scale": scale.grad}
    if hard_txt is not None:
        out["hard"] = hard_txt.grad
    if family == "siglip":
        out["logit_bias"] = bias.grad
    return out


def _check_against_reference(ranks: list[dict], name: str) -> None:
    world = len(ranks)
    ref = _reference(name, world * B_LOCAL)
    got = [r[name] for r in ranks]
    assert set(got[0]) == set(ref)
    tol = {"rtol": 1e-10, "atol": 1e-12}
    # mean over ranks of the rank losses == full-batch loss
    torch.testing.assert_close(torch.stack([g["loss"] for g in got]).mean(), ref["loss"], **tol)
    # DDP averaging: each rank's local gradient divided by W == the full-batch gradient of its rows
    for key in ("img", "txt", "hard"):
        if key in ref:
            ddp = torch.cat([g[key] for g in got]) / world
            torch.testing.assert_close(ddp, ref[key], **tol)
    # replicated scalars: the DDP average of the per-rank grads == full-batch grad
    for key in ("logit_scale", "logit_bias"):
        if key in ref:
            torch.testing.assert_close(torch.stack([g[key] for g in got]).mean(), ref[key], **tol)


def _check_ddp(ranks: list[dict], family: str) -> None:
    world = len(ranks)
    full = _full_batch(world * B_LOCAL)
    model = _Tiny(family=family, distributed=False)
    model(full["x_img"], full["x_txt"]).backward()
    for r in ranks:
        got = r[f"ddp_{family}"]
        for n, p in model.named_parameters():
            torch.testing.assert_close(got[n], p.grad, rtol=1e-10, atol=1e-12, msg=n)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return _run(2, tmp_path_factory.mktemp("gloo2"), list(CASES))


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_match_full_batch(two_ranks: list[dict], name: str) -> None:
    _check_against_reference(two_ranks, name)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_ddp_averaged_grads_equal_full_batch(two_ranks: list[dict], family: str) -> None:
    _check_ddp(two_ranks, family)


def test_ranks_really_differ(two_ranks: list[dict]) -> None:
    """Guard against a vacuous pass: each rank's loss is its own share, not the full loss."""
    losses = [r["clip_dense"]["loss"] for r in two_ranks]
    assert not torch.allclose(losses[0], losses[1])


def test_four_ranks_bidir_and_ring(tmp_path: Path) -> None:
    """W=4 runs a bidirectional step plus the one-way remainder (W=2 uses only the remainder)."""
    cases = ["clip_dense", "siglip_bidir", "siglip_ring", "siglip_hard_chunked_ring"]
    ranks = _run(4, tmp_path, cases)
    for name in cases:
        _check_against_reference(ranks, name)
    for family in ("clip", "siglip"):
        _check_ddp(ranks, family)
