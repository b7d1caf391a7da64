"""Multimodal language model (LLaVA / BLIP-2 recipe): vision encoder -> projector -> GPT decoder.

- The decoder: `models.lm.GPT`, a small causal decoder with a KV cache (left-padded rows), or
  any HF causal LM with its tokenizer and chat template (`init.lm=HF_DIR`, `model.decoder="hf"`;
  models/vlm_hf.py, which also writes and reads LLaVA).
- Projectors into the LM's embedding space: `linear`, `mlp2x` (Linear-GELU-Linear, LLaVA-1.5) and
  `qformer` (K learned queries that self-attend and cross-attend to the image tokens, BLIP-2).
- `VLM`: the image tokens replace the `<image>` placeholder of the chat template
  `USER: <image>\\n{instruction}\\nASSISTANT: {response}[EOS]`. A wide image (the world's OCR
  strips, 4:1) is cut into square tiles, each encoded separately, tokens concatenated in order.
- The vision tower is the ViT of a polysense CLIP checkpoint or of an HF CLIP/SigLIP directory
  (`VisionTransformer.forward_features` gives its token sequence: cls + patches, at
  `model.feature_layer`; `feature_select="patch"` drops the cls token, as LLaVA does).

The run configs (`LMRunConfig`, `VLMRunConfig`) are what a checkpoint's config.json holds;
`models.checkpoint` writes and reads them (`save_vlm`, `load_lm`, `load_vlm`), and
`models.warmstart.build_vlm` builds a VLM from its init checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import nn

from polysense.config import ConfigError, LoopConfig, VisionConfig, check_fields
from polysense.data.chat import (
    IMAGE,
    ChatTokenizer,
)
from polysense.data.transforms import images_to_tensor
from polysense.decoding import ban
from polysense.errors import PolysenseError
from polysense.models.lm import GPT, LMConfig
from polysense.models.vit import MLP, Attention, VisionTransformer

if TYPE_CHECKING:
    from polysense.models.vlm_hf import HFChatTokenizer

# ---------------------------------------------------------------------------------------------
# configs


@dataclass(frozen=True)
class VLMConfig:
    family: Literal["vlm"] = "vlm"
    lm: LMConfig = field(default_factory=LMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)  # copied from the CLIP checkpoint
    projector: Literal["linear", "mlp2x", "qformer"] = "mlp2x"
    num_queries: int = 16  # qformer: learned queries = image tokens the LM sees
    qformer_layers: int = 2
    qformer_heads: int = 4
    max_tiles: int = 4  # a W:H = k:1 image is cut into k square tiles (k <= max_tiles)
    # "polysense": the GPT below (fields of `lm`); "hf": a transformers causal LM (init.lm=HF_DIR;
    # its architecture is the checkpoint's lm/config.json, `lm` only mirrors its sizes)
    decoder: Literal["polysense", "hf"] = "polysense"
    # the vision tokens the projector reads: -1 = after the final LayerNorm; -2 = the output of
    # the second to last block, without it (LLaVA's hidden_states[-2]); "patch" drops the cls token
    feature_layer: int = -1
    feature_select: Literal["full", "patch"] = "full"

    def __post_init__(self) -> None:
        check_fields(
            self, positive="num_queries qformer_heads max_tiles", non_negative="qformer_layers"
        )
        if self.feature_layer >= 0:
            raise ConfigError(
                f"model.feature_layer={self.feature_layer}: count from the end (-1 = last block "
                "with the final LayerNorm, -2 = LLaVA's second to last block)"
            )


@dataclass(frozen=True)
class SCSTConfig:
    """Self-critical sequence training (Rennie et al. 2017) of the caption task: the last
    `fraction` of a stage (of its steps, or of its clock when `max_minutes` is set) samples
    `samples` captions per image and follows the policy gradient of their CIDEr-D reward, each
    sample's baseline being the mean reward of the image's other samples (Luo 2020)."""

    fraction: float = 0.0  # 0 = off; the cross-entropy schedule anneals over the rest
    lr: float = 2e-5  # constant; the ViT trains at lr * lr_vision / train.lr
    batch_size: int = 16  # images per step
    samples: int = 5  # captions sampled per image (>= 2)
    temperature: float = 0.5  # sampling temperature (the policy is softmax(logits / T))
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        # temperature, and samples >= 2, are checked by the trainer with SCST's reasons
        check_fields(self, positive="lr batch_size samples max_new_tokens", fraction="fraction")


@dataclass(frozen=True)
class VLMTrainConfig(LoopConfig):
    """The LM and VLM stages' train config: the shared loop fields (`LoopConfig`; the schedule
    anneals within `max_minutes`), what trains, the task mixture, LoRA and SCST."""

    batch_size: int = 64
    lr_vision: float = 1e-4  # for the top ViT blocks when train_vision_top > 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.05
    eps: float = 1e-8  # torch's AdamW default, which the VLM stages have always trained with
    warmup_steps: int = 50
    # What trains (everything else is frozen: requires_grad False, never in the optimiser).
    train_lm: bool = True
    train_projector: bool = True
    train_vision_top: int = 0  # the last N ViT blocks (+ final LayerNorm) at lr_vision
    # Stage mixture: fractions of a batch that are captions / QA / OCR (normalised).
    mix_caption: float = 1.0
    mix_qa: float = 0.0
    mix_ocr: float = 0.0
    # QA rows hold up to this many questions about their image as one conversation (LLaVA's
    # multi-turn packing: one image prefix serves several answers).
    qa_turns: int = 1
    precision: Literal["auto", "fp32", "bf16"] = "fp32"  # bf16: autocast (fast on CPUs with AMX)
    # LoRA on the LM through peft (0 = off): with train_lm, only the adapters of the LM train;
    # checkpoints hold the merged weights (state.pt keeps the adapters, so resume is exact)
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = ""  # comma-separated module names; "" = peft's default for the LM type
    grad_checkpointing: bool = False  # recompute LM and ViT activations in backward
    scst: SCSTConfig = field(default_factory=SCSTConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(
            self,
            positive="qa_turns",
            non_negative="lr_vision train_vision_top mix_caption mix_qa mix_ocr lora_rank "
            "lora_alpha",
            below_one="lora_dropout",
        )


@dataclass(frozen=True)
class InitConfig:
    # an lm-tiny checkpoint (its GPT and tokenizer), or any HF AutoModelForCausalLM directory
    # (its weights, tokenizer and chat template; sets model.decoder=hf); "" = a fresh GPT
    lm: str = ""
    vision: str = "runs/quickstart/ckpt"  # a polysense CLIP checkpoint or HF CLIP/SigLIP dir
    vlm: str = ""  # a VLM checkpoint to continue from (stage 2 starts from stage 1)


@dataclass(frozen=True)
class LMRunConfig:
    name: str = ""
    # "polysense" = polysense's GPT; "qwen2" = a fresh transformers Qwen2ForCausalLM of `model`'s
    # sizes with a Qwen2-format tokenizer trained on the data's text (models/hf_decoder.py),
    # saved as a transformers directory that the VLM stages' init.lm takes
    decoder: Literal["polysense", "qwen2"] = "polysense"
    model: LMConfig = field(default_factory=LMConfig)
    train: VLMTrainConfig = field(default_factory=VLMTrainConfig)


@dataclass(frozen=True)
class VLMRunConfig:
    name: str = ""
    model: VLMConfig = field(default_factory=VLMConfig)
    train: VLMTrainConfig = field(default_factory=VLMTrainConfig)
    init: InitConfig = field(default_factory=InitConfig)


# ---------------------------------------------------------------------------------------------
# projectors


class CrossAttention(nn.Module):
    def __init__(self, *, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """x (B, K, C) queries attend to ctx (B, N, C)."""
        q = rearrange(self.q(x), "b k (h d) -> b h k d", h=self.heads)
        k, v = rearrange(self.kv(ctx), "b n (two h d) -> two b h n d", two=2, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, K, D)
        return self.proj(rearrange(out, "b h k d -> b k (h d)"))


class QFormerLayer(nn.Module):
    def __init__(self, *, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2, self.ln_3 = (nn.LayerNorm(width) for _ in range(3))
        self.self_attn = Attention(width=width, heads=heads)
        self.cross_attn = CrossAttention(width=width, heads=heads)
        self.mlp = MLP(width=width, hidden=4 * width, act="gelu")

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.ln_1(x))  # (B, K, C)
        x = x + self.cross_attn(self.ln_2(x), ctx)
        return x + self.mlp(self.ln_3(x))


class QFormer(nn.Module):
    """K learned queries read the image tokens through cross-attention (BLIP-2's Q-Former, without
    its text branch): the LM sees K tokens whatever the number of patches."""

    def __init__(self, *, in_width: int, width: int, queries: int, layers: int, heads: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, queries, width) * 0.02)
        self.ctx_proj = nn.Linear(in_width, width)
        self.layers = nn.ModuleList(QFormerLayer(width=width, heads=heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.out = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx_proj(tokens)  # (B, N, C)
        x = self.queries.expand(tokens.shape[0], -1, -1)  # (B, K, C)
        for layer in self.layers:
            x = layer(x, ctx)
        return self.out(self.ln(x))  # (B, K, C)


def build_projector(cfg: VLMConfig) -> nn.Module:
    vw, lw = cfg.vision.width, cfg.lm.width
    if cfg.projector == "linear":
        return nn.Linear(vw, lw)
    if cfg.projector == "mlp2x":
        return nn.Sequential(nn.Linear(vw, lw), nn.GELU(), nn.Linear(lw, lw))
    if cfg.projector == "qformer":
        return QFormer(
            in_width=vw,
            width=lw,
            queries=cfg.num_queries,
            layers=cfg.qformer_layers,
            heads=cfg.qformer_heads,
        )
    raise ConfigError(f"model.projector={cfg.projector!r}; use one of 'linear', 'mlp2x', 'qformer'")


# ---------------------------------------------------------------------------------------------
# inputs: images -> tiles, rows -> left-padded embeddings


def image_tiles(image: Image.Image, *, size: int, max_tiles: int) -> list[Image.Image]:
    """A W:H ~ k:1 image (1 <= k <= max_tiles) -> k square tiles of `size` px, left to right."""
    image = image.convert("RGB")
    w, h = image.size
    k = max(1, min(max_tiles, round(w / h)))
    if k == 1:
        return [image]
    strip = image.resize((k * size, size), resample=Image.Resampling.BICUBIC)
    return [strip.crop((i * size, 0, (i + 1) * size, size)) for i in range(k)]


@dataclass
class Batch:
    """One left-padded batch: embeds (B, T, C), key_mask (B, T), labels (B, T) (-100 = no loss;
    labels[t] is the token that position t predicts)."""

    embeds: torch.Tensor
    key_mask: torch.Tensor
    labels: torch.Tensor


class VLM(nn.Module):
    """Vision tower + projector + decoder (polysense's GPT, or an HF causal LM passed as `lm`).
    `generate` / `score` take PIL images and prompt strings."""

    def __init__(
        self,
        *,
        cfg: VLMConfig,
        tokenizer: ChatTokenizer | HFChatTokenizer,
        lm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if (lm is not None) != (cfg.decoder == "hf"):
            raise PolysenseError(
                f"model.decoder={cfg.decoder!r} but an HF LM was{'' if lm is not None else ' not'} "
                "given; an HF decoder comes from init.lm=HF_DIR"
            )
        if tokenizer.vocab_size > cfg.lm.vocab_size:
            raise PolysenseError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but model.lm.vocab_size="
                f"{cfg.lm.vocab_size}; --set model.lm.vocab_size={tokenizer.vocab_size}"
            )
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.visual = VisionTransformer(cfg=cfg.vision)
        self.tile_embed = nn.Parameter(torch.zeros(cfg.max_tiles, cfg.vision.width))
        self.projector = build_projector(cfg)
        self.lm = lm if lm is not None else GPT(cfg=cfg.lm)

    @property
    def device(self) -> torch.device:
        return self.tile_embed.device

    # -- images ---------------------------------------------------------------------------
    def pixels(self, images: Sequence[Image.Image | torch.Tensor]) -> list[torch.Tensor]:
        """PIL images -> per image a (k, 3, H, W) tensor of its k tiles, normalised. A tensor
        (k, 3, H, W) is taken as already tiled and normalised."""
        v = self.cfg.vision
        out = []
        for image in images:
            if isinstance(image, torch.Tensor):
                out.append(image if image.ndim == 4 else image[None])
                continue
            tiles = image_tiles(image, size=v.image_size, max_tiles=self.cfg.max_tiles)
            out.append(
                images_to_tensor(
                    tiles, size=v.image_size, mean=v.image_mean, std=v.image_std, resize=v.resize
                )
            )
        return out

    def image_tokens(self, images: Sequence[Image.Image | torch.Tensor | None]) -> list:
        """Per image its LM-space tokens (N, C), None stays None."""
        pix = self.pixels([im for im in images if im is not None])
        encoded = iter(self.encode_images(pix)) if pix else iter(())
        return [None if im is None else next(encoded) for im in images]

    def encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """(B, k, 3, H, W) normalised tiles -> (B, N, C_lm) tokens for the LM."""
        b, k = tiles.shape[:2]
        frozen = not any(p.requires_grad for p in self.visual.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            tokens = self.visual.forward_features(
                tiles.flatten(0, 1).to(self.device), layer=self.cfg.feature_layer
            )  # (B*k, n, W)
        if self.cfg.feature_select == "patch" and self.visual.cls_token is not None:
            tokens = tokens[:, 1:]  # LLaVA's "default": the patch tokens only
        tokens = rearrange(tokens, "(b k) n w -> b k n w", b=b, k=k) + self.tile_embed[:k, None]
        tokens = rearrange(tokens, "b k n w -> b (k n) w")  # (B, k*n, W)
        return self.projector(tokens)  # (B, k*n, C); qformer: (B, num_queries, C)

    def encode_images(self, pixels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per image (k, 3, H, W) -> per image (N, C_lm); images with equal k go through together."""
        out: list[torch.Tensor | None] = [None] * len(pixels)
        by_k: dict[int, list[int]] = {}
        for i, p in enumerate(pixels):
            by_k.setdefault(p.shape[0], []).append(i)
        for idx in by_k.values():
            tokens = self.encode_tiles(torch.stack([pixels[i] for i in idx]))
            for j, i in enumerate(idx):
                out[i] = tokens[j]
        return out  # type: ignore[return-value]

    # -- token rows -----------------------------------------------------------------------
    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer.prompt_ids(prompt)

    def response_ids(self, response: str) -> list[int]:
        return self.tokenizer.response_ids(response)

    def build_batch(
        self,
        rows: Sequence[Sequence[int]],
        images: Sequence[torch.Tensor | None],
        *,
        n_prompt: Sequence[int] | None = None,
        targets: Sequence[Sequence[bool]] | None = None,
    ) -> Batch:
        """Token rows (each with at most one `<image>` id, replaced by that row's image tokens)
        -> left-padded embeddings. Which tokens are predicted (get a loss): `targets`, a flag
        per token (several answer spans: a multi-turn conversation), or `n_prompt`, the first n
        tokens being prompt and the rest targets; neither: no targets."""
        embed = self.lm.token_embed
        pieces, labels = [], []
        for r, ids in enumerate(rows):
            ids_t = torch.tensor(ids, dtype=torch.long, device=self.device)
            tgt = torch.full_like(ids_t, -100)
            if targets is not None:
                flag = torch.tensor(targets[r], dtype=torch.bool, device=self.device)
                tgt[:-1] = torch.where(flag[1:], ids_t[1:], -100)  # position t predicts t + 1
            elif n_prompt is not None:
                tgt[n_prompt[r] - 1 : -1] = ids_t[n_prompt[r] :]
            e = embed(ids_t)  # (L, C)
            at = (ids_t == self.tokenizer.image_id).nonzero().flatten().tolist()
            if len(at) > 1:
                raise PolysenseError(f"a prompt holds {len(at)} {IMAGE} placeholders; use one")
            if at:
                if images[r] is None:
                    raise PolysenseError(f"a prompt has {IMAGE} but no image was given for it")
                p, img = at[0], images[r].to(e.dtype)
                e = torch.cat([e[:p], img, e[p + 1 :]])
                tgt = torch.cat([tgt[:p], tgt.new_full((len(img),), -100), tgt[p + 1 :]])
            elif images[r] is not None:
                raise PolysenseError(f"an image was given but its prompt has no {IMAGE}")
            pieces.append(e)
            labels.append(tgt)
        t = max(len(e) for e in pieces)
        c = embed.weight.shape[1]
        out = torch.zeros(len(rows), t, c, dtype=embed.weight.dtype, device=self.device)
        key_mask = torch.zeros(len(rows), t, dtype=torch.bool, device=self.device)
        lab = torch.full((len(rows), t), -100, dtype=torch.long, device=self.device)
        for r, (e, y) in enumerate(zip(pieces, labels, strict=True)):
            out[r, t - len(e) :], key_mask[r, t - len(e) :], lab[r, t - len(y) :] = e, True, y
        return Batch(embeds=out, key_mask=key_mask, labels=lab)

    def loss(self, batch: Batch, *, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy over the target positions (mean, or sum)."""
        logits, _ = self.lm(batch.embeds, batch.key_mask)  # (B, T, V)
        return F.cross_entropy(
            logits.flatten(0, 1).float(),
            batch.labels.flatten(),
            ignore_index=-100,
            reduction=reduction,
        )

    # -- inference ------------------------------------------------------------------------
    def _prefix(self, images: Sequence[Any], prompts: Sequence[str]) -> Batch:
        tokens = self.image_tokens(images)
        return self.build_batch([self.prompt_ids(p) for p in prompts], tokens)

    @torch.no_grad()
    def generate(
        self,
        images: Sequence[Image.Image | torch.Tensor | None],
        prompts: Sequence[str],
        **decode_args: Any,
    ) -> list[str]:
        """Decode a response per (image, prompt); `decode_args` go to `polysense.decoding.generate`
        (strategy greedy/beam/sample, max_new_tokens, num_beams, temperature, top_p, seed)."""
        ids = self.generate_ids(images, prompts, **decode_args)
        return [self.tokenizer.decode(row) for row in ids]

    @torch.no_grad()
    def generate_ids(
        self,
        images: Sequence[Image.Image | torch.Tensor | None],
        prompts: Sequence[str],
        **decode_args: Any,
    ) -> list[list[int]]:
        """The token ids `generate` decodes (stop token excluded)."""
        from polysense.decoding import LMStepper, generate

        if len(images) != len(prompts):
            raise PolysenseError(f"{len(images)} images but {len(prompts)} prompts")
        batch = self._prefix(images, prompts)
        stepper = LMStepper(self.lm)
        logits, state = stepper.start(batch.embeds, batch.key_mask)
        return generate(stepper, logits, state, stop_ids=self.tokenizer.stop_ids, **decode_args)

    @torch.no_grad()
    def score(
        self,
        images: Sequence[Image.Image | torch.Tensor | None],
        prompts: Sequence[str],
        responses: Sequence[str],
        *,
        eos: bool = False,
    ) -> torch.Tensor:
        """Sum of log p(response tokens | image, prompt) per row: (B,). `eos` adds the end token."""
        rows, n_prompt = [], []
        for p, r in zip(prompts, responses, strict=True):
            row, n = self.tokenizer.scored_row(p, r, eos=eos)
            rows.append(row)
            n_prompt.append(n)
        return self.sequence_logprobs(rows, self.image_tokens(images), n_prompt=n_prompt)

    def banned_ids(self) -> list[int]:
        """Ids a response never holds: padding, begin, `<image>` and the LM's rows past the
        tokenizer's vocabulary."""
        t = self.tokenizer
        special = {t.pad_id, t.bos_id, t.image_id} - {None, *t.stop_ids}
        return [*sorted(special), *range(t.vocab_size, self.cfg.lm.vocab_size)]

    def sequence_logprobs(
        self,
        rows: Sequence[Sequence[int]],
        image_tokens: Sequence[torch.Tensor | None],
        *,
        n_prompt: Sequence[int],
        temperature: float = 1.0,
        banned: Sequence[int] = (),
    ) -> torch.Tensor:
        """Sum over each row's tokens after its first n_prompt of log softmax(logits / T), the
        `banned` ids masked out: (B,). Differentiable (self-critical training); `score` calls it
        without gradients."""
        batch = self.build_batch(rows, image_tokens, n_prompt=n_prompt)
        logits, _ = self.lm(batch.embeds, batch.key_mask)  # (B, T, V)
        if banned:
            logits = ban(logits, banned)
        logp = (logits.float() / temperature).log_softmax(-1)
        keep = batch.labels != -100
        picked = logp.gather(-1, batch.labels.clamp(min=0)[..., None])[..., 0]  # (B, T)
        return torch.where(keep, picked, 0.0).sum(1)  # masked ids give -inf off the targets
