"""Text-to-image commands: `polysense generate` (a labelled grid) and `polysense bench t2i-guidance`
(attribute accuracy, CLIP score and fid_embed over guidance scales 0, 1, 3, 5, 7, as a plot)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from polysense.cli.app import app, bench_app, console
from polysense.errors import PolysenseError


def grid_image(images, labels: list[str], *, title: str = "", columns: int = 4, scale: int = 4):
    """uint8 images (N, S, S, 3) -> one PIL image: an optional title line (wrapped), then a grid
    of upscaled cells, each labelled underneath."""
    import textwrap

    from PIL import Image, ImageDraw

    n, s = images.shape[0], images.shape[1] * scale
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    label_h, pad = 14, 4
    width = cols * (s + pad) + pad
    lines = textwrap.wrap(title, width=max(width // 6, 10)) if title else []
    top = len(lines) * label_h
    grid = Image.new("RGB", (width, top + rows * (s + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for k, line in enumerate(lines):
        draw.text((pad, pad + k * label_h), line, fill=(0, 0, 0))
    for i in range(n):
        r, c = divmod(i, cols)
        x, y = pad + c * (s + pad), top + pad + r * (s + label_h + pad)
        cell = Image.fromarray(images[i].numpy()).resize((s, s), Image.NEAREST)
        grid.paste(cell, (x, y))
        draw.text((x, y + s + 1), labels[i][: s // 6], fill=(0, 0, 0))
    return grid


@app.command("generate")
def generate_cmd(
    prompt: Annotated[str, typer.Argument(help="Text prompt, e.g. 'a red circle'.")],
    ckpt: Annotated[Path, typer.Option(help="Text-to-image checkpoint (polysense train t2i-*).")],
    out: Annotated[Path, typer.Option(help="Output PNG: a labelled grid of the images.")],
    n: Annotated[int, typer.Option(help="Number of images.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same images.")] = 0,
    guidance: Annotated[
        float, typer.Option(help="Classifier-free guidance scale (1 = none, 0 = unconditional).")
    ] = 3.0,
    steps: Annotated[int, typer.Option(help="DDIM sampling steps.")] = 25,
    columns: Annotated[int, typer.Option(help="Grid columns.")] = 4,
) -> None:
    """Generate N images for one prompt and save them as a labelled grid PNG.

    Example: `polysense generate --ckpt runs/t2i/tiny "a red circle left of a blue square" --n 8 --out grid.png`
    """
    import torch
    from rich.progress import Progress

    from polysense.fileio import atomic_path
    from polysense.models.checkpoint import load_generator

    if n < 1:
        raise PolysenseError(f"--n {n}: must be at least 1")
    if out.suffix.lower() != ".png":
        raise PolysenseError(f"--out {out}: write a .png file")
    model = load_generator(ckpt)
    with Progress(transient=True) as bar:
        task = bar.add_task("sampling", total=n * steps)
        images = []
        for i in range(n):  # one at a time so the bar moves per DDIM step
            images.append(
                model.generate(
                    [prompt],
                    steps=steps,
                    guidance=guidance,
                    seed=seed * 1_000_003 + i,
                    step_callback=lambda k: bar.advance(task, 1),
                )
            )
    images = torch.cat(images)
    labels = [f"#{i}" for i in range(n)]
    title = f"{prompt!r}  (guidance {guidance:g}, {steps} DDIM steps, seed {seed})"
    grid = grid_image(images, labels, title=title, columns=columns)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        grid.save(tmp, format="PNG")
    console.print(f"wrote {out} ({n} images, guidance {guidance:g}, {steps} steps, seed {seed})")


@bench_app.command("t2i-guidance")
def bench_t2i_guidance(
    ckpt: Annotated[Path, typer.Option(help="Text-to-image checkpoint.")],
    clip: Annotated[Path, typer.Option(help="Scoring CLIP/SigLIP, trained separately.")],
    data: Annotated[str, typer.Option(help="World dir (prompts and real images).")],
    out: Annotated[Path, typer.Option(help="Report dir: t2i-guidance.json/.md/.png.")],
    limit: Annotated[int, typer.Option(help="Single-object prompts per split.")] = 64,
    steps: Annotated[int, typer.Option(help="DDIM sampling steps.")] = 25,
    scales: Annotated[str, typer.Option(help="Guidance scales, comma-separated.")] = "0,1,3,5,7",
) -> None:
    """Sweep the guidance scale: attribute accuracy, CLIP score, fid_embed on test and test_novel.

    Example: `polysense bench t2i-guidance --ckpt runs/t2i/tiny --clip runs/siglip-1400 --data runs/world --out docs/img/t2i`
    """
    from polysense.bench.report import write_report
    from polysense.eval.t2i import guidance_sweep

    try:
        values = tuple(float(s) for s in scales.split(",") if s.strip())
    except ValueError:
        raise PolysenseError(f"--scales {scales!r}: give numbers, e.g. 0,1,3,5,7") from None
    rows = guidance_sweep(ckpt=ckpt, clip=clip, data=data, scales=values, limit=limit, steps=steps)

    def plot(ax) -> None:
        for split, style in (("test", "-"), ("test_novel", "--")):
            part = [r for r in rows if r["split"] == split]
            xs = [r["guidance"] for r in part]
            ax.plot(
                xs,
                [r["attribute_accuracy"] for r in part],
                "o" + style,
                c="C0",
                label=f"attribute accuracy ({split})",
            )
            ax.plot(
                xs,
                [r["clip_score"] for r in part],
                "s" + style,
                c="C1",
                label=f"CLIP score ({split})",
            )
        ax.set_xlabel("classifier-free guidance scale")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{ckpt.name}: guidance sweep ({steps} DDIM steps, judge {clip.name})")

    table = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    paths = write_report(
        out,
        "t2i-guidance",
        {"ckpt": str(ckpt), "clip": str(clip), "steps": steps, "limit": limit},
        table,
        plot,
        title="Text-to-image: guidance sweep",
        notes="Single-object prompts; guidance 1 = conditional model alone, 0 = unconditional.",
    )
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
