"""Contrastive losses for the shared embedding space: CLIP's symmetric InfoNCE and SigLIP's sigmoid.

Every loss comes in forms that compute the same number (see docs/losses.md):

- ``*_naive``: the formula written literally over the full B x B logits, in float64. The reference
  the tests hold the other forms to; not for training (it materialises exp(logits)).
- dense (``clip_loss``, ``siglip_loss``): full B x B logits with fused, stable torch ops.
- ``*_chunked``: a ``torch.autograd.Function`` walking the text columns in chunks; the backward
  recomputes each chunk's logits, so peak memory grows with B x chunk instead of B x B.
- ``*_distributed``: cross-process negatives under torchrun (all-gather with gradient for CLIP, a
  ring of send/recv for SigLIP). Each rank's loss is scaled so that the mean over ranks equals the
  single-process loss on the full batch; DDP's gradient averaging then gives the full-batch gradient.

Inputs: ``img (B, D)`` and ``txt (B, D)`` L2-normalised embeddings (row i of each is a pair),
``logit_scale`` holding ln(scale) (callers clamp it), SigLIP's ``logit_bias``, and optional hard
negative captions ``hard_txt (B, H, D)`` that belong to image i and must score below its caption.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from polysense.errors import PolysenseError

__all__ = [
    "ContrastiveLoss",
    "LossInputError",
    "clip_loss",
    "clip_loss_chunked",
    "clip_loss_distributed",
    "clip_loss_naive",
    "siglip_loss",
    "siglip_loss_chunked",
    "siglip_loss_distributed",
    "siglip_loss_naive",
]


class LossInputError(PolysenseError, ValueError):
    """Embeddings, scale or bias that a loss cannot use; the message names the argument and the fix."""


# ----------------------------------------------------------------------------------------------
# input checks


def _check(
    img: Tensor,
    txt: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None,
    hard_txt: Tensor | None,
    *,
    family: Literal["clip", "siglip"],
) -> None:
    """Raise LossInputError naming the argument when shapes or dtypes cannot be used."""
    if img.dim() != 2 or txt.dim() != 2:
        raise LossInputError(
            f"{family} loss: img and txt must be (B, D) embeddings, got img {tuple(img.shape)} "
            f"and txt {tuple(txt.shape)}; flatten or pool the encoder outputs first"
        )
    if img.shape != txt.shape:
        raise LossInputError(
            f"{family} loss: img {tuple(img.shape)} and txt {tuple(txt.shape)} differ; row i of "
            "each must be a matching pair with the same embedding width"
        )
    if img.dtype != txt.dtype:
        raise LossInputError(
            f"{family} loss: img is {img.dtype} but txt is {txt.dtype}; cast both to one dtype"
        )
    if not isinstance(logit_scale, Tensor) or logit_scale.numel() != 1:
        raise LossInputError(
            f"{family} loss: logit_scale must be a one-element tensor holding ln(scale), got "
            f"{logit_scale!r}"
        )
    if family == "siglip":
        if logit_bias is None:
            raise LossInputError(
                "siglip loss: logit_bias is required (a one-element tensor, SigLIP starts it at "
                "-10); set model.init_logit_bias or use family='clip'"
            )
        if not isinstance(logit_bias, Tensor) or logit_bias.numel() != 1:
            raise LossInputError(
                f"siglip loss: logit_bias must be a one-element tensor, got {logit_bias!r}"
            )
    elif logit_bias is not None:
        raise LossInputError(
            "clip loss: logit_bias was given but InfoNCE has no bias; drop it or use "
            "family='siglip'"
        )
    if hard_txt is not None and (
        hard_txt.dim() != 3
        or hard_txt.shape[0] != img.shape[0]
        or hard_txt.shape[2] != img.shape[1]
    ):
        raise LossInputError(
            f"{family} loss: hard_txt must be (B, H, D) = ({img.shape[0]}, H, {img.shape[1]}), got "
            f"{tuple(hard_txt.shape)}; stack H extra captions per image along dim 1"
        )
    if hard_txt is not None and hard_txt.dtype != img.dtype:
        raise LossInputError(
            f"{family} loss: hard_txt is {hard_txt.dtype} but img is {img.dtype}; cast it"
        )


def _check_chunk(chunk: int) -> None:
    if not isinstance(chunk, int) or chunk < 1:
        raise LossInputError(f"chunk must be a positive int (columns per step), got {chunk!r}")


def _hard_logits(img: Tensor, hard_txt: Tensor, scale: Tensor) -> Tensor:
    """scale * <img_i, hard_txt_ik> for each image's own hard captions."""
    return scale * torch.einsum("bd,bhd->bh", img, hard_txt)  # (B, H)


# ----------------------------------------------------------------------------------------------
# CLIP: symmetric InfoNCE


def clip_loss_naive(
    img: Tensor, txt: Tensor, logit_scale: Tensor, hard_txt: Tensor | None = None
) -> Tensor:
    """Reference InfoNCE: mean over rows of -log softmax at the positive, both directions, float64.

    loss = 1/2 [ 1/B sum_i -log(e^{l_ii} / (sum_j e^{l_ij} + sum_k e^{h_ik}))
               + 1/B sum_j -log(e^{l_jj} / sum_i e^{l_ij}) ],   l_ij = s <img_i, txt_j>.
    """
    _check(img, txt, logit_scale, None, hard_txt, family="clip")
    dtype = img.dtype
    img, txt, s = img.double(), txt.double(), logit_scale.double().exp().reshape(())
    logits = s * img @ txt.T  # (B, B) row = image, column = caption
    e = logits.exp()  # (B, B)
    positive = e.diagonal()  # (B,)
    row_sum = e.sum(dim=1)  # (B,) image -> every caption
    if hard_txt is not None:
        row_sum = row_sum + _hard_logits(img, hard_txt.double(), s).exp().sum(dim=1)
    col_sum = e.sum(dim=0)  # (B,) caption -> every image
    i2t = -(positive / row_sum).log().mean()
    t2i = -(positive / col_sum).log().mean()
    return ((i2t + t2i) / 2).to(dtype)


def clip_loss(
    img: Tensor, txt: Tensor, logit_scale: Tensor, hard_txt: Tensor | None = None
) -> Tensor:
    """Symmetric InfoNCE over the full B x B logits (open_clip's ClipLoss, one process)."""
    _check(img, txt, logit_scale, None, hard_txt, family="clip")
    s = logit_scale.exp().reshape(()).to(img.dtype)
    logits = s * img @ txt.T  # (B, B)
    labels = torch.arange(img.shape[0], device=img.device)
    rows = logits
    if hard_txt is not None:
        rows = torch.cat([logits, _hard_logits(img, hard_txt, s)], dim=1)  # (B, B + H)
    return (F.cross_entropy(rows, labels) + F.cross_entropy(logits.T, labels)) / 2


class _ChunkedRowCE(torch.autograd.Function):
    """sum_i CE(s <q_i, k_j> over j [and s <q_i, hard_ik> over k], target j = offset + i).

    Forward walks k in chunks of columns keeping a running log-sum-exp per row; only q, k, hard
    and the (R,) log-sum-exp are saved. Backward recomputes each chunk's logits to form
    softmax - onehot, so no (R, N) tensor is ever alive.
    """

    @staticmethod
    def forward(ctx, q, k, logit_scale, hard, offset, chunk):  # type: ignore[override]
        s = logit_scale.exp().reshape(()).to(q.dtype)
        n_rows = q.shape[0]
        lse = q.new_full((n_rows,), float("-inf"))  # (R,)
        for start in range(0, k.shape[0], chunk):
            logits = s * q @ k[start : start + chunk].T  # (R, c)
            lse = torch.logaddexp(lse, logits.logsumexp(dim=1))
        if hard is not None:
            lse = torch.logaddexp(lse, _hard_logits(q, hard, s).logsumexp(dim=1))
        positive = s * (q * k[offset : offset + n_rows]).sum(dim=1)  # (R,)
        ctx.save_for_backward(q, k, logit_scale, hard, lse)
        ctx.offset, ctx.chunk = offset, chunk
        return (lse - positive).sum()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        q, k, logit_scale, hard, lse = ctx.saved_tensors
        offset, chunk = ctx.offset, ctx.chunk
        s = logit_scale.exp().reshape(()).to(q.dtype)
        g = grad.to(q.dtype)
        n_rows = q.shape[0]
        grad_q, grad_k = torch.zeros_like(q), torch.zeros_like(k)  # (R, D), (N, D)
        grad_logit = q.new_zeros(())  # d loss / d ln(scale) = sum of G * logits
        for start in range(0, k.shape[0], chunk):
            k_c = k[start : start + chunk]  # (c, D)
            logits = s * q @ k_c.T  # (R, c)
            p = g * (logits - lse[:, None]).exp()  # (R, c) softmax part of dL/dlogits
            grad_q += s * p @ k_c
            grad_k[start : start + chunk] = s * p.T @ q
            grad_logit += (p * logits).sum()
        grad_hard = None
        if hard is not None:
            h = _hard_logits(q, hard, s)  # (R, H)
            p = g * (h - lse[:, None]).exp()  # (R, H)
            grad_q += s * torch.einsum("rh,rhd->rd", p, hard)
            grad_hard = s * p[:, :, None] * q[:, None, :]  # (R, H, D)
            grad_logit += (p * h).sum()
        # the -onehot part of softmax - onehot: the positive pair (i, offset + i)
        k_pos = k[offset : offset + n_rows]  # (R, D)
        grad_q -= g * s * k_pos
        grad_k[offset : offset + n_rows] -= g * s * q
        grad_logit -= g * s * (q * k_pos).sum()
        grad_scale = grad_logit.reshape(logit_scale.shape).to(logit_scale.dtype)
        return grad_q, grad_k, grad_scale, grad_hard, None, None


def _row_ce(
    q: Tensor, k: Tensor, logit_scale: Tensor, hard: Tensor | None, offset: int, chunk: int
) -> Tensor:
    """Summed CE of rows q against columns k, chunked when chunk > 0, else dense."""
    if chunk > 0:
        return _ChunkedRowCE.apply(q, k, logit_scale, hard, offset, chunk)
    s = logit_scale.exp().reshape(()).to(q.dtype)
    logits = s * q @ k.T  # (R, N)
    if hard is not None:
        logits = torch.cat([logits, _hard_logits(q, hard, s)], dim=1)  # (R, N + H)
    labels = torch.arange(offset, offset + q.shape[0], device=q.device)
    return F.cross_entropy(logits, labels, reduction="sum")


def clip_loss_chunked(
    img: Tensor,
    txt: Tensor,
    logit_scale: Tensor,
    hard_txt: Tensor | None = None,
    *,
    chunk: int,
) -> Tensor:
    """Symmetric InfoNCE with peak memory O(B x chunk): equal to clip_loss, value and gradients.

    Runs two chunked passes (image rows vs caption columns, caption rows vs image columns).
    """
    _check(img, txt, logit_scale, None, hard_txt, family="clip")
    _check_chunk(chunk)
    i2t = _row_ce(img, txt, logit_scale, hard_txt, 0, chunk)
    t2i = _row_ce(txt, img, logit_scale, None, 0, chunk)
    return (i2t + t2i) / (2 * img.shape[0])


# ----------------------------------------------------------------------------------------------
# SigLIP: pairwise sigmoid


def siglip_loss_naive(
    img: Tensor,
    txt: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None,
    hard_txt: Tensor | None = None,
) -> Tensor:
    """Reference SigLIP, float64: 1/B sum_ij -log(1 / (1 + e^{-z_ij (s <img_i, txt_j> + b)})).

    z_ij = +1 on the diagonal, -1 elsewhere; each hard caption adds one more z = -1 pair.
    """
    _check(img, txt, logit_scale, logit_bias, hard_txt, family="siglip")
    assert logit_bias is not None  # checked above
    dtype = img.dtype
    img, txt = img.double(), txt.double()
    s, b = logit_scale.double().exp().reshape(()), logit_bias.double().reshape(())
    n = img.shape[0]
    logits = s * img @ txt.T + b  # (B, B)
    z = 2 * torch.eye(n, dtype=torch.float64, device=img.device) - 1  # (B, B) +1 diag, -1 off
    total = -(1 / (1 + (-z * logits).exp())).log().sum()
    if hard_txt is not None:
        h = _hard_logits(img, hard_txt.double(), s) + b  # (B, H) all negatives
        total = total - (1 / (1 + h.exp())).log().sum()
    return (total / n).to(dtype)


def _siglip_block_dense(
    img: Tensor, txt: Tensor, s: Tensor, b: Tensor, hard: Tensor | None, positives: bool
) -> Tensor:
    """Summed -logsigmoid(z * logits) of img rows vs txt columns; diagonal positive if asked."""
    logits = s * img @ txt.T + b  # (R, C)
    z = -torch.ones_like(logits)
    if positives:
        z.diagonal().fill_(1.0)
    total = -F.logsigmoid(z * logits).sum()
    if hard is not None:
        total = total - F.logsigmoid(-(_hard_logits(img, hard, s) + b)).sum()
    return total


def siglip_loss(
    img: Tensor,
    txt: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None,
    hard_txt: Tensor | None = None,
) -> Tensor:
    """SigLIP sigmoid loss over the full B x B logits, summed over pairs and divided by B."""
    _check(img, txt, logit_scale, logit_bias, hard_txt, family="siglip")
    assert logit_bias is not None
    s = logit_scale.exp().reshape(()).to(img.dtype)
    b = logit_bias.reshape(()).to(img.dtype)
    return _siglip_block_dense(img, txt, s, b, hard_txt, positives=True) / img.shape[0]


class _ChunkedSigmoid(torch.autograd.Function):
    """sum_ij -logsigmoid(z_ij (s <img_i, txt_j> + b)) [+ hard pairs], txt walked in chunks.

    z_ij = +1 where positives and i == j, else -1. As -logsigmoid(z x) = softplus(-z x), each
    chunk negates its slice of the diagonal in place and sums softplus. Saves only the inputs;
    backward recomputes each (R, c) chunk, so no (R, C) tensor is kept.
    """

    @staticmethod
    def forward(ctx, img, txt, logit_scale, logit_bias, hard, positives, chunk):  # type: ignore[override]
        s = logit_scale.exp().reshape(()).to(img.dtype)
        b = logit_bias.reshape(()).to(img.dtype)
        total = img.new_zeros(())
        for start in range(0, txt.shape[0], chunk):
            x = s * img @ txt[start : start + chunk].T + b  # (R, c)
            if positives:
                x.diagonal(offset=-start).neg_()  # pairs (i, i) sit at (i, i - start)
            total += F.softplus(x).sum()
        if hard is not None:
            total += F.softplus(_hard_logits(img, hard, s) + b).sum()
        ctx.save_for_backward(img, txt, logit_scale, logit_bias, hard)
        ctx.positives, ctx.chunk = positives, chunk
        return total

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        img, txt, logit_scale, logit_bias, hard = ctx.saved_tensors
        s = logit_scale.exp().reshape(()).to(img.dtype)
        b = logit_bias.reshape(()).to(img.dtype)
        g = grad.to(img.dtype)
        grad_img, grad_txt = torch.zeros_like(img), torch.zeros_like(txt)  # (R, D), (C, D)
        grad_logit, grad_bias = img.new_zeros(()), img.new_zeros(())
        for start in range(0, txt.shape[0], ctx.chunk):
            txt_c = txt[start : start + ctx.chunk]  # (c, D)
            sims = s * img @ txt_c.T  # (R, c)
            x = sims + b  # (R, c)
            if ctx.positives:
                x.diagonal(offset=-start).neg_()
            dl = g * torch.sigmoid(x)  # (R, c) d softplus(-z x) / dx = -z sigmoid(-z x)
            if ctx.positives:
                dl.diagonal(offset=-start).neg_()
            grad_img += s * dl @ txt_c
            grad_txt[start : start + ctx.chunk] = s * dl.T @ img
            grad_logit += (dl * sims).sum()
            grad_bias += dl.sum()
        grad_hard = None
        if hard is not None:
            sims = _hard_logits(img, hard, s)  # (R, H), z = -1
            dl = g * torch.sigmoid(sims + b)  # (R, H)
            grad_img += s * torch.einsum("rh,rhd->rd", dl, hard)
            grad_hard = s * dl[:, :, None] * img[:, None, :]  # (R, H, D)
            grad_logit += (dl * sims).sum()
            grad_bias += dl.sum()
        grad_scale = grad_logit.reshape(logit_scale.shape).to(logit_scale.dtype)
        grad_b = grad_bias.reshape(logit_bias.shape).to(logit_bias.dtype)
        return grad_img, grad_txt, grad_scale, grad_b, grad_hard, None, None


def _siglip_block(
    img: Tensor,
    txt: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    hard: Tensor | None,
    positives: bool,
    chunk: int,
) -> Tensor:
    if chunk > 0:
        return _ChunkedSigmoid.apply(img, txt, logit_scale, logit_bias, hard, positives, chunk)
    s = logit_scale.exp().reshape(()).to(img.dtype)
    b = logit_bias.reshape(()).to(img.dtype)
    return _siglip_block_dense(img, txt, s, b, hard, positives)


def siglip_loss_chunked(
    img: Tensor,
    txt: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None,
    hard_txt: Tensor | None = None,
    *,
    chunk: int,
) -> Tensor:
    """SigLIP loss with peak memory O(B x chunk): equal to siglip_loss, value and gradients."""
    _check(img, txt, logit_scale, logit_bias, hard_txt, family="siglip")
    _check_chunk(chunk)
    assert logit_bias is not None
    total = _siglip_block(img, txt, logit_scale, logit_bias, hard_txt, True, chunk)
    return total / img.shape[0]


# ----------------------------------------------------------------------------------------------
# distributed: cross-process negatives


def _world() -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise LossInputError(
            "distributed loss: torch.distributed is not initialised; launch with torchrun and "
            "call torch.distributed.init_process_group first, or use distributed=False"
        )
    return dist.get_rank(), dist.get_world_size()


def clip_loss_distributed(
    img: Tensor,
    txt: Tensor,
    logit_scale: Tensor,
    hard_txt: Tensor | None = None,
    *,
    chunk: int = 0,
) -> Tensor:
    """InfoNCE with every rank's captions and images as negatives (default process group).

    Each rank holds b local pairs (b equal on all ranks, as with drop_last); the embeddings are
    all-gathered with gradient into (N, D), N = W b. The rank's loss is
        1/(2b) [ sum_{i local} CE(img_i vs all N captions) + sum_{i local} CE(txt_i vs all N images) ]
    so the mean over the W ranks is the single-process loss on the N pairs. The all-gather's
    backward sums every rank's gradient into the owner, so a local embedding's gradient is W times
    its full-batch gradient and DDP's 1/W average gives exactly the full-batch parameter gradient.
    """
    _check(img, txt, logit_scale, None, hard_txt, family="clip")
    if chunk:
        _check_chunk(chunk)
    rank, world = _world()
    from torch.distributed.nn.functional import all_gather

    b = img.shape[0]
    all_img = torch.cat(all_gather(img.contiguous()), dim=0)  # (N, D)
    all_txt = torch.cat(all_gather(txt.contiguous()), dim=0)  # (N, D)
    if all_img.shape[0] != world * b:
        raise LossInputError(
            f"clip distributed loss: ranks hold different batch sizes (this rank {b}, total "
            f"{all_img.shape[0]} over {world} ranks); use drop_last=True so every rank has b pairs"
        )
    offset = rank * b
    i2t = _row_ce(img, all_txt, logit_scale, hard_txt, offset, chunk)
    t2i = _row_ce(txt, all_img, logit_scale, None, offset, chunk)
    return (i2t + t2i) / (2 * b)


def _p2p(sends: list[tuple[Tensor, int]], recv_from: list[int], like: Tensor) -> list[Tensor]:
    """Post all sends and receives together (batch_isend_irecv cannot deadlock on order)."""
    outs = [torch.empty_like(like) for _ in recv_from]
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, out, peer) for out, peer in zip(outs, recv_from, strict=True)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return outs


class _NeighbourExchange(torch.autograd.Function):
    """Send a tensor to the right neighbour, receive the left one's; gradients travel back."""

    @staticmethod
    def forward(ctx, left, right, tensor):  # type: ignore[override]
        ctx.left, ctx.right = left, right
        return _p2p([(tensor, right)], [left], tensor)[0]

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        # what we received came from the left: its gradient goes left; ours comes from the right
        return None, None, _p2p([(grad, ctx.left)], [ctx.right], grad)[0]


class _NeighbourExchangeBidir(torch.autograd.Function):
    """Send one tensor left and one right, receive from both sides; gradients travel back."""

    @staticmethod
    def forward(ctx, left, right, to_left, to_right):  # type: ignore[override]
        ctx.left, ctx.right = left, right
        from_left, from_right = _p2p([(to_left, left), (to_right, right)], [left, right], to_left)
        return from_left, from_right

    @staticmethod
    def backward(ctx, grad_from_left, grad_from_right):  # type: ignore[override]
        sends = [(grad_from_left, ctx.left), (grad_from_right, ctx.right)]
        grad_to_left, grad_to_right = _p2p(sends, [ctx.left, ctx.right], grad_from_left)
        return None, None, grad_to_left, grad_to_right


def siglip_loss_distributed(
    img: Tensor,
    txt: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None,
    hard_txt: Tensor | None = None,
    *,
    chunk: int = 0,
    bidir: bool = True,
) -> Tensor:
    """SigLIP with every rank's captions as negatives, passed around a ring (default group).

    Each rank scores its b images against its own b captions (diagonal positive), then against
    the captions of every other rank as they arrive by send/recv from its neighbours (bidir: both
    directions at once, W/2 steps instead of W - 1). The rank's loss is
        1/b sum_{i local, j all N} -log sigmoid(z_ij (s <img_i, txt_j> + b))  (+ hard pairs),
    so the mean over ranks is the single-process loss on the N pairs, and the exchanges route each
    caption's gradient back to its owner: DDP's average gives the full-batch gradient.
    """
    _check(img, txt, logit_scale, logit_bias, hard_txt, family="siglip")
    assert logit_bias is not None
    if chunk:
        _check_chunk(chunk)
    rank, world = _world()
    left, right = (rank - 1) % world, (rank + 1) % world

    def block(other: Tensor, positives: bool, hard: Tensor | None = None) -> Tensor:
        return _siglip_block(img, other, logit_scale, logit_bias, hard, positives, chunk)

    total = block(txt, True, hard_txt)
    if bidir:
        to_left = to_right = txt
        steps, remainder = divmod(world - 1, 2)
        for _ in range(steps):
            from_left, from_right = _NeighbourExchangeBidir.apply(left, right, to_left, to_right)
            total = total + block(from_left, False) + block(from_right, False)
            to_left, to_right = from_right, from_left  # keep each travelling the same way
        if remainder:
            total = total + block(_NeighbourExchange.apply(left, right, to_right), False)
    else:
        to_right = txt
        for _ in range(world - 1):
            to_right = _NeighbourExchange.apply(left, right, to_right)
            total = total + block(to_right, False)
    return total / img.shape[0]


# ----------------------------------------------------------------------------------------------
# front door


class ContrastiveLoss(nn.Module):
    """The loss the trainer calls: picks dense, chunked (chunk > 0) or distributed forms.

    The naive references are not selectable here: they exist to test the others.
    """

    def __init__(
        self,
        *,
        family: Literal["clip", "siglip"],
        chunk: int = 0,
        distributed: bool = False,
        bidir: bool = True,
    ) -> None:
        super().__init__()
        if family not in ("clip", "siglip"):
            raise LossInputError(
                f"ContrastiveLoss: family must be 'clip' or 'siglip', got {family!r}"
            )
        if chunk != 0:
            _check_chunk(chunk)
        self.family, self.chunk, self.distributed, self.bidir = family, chunk, distributed, bidir

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
        hard_txt: Tensor | None = None,
    ) -> Tensor:
        """Scalar loss for L2-normalised img (B, D), txt (B, D) and optional hard_txt (B, H, D)."""
        _check(img, txt, logit_scale, logit_bias, hard_txt, family=self.family)
        if self.family == "clip":
            if self.distributed:
                return clip_loss_distributed(img, txt, logit_scale, hard_txt, chunk=self.chunk)
            if self.chunk:
                return clip_loss_chunked(img, txt, logit_scale, hard_txt, chunk=self.chunk)
            return clip_loss(img, txt, logit_scale, hard_txt)
        if self.distributed:
            return siglip_loss_distributed(
                img, txt, logit_scale, logit_bias, hard_txt, chunk=self.chunk, bidir=self.bidir
            )
        if self.chunk:
            return siglip_loss_chunked(
                img, txt, logit_scale, logit_bias, hard_txt, chunk=self.chunk
            )
        return siglip_loss(img, txt, logit_scale, logit_bias, hard_txt)

    def extra_repr(self) -> str:
        return f"family={self.family}, chunk={self.chunk}, distributed={self.distributed}"
