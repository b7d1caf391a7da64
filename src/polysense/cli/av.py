"""Audio and video commands: `polysense bench video-attention` (training presets and evaluation
go through `polysense train` and `polysense eval audio|avc|video`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from polysense.cli.app import bench_app, console
from polysense.errors import PolysenseError


def _frames(text: str) -> tuple[int, ...]:
    try:
        frames = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        frames = ()
    if len(frames) < 2 or any(t < 1 for t in frames) or list(frames) != sorted(set(frames)):
        raise PolysenseError(
            f"--frames {text!r}: give two or more increasing positive counts, e.g. 4,8,16,32"
        )
    return frames


@bench_app.command("video-attention")
def bench_video_attention(
    out: Annotated[Path, typer.Option(help="Output directory for video-attention.json/.md/.png.")],
    frames: Annotated[str, typer.Option(help="Frame counts, comma-separated.")] = "4,8,16,32",
    image_size: Annotated[int, typer.Option(help="Frame side in pixels.")] = 64,
    patch_size: Annotated[int, typer.Option(help="Patch side in pixels.")] = 8,
    width: Annotated[int, typer.Option(help="Transformer width.")] = 128,
    layers: Annotated[int, typer.Option(help="Transformer layers.")] = 4,
    batch_size: Annotated[int, typer.Option(help="Clips per step.")] = 2,
    repeats: Annotated[int, typer.Option(help="Timed steps per configuration (median).")] = 3,
) -> None:
    """Joint vs divided (TimeSformer) space-time attention as frames grow: GFLOPs, latency and
    peak memory of one training step each, with the growth exponents, table and plot.

    Example: `polysense bench video-attention --out runs/bench`
    """
    from polysense.bench.video_attention import run_video_attention_bench

    if image_size % patch_size:
        raise PolysenseError(
            f"--image-size {image_size} is not a multiple of --patch-size {patch_size}"
        )
    run_video_attention_bench(
        out,
        frames=_frames(frames),
        image_size=image_size,
        patch_size=patch_size,
        width=width,
        layers=layers,
        heads=max(1, width // 32),
        batch_size=batch_size,
        repeats=repeats,
    )
    console.print(
        f"wrote {out / 'video-attention.json'}, video-attention.md and video-attention.png"
    )
    console.print((out / "video-attention.md").read_text(), markup=False, highlight=False)
