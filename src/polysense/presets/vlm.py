"""Presets of the language model and the VLM (models/vlm.py), trained by `train/vlm.py`.

The documented sequence (docs/vlm.md), each stage starting from the previous one's checkpoint:

    polysense train lm-tiny --data runs/world-all --out runs/vlm/lm
    polysense train vlm-tiny-stage1 --data runs/world-all --out runs/vlm/stage1
    polysense train vlm-tiny-stage2 --data runs/world-all --out runs/vlm/stage2
"""

from __future__ import annotations

from polysense.models.vlm import (
    InitConfig,
    LMConfig,
    LMRunConfig,
    VLMConfig,
    VLMRunConfig,
    VLMTrainConfig,
)
from polysense.presets import register


@register("lm-tiny", runner="polysense.train.vlm:run_lm")
def lm_tiny() -> LMRunConfig:
    """`polysense train lm-tiny --data runs/world-all --out runs/vlm/lm`: GPT on world text."""
    return LMRunConfig(
        model=LMConfig(vocab_size=512, context_length=128, width=192, layers=4, heads=4),
        train=VLMTrainConfig(batch_size=64, steps=300, lr=2e-3, warmup_steps=30, max_minutes=2.5),
    )


@register("vlm-tiny-stage1", runner="polysense.train.vlm:run_vlm")
def vlm_tiny_stage1() -> VLMRunConfig:
    """`polysense train vlm-tiny-stage1 --data runs/world-all --out runs/vlm/stage1`: align
    (projector only) on captions; ViT from the quickstart CLIP, LM from lm-tiny."""
    return VLMRunConfig(
        model=VLMConfig(projector="mlp2x"),
        train=VLMTrainConfig(
            batch_size=64,
            steps=250,
            max_minutes=4.0,
            lr=2e-3,
            warmup_steps=25,
            train_lm=False,
            train_projector=True,
            mix_caption=1.0,
        ),
        init=InitConfig(lm="runs/vlm/lm", vision="runs/quickstart/ckpt"),
    )


@register("vlm-tiny-stage2", runner="polysense.train.vlm:run_vlm")
def vlm_tiny_stage2() -> VLMRunConfig:
    """`polysense train vlm-tiny-stage2 --data runs/world-all --out runs/vlm/stage2`: instruction
    tuning (LM + projector) on captions, QA and OCR, from stage 1's checkpoint."""
    return VLMRunConfig(
        model=VLMConfig(projector="mlp2x"),
        train=VLMTrainConfig(
            batch_size=64,
            steps=1200,
            max_minutes=12.0,
            lr=1e-3,
            warmup_steps=50,
            train_lm=True,
            train_projector=True,
            train_vision_top=1,
            lr_vision=2e-4,
            mix_caption=0.35,
            mix_qa=0.5,
            mix_ocr=0.15,
            qa_turns=4,
        ),
        init=InitConfig(vlm="runs/vlm/stage1", vision="runs/quickstart/ckpt"),
    )
