"""Test helpers: a small image-caption JSONL dataset made with Pillow, and a tiny model config."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from polysense.config import RunConfig, apply_overrides
from polysense.presets import get_preset

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 210, 20),
}

TINY = [
    "model.embed_dim=32",
    "model.vision.width=32",
    "model.vision.layers=1",
    "model.vision.heads=2",
    "model.vision.patch_size=8",
    "model.text.width=32",
    "model.text.layers=1",
    "model.text.heads=2",
    "model.text.vocab_size=300",
    "model.text.context_length=16",
    "train.batch_size=16",
    "train.steps=12",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.ckpt_every=4",
    # the loop's mechanics are tested with both towers training (clip-tiny itself locks its text)
    "train.lock_text=false",
]


def tiny_config(preset: str = "clip-tiny", *overrides: str) -> RunConfig:
    return apply_overrides(get_preset(preset), [*TINY, *overrides])


def cli_train(data: Path, out: Path, *extra: str, sets: tuple[str, ...] = ()) -> list[str]:
    """The command line of `polysense train clip-tiny` at the TINY sizes (plus `sets`), with
    no evaluation, for the tests that run training in a child process (kill -9, torchrun)."""
    overrides = [a for item in [*TINY, *sets] for a in ("--set", item)]
    cli = [sys.executable, "-m", "polysense.cli", "train", "clip-tiny"]
    return [*cli, "--data", str(data), "--out", str(out), "--eval-splits", "", *overrides, *extra]


def make_pairs(root: Path, n: int, seed: int = 0) -> Path:
    """`n` 32 px images of one coloured circle or square, captions naming colour and shape."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(["circle", "square"])
        image = Image.new("RGB", (32, 32), (235, 235, 235))
        x, y = rng.randint(2, 16), rng.randint(2, 16)
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)(
            [x, y, x + 12, y + 12], fill=COLOURS[colour]
        )
        image.save(root / f"{i}.png")
        lines.append(
            json.dumps(
                {"image": f"{i}.png", "caption": [f"a {colour} {shape}", f"{shape}, {colour}"]}
            )
        )
    path = root / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
