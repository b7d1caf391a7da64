"""Packed weights for float32 inference on CPU.

MKL can lay a weight matrix out once in the order its GEMM kernel reads it (`cblas_sgemm_pack`)
and then multiply by it without repacking (`cblas_sgemm_compute`); PyTorch exposes the pair as
`torch.ops.mkl._mkl_reorder_linear_weight` / `_mkl_linear` (what inductor's freezing uses). A
plain `F.linear` repacks the weight on every call.

`packed_copy(module)` returns a copy of a tower whose linear layers multiply by packed weights,
sharing (not copying) the original parameters for everything else. Its MLPs with OpenAI CLIP's
quick GELU, `h * sigmoid(1.702 h)`, run as one in-place SiLU: with `g = 1.702 h` (fc1's weight
and bias scaled by 1.702 when packed) `silu(g) / 1.702 = h * sigmoid(1.702 h)`, and the 1 / 1.702
goes into fc2's packed weight. That replaces three passes over the (rows, 4 W) hidden tensor and
two allocations with one in-place pass. The results equal the unpacked tower's to float32
rounding (tests/test_packed.py). Where MKL's packing is missing (ARM, macOS) or the model is on
a GPU, `folded_copy` applies the fold alone, on plain `F.linear` (`FoldedMLP`).

Packing pays at ViT-B sizes, not below: with CLIP's dims at ViT-B/32 (width 768), batch 16,
fp32 on 2 AVX2 threads, the plain tower ran 17.5 images/s, packed alone 18.1, the fold alone 18.7,
both 19.3; at clip-tiny, siglip-tiny and clip-small widths (256-384) the packed towers were no
faster at batch 128 and 10-40 % slower at batch 1 to 16, where the copy's bookkeeping and the
extra module calls outweigh the multiply. `worth_packing` draws the line (`CLIP.inference_packed`
"auto").

A packed weight is built for the largest row count (batch x tokens) seen so far; an input with
fewer rows (a last partial batch, a shorter text batch) runs the plain layer, since MKL's packed
kernel is only used for the row count it was packed for. `CLIP` builds the copy for inference in
float32 (`CLIP.inference_packed`) and rebuilds it when the weights change.

Measured at ViT-B/32, fp32, 2 AVX2 threads: docs/performance.md.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

from polysense.models.vit import MLP, QuickGELU

QUICK_GELU = 1.702  # QuickGELU's slope
# The smallest weight (in x out elements) that makes a tower worth packing: an MLP layer at width
# 512 (512 x 2048). Measured above: ViT-B (768 x 3072) gains, widths 256-384 do not.
PACK_MIN_WEIGHT = 512 * 2048


@functools.cache
def packing_available() -> bool:
    """Whether this torch build has MKL's packed GEMM (x86 wheels; not ARM or macOS)."""
    if not torch.backends.mkl.is_available():
        return False
    try:
        return hasattr(torch.ops.mkl, "_mkl_linear")
    except (AttributeError, RuntimeError):
        return False


def worth_packing(*modules: nn.Module) -> bool:
    """Whether `modules` hold a linear layer of at least `PACK_MIN_WEIGHT` weights (module
    docstring: below that size packing does not pay)."""
    return any(
        isinstance(m, nn.Linear) and m.weight.numel() >= PACK_MIN_WEIGHT
        for module in modules
        for m in module.modules()
    )


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


class PackedLinear(nn.Module):
    """`linear` with its weight (times `weight_scale`) and bias (times `bias_scale`) packed for
    MKL. Inputs (..., K) -> (..., N). With scales of 1, an input of another row count than the
    packed one runs `linear` itself; with other scales the caller must check `ready` first."""

    def __init__(
        self, *, linear: nn.Linear, weight_scale: float = 1.0, bias_scale: float = 1.0
    ) -> None:
        super().__init__()
        self.linear = linear  # shared with the tower, not copied
        self.weight_scale = weight_scale
        self.bias_scale = bias_scale
        self._packed: tuple[int, torch.Tensor, torch.Tensor | None] | None = None

    @property
    def weight(self) -> torch.Tensor:  # read as an nn.Linear's (the unscaled original)
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def __deepcopy__(self, memo: dict) -> PackedLinear:
        # a packed weight is an opaque MKL tensor that cannot be copied; the copy packs again
        out = PackedLinear(
            linear=copy.deepcopy(self.linear, memo),
            weight_scale=self.weight_scale,
            bias_scale=self.bias_scale,
        )
        memo[id(self)] = out
        return out.train(self.training)

    def ready(self, x: torch.Tensor) -> bool:
        """Pack for x's row count if it is the largest seen; whether x can use the packing."""
        rows = _rows(x)
        packed = self._packed
        if packed is None or rows > packed[0]:
            w = self.linear.weight.detach()
            if self.weight_scale != 1.0:
                w = w * self.weight_scale
            b = self.linear.bias
            b = None if b is None else b.detach() * self.bias_scale
            # one tuple, assigned at once: a concurrent caller sees the old or the new packing
            self._packed = (rows, torch.ops.mkl._mkl_reorder_linear_weight(w, rows), b)
            return True
        return rows == packed[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ready(x):
            if self.weight_scale != 1.0 or self.bias_scale != 1.0:
                raise RuntimeError("a scaled PackedLinear needs an input of its packed row count")
            return self.linear(x)
        rows, packed, bias = self._packed
        x = x.contiguous()
        # the original weight gives the kernel its shape and dtype checks; with rows equal to
        # the packed count it multiplies by `packed` alone
        return torch.ops.mkl._mkl_linear(x, packed, self.linear.weight, bias, rows)  # (..., N)


class PackedMLP(nn.Module):
    """`mlp` on packed weights; quick GELU folded into one in-place SiLU (module docstring)."""

    def __init__(self, *, mlp: MLP) -> None:
        super().__init__()
        self.mlp = mlp  # the fallback for a row count that is not packed
        fold = isinstance(mlp.act, QuickGELU)
        s = QUICK_GELU if fold else 1.0
        self.fold = fold
        self.fc1 = PackedLinear(linear=mlp.fc1, weight_scale=s, bias_scale=s)
        self.fc2 = PackedLinear(linear=mlp.fc2, weight_scale=1.0 / s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., W) -> (..., W)."""
        if not (self.fc1.ready(x) and self.fc2.ready(x)):
            return self.mlp(x)
        h = self.fc1(x)  # (..., 4W); with the fold, 1.702 times fc1's output
        h = F.silu(h, inplace=True) if self.fold else self.mlp.act(h)
        return self.mlp.drop(self.fc2(h))  # (..., W)


class FoldedMLP(nn.Module):
    """A quick-GELU `mlp` as `fc2' (silu_(fc1' x))` on plain `F.linear`, with fc1' = 1.702 fc1
    and fc2' = fc2 / 1.702 (module docstring): the fold without MKL packing, for a CPU without
    MKL (ARM, macOS) or a GPU. The scaled weights are a snapshot, like a packing."""

    def __init__(self, *, mlp: MLP) -> None:
        super().__init__()
        if not isinstance(mlp.act, QuickGELU):
            raise ValueError("FoldedMLP folds quick GELU only")
        self.mlp = mlp
        w1, b1, w2 = mlp.fc1.weight.detach(), mlp.fc1.bias, mlp.fc2.weight.detach()
        self.w1 = w1 * QUICK_GELU  # plain attributes: not state, not parameters
        self.b1 = None if b1 is None else b1.detach() * QUICK_GELU
        self.w2 = w2 / QUICK_GELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., W) -> (..., W)."""
        h = F.silu(F.linear(x, self.w1, self.b1), inplace=True)  # (..., 4W), 1.702 x fc1's
        return self.mlp.drop(F.linear(h, self.w2, self.mlp.fc2.bias))  # (..., W)


def folds(*modules: nn.Module) -> bool:
    """Whether `modules` hold a quick-GELU MLP (what `folded_copy` changes)."""
    return any(
        isinstance(m, MLP) and isinstance(m.act, QuickGELU)
        for module in modules
        for m in module.modules()
    )


def folded_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` whose quick-GELU MLPs run folded on plain linears (`FoldedMLP`); the
    rest shares `module`'s parameters and buffers. Like `packed_copy`, a snapshot."""
    out = _sharing_copy(module)
    for parent in list(out.modules()):
        for name, child in parent.named_children():
            if isinstance(child, MLP) and isinstance(child.act, QuickGELU):
                setattr(parent, name, FoldedMLP(mlp=child))
    return out


def packed_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` whose linear layers and MLPs run on packed weights (module docstring).
    Parameters and buffers are shared with `module`, not copied; call it again after they
    change (a packing is a snapshot of the weights)."""
    out = _sharing_copy(module)
    _replace(out)
    return out


def _sharing_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module`'s modules that shares (does not copy) its parameters and buffers."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


def _replace(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, MLP):
            setattr(module, name, PackedMLP(mlp=child))
        elif isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(linear=child))
        else:
            _replace(child)
