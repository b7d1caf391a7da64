"""The preset registry: name -> run config, in plain Python.

Add one with `@register("name")` on a function that returns a frozen run config; any field can
still be changed with `--set key=value`. The contrastive presets (CLIP, SigLIP, LiT) live here and
train with `polysense.train.loop`; the other model families keep their presets in a module of this
package each (`presets/vlm.py`, ...), imported on first lookup so `import polysense` stays light.
A preset of another family names its runner, "module:function", called by `polysense train` as
`runner(cfg, data=Path, out=Path, resume=bool, eval_splits=tuple[str, ...]) -> dict` (the metrics,
which the runner also writes to OUT/metrics.json).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

from polysense.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfig,
    TextConfig,
    TrainConfig,
    VisionConfig,
)

_PRESETS: dict[str, Callable[[], Any]] = {}
_RUNNERS: dict[str, str] = {}
# One module per model family beyond contrastive alignment; missing ones are skipped.
_FAMILY_MODULES: tuple[str, ...] = ("fusion", "vlm", "av", "t2i")
_loaded = False


def register(name: str, *, runner: str | None = None) -> Callable[[Callable[[], Any]], Callable]:
    """Register a preset; `runner` ("module:function") trains it, default the contrastive loop."""

    def wrap(fn: Callable[[], Any]) -> Callable[[], Any]:
        if name in _PRESETS:
            raise ValueError(f"preset {name!r} registered twice")
        _PRESETS[name] = fn
        if runner is not None:
            _RUNNERS[name] = runner
        return fn

    return wrap


def _load_families() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for family in _FAMILY_MODULES:
        module = f"{__name__}.{family}"
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def available_presets() -> list[str]:
    _load_families()
    return sorted(_PRESETS)


def get_preset(name: str) -> Any:
    _load_families()
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(available_presets())}")
    return dataclasses.replace(_PRESETS[name](), name=name)


def get_runner(name: str) -> Callable[..., dict] | None:
    """The function that trains preset `name`, or None for the contrastive training loop."""
    _load_families()
    target = _RUNNERS.get(name)
    if target is None:
        return None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


@register("clip-tiny")
def clip_tiny() -> RunConfig:
    """`polysense train clip-tiny --data runs/world --out runs/clip-tiny` (quickstart's model).

    A recipe chosen for time to quality on a 2-core CPU in fp32 (docs/performance.md, "The
    quickstart recipe"): 800 steps of 128 pairs on a fixed schedule, with
    - a locked text encoder: random token and position embeddings, no transformer layers,
      mean-pooled; only its projection trains. A text transformer trained from scratch first
      learns colours and, while the image tower cannot yet tell shapes apart, makes "a red
      circle" and "a red square" alike, which held both towers on a plateau for ~700 steps
      (measured). A locked random encoder keeps every caption distinct from the first step, and
      its mean is additive in the words, which carries zero-shot to colour-shape pairs never
      seen in training (test_novel). Position embeddings keep word order ("left of");
    - an image embedding that is the mean of all tokens (`pool="cls_mean"`: the same weights
      and tokens as a cls ViT, so fusion and the VLM take the checkpoint as before), which gives
      the patch features a direct path to the loss.
    The classic CLIP text tower: `--set train.lock_text=false --set model.text.layers=4
    --set model.text.pool=eot --set model.vision.pool=cls --set train.steps=1400`."""
    return RunConfig(
        model=ModelConfig(
            family="clip",
            embed_dim=128,
            # Early convolutions and 8 px patches (16 tokens): on the 32 px world this learns
            # shapes several times faster per second than a 4 px patch embedding.
            vision=VisionConfig(
                image_size=32,
                patch_size=8,
                stem="conv",
                width=128,
                layers=4,
                heads=4,
                pool="cls_mean",
            ),
            text=TextConfig(
                vocab_size=1024, context_length=32, width=128, layers=0, heads=4, pool="mean"
            ),
        ),
        data=DataConfig(),
        train=TrainConfig(batch_size=128, steps=800, lr=2e-3, warmup_steps=100, lock_text=True),
    )


@register("clip-tiny-full")
def clip_tiny_full() -> RunConfig:
    """`polysense train clip-tiny-full --data runs/world --out runs/clip-tiny-full`: clip-tiny
    with both towers trained, the earlier quickstart recipe (a 4-layer eot-pooled text
    transformer, cls image pooling, 1400 steps; ~6 minutes on 2 AMX cores in bf16, ~6 on an
    AVX-512 core pair in fp32). The fusion `-clip` presets and t2i take their text tower from it:
    they need a text transformer, which the quickstart's locked word embeddings are not."""
    base = clip_tiny()
    model = dataclasses.replace(
        base.model,
        vision=dataclasses.replace(base.model.vision, pool="cls"),
        text=dataclasses.replace(base.model.text, layers=4, pool="eot"),
    )
    train = dataclasses.replace(base.train, steps=1400, lock_text=False)
    return dataclasses.replace(base, model=model, train=train)


@register("clip-small")
def clip_small() -> RunConfig:
    """`polysense train clip-small --data runs/world64 --out runs/clip-small` (64 px world)."""
    return RunConfig(
        model=ModelConfig(
            family="clip",
            embed_dim=256,
            vision=VisionConfig(image_size=64, patch_size=8, width=256, layers=6, heads=8),
            text=TextConfig(vocab_size=2048, context_length=32, width=256, layers=6, heads=8),
        ),
        data=DataConfig(),
        train=TrainConfig(batch_size=256, steps=3000, lr=5e-4, warmup_steps=200),
    )


@register("siglip-tiny")
def siglip_tiny() -> RunConfig:
    """`polysense train siglip-tiny --data runs/world --out runs/siglip-tiny`."""
    base = clip_tiny_full()  # the trained text tower, not the quickstart's locked embeddings
    # SigLIP's architecture: vision without cls token or pre-LayerNorm, pooled by a MAP head that
    # is the embedding itself (no projection); bidirectional text with a biased head. Departures
    # for a model trained from scratch on the CPU: the conv stem of clip-tiny, and text pooled by
    # masked mean, because pooling at the last (padding) position, as HF SigLIP does, collapsed
    # to the constant-logit solution (loss ln 127 + 1) in our runs. For an HF `SiglipModel`
    # export: --set model.vision.stem=patch --set model.text.pool=last
    # --set model.text.mask_padding=false. A lower lr than CLIP's 2e-3 keeps it stable.
    model = dataclasses.replace(
        base.model,
        family="siglip",
        vision=dataclasses.replace(base.model.vision, pool="map", ln_pre=False, patch_bias=True),
        text=dataclasses.replace(base.model.text, causal=False, pool="mean"),
        vision_proj="none",
        text_proj="linear_bias",
        init_logit_scale=2.302585092994046,  # ln 10
        init_logit_bias=-10.0,
    )
    train = dataclasses.replace(base.train, lr=1e-3, steps=2000)
    return dataclasses.replace(base, model=model, train=train)


# --- real sizes: the architectures of OpenAI's CLIP and Google's SigLIP ----------------------
# Each equals transformers' config of the published model (CLIPConfig() and SiglipConfig()
# defaults are openai/clip-vit-base-patch32 and google/siglip-base-patch16-224), so a trained one
# exports to a directory transformers loads, and `--init` on the published weights fits them. The
# recipe is a fine-tuning one (CLIP's AdamW betas and eps, a small lr, weight decay 0.2; add
# --set train.grad_checkpointing=true where memory is short): from
# random weights these take days on a CPU; start them from a checkpoint with --init.


def _vit_b(patch_size: int, *, siglip: bool) -> VisionConfig:
    return VisionConfig(
        image_size=224,
        patch_size=patch_size,
        width=768,
        layers=12,
        heads=12,
        act="gelu_pytorch_tanh" if siglip else "quick_gelu",
        ln_eps=1e-6 if siglip else 1e-5,
        pool="map" if siglip else "cls",
        ln_pre=not siglip,
        patch_bias=siglip,
        resize="square" if siglip else "shortest_edge",
        image_mean=(0.5, 0.5, 0.5) if siglip else VisionConfig.image_mean,
        image_std=(0.5, 0.5, 0.5) if siglip else VisionConfig.image_std,
    )


def _finetune(batch_size: int = 32) -> TrainConfig:
    return TrainConfig(
        batch_size=batch_size,
        steps=1000,
        lr=1e-5,
        warmup_steps=100,
        weight_decay=0.2,
        betas=(0.9, 0.98),
        eps=1e-6,
    )


def _clip_vit_b(patch_size: int) -> RunConfig:
    return RunConfig(
        model=ModelConfig(
            family="clip",
            embed_dim=512,
            vision=_vit_b(patch_size, siglip=False),
            text=TextConfig(
                vocab_size=49408,
                context_length=77,
                width=512,
                layers=12,
                heads=8,
                act="quick_gelu",
                pool="eot",
                pad_id=49407,
                eot_id=49407,
            ),
            init_logit_scale=2.6592,
        ),
        data=DataConfig(),
        train=_finetune(),
    )


@register("clip-vit-b32")
def clip_vit_b32() -> RunConfig:
    """`polysense train clip-vit-b32 --init path/to/clip-vit-base-patch32 --data my.csv --out
    runs/ft`: OpenAI CLIP ViT-B/32 (151 M parameters), as transformers' CLIPConfig()."""
    return _clip_vit_b(32)


@register("clip-vit-b16")
def clip_vit_b16() -> RunConfig:
    """`polysense train clip-vit-b16 --init path/to/clip-vit-base-patch16 ...`: CLIP ViT-B/16."""
    return _clip_vit_b(16)


@register("siglip-b16-224")
def siglip_b16_224() -> RunConfig:
    """`polysense train siglip-b16-224 --init path/to/siglip-base-patch16-224 ...`: SigLIP
    base at 224 px (203 M parameters), as transformers' SiglipConfig()."""
    return RunConfig(
        model=ModelConfig(
            family="siglip",
            embed_dim=768,
            vision=_vit_b(16, siglip=True),
            text=TextConfig(
                vocab_size=32000,
                context_length=64,
                width=768,
                layers=12,
                heads=12,
                causal=False,
                pool="last",
                act="gelu_pytorch_tanh",
                ln_eps=1e-6,
                mask_padding=False,
                pad_id=1,
                eot_id=1,
            ),
            vision_proj="none",
            text_proj="linear_bias",
            init_logit_scale=2.302585092994046,  # ln 10
            init_logit_bias=-10.0,
        ),
        data=DataConfig(),
        train=_finetune(),
    )


@register("lit-minilm")
def lit_minilm() -> RunConfig:
    """`polysense train lit-minilm --data runs/world --out runs/lit-minilm`: LiT, locked MiniLM."""
    base = clip_tiny_full()
    model = dataclasses.replace(
        base.model,
        text=TextConfig(
            pretrained="minilm", vocab_size=30522, context_length=32, width=384, layers=6, heads=12
        ),
    )
    train = dataclasses.replace(base.train, lock_text=True, steps=2000)
    return dataclasses.replace(base, model=model, train=train)
