"""Video ViT: per-frame patches, a learned temporal embedding, joint or divided space-time attention.

Joint attention (ViViT's "spatio-temporal" model) runs the pre-norm blocks of `models/vit.py` over
all T x N patch tokens of a clip: cost grows with (T N)^2. Divided attention (TimeSformer, Bertasius
et al. 2021) splits each block into temporal attention (each patch position across the T frames,
then a zero-initialised linear) followed by spatial attention (the N patches of one frame, with a
copy of the cls token, averaged back over frames) and the MLP: cost grows with T N^2 + N T^2.

The spatial weights (patch embedding, cls token, positions, each block's spatial attention and MLP,
LayerNorms) have the names and shapes of a `VisionTransformer`'s, so `load_image_weights` copies an
image checkpoint into them. With the temporal parts at their zero initialisation, a divided model
so initialised maps a clip of identical frames to exactly the image model's output (tested).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from polysense.config import VideoConfig
from polysense.data.readers import sample_frame_indices
from polysense.errors import PolysenseError
from polysense.models.vit import (
    MLP,
    Attention,
    Block,
    ConvStem,
    init_linear,
    make_blocks,
    mlp_dim,
    patch_embedding,
)

__all__ = ["DividedBlock", "VideoTransformer", "sample_frame_indices", "videos_to_tensor"]


def videos_to_tensor(videos: torch.Tensor, cfg: VideoConfig) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> normalised float32 (B, T, 3, H, W)."""
    x = videos.permute(0, 1, 4, 2, 3).float().div_(255.0)  # (B, T, 3, H, W)
    mean = torch.tensor(cfg.image_mean).view(1, 1, 3, 1, 1)
    std = torch.tensor(cfg.image_std).view(1, 1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous()


class DividedBlock(nn.Module):
    """TimeSformer block: x + fc(temporal attn), then spatial attention per frame, then the MLP.

    `ln_1`, `attn`, `ln_2` and `mlp` are named as in `vit.Block`, so image weights load into them.
    """

    def __init__(
        self, *, width: int, heads: int, mlp_ratio: float, act: str, ln_eps: float, dropout: float
    ) -> None:
        super().__init__()
        self.ln_time = nn.LayerNorm(width, eps=ln_eps)
        self.attn_time = Attention(width=width, heads=heads, dropout=dropout)
        self.fc_time = nn.Linear(width, width)
        self.ln_1 = nn.LayerNorm(width, eps=ln_eps)
        self.attn = Attention(width=width, heads=heads, dropout=dropout)
        self.ln_2 = nn.LayerNorm(width, eps=ln_eps)
        self.mlp = MLP(width=width, hidden=mlp_dim(width, mlp_ratio), act=act, dropout=dropout)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """x (B, 1 + T*N, W): the cls token, then the patches frame by frame."""
        cls, patches = x[:, :1], x[:, 1:]  # (B, 1, W), (B, T*N, W)
        p = rearrange(patches, "b (t n) c -> (b n) t c", t=frames)  # (B*N, T, W)
        p = p + self.fc_time(self.attn_time(self.ln_time(p)))
        n = p.shape[0] // x.shape[0]
        s = rearrange(p, "(b n) t c -> (b t) n c", n=n)  # (B*T, N, W)
        s = torch.cat([cls.repeat_interleave(frames, dim=0), s], dim=1)  # (B*T, 1+N, W)
        s = s + self.attn(self.ln_1(s))
        cls = rearrange(s[:, :1], "(b t) one c -> b t (one c)", t=frames).mean(1, keepdim=True)
        patches = rearrange(s[:, 1:], "(b t) n c -> b (t n) c", t=frames)  # (B, T*N, W)
        x = torch.cat([cls, patches], dim=1)  # (B, 1+T*N, W)
        return x + self.mlp(self.ln_2(x))


class VideoTransformer(nn.Module):
    """Clips (B, T, 3, H, W), normalised -> (B, width) by the cls token or the patch mean."""

    def __init__(self, *, cfg: VideoConfig) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise PolysenseError(
                f"model.video.image_size={cfg.image_size} is not a multiple of "
                f"model.video.patch_size={cfg.patch_size}; change one of them"
            )
        self.cfg = cfg
        self.grad_checkpointing = False
        w = cfg.width
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = patch_embedding(cfg)
        self.cls_token = nn.Parameter(torch.randn(1, 1, w) * w**-0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.num_patches, w) * 0.02)  # space
        self.time_embed = nn.Parameter(torch.zeros(1, cfg.num_frames, 1, w))  # (1, T, 1, W)
        self.ln_pre = nn.LayerNorm(w, eps=cfg.ln_eps) if cfg.ln_pre else nn.Identity()
        if cfg.attention == "joint":
            self.blocks = make_blocks(cfg)
        else:
            self.blocks = nn.ModuleList(
                DividedBlock(
                    width=w,
                    heads=cfg.heads,
                    mlp_ratio=cfg.mlp_ratio,
                    act=cfg.act,
                    ln_eps=cfg.ln_eps,
                    dropout=cfg.dropout,
                )
                for _ in range(cfg.layers)
            )
        self.ln_post = nn.LayerNorm(w, eps=cfg.ln_eps)
        self.apply(init_linear)
        if isinstance(self.patch_embed, ConvStem):
            self.patch_embed.reset_parameters()
        for block in self.blocks:  # TimeSformer: the temporal branch starts as the identity
            if isinstance(block, DividedBlock):
                nn.init.zeros_(block.fc_time.weight)
                nn.init.zeros_(block.fc_time.bias)

    @property
    def width(self) -> int:
        return self.cfg.width

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _block(self, block: nn.Module, x: torch.Tensor, frames: int) -> torch.Tensor:
        if isinstance(block, Block):
            return block(x)
        return block(x, frames)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) -> tokens (B, 1 + T*N, W) after the final LayerNorm (cls first)."""
        cfg = self.cfg
        size = cfg.image_size
        if x.ndim != 5 or x.shape[1] != cfg.num_frames or x.shape[2:] != (3, size, size):
            raise PolysenseError(
                f"video of shape {tuple(x.shape)} does not fit model.video (expected (B, "
                f"{cfg.num_frames}, 3, {size}, {size})); sample frames with "
                "polysense.models.video.sample_frame_indices and resize them"
            )
        b, t = x.shape[:2]
        x = self.patch_embed(rearrange(x, "b t c h w -> (b t) c h w").to(self.pos_embed.dtype))
        x = rearrange(x, "(b t) c h w -> b t (h w) c", b=b)  # (B, T, N, W)
        x = x + self.pos_embed[:, None, 1:] + self.time_embed  # space + time positions
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)  # (B, 1, W)
        x = self.ln_pre(torch.cat([cls, rearrange(x, "b t n c -> b (t n) c")], dim=1))
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(self._block, block, x, t, use_reentrant=False)
            else:
                x = self._block(block, x, t)
        return self.ln_post(x)  # (B, 1 + T*N, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_features(x)
        return tokens[:, 0] if self.cfg.pool == "cls" else tokens[:, 1:].mean(dim=1)  # (B, W)

    def load_image_weights(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Copy a `VisionTransformer`'s state dict into the spatial parts; returns the keys
        copied. A CLIP checkpoint's is `models.checkpoint.tower_weights(dir, "visual.", ...)`.
        The temporal embedding and temporal attention keep their initialisation."""
        own = self.state_dict()
        copied, skipped = {}, []
        for key, value in state.items():
            if key == "cls_token" and value.shape != own[key].shape:
                skipped.append(key)
            elif key in own and own[key].shape == value.shape:
                copied[key] = value
            elif key in own or key.startswith("head."):
                skipped.append(key)
        bad = [k for k in skipped if not k.startswith("head.")]
        if bad or not copied:
            raise PolysenseError(
                f"image weights do not fit model.video ({len(bad)} mismatched, e.g. {bad[:3]}): "
                "make image_size, patch_size, stem, width, layers and heads equal the image "
                "tower's, and pool='cls'"
            )
        self.load_state_dict(copied, strict=False)
        return sorted(copied)
