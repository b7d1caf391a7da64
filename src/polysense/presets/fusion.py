"""Fusion presets: `polysense train fusion-{early,late,xattn}-tiny --data runs/world-all --out D`.

Each trains one style on the world's VQA, image-text matching and sound tasks with
`polysense.train.fusion` and evaluates it on test and test_novel (docs/fusion.md). The `-clip`
presets start from a CLIP with a trained text transformer (`polysense train clip-tiny-full --data
runs/world --out runs/clip-tiny-full`, the earlier quickstart recipe; the quickstart's own text
encoder is locked word embeddings, which text_init cannot take): its image tower, frozen (`-ft`:
trained), and its text tower and tokenizer, under a wall-clock budget.
"""

from __future__ import annotations

import dataclasses

from polysense.models.fusion import FusionConfig, FusionRunConfig, FusionTrainConfig
from polysense.presets import register

_RUNNER = "polysense.train.fusion:run_preset"


def _tiny(style: str) -> FusionRunConfig:
    return FusionRunConfig(
        model=FusionConfig(style=style, width=128, layers=4, heads=4),  # type: ignore[arg-type]
        train=FusionTrainConfig(batch_size=96, steps=2000, lr=1e-3, warmup_steps=100),
    )


@register("fusion-early-tiny", runner=_RUNNER)
def fusion_early_tiny() -> FusionRunConfig:
    """`polysense train fusion-early-tiny --data runs/world-all --out runs/fusion-early`."""
    return _tiny("early")


@register("fusion-late-tiny", runner=_RUNNER)
def fusion_late_tiny() -> FusionRunConfig:
    """`polysense train fusion-late-tiny --data runs/world-all --out runs/fusion-late`."""
    return _tiny("late")


@register("fusion-xattn-tiny", runner=_RUNNER)
def fusion_xattn_tiny() -> FusionRunConfig:
    """`polysense train fusion-xattn-tiny --data runs/world-all --out runs/fusion-xattn`."""
    return _tiny("xattn")


CLIP_CKPT = "runs/clip-tiny-full"


def _clip(style: str, minutes: float, *, freeze_image: bool = True, **model) -> FusionRunConfig:
    """`_tiny(style)` on clip-tiny-full's image tower (frozen unless `freeze_image=False`)
    and its text tower, trained for `minutes` (the lr schedule follows the clock; `steps` is only
    a cap), VQA 60 % of a batch."""
    run = _tiny(style)
    return FusionRunConfig(
        model=dataclasses.replace(
            run.model,
            image_init=CLIP_CKPT,
            text_init=CLIP_CKPT,
            freeze_image=freeze_image,
            **model,
        ),
        train=dataclasses.replace(
            run.train,
            steps=100_000,
            max_minutes=minutes,
            lr=5e-4,
            task_mix=(0.6, 0.2, 0.2),
        ),
    )


@register("fusion-xattn-clip", runner=_RUNNER)
def fusion_xattn_clip() -> FusionRunConfig:
    """`polysense train fusion-xattn-clip --data runs/world-all --out runs/fusion/xattn-clip`:
    cross-attention onto the second to last block's image tokens, gates at 20x the lr."""
    run = _clip("xattn", 20, image_layer=-2)
    return dataclasses.replace(run, train=dataclasses.replace(run.train, gate_lr_scale=20.0))


@register("fusion-late-clip", runner=_RUNNER)
def fusion_late_clip() -> FusionRunConfig:
    """`polysense train fusion-late-clip --data runs/world-all --out runs/fusion/late-clip`:
    late fusion of the pooled vectors and their pairwise products."""
    return _clip("late", 20, combine="product")


@register("fusion-late-clip-ft", runner=_RUNNER)
def fusion_late_clip_ft() -> FusionRunConfig:
    """`polysense train fusion-late-clip-ft --data runs/world-all --out runs/fusion/late-clip-ft`:
    fusion-late-clip with the image tower trained too (not frozen), for 13 minutes."""
    return _clip("late", 13, combine="product", freeze_image=False)
