"""Text-to-image diffusion: a small pixel-space U-Net with cross-attention to frozen text tokens.

Imagen's recipe at the world's scale: a frozen polysense text tower (the CLIP text transformer of
a contrastive checkpoint) turns a prompt into per-token states; a U-Net over 32 px pixels reads
them through cross-attention at its lower resolutions and adds their pooled vector to the timestep
embedding. Trained with the DDPM objective (epsilon or v prediction, cosine noise schedule),
sampled with DDIM in any number of steps, with classifier-free guidance: the condition is dropped
(replaced by a learned null token) for a fraction of training samples, and sampling mixes the
conditional and unconditional predictions as `uncond + scale * (cond - uncond)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from polysense.config import check_fields
from polysense.errors import PolysenseError


@dataclass(frozen=True)
class DiffusionConfig:
    """The denoiser and its noise process. The image is folded into `patch` x `patch` pixel
    blocks (32 px -> 16 x 16 x 12 at patch 2), which costs like a 16 px U-Net yet predicts every
    pixel; `channels` are per resolution level (16, 8, 4 at patch 2); levels from `attn_from` on
    get self- and cross-attention blocks."""

    image_size: int = 32
    patch: int = 2  # the U-Net works on patch x patch pixel blocks (space-to-depth, lossless)
    channels: tuple[int, int, int] = (64, 96, 128)
    res_blocks: int = 1
    attn_from: int = 1
    heads: int = 4
    text_width: int = 128  # the frozen text tower's width (set from it when training)
    timesteps: int = 1000
    prediction: Literal["eps", "v"] = "v"
    cond_drop: float = 0.1  # fraction of training samples trained unconditionally (for CFG)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_fields(
            self,
            positive="image_size patch channels heads text_width timesteps",
            non_negative="res_blocks attn_from",
            fraction="cond_drop",
            below_one="dropout",
        )


# ---------------------------------------------------------------------------------------------
# noise schedule


def cosine_alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """Cumulative signal fraction alpha_bar(t) for continuous t in [0, 1] (Nichol & Dhariwal),
    clamped so that the last step keeps a little signal (no division by zero in DDIM)."""
    s = 0.008
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return (f / f0).clamp(min=1e-5, max=1.0)


def alpha_bars(timesteps: int) -> torch.Tensor:
    """alpha_bar at the discrete steps 1..T, (T,) float64; index i is step i + 1."""
    t = torch.arange(1, timesteps + 1, dtype=torch.float64) / timesteps
    return cosine_alpha_bar(t)


def q_sample(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Forward process: x_t = sqrt(ab) x0 + sqrt(1 - ab) noise; alpha_bar is (B,)."""
    a = alpha_bar.view(-1, 1, 1, 1).to(x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise  # (B, 3, H, W)


def target_for(
    prediction: str, x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor
) -> torch.Tensor:
    """What the network regresses: eps, or v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho)."""
    if prediction == "eps":
        return noise
    a = alpha_bar.view(-1, 1, 1, 1).to(x0.dtype)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def to_x0_eps(
    prediction: str, out: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The network output at x_t -> (x0, eps) estimates."""
    a = alpha_bar.view(-1, 1, 1, 1).to(x_t.dtype)
    if prediction == "eps":
        eps = out
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    else:
        x0 = a.sqrt() * x_t - (1 - a).sqrt() * out
        eps = (1 - a).sqrt() * x_t + a.sqrt() * out
    return x0, eps


# ---------------------------------------------------------------------------------------------
# the U-Net


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of timesteps t (B,) float -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([args.cos(), args.sin()], dim=-1)  # (B, dim)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the embedding added in between as a per-channel shift."""

    def __init__(self, *, c_in: int, c_out: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = _norm(c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C, H, W)
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class CrossAttention(nn.Module):
    """Queries from image tokens (B, N, C); keys and values from text tokens (B, L, D)."""

    def __init__(self, *, width: int, context_width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width, bias=False)
        self.kv = nn.Linear(context_width, 2 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.kv(ctx), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        mask = keep[:, None, None, :]  # (B, 1, 1, L) True where a key is a real token
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, d)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, N, C)


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> self-attention, cross-attention to the text, MLP -> feature map."""

    def __init__(self, *, channels: int, context_width: int, heads: int) -> None:
        super().__init__()
        if channels % heads:
            raise PolysenseError(f"channels={channels} not divisible by heads={heads}; change one")
        self.norm = _norm(channels)
        self.ln1 = nn.LayerNorm(channels)
        self.self_attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(channels)
        self.cross = CrossAttention(width=channels, context_width=context_width, heads=heads)
        self.ln3 = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(
            nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels)
        )
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        t = rearrange(self.norm(x), "b c h w -> b (h w) c")  # (B, N, C)
        y = self.ln1(t)
        t = t + self.self_attn(y, y, y, need_weights=False)[0]
        t = t + self.cross(self.ln2(t), ctx, keep)
        t = t + self.mlp(self.ln3(t))
        return x + self.out(rearrange(t, "b (h w) c -> b c h w", h=h, w=w))


class UNet(nn.Module):
    """The denoiser: (x_t (B, 3, S, S), t (B,) in [0, 1], text tokens (B, L, D), keep (B, L),
    pooled text (B, D)) -> prediction (B, 3, S, S)."""

    def __init__(self, *, cfg: DiffusionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        chs = cfg.channels
        if cfg.image_size % (cfg.patch * 2 ** (len(chs) - 1)):
            raise PolysenseError(
                f"image_size={cfg.image_size} must be divisible by patch * 2^(levels - 1) = "
                f"{cfg.patch * 2 ** (len(chs) - 1)}; change model.patch or model.image_size"
            )
        pixels = 3 * cfg.patch**2
        emb = 4 * chs[0]
        self.emb_dim = emb
        self.time_mlp = nn.Sequential(nn.Linear(chs[0], emb), nn.SiLU(), nn.Linear(emb, emb))
        self.text_pool = nn.Linear(cfg.text_width, emb)
        self.ctx_norm = nn.LayerNorm(cfg.text_width)
        # Classifier-free guidance: the dropped condition is one learned token and pooled vector.
        self.null_token = nn.Parameter(torch.randn(cfg.text_width) * 0.02)
        self.null_pooled = nn.Parameter(torch.zeros(cfg.text_width))
        self.stem = nn.Conv2d(pixels, chs[0], 3, padding=1)

        def attn(level: int, c: int) -> nn.Module | None:
            if level < cfg.attn_from:
                return None
            return SpatialTransformer(channels=c, context_width=cfg.text_width, heads=cfg.heads)

        self.down = nn.ModuleList()
        skips = [chs[0]]
        c = chs[0]
        for level, c_out in enumerate(chs):
            for _ in range(cfg.res_blocks):
                self.down.append(
                    nn.ModuleList(
                        [
                            ResBlock(c_in=c, c_out=c_out, emb_dim=emb, dropout=cfg.dropout),
                            attn(level, c_out) or nn.Identity(),
                        ]
                    )
                )
                c = c_out
                skips.append(c)
            if level < len(chs) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid1 = ResBlock(c_in=c, c_out=c, emb_dim=emb, dropout=cfg.dropout)
        self.mid_attn = SpatialTransformer(
            channels=c, context_width=cfg.text_width, heads=cfg.heads
        )
        self.mid2 = ResBlock(c_in=c, c_out=c, emb_dim=emb, dropout=cfg.dropout)
        self.up = nn.ModuleList()
        for level in reversed(range(len(chs))):
            c_out = chs[level]
            for _ in range(cfg.res_blocks + 1):
                self.up.append(
                    nn.ModuleList(
                        [
                            ResBlock(
                                c_in=c + skips.pop(), c_out=c_out, emb_dim=emb, dropout=cfg.dropout
                            ),
                            attn(level, c_out) or nn.Identity(),
                        ]
                    )
                )
                c = c_out
            if level > 0:
                self.up.append(
                    nn.Sequential(nn.Upsample(scale_factor=2.0), nn.Conv2d(c, c, 3, padding=1))
                )
        self.out_norm = _norm(c)
        self.out = nn.Conv2d(c, pixels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def null_condition(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The unconditional context: one null token (B, 1, D), keep (B, 1), pooled (B, D)."""
        tokens = self.null_token.expand(batch, 1, -1)
        keep = torch.ones(batch, 1, dtype=torch.bool, device=tokens.device)
        return tokens, keep, self.null_pooled.expand(batch, -1)

    def drop_condition(
        self,
        tokens: torch.Tensor,
        keep: torch.Tensor,
        pooled: torch.Tensor,
        drop: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Replace the condition of rows where drop (B,) is True by the null condition: the
        null token sits at position 0 and every other position is masked out."""
        d = drop.view(-1, 1, 1)
        first = torch.zeros_like(keep)
        first[:, 0] = True
        tokens = torch.where(d & first[..., None], self.null_token.to(tokens.dtype), tokens)
        keep = torch.where(drop[:, None], first, keep)  # (B, L)
        pooled = torch.where(drop[:, None], self.null_pooled.to(pooled.dtype), pooled)
        return tokens, keep, pooled

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        tokens: torch.Tensor,
        keep: torch.Tensor,
        pooled: torch.Tensor,
    ) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t * 1000.0, self.cfg.channels[0]))  # (B, E)
        emb = emb + self.text_pool(pooled)
        ctx = self.ctx_norm(tokens)  # (B, L, D)
        h = self.stem(F.pixel_unshuffle(x, self.cfg.patch))  # (B, C0, S/p, S/p)
        hs = [h]
        for layer in self.down:
            if isinstance(layer, nn.ModuleList):
                h = layer[0](h, emb)
                h = h if isinstance(layer[1], nn.Identity) else layer[1](h, ctx, keep)
            else:
                h = layer(h)  # downsample
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb), ctx, keep), emb)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = layer[0](torch.cat([h, hs.pop()], dim=1), emb)
                h = h if isinstance(layer[1], nn.Identity) else layer[1](h, ctx, keep)
            else:
                h = layer(h)  # upsample
        out = self.out(F.silu(self.out_norm(h)))  # (B, 3 p^2, S/p, S/p)
        return F.pixel_shuffle(out, self.cfg.patch)  # (B, 3, S, S)


# ---------------------------------------------------------------------------------------------
# training loss and sampling


def diffusion_loss(
    net: UNet,
    x0: torch.Tensor,
    tokens: torch.Tensor,
    keep: torch.Tensor,
    pooled: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The DDPM objective: MSE between the network output and the eps / v target at a uniformly
    drawn step, with the condition dropped for a `cond_drop` fraction of rows. Randomness comes
    from `generator` so a step's loss is a pure function of (weights, batch, generator seed)."""
    cfg = net.cfg
    b = x0.shape[0]
    steps = torch.randint(1, cfg.timesteps + 1, (b,), generator=generator)  # (B,)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    drop = (torch.rand(b, generator=generator) < cfg.cond_drop).to(x0.device)
    ab = alpha_bars(cfg.timesteps)[steps - 1].to(x0.device)  # (B,)
    x_t = q_sample(x0, noise, ab)
    tokens, keep, pooled = net.drop_condition(tokens, keep, pooled, drop)
    t = (steps.float() / cfg.timesteps).to(x0.device)
    out = net(x_t, t, tokens, keep, pooled)
    return F.mse_loss(out.float(), target_for(cfg.prediction, x0, noise, ab).float())


def guided_output(
    net: UNet,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    guidance: float,
) -> torch.Tensor:
    """Classifier-free guidance: uncond + guidance * (cond - uncond), one batched forward.
    guidance 1 is the conditional prediction alone, 0 the unconditional one."""
    tokens, keep, pooled = cond
    b = x.shape[0]
    if guidance == 1.0:
        return net(x, t, tokens, keep, pooled)
    n_tok, n_keep, n_pool = net.null_condition(b)
    if guidance == 0.0:
        return net(x, t, n_tok, n_keep, n_pool)
    pad = tokens.new_zeros(b, tokens.shape[1] - 1, tokens.shape[2])
    both_tokens = torch.cat([tokens, torch.cat([n_tok.to(tokens.dtype), pad], dim=1)])
    both_keep = torch.cat([keep, F.pad(n_keep, (0, keep.shape[1] - 1), value=False)])
    out = net(
        torch.cat([x, x]), torch.cat([t, t]), both_tokens, both_keep, torch.cat([pooled, n_pool])
    )
    cond_out, uncond_out = out.chunk(2)
    return uncond_out + guidance * (cond_out - uncond_out)


@torch.no_grad()
def ddim_sample(
    net: UNet,
    cond: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    steps: int = 50,
    guidance: float = 3.0,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    callback: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """DDIM (Song et al.) from pure noise in `steps` evenly spaced steps of the T-step process;
    eta 0 is deterministic given the generator (or the starting `noise`). Returns images in [-1, 1], (B, 3, S, S)."""
    cfg = net.cfg
    if not 1 <= steps <= cfg.timesteps:
        raise PolysenseError(f"steps={steps} must be between 1 and {cfg.timesteps}")
    b = cond[0].shape[0]
    device = cond[0].device
    ab_all = alpha_bars(cfg.timesteps)
    # Steps T = s_K > ... > s_1 >= 1, then "step 0" where alpha_bar is 1 (the clean image).
    seq = torch.linspace(cfg.timesteps, 1, steps).round().long().tolist()
    shape = (b, 3, cfg.image_size, cfg.image_size)
    x = (noise if noise is not None else torch.randn(shape, generator=generator)).to(device)
    for i, s in enumerate(seq):
        ab = torch.full((b,), float(ab_all[s - 1]), device=device)
        ab_prev = float(ab_all[seq[i + 1] - 1]) if i + 1 < len(seq) else 1.0
        t = torch.full((b,), s / cfg.timesteps, device=device)
        out = guided_output(net, x, t, cond, guidance).float()
        x0, eps = to_x0_eps(cfg.prediction, out, x, ab)
        x0 = x0.clamp(-1.0, 1.0)
        a = float(ab[0])
        # Recompute eps from the clipped x0 so the update stays on the data manifold.
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - a) * (1 - a / ab_prev))
        x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator).to(device)
        if callback is not None:
            callback(i + 1)
    return x.clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# the frozen text tower and the whole generator


class TextCondition(nn.Module):
    """The frozen text tower of a polysense CLIP: prompts -> per-token states, keep mask, pooled.

    Padding columns past the longest prompt are cut (the tower masks padding, so the real
    tokens' states do not change) to keep cross-attention short."""

    def __init__(self, *, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip.eval()
        for p in self.clip.parameters():
            p.requires_grad_(False)

    @property
    def width(self) -> int:
        return self.clip.text.width

    def train(self, mode: bool = True) -> TextCondition:
        super().train(False)  # frozen: always in eval mode
        return self

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids (B, L) -> tokens (B, L', D), keep (B, L') bool, pooled (B, D)."""
        text = self.clip.text
        keep = ids != text.cfg.pad_id  # (B, L)
        length = max(int(keep.sum(dim=1).max()), 1)
        ids, keep = ids[:, :length], keep[:, :length]
        tokens = text.forward_features(ids)  # (B, L', D)
        return tokens, keep, text.pool(tokens, ids)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self(self.clip.tokenize(prompts).to(self.clip.device))


class TextToImage(nn.Module):
    """A denoiser and the frozen text tower it reads: `generate(prompts)` -> uint8 images."""

    def __init__(self, *, unet: UNet, text: TextCondition) -> None:
        super().__init__()
        self.unet = unet
        self.text = text

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        *,
        steps: int = 50,
        guidance: float = 3.0,
        seed: int = 0,
        batch_size: int = 64,
        callback: Callable[[int], None] | None = None,
        step_callback: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """One image per prompt -> (N, S, S, 3) uint8. Image i depends only on (prompt i, seed,
        i), not on the batch it was drawn in. `callback(n)` is told of each finished batch of n
        images, `step_callback(k)` of each DDIM step."""
        self.unet.eval()
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            noise = torch.stack(  # per-image noise seeds: batch-size independent
                [
                    torch.randn(
                        3,
                        self.unet.cfg.image_size,
                        self.unet.cfg.image_size,
                        generator=torch.Generator().manual_seed(seed * 1_000_003 + start + j),
                    )
                    for j in range(len(chunk))
                ]
            )
            x = ddim_sample(
                self.unet,
                self.text.encode(chunk),
                steps=steps,
                guidance=guidance,
                noise=noise,
                callback=step_callback,
            )
            out.append(to_uint8(x))
            if callback is not None:
                callback(len(chunk))
        return torch.cat(out)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, S, S) -> uint8 (B, S, S, 3)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float (B, 3, S, S) in [-1, 1], the space the diffusion runs in."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
