"""The `polysense` command line: thin typer commands over library functions, printed with rich.

Errors caused by input (a missing file, an unknown key) print one line and exit 2; no traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from polysense.errors import PolysenseError

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

app = typer.Typer(
    name="polysense",
    help="Multimodal learning on a laptop CPU: world data, contrastive alignment, evaluation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
world_app = typer.Typer(help="The embedded procedural multimodal dataset.", no_args_is_help=True)
data_app = typer.Typer(help="Read, inspect and curate datasets.", no_args_is_help=True)
demo_app = typer.Typer(help="Small runnable examples from the tutorials.", no_args_is_help=True)
tok_app = typer.Typer(help="Train and inspect text tokenizers.", no_args_is_help=True)
app.add_typer(world_app, name="world")
app.add_typer(data_app, name="data")
app.add_typer(demo_app, name="demo")
app.add_typer(tok_app, name="tokenizer")

SPLITS = ("train", "val", "test", "test_novel")


def _parse_modalities(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def _print_world_summary(manifest: dict, out: Path) -> None:
    table = Table(title=f"world at {out}", show_lines=False)
    table.add_column("split")
    table.add_column("scenes", justify="right")
    table.add_column("shards", justify="right")
    for split, count in manifest["counts"].items():
        shards = manifest["splits"][split]["shards"]
        table.add_row(split, str(count), str(len(shards)))
    console.print(table)
    vocab = manifest["vocab"]
    console.print(
        f"seed {manifest['seed']}, {manifest['size']} px, modalities: "
        f"{', '.join(manifest['modalities'])}"
    )
    console.print(
        f"{len(vocab['colors'])} colours x {len(vocab['shapes'])} shapes = "
        f"{len(manifest['classes'])} classes; held out of train (test_novel): "
        + ", ".join(f"{c} {s}" for c, s in manifest["novel_pairs"])
    )


@world_app.command("generate")
def world_generate(
    out: Annotated[Path, typer.Option(help="Output directory (shards + manifest.json).")],
    n: Annotated[int, typer.Option(help="Total number of scenes over all splits.")] = 20000,
    seed: Annotated[int, typer.Option(help="Random seed; same seed gives identical bytes.")] = 0,
    size: Annotated[int, typer.Option(help="Canvas size in pixels (32 or 64).")] = 32,
    modalities: Annotated[
        str, typer.Option(help="Comma-separated subset of image,text,ocr,audio,video.")
    ] = "image,text,ocr,audio,video",
    shard_size: Annotated[int, typer.Option(help="Scenes per tar shard.")] = 1000,
    workers: Annotated[int, typer.Option(help="Processes (0 = one per core).")] = 0,
) -> None:
    """Generate the procedural world: scenes of 1-3 coloured shapes with captions, QA, boxes,
    OCR text, sound and motion, as webdataset shards.

    Example: `polysense world generate --out runs/world --n 2000 --seed 1`
    """
    import time

    from polysense.data.world import generate_world

    start = time.perf_counter()
    manifest = generate_world(
        out,
        n=n,
        seed=seed,
        size=size,
        modalities=_parse_modalities(modalities),
        shard_size=shard_size,
        workers=workers,
    )
    seconds = time.perf_counter() - start
    _print_world_summary(manifest, out)
    console.print(f"{n} scenes in {seconds:.1f} s ({n / max(seconds, 1e-9):.0f} scenes/s)")


@data_app.command("inspect")
def data_inspect(
    path: Annotated[
        str,
        typer.Argument(
            help="World dir, .tar/shard pattern, CSV/TSV/JSONL, COCO json or image folder."
        ),
    ],
    split: Annotated[str | None, typer.Option(help="World split to read (default train).")] = None,
    sheet: Annotated[
        Path | None, typer.Option(help="Contact sheet PNG (default: PATH stem + .sheet.png).")
    ] = None,
    rejects: Annotated[
        Path | None, typer.Option(help="Rejects JSONL (default: PATH stem + .rejects.jsonl).")
    ] = None,
    image_key: Annotated[str, typer.Option(help="Image column of CSV/TSV/JSONL.")] = "image",
    caption_key: Annotated[str, typer.Option(help="Caption column of CSV/TSV/JSONL.")] = "caption",
    n_sheet: Annotated[int, typer.Option(help="Samples on the contact sheet.")] = 16,
) -> None:
    """Count samples and modalities, list rejected samples with reasons, draw a contact sheet.

    Example: `polysense data inspect pairs.jsonl`
    """
    from polysense.data.inspect import format_report, inspect

    stem = Path(path.split("{")[0].rstrip("/-_") or "data")
    base = stem.parent / (stem.stem or stem.name)
    report = inspect(
        path,
        split=split,
        image_key=image_key,
        caption_key=caption_key,
        rejects_path=rejects or base.with_name(base.name + ".rejects.jsonl"),
        sheet_path=sheet or base.with_name(base.name + ".sheet.png"),
        n_sheet=n_sheet,
    )
    for line in format_report(report):
        console.print(line, highlight=False, markup=False)


@demo_app.command("toy")
def demo_toy() -> None:
    """Seed 000's toy examples: concatenation fusion, then cosine-similarity retrieval of three
    images for three text queries, printed in the tutorial's format.

    Example: `polysense demo toy`
    """
    from polysense.demo import fusion_lines, matching_lines

    for line in fusion_lines():
        print(line)
    for line in matching_lines():
        if line.startswith("Query text"):
            print()
        print(line)


@tok_app.command("train")
def tokenizer_train(
    data: Annotated[str, typer.Option(help="Any readable dataset (world dir, JSONL, ...).")],
    out: Annotated[Path, typer.Option(help="Output tokenizer.json.")],
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size.")] = 1024,
    context_length: Annotated[int, typer.Option(help="Fixed context length.")] = 32,
    split: Annotated[str | None, typer.Option(help="World split (default train).")] = None,
) -> None:
    """Train a byte-level BPE tokenizer on a dataset's captions and save tokenizer.json.

    Example: `polysense tokenizer train --data runs/world --out runs/tokenizer.json`
    """
    from polysense.data.readers import read_samples
    from polysense.data.tokenizer import Tokenizer

    captions = [c for s in read_samples(data, split=split, decode=False) for c in s["text"]]
    if not captions:
        raise PolysenseError(f"{data}: no captions to train a tokenizer on")
    tok = Tokenizer.train(captions, vocab_size=vocab_size, context_length=context_length)
    tok.save(out)
    _, n_truncated = tok.encode(captions)
    console.print(
        f"trained on {len(captions)} captions: vocab {tok.vocab_size}, "
        f"{n_truncated} captions longer than {context_length} tokens -> {out}"
    )


@app.command("presets")
def presets(
    name: Annotated[str | None, typer.Argument(help="Show one preset's config.")] = None,
) -> None:
    """List the model presets, or print one preset's full config as JSON.

    Example: `polysense presets clip-tiny`
    """
    from polysense.config import dumps
    from polysense.presets import available_presets, get_preset

    if name:
        print(dumps(get_preset(name)))
        return
    for preset in available_presets():
        console.print(preset)


@app.command("quickstart")
def quickstart(
    out: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/quickstart"),
    world: Annotated[Path, typer.Option(help="World directory (generated when absent).")] = Path(
        "runs/world"
    ),
    n: Annotated[int, typer.Option(help="World size when it has to be generated.")] = 20000,
) -> None:
    """Generate the world if absent and summarise it.

    Training and evaluation of the default tiny CLIP join this command with the alignment work;
    until then it does not train.

    Example: `polysense quickstart`
    """
    from polysense.data.world import generate_world, load_manifest

    if (world / "manifest.json").exists():
        manifest = load_manifest(world)
        console.print(f"using the world at {world}")
    else:
        manifest = generate_world(world, n=n, seed=0, modalities=("image", "text"))
    _print_world_summary(manifest, world)
    out.mkdir(parents=True, exist_ok=True)


def main() -> None:
    try:
        app()
    except PolysenseError as exc:
        err_console.print(f"error: {exc}", style="bold red", markup=False, highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
