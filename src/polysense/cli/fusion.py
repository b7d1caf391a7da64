"""`polysense bench fusion`: early / late / cross-attention fusion vs the dual encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from polysense.cli.app import bench_app, console
from polysense.errors import PolysenseError


@bench_app.command("fusion")
def bench_fusion(
    out: Annotated[Path, typer.Option(help="Output directory for fusion.json/.md/.png.")],
    data: Annotated[
        Path, typer.Option(help="A world written with audio (image,text,audio at least).")
    ] = Path("runs/world-all"),
    seconds: Annotated[
        float, typer.Option(help="Training seconds per style (and per dropout variant).")
    ] = 70.0,
    dropout: Annotated[
        float, typer.Option(help="Modality dropout rate of the second model of each style.")
    ] = 0.3,
    eval_limit: Annotated[
        int, typer.Option(help="Evaluate at most this many items per task and split (0 = all).")
    ] = 1000,
    styles: Annotated[
        str, typer.Option(help="Comma-separated subset of early,late,xattn,dual.")
    ] = "early,late,xattn,dual",
    threads: Annotated[int, typer.Option(help="torch CPU threads while benchmarking.")] = 1,
    image_init: Annotated[
        str,
        typer.Option(
            help="CLIP checkpoint every style starts from (vision tower / whole dual); '' = none."
        ),
    ] = "runs/quickstart/ckpt",
    freeze_image: Annotated[
        bool, typer.Option(help="Keep the late / xattn image encoders frozen.")
    ] = True,
    text_init: Annotated[
        bool,
        typer.Option(help="Late / xattn also take the checkpoint's text tower and tokenizer."),
    ] = False,
    train_limit: Annotated[
        int, typer.Option(help="Read at most this many training scenes (0 = all).")
    ] = 0,
) -> None:
    """Train every fusion style for the same seconds on the world's VQA, image-text matching and
    sound tasks, then measure accuracy (test, test_novel, each modality missing, with and
    without modality dropout), parameters, samples/s, latency, memory and retrieval cost.

    Example: `polysense bench fusion --out runs/bench`
    """
    from polysense.bench.fusion import run_fusion_bench

    chosen = tuple(s.strip() for s in styles.split(",") if s.strip())
    unknown = [s for s in chosen if s not in ("early", "late", "xattn", "dual")]
    if unknown or not chosen:
        raise PolysenseError(f"--styles {styles!r}: choose from early,late,xattn,dual")
    if seconds <= 0:
        raise PolysenseError(f"--seconds {seconds}: must be > 0, e.g. --seconds 75")
    run_fusion_bench(
        out,
        data=data,
        seconds=seconds,
        dropout=dropout,
        eval_limit=eval_limit,
        styles=chosen,
        train_limit=train_limit or None,
        threads=threads,
        image_init=image_init,
        freeze_image=freeze_image,
        text_init=text_init,
    )
    console.print(f"wrote {out / 'fusion.json'}, fusion.md and fusion.png")
    console.print((out / "fusion.md").read_text(), markup=False, highlight=False)
