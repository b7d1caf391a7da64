"""Audio and video presets: CLAP-style audio-text, video-text, audio-image, and ImageBind-style.

Each is a `RunConfig` trained by the contrastive loop (`polysense.train.loop.train`) with other
towers (`model.towers`); the runner (`train/av.py`) trains, then evaluates what the towers allow on
each split (`eval/towers.py`):

    polysense train clap-tiny --data runs/world-all --out runs/av/clap-tiny
    polysense train video-clip-tiny --data runs/world-all --out runs/av/video-clip-tiny
    polysense train av-tiny --data runs/world-all --out runs/av/av-tiny
    polysense train imagebind-tiny --data runs/world-all --out runs/av/imagebind-tiny
"""

from __future__ import annotations

import dataclasses
from typing import Any

from polysense.config import AudioConfig, DataConfig, RunConfig, VideoConfig
from polysense.presets import clip_tiny_full, register

RUNNER = "polysense.train.av:run"

# 1 s clips at 16 kHz: 25 ms windows, 10 ms hops (101 frames), 32 mel bands; patches of 8 bands x
# 10 frames (4 x 10 = 40 tokens). The log-mel statistics are the world's (mean -44 dB, std 14).
AUDIO = AudioConfig(
    sample_rate=16000,
    n_fft=400,
    hop_length=160,
    n_mels=32,
    patch_freq=8,
    patch_time=10,
    norm_mean=-44.0,
    norm_std=14.0,
    width=128,
    layers=4,
    heads=4,
)
# The world's clips at 32 px, 8 px patches after the conv stem of clip-tiny's image tower
# (same shapes, so `model.video.init_from_image=runs/quickstart/ckpt` can initialise it).
# Four of the eight frames (1, 3, 5, 7: the direction is still plain) halve the cost of a step.
VIDEO = VideoConfig(
    num_frames=4, image_size=32, patch_size=8, stem="conv", width=128, layers=4, heads=4
)


def _preset(towers: tuple[str, ...], *, caption_key: str = "caption", **train: Any) -> RunConfig:
    """clip-tiny-full's towers and recipe (the trained text transformer these presets were
    measured with, docs/audio-video.md) with other towers; training stops at 4 minutes (the
    schedule anneals in time); with loading and evaluation a run takes about 6 minutes."""
    base = clip_tiny_full()
    train = {"max_minutes": 4.0, **train}
    model = dataclasses.replace(base.model, towers=towers, audio=AUDIO, video=VIDEO)
    train_cfg = dataclasses.replace(base.train, **train)
    return RunConfig(
        model=model,
        data=DataConfig(caption_key=caption_key),
        train=train_cfg,
    )


@register("clap-tiny", runner=RUNNER)
def clap_tiny() -> RunConfig:
    """Audio-text (CLAP-style): a scene's sound against its captions."""
    return _preset(("audio", "text"), steps=1000, batch_size=128, lr=1e-3, warmup_steps=20)


@register("video-clip-tiny", runner=RUNNER)
def video_clip_tiny() -> RunConfig:
    """Video-text: a scene's clip against its motion caption, divided space-time attention.

    In-batch negatives almost always differ in appearance, so alone they teach no motion; each
    clip also gets its caption with the other three directions as hard negatives."""
    return _preset(
        ("video", "text"),
        caption_key="motion_caption",
        steps=800,
        batch_size=64,
        lr=1e-3,
        warmup_steps=20,
        hard_negatives="motion",
    )


@register("av-tiny", runner=RUNNER)
def av_tiny() -> RunConfig:
    """Audio-image: does this sound belong to this scene (audio-visual correspondence)."""
    return _preset(("image", "audio"), steps=1000, batch_size=128, lr=1e-3, warmup_steps=20)


@register("imagebind-tiny", runner=RUNNER)
def imagebind_tiny() -> RunConfig:
    """Image, text and audio in one space, image as the anchor: image-text and image-audio
    losses only; audio-text alignment (zero-shot audio) has to emerge through the image."""
    return _preset(("image", "text", "audio"), steps=1000, batch_size=128, lr=1e-3, warmup_steps=20)
