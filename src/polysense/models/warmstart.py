"""Models whose weights start from other checkpoints (the `init` fields of their configs).

- `build_vlm`: a VLM from the ViT of a CLIP checkpoint or HF CLIP/SigLIP directory
  (`init.vision`), the decoder of an lm-tiny checkpoint or HF causal LM (`init.lm`), or a whole
  VLM checkpoint (`init.vlm`).
- `build_fusion`: a fusion model whose image and text encoders are copied from CLIP checkpoints
  (`model.image_init`, `model.text_init`; `with_text_init` takes the text tower's vocabulary,
  context length, mask and pooling).

The checkpoints are read through `polysense.models.checkpoint`; this module sits above it, so the
model files never import checkpoint I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from polysense.config import ConfigError, TextConfig
from polysense.data.chat import ChatTokenizer
from polysense.errors import PolysenseError
from polysense.models.checkpoint import (
    load_lm,
    load_model,
    load_vlm,
    read_run_config,
    tower_weights,
)
from polysense.models.fusion import (
    CrossAttnFusion,
    EarlyFusion,
    FusionConfig,
    FusionModel,
    LateFusion,
    fusion_model,
)
from polysense.models.lm import LMConfig
from polysense.models.vlm import VLM, VLMRunConfig
from polysense.models.vlm_hf import is_hf_dir, lm_config_fields, load_hf_lm


def build_vlm(run: VLMRunConfig, *, texts: Sequence[str] | None = None) -> tuple[VLM, VLMRunConfig]:
    """A VLM from its init sources: the ViT of the CLIP checkpoint or HF CLIP/SigLIP directory
    `run.init.vision`, the GPT and tokenizer of `run.init.lm` (an HF causal LM directory: that LM,
    its tokenizer and chat template; "": a fresh GPT, with a BPE trained on `texts`), or
    everything from `run.init.vlm`. Returns the model and the run config with the model config
    it really has."""
    init = run.init
    if init.vlm:
        prev = load_vlm(init.vlm)
        cfg = dataclasses.replace(run, model=prev.cfg)
        if prev.cfg.decoder == "hf":
            return prev.train(), cfg
        model = VLM(cfg=prev.cfg, tokenizer=prev.tokenizer)  # (draws the init: keeps the RNG)
        model.load_state_dict(prev.state_dict())
        return model.train(), cfg
    if not init.vision:
        raise ConfigError("init.vision is empty: a VLM needs a CLIP checkpoint for its ViT")
    clip = load_model(init.vision)
    lm_cfg = run.model.lm
    lm_state, hf_lm, decoder = None, None, "polysense"
    if init.lm and is_hf_dir(init.lm):
        hf_lm, tokenizer = load_hf_lm(init.lm)
        fields = lm_config_fields(hf_lm.model.config)
        fields["vocab_size"] = hf_lm.token_embed.num_embeddings
        lm_cfg, decoder = LMConfig(**fields), "hf"
    elif init.lm:
        gpt, tokenizer, lm_run = load_lm(init.lm)
        lm_cfg, lm_state = lm_run.model, gpt.state_dict()
    else:
        if texts is None:
            raise ConfigError("init.lm is empty and no texts were given to train a tokenizer")
        tokenizer = ChatTokenizer.train(texts, vocab_size=lm_cfg.vocab_size)
        lm_cfg = dataclasses.replace(lm_cfg, vocab_size=tokenizer.vocab_size)
    model_cfg = dataclasses.replace(run.model, lm=lm_cfg, vision=clip.cfg.vision, decoder=decoder)
    model = VLM(cfg=model_cfg, tokenizer=tokenizer, lm=hf_lm)
    model.visual.load_state_dict(clip.visual.state_dict())
    if lm_state is not None:
        model.lm.load_state_dict(lm_state)
    return model.train(), dataclasses.replace(run, model=model_cfg)


def build_fusion(cfg: FusionConfig) -> FusionModel:
    """The model of `cfg.style` (`models.fusion.fusion_model`), its image encoder copied from
    `image_init` and its text encoder from `text_init` when they are set."""
    model = fusion_model(with_text_init(cfg))
    if cfg.image_init:
        load_image_tower(model, cfg.image_init)
    if cfg.text_init:
        load_text_tower(model, cfg.text_init)
    return model


def load_image_tower(model: FusionModel, ckpt: str | Path) -> None:
    """Copy a CLIP checkpoint's vision tower (`visual.*` in model.safetensors) into the image
    encoder; the shapes must match (same image_size, patch_size, width, layers, heads)."""
    visual = tower_weights(ckpt, "visual.", field="model.image_init")
    try:
        if isinstance(model, EarlyFusion):
            model.image_stem.load_state_dict(
                {k[12:]: v for k, v in visual.items() if k.startswith("patch_embed.")}
            )
            blocks = {k[7:]: v for k, v in visual.items() if k.startswith("blocks.")}
            model.blocks.load_state_dict(blocks)
            with torch.no_grad():
                model.pos_image.copy_(visual["pos_embed"][:, -model.n_image :])
        else:
            model.image.load_state_dict(visual)
    except (RuntimeError, KeyError) as exc:
        raise PolysenseError(
            f"model.image_init: {ckpt} does not fit this model's image encoder "
            f"({str(exc).splitlines()[0]}); use a checkpoint with the same vision config "
            "(clip-tiny: 32 px, patch 8, conv stem, width 128, 4 layers, 4 heads)"
        ) from None


def _clip_text_config(ckpt: str | Path) -> TextConfig:
    path = Path(ckpt)
    if not (path / "model.safetensors").is_file():
        raise PolysenseError(
            f"model.text_init: {path / 'model.safetensors'} does not exist; point it at a CLIP "
            "checkpoint directory such as runs/quickstart/ckpt (`polysense quickstart`)"
        )
    return read_run_config(path).model.text


def with_text_init(cfg: FusionConfig) -> FusionConfig:
    """`cfg` with the text fields (vocabulary, context length, ids, mask, pooling) of its
    `text_init` checkpoint; unchanged without one. Width, layers and heads must already agree."""
    if not cfg.text_init:
        return cfg
    t = _clip_text_config(cfg.text_init)
    if (t.width, t.layers, t.heads, t.mlp_ratio) != (
        cfg.width,
        cfg.layers,
        cfg.heads,
        cfg.mlp_ratio,
    ):
        raise PolysenseError(
            f"model.text_init: {cfg.text_init}'s text tower is width {t.width}, {t.layers} layers, "
            f"{t.heads} heads, mlp_ratio {t.mlp_ratio}; set the fusion model's width/layers/heads/"
            "mlp_ratio to match (clip-tiny: 128, 4, 4, 4.0)"
        )
    return dataclasses.replace(
        cfg,
        vocab_size=t.vocab_size,
        context_length=t.context_length,
        pad_id=t.pad_id,
        eot_id=t.eot_id,
        text_causal=t.causal,
        text_pool="eot" if t.pool == "eot" else "mean",
    )


def load_text_tower(model: FusionModel, ckpt: str | Path) -> None:
    """Copy a CLIP checkpoint's text tower (`text.*` in model.safetensors) into the text encoder
    of late fusion (the whole `TextTransformer`) or xattn (embeddings, blocks, final norm)."""
    text = tower_weights(ckpt, "text.", field="model.text_init")
    try:
        if isinstance(model, LateFusion):
            model.text.load_state_dict(text)
        elif isinstance(model, CrossAttnFusion):
            blocks = {k[7:]: v for k, v in text.items() if k.startswith("blocks.")}
            model.blocks.load_state_dict(blocks)
            with torch.no_grad():
                model.token_embed.weight.copy_(text["token_embed.weight"])
                model.pos_text.copy_(text["pos_embed"])
            model.ln.load_state_dict(
                {k[9:]: v for k, v in text.items() if k.startswith("ln_final.")}
            )
    except (RuntimeError, KeyError) as exc:
        raise PolysenseError(
            f"model.text_init: {ckpt} does not fit this model's text encoder "
            f"({str(exc).splitlines()[0]}); use a CLIP checkpoint with the same text width, "
            "layers and heads"
        ) from None
