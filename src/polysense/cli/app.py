"""The typer apps and consoles every command module attaches to (a leaf: it imports no command)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

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
bench_app = typer.Typer(
    help="Benchmarks: each writes DIR/NAME.json, .md and .png.", no_args_is_help=True
)
index_app = typer.Typer(
    help="Embedding indexes for retrieval (faiss + SQLite).", no_args_is_help=True
)
app.add_typer(world_app, name="world")
app.add_typer(data_app, name="data")
app.add_typer(demo_app, name="demo")
app.add_typer(tok_app, name="tokenizer")
app.add_typer(index_app, name="index")
app.add_typer(bench_app, name="bench")


def load_world(world: Path, n: int, seed: int = 0) -> dict:
    """The world manifest at `world`, generated (image and text, `n` scenes) when absent."""
    from polysense.data.world import generate_world, load_manifest

    if (world / "manifest.json").exists():
        console.print(f"using the world at {world}")
        return load_manifest(world)
    console.print(f"generating the world at {world} ({n} scenes)")
    return generate_world(world, n=n, seed=seed, modalities=("image", "text"))
