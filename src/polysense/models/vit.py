"""Vision Transformer: patch embedding, pre-norm blocks, cls / MAP / mean pooling.

One module expresses both the CLIP image tower (cls token, LayerNorm before the blocks, no patch
bias) and the SigLIP one (no cls token, MAP head, patch bias) through `VisionConfig` fields, so
Hugging Face weights of either map onto it one to one (`models/hf.py`). The transformer block,
attention and MLP defined here are shared with the text tower (`models/text.py`).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from polysense.config import TextConfig, VideoConfig, VisionConfig
from polysense.errors import PolysenseError

ACTIVATIONS = ("gelu", "quick_gelu", "gelu_pytorch_tanh")


def activation(name: str) -> nn.Module:
    """The MLP non-linearity by its Hugging Face name (so imported configs map by name)."""
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_pytorch_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    raise PolysenseError(f"activation {name!r} is not supported; use one of {list(ACTIVATIONS)}")


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation of the original OpenAI CLIP weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def mlp_dim(width: int, mlp_ratio: float) -> int:
    """Hidden size of the MLP; rounded so that an HF `intermediate_size` survives the ratio."""
    return round(width * mlp_ratio)


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection and `F.scaled_dot_product_attention`."""

    def __init__(self, *, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise PolysenseError(f"width={width} is not divisible by heads={heads}; change one")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        causal: bool = False,
        first_only: bool = False,
    ) -> torch.Tensor:
        """x (B, T, C); mask (B, 1, T, T) bool, True where a query may attend to a key; `causal`
        (with no mask) lets SDPA apply the lower-triangular mask itself, without a mask tensor.
        `first_only` (no mask, not causal): only the first token queries -> (B, 1, C)."""
        B, T, C = x.shape
        # views, no copies: (B, T, 3C) -> (3, B, H, T, D)
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if first_only:
            q, T = q[:, :, :1], 1  # (B, H, 1, D) against all T keys
        p = self.dropout if self.training else 0.0
        causal = causal and mask is None
        if (
            q.device.type == "cpu"
            and q.dtype in (torch.bfloat16, torch.float16)
            and q.requires_grad
        ):
            # training: the flash kernel's bf16 backward is the slow part; inference keeps SDPA,
            # whose bf16 forward is 1.3x (17 tokens) to 2x (65 tokens) the written-out one
            out = low_precision_attention(q, k, v, mask, dropout_p=p, causal=causal)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal
            )  # (B, H, T, D)
        return self.proj(out.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


def low_precision_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    dropout_p: float = 0.0,
    causal: bool = False,
) -> torch.Tensor:
    """Attention written out for bf16/fp16 on CPU: q, k, v (B, H, T, D) -> (B, H, T, D).

    PyTorch's CPU flash-attention kernel is 3-6x slower in bf16 than in fp32 at our sequence
    lengths (its backward dominates a bf16 training step; docs/performance.md), while the two
    batched matmuls here run on the bf16 matrix units. The scores stay in q's dtype: the softmax
    accumulates in float32 internally, and no float32 copy of the (B, H, T, S) scores is made."""
    scores = q @ k.transpose(-2, -1)  # (B, H, T, S)
    scores = scores.mul_(q.shape[-1] ** -0.5)  # in place: matmul saves q and k, not its output
    if causal:
        T, S = scores.shape[-2:]
        keep = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:  # bool (True = attend) or additive float, as SDPA takes it
        scores = (
            scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        )
    probs = scores.softmax(dim=-1).to(v.dtype)  # (B, H, T, S); no-op cast when dtypes agree
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v  # (B, H, T, D)


def inference_dtype(x: torch.Tensor) -> torch.dtype | None:
    """Under CPU autocast without gradients, the autocast dtype (else None): the towers then cast
    the residual stream to it once, so LayerNorm, GELU and the residual adds run in bf16 as well
    and no linear layer has to cast its input (casts were 27 % of a bf16 inference step); the
    final tokens are cast back, so callers see the dtypes they saw before. Training keeps its
    float32 residual stream."""
    dev = x.device.type
    if dev != "cpu" or torch.is_grad_enabled() or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


class MLP(nn.Module):
    def __init__(self, *, width: int, hidden: int, act: str, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = activation(act)
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(
        self,
        *,
        width: int,
        heads: int,
        mlp_ratio: float,
        act: str,
        ln_eps: float,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=ln_eps)
        self.attn = Attention(width=width, heads=heads, dropout=dropout)
        self.ln_2 = nn.LayerNorm(width, eps=ln_eps)
        self.mlp = MLP(width=width, hidden=mlp_dim(width, mlp_ratio), act=act, dropout=dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        causal: bool = False,
        first_only: bool = False,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); with `first_only`, the first token's output alone (B, 1, C):
        it still attends to every token, but no other token's output is computed."""
        out = self.attn(self.ln_1(x), mask, causal=causal, first_only=first_only)
        x = (x[:, :1] if first_only else x) + out  # (B, T or 1, C)
        return x + self.mlp(self.ln_2(x))


def make_blocks(cfg: VisionConfig | TextConfig) -> nn.ModuleList:
    """`cfg.layers` pre-norm blocks of `cfg.width` (shared by the image and text towers)."""
    return nn.ModuleList(
        Block(
            width=cfg.width,
            heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            act=cfg.act,
            ln_eps=cfg.ln_eps,
            dropout=cfg.dropout,
        )
        for _ in range(cfg.layers)
    )


def run_blocks(
    blocks: nn.ModuleList,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    grad_ckpt: bool,
    causal: bool = False,
) -> torch.Tensor:
    """Apply the blocks in order; with `grad_ckpt`, recompute activations in backward to save memory.
    `causal` (only with mask=None) asks SDPA for its built-in causal mask."""
    for block in blocks:
        if grad_ckpt and torch.is_grad_enabled():
            x = checkpoint(block, x, mask, causal=causal, use_reentrant=False)
        else:
            x = block(x, mask, causal=causal)
    return x


class MAPHead(nn.Module):
    """Multi-head attention pooling (SigLIP): a learned probe attends over the tokens, then an MLP."""

    def __init__(
        self, *, width: int, heads: int, mlp_ratio: float, act: str, ln_eps: float
    ) -> None:
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=ln_eps)
        self.mlp = MLP(width=width, hidden=mlp_dim(width, mlp_ratio), act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, W) tokens -> (B, W)."""
        # F.linear, not self.q(...): a parameter as a module's input trips the grad hooks of
        # torch's FlopCounterMode under inference_mode (`bench throughput` counts FLOPs so)
        q = F.linear(self.probe, self.q.weight, self.q.bias).expand(x.shape[0], -1, -1)  # (B, 1, W)
        q = rearrange(q, "b t (h d) -> b h t d", h=self.heads)
        k, v = rearrange(self.kv(x), "b n (two h d) -> two b h n d", two=2, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, 1, D)
        out = self.proj(rearrange(out, "b h t d -> b t (h d)"))  # (B, 1, W)
        out = out + self.mlp(self.norm(out))
        return out[:, 0]  # (B, W)


class ConvStem(nn.Module):
    """Early convolutions instead of one patchifying conv (Xiao et al., 2021, "Early convolutions
    help transformers see better"): log2(patch_size) 3x3 stride-2 convs (GroupNorm + GELU), then a
    1x1 conv to the width. Same (h, w) token grid as a patch embedding; it learns shapes from
    little data much faster (world probe: 0.98 vs 0.84 top-1 after 400 supervised steps)."""

    def __init__(self, *, in_channels: int, width: int, patch_size: int) -> None:
        super().__init__()
        n = patch_size.bit_length() - 1
        if patch_size < 2 or 2**n != patch_size:
            raise PolysenseError(
                f"model.vision.stem='conv' needs a power-of-two patch_size >= 2, got {patch_size}"
            )
        chans = [in_channels] + [min(width, 32 * 2**i) for i in range(n)]
        layers: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(chans):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                nn.GroupNorm(1, c_out),
                nn.GELU(),
            ]
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(chans[-1], width, 1)

    def reset_parameters(self) -> None:
        """PyTorch's default (Kaiming-uniform) init: the normalised convs want it, not 0.02."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.GroupNorm):
                m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last: oneDNN's convolutions (forward and backward) skip their layout reorders
        # (1.1-1.2x on this stem, more under bf16 autocast; docs/performance.md). Same values.
        x = x.contiguous(memory_format=torch.channels_last)
        return self.proj(self.convs(x))  # (B, C, H, W) -> (B, W, H/p, W/p)


def patch_embedding(cfg: VisionConfig | VideoConfig) -> nn.Module:
    """The patch embedding of an image or video tower config (fields in_channels, width,
    patch_size, stem, patch_bias): the conv stem, or one conv with kernel = stride = patch."""
    if cfg.stem == "conv":
        return ConvStem(in_channels=cfg.in_channels, width=cfg.width, patch_size=cfg.patch_size)
    return nn.Conv2d(
        cfg.in_channels, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias
    )


class VisionTransformer(nn.Module):
    """ViT image encoder: `forward_features` gives normalised tokens, `forward` the pooled vector."""

    def __init__(self, *, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size and cfg.stem != "patch":
            raise PolysenseError(
                f"model.vision.image_size={cfg.image_size} is not a multiple of "
                f"model.vision.patch_size={cfg.patch_size}, which stem='conv' needs; change one "
                "of them"
            )
        # With a patch stem a remainder is dropped, as HF's strided conv does (SigLIP so400m:
        # 384 px in patches of 14 is a 27 x 27 grid; the last 6 rows and columns are unseen).
        self.cfg = cfg
        self.grad_checkpointing = False
        w = cfg.width
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = patch_embedding(cfg)
        has_cls = cfg.pool in ("cls", "cls_mean")
        n_tokens = self.num_patches + (1 if has_cls else 0)
        self.cls_token = nn.Parameter(torch.randn(1, 1, w) * w**-0.5) if has_cls else None
        self.pos_embed = nn.Parameter(torch.randn(1, n_tokens, w) * 0.02)
        self.ln_pre = nn.LayerNorm(w, eps=cfg.ln_eps) if cfg.ln_pre else nn.Identity()
        self.blocks = make_blocks(cfg)
        self.ln_post = nn.LayerNorm(w, eps=cfg.ln_eps)
        self.head = (
            MAPHead(
                width=w, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, act=cfg.act, ln_eps=cfg.ln_eps
            )
            if cfg.pool == "map"
            else None
        )
        self.apply(init_linear)
        if isinstance(self.patch_embed, ConvStem):
            self.patch_embed.reset_parameters()
            self.patch_embed.to(memory_format=torch.channels_last)  # see ConvStem.forward

    @property
    def width(self) -> int:
        return self.cfg.width

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor, *, layer: int = -1) -> torch.Tensor:
        """Images (B, C, H, W), already normalised -> tokens (B, N, W) after the final LayerNorm.

        N is the number of patches, plus one leading cls token (pool "cls" or "cls_mean"). `layer`
        below -1 returns the output of that block instead (-2: the second to last), the raw
        residual stream without the final LayerNorm (LLaVA's hidden_states[-2]).
        """
        x, dtype = self._embed(x)
        blocks = self.blocks if layer == -1 else self.blocks[: layer + 1]
        x = run_blocks(blocks, x, None, grad_ckpt=self.grad_checkpointing and self.training)
        if layer == -1:
            x = self.ln_post(x)
        return x.to(dtype)  # (B, N, W), in the dtype it would have without the cast

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
        """Images -> (tokens (B, N, W) entering the blocks, the dtype to return tokens in)."""
        size = self.cfg.image_size
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels or x.shape[-2:] != (size, size):
            raise PolysenseError(
                f"images of shape {tuple(x.shape)} do not fit model.vision "
                f"(expected (B, {self.cfg.in_channels}, {size}, {size})); resize them with "
                f"polysense.data.transforms.images_to_tensor(images, size={size})"
            )
        x = self.patch_embed(x.to(self.pos_embed.dtype))  # (B, W, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, N, W), a view
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, W)
        x = self.ln_pre(x + self.pos_embed)
        dtype = x.dtype
        if (low := inference_dtype(x)) is not None:
            x = x.to(low)
        return x, dtype

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, W) -> (B, W) by the configured pooling."""
        if self.cfg.pool == "cls":
            return tokens[:, 0]
        if self.cfg.pool == "map":
            return self.head(tokens)
        return tokens.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> pooled (B, W), equal to pooling `forward_features(x)`. With cls pooling the
        last block computes the cls token's output alone (it still attends to every patch): the
        other tokens' last MLP, projection and final LayerNorm would be thrown away (exact; 1/L of
        the tower's work saved)."""
        if self.cfg.pool != "cls" or not len(self.blocks):
            return self.pool(self.forward_features(x))
        x, dtype = self._embed(x)
        grad_ckpt = self.grad_checkpointing and self.training
        x = run_blocks(self.blocks[:-1], x, None, grad_ckpt=grad_ckpt)
        x = self.blocks[-1](x, first_only=True)  # (B, 1, W)
        return self.ln_post(x[:, 0]).to(dtype)  # (B, W)


def init_linear(m: nn.Module) -> None:
    """Small normal init for linear/conv weights, zero biases (LayerNorm keeps ones/zeros)."""
    if isinstance(m, nn.Linear | nn.Conv2d):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
