"""The small causal decoder of polysense's language model and VLM (`GPT`) and its config.

Pre-norm blocks, learned positions, tied input/output embeddings and a KV cache, so generation
costs one token's compute per step. Rows may be left-padded: a key mask hides the padding and
positions count only real tokens (`attention_mask`, `positions_from_mask`, which the HF decoder
of models/vlm_hf.py shares).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from polysense.config import check_fields
from polysense.errors import PolysenseError
from polysense.models.vit import MLP, init_linear

# (k, v) per layer, each (B, H, S, D)
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class LMConfig:
    family: Literal["lm"] = "lm"
    vocab_size: int = 512
    context_length: int = 128  # learned positions: the longest sequence, image tokens included
    width: int = 192
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_fields(
            self,
            positive="vocab_size context_length width heads mlp_ratio",
            non_negative="layers",
            below_one="dropout",
        )


def attention_mask(key_mask: torch.Tensor, n_query: int) -> torch.Tensor:
    """Causal mask over left-padded rows: key_mask (B, S) True on real tokens -> (B, 1, T, S).

    The T queries are the last T of the S positions. Every query also sees itself, so a padding
    query has a non-empty row (no NaN); real queries never see padding keys.
    """
    s = key_mask.shape[1]
    q_pos = torch.arange(s - n_query, s, device=key_mask.device)[:, None]  # (T, 1)
    k_pos = torch.arange(s, device=key_mask.device)[None, :]  # (1, S)
    causal = k_pos <= q_pos  # (T, S)
    mask = causal[None] & key_mask[:, None, :]  # (B, T, S)
    mask = mask | (k_pos == q_pos)[None]
    return mask[:, None]  # (B, 1, T, S)


def positions_from_mask(key_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting real tokens only (left padding does not shift them): (B, S)."""
    return (key_mask.long().cumsum(1) - 1).clamp(min=0)


class CausalSelfAttention(nn.Module):
    """Multi-head attention with an optional past (k, v): new keys are appended to the cache."""

    def __init__(self, *, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        if width % heads:
            raise PolysenseError(f"model.lm.width={width} is not divisible by heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, H, S, D)
            v = torch.cat([past[1], v], dim=2)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, T, D)
        return self.proj(rearrange(out, "b h t d -> b t (h d)")), (k, v)


class DecoderBlock(nn.Module):
    def __init__(self, *, cfg: LMConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = CausalSelfAttention(width=cfg.width, heads=cfg.heads, dropout=cfg.dropout)
        self.ln_2 = nn.LayerNorm(cfg.width)
        hidden = round(cfg.width * cfg.mlp_ratio)
        self.mlp = MLP(width=cfg.width, hidden=hidden, act="gelu", dropout=cfg.dropout)

    def forward(self, x, mask, past):
        a, kv = self.attn(self.ln_1(x), mask, past)
        x = x + a  # (B, T, C)
        return x + self.mlp(self.ln_2(x)), kv


class GPT(nn.Module):
    """Causal decoder over token embeddings; the output head is the token embedding (tied)."""

    def __init__(self, *, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False  # recompute each block in backward (training only)
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.context_length, cfg.width))
        self.blocks = nn.ModuleList(DecoderBlock(cfg=cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.apply(init_linear)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        for block in self.blocks:  # GPT-2: residual projections scaled by depth
            nn.init.normal_(block.attn.proj.weight, std=0.02 / (2 * cfg.layers) ** 0.5)
            nn.init.normal_(block.mlp.fc2.weight, std=0.02 / (2 * cfg.layers) ** 0.5)

    def forward(
        self,
        embeds: torch.Tensor,
        key_mask: torch.Tensor,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """embeds (B, T, C) of the new tokens; key_mask (B, S) over past + new tokens (True =
        real). Returns logits (B, T, V) and the cache extended by these T tokens."""
        t, s = embeds.shape[1], key_mask.shape[1]
        if s > self.cfg.context_length:
            raise PolysenseError(
                f"sequence of {s} tokens exceeds model.lm.context_length="
                f"{self.cfg.context_length}; shorten the prompt or max_new_tokens"
            )
        pos = positions_from_mask(key_mask)[:, s - t :]  # (B, T)
        x = embeds + self.pos_embed[0, pos]  # (B, T, C)
        mask = attention_mask(key_mask, t)
        new_cache: KVCache = []
        for i, block in enumerate(self.blocks):
            past = cache[i] if cache is not None else None
            if self.grad_checkpointing and torch.is_grad_enabled() and past is None:
                x, kv = checkpoint(block, x, mask, None, use_reentrant=False)
            else:
                x, kv = block(x, mask, past)
            new_cache.append(kv)
        logits = self.ln_f(x) @ self.token_embed.weight.T  # (B, T, V)
        return logits, new_cache
