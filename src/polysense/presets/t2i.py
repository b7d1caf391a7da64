"""Text-to-image presets: a small pixel diffusion model conditioned on a frozen CLIP text tower.

`polysense train t2i-tiny --data runs/world --out runs/t2i/tiny` (docs/t2i.md) trains with
`polysense.train.t2i.run_t2i`, then, when `eval.clip` names a scoring CLIP, evaluates it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from polysense.config import LoopConfig, check_fields
from polysense.models.diffusion import DiffusionConfig
from polysense.presets import register


@dataclass(frozen=True)
class T2ITrainConfig(LoopConfig):
    batch_size: int = 64
    steps: int = 3000
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    ema_decay: float = 0.995
    single_weight: float = 3.0  # draw single-object scenes this many times as often
    threads: int = 0  # torch threads; 0 = torch's default

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, positive="single_weight", non_negative="threads", below_one="ema_decay")


@dataclass(frozen=True)
class T2IEvalConfig:
    clip: str = ""  # scoring CLIP checkpoint for the evaluation after training; "" = skip it
    limit: int = 200  # single-object prompts per split
    steps: int = 25  # DDIM steps
    guidance: float = 3.0

    def __post_init__(self) -> None:
        check_fields(self, positive="limit steps", non_negative="guidance")


@dataclass(frozen=True)
class T2IRunConfig:
    name: str = ""
    text_ckpt: str = "runs/clip-tiny-full"  # the frozen conditioning text tower (a CLIP dir)
    model: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: T2ITrainConfig = field(default_factory=T2ITrainConfig)
    eval: T2IEvalConfig = field(default_factory=T2IEvalConfig)


@register("t2i-tiny", runner="polysense.train.t2i:run_t2i")
def t2i_tiny() -> T2IRunConfig:
    """`polysense train t2i-tiny --data runs/world --out runs/t2i/tiny` (3.9M-parameter U-Net)."""
    return T2IRunConfig(
        model=DiffusionConfig(channels=(32, 64, 128), patch=2, attn_from=1, prediction="v"),
        train=T2ITrainConfig(
            batch_size=48, steps=3000, lr=1e-3, single_weight=4.0, max_minutes=20.0
        ),
    )
