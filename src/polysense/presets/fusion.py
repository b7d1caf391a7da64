"""Fusion presets: `polysense train fusion-{early,late,xattn}-tiny --data runs/world-all --out D`.

Each trains one style on the world's VQA, image-text matching and sound tasks with
`polysense.train.fusion` and evaluates it on test and test_novel (docs/fusion.md).
"""

from __future__ import annotations

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
