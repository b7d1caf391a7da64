"""Presets of the language model and the VLM (models/vlm.py), trained by `train/vlm.py`.

The documented sequence (docs/vlm.md), each stage starting from the previous one's checkpoint:

    polysense train lm-tiny --data runs/world-all --out runs/vlm/lm
    polysense train vlm-tiny-stage1 --data runs/world-all --out runs/vlm/stage1
    polysense train vlm-tiny-stage2 --data runs/world-all --out runs/vlm/stage2
"""

from __future__ import annotations

from polysense.models.lm import LMConfig
from polysense.models.vlm import (
    InitConfig,
    LMRunConfig,
    SCSTConfig,
    VLMConfig,
    VLMRunConfig,
    VLMTrainConfig,
)
from polysense.presets import register


@register("lm-tiny", runner="polysense.train.vlm:run_lm")
def lm_tiny() -> LMRunConfig:
    """`polysense train lm-tiny --data runs/world-all --out runs/vlm/lm`: GPT on world text.
    200 steps: after a 600-step LM, stage 2 did not learn to bind colours to shapes (VQA colour
    0.77 against 0.997; one run each way, docs/vlm.md)."""
    return LMRunConfig(
        model=LMConfig(vocab_size=512, context_length=128, width=128, layers=4, heads=4),
        train=VLMTrainConfig(batch_size=64, steps=200, lr=2e-3, warmup_steps=30, max_minutes=2.5),
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
    tuning (LM, projector and every ViT block) on captions, QA and OCR, from stage 1's
    checkpoint; its last fifth tunes the captions by self-critical sequence training (CIDEr-D
    reward). The step count is a ceiling: the 16-minute budget ends the run and the schedule
    follows the clock."""
    return VLMRunConfig(
        model=VLMConfig(projector="mlp2x"),
        train=VLMTrainConfig(
            batch_size=32,
            steps=6000,
            max_minutes=16.0,
            lr=1e-3,
            warmup_steps=100,
            train_lm=True,
            train_projector=True,
            train_vision_top=4,
            lr_vision=2e-4,
            mix_caption=0.3,
            mix_qa=0.6,
            mix_ocr=0.1,
            qa_turns=4,
            scst=SCSTConfig(fraction=0.2, lr=2e-5, batch_size=16, samples=5, temperature=0.5),
        ),
        init=InitConfig(vlm="runs/vlm/stage1", vision="runs/quickstart/ckpt"),
    )
