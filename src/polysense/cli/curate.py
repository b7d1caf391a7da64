"""`polysense data dedup|filter|safety|recaption|contamination|shard|curate|noisy|verify` and
`polysense bench curation` (docs/curation.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from polysense.cli.app import bench_app, console, data_app

_SET = typer.Option("--set", help="Override a config field, e.g. --set filter.min_similarity=0.8")


def _run(cfg, overrides: list[str]) -> None:
    from rich.table import Table

    from polysense.config import apply_overrides
    from polysense.data.curate import run_curate

    if overrides:
        cfg = apply_overrides(cfg, overrides)
    report = run_curate(cfg, progress=True)
    table = Table(title=f"{cfg.source} -> {cfg.out}")
    for column in ("stage", "in", "kept", "dropped", "samples/s"):
        table.add_column(column)
    for name, s in report["stages"].items():
        dropped = ", ".join(f"{k} {v}" for k, v in s["dropped"].items()) or "-"
        rate = f"{s['samples_per_s']:.0f}" if s["samples_per_s"] else "-"
        table.add_row(name, str(s["in"]), str(s["kept"]), dropped, rate)
    console.print(table)
    console.print(
        f"{report['input']} in = {report['output']} out + {report['rejects']} rejected; "
        f"wrote {Path(cfg.out) / 'report.json'}, rejects.jsonl, manifest.json"
    )


def _stage_command(stage: str, summary: str, example: str) -> None:
    def command(
        source: Annotated[str, typer.Argument(help="Any readable source: world, tars, JSONL ...")],
        out: Annotated[Path, typer.Option(help="Output directory (shards, report.json).")],
        split: Annotated[str | None, typer.Option(help="World / tar split to read.")] = None,
        ckpt: Annotated[str, typer.Option(help="polysense checkpoint for embeddings.")] = "",
        workers: Annotated[int, typer.Option(help="Local worker processes.")] = 1,
        engine: Annotated[str, typer.Option(help="local or ray (Ray Data).")] = "local",
        shard_size: Annotated[int, typer.Option(help="Samples per working shard.")] = 1000,
        device: Annotated[
            str, typer.Option(help="Where --ckpt embeds: cpu, cuda, cuda:N or auto.")
        ] = "cpu",
        batch_size: Annotated[
            int, typer.Option(help="Images per embedding forward pass (captions: 2x).")
        ] = 256,
        overrides: Annotated[list[str] | None, _SET] = None,
    ) -> None:
        from polysense.data.curate import CurateConfig

        cfg = CurateConfig(
            source=source,
            out=str(out),
            split=split,
            stages=(stage,),
            ckpt=ckpt,
            workers=workers,
            engine=engine,
            shard_size=shard_size,
            device=device,
            embed_batch=batch_size,
        )
        _run(cfg, overrides or [])

    command.__doc__ = f"{summary}\n\nExample: `{example}`"
    data_app.command(stage)(command)


_stage_command(
    "dedup",
    "Drop duplicates: exact (pixels + text), perceptual (pHash, verified), embedding (cosine).",
    "polysense data dedup runs/world --out runs/dedup --set dedup.phash_radius=10",
)
_stage_command(
    "filter",
    "Filter by image-caption similarity (needs --ckpt) and caption/image heuristics.",
    "polysense data filter runs/world --out runs/filtered --ckpt runs/quickstart/ckpt "
    "--set filter.min_similarity=0.8",
)
_stage_command(
    "safety",
    "Reject samples whose captions hit the blocklist or whose image a classifier flags.",
    "polysense data safety pairs.jsonl --out runs/safe --set safety.blocklist=words.txt",
)
_stage_command(
    "recaption",
    "Write a synthetic caption (caption_synthetic) next to the original; mix it in by ratio.",
    "polysense data recaption runs/world --out runs/recap --set recaption.mix_ratio=0.3",
)
_stage_command(
    "contamination",
    "Find (and remove) training samples that match evaluation samples.",
    "polysense data contamination runs/world --out runs/clean "
    "--set contamination.eval_source=runs/world",
)
_stage_command(
    "shard",
    "Globally shuffle into fixed-size shards with a manifest of counts and checksums.",
    "polysense data shard pairs.jsonl --out runs/shards --set shard.shard_size=1000",
)


@data_app.command("curate")
def data_curate(
    config: Annotated[Path, typer.Option(help="Python file defining config = CurateConfig(...).")],
    workers: Annotated[int | None, typer.Option(help="Local worker processes.")] = None,
    engine: Annotated[str | None, typer.Option(help="local or ray (Ray Data).")] = None,
    overrides: Annotated[list[str] | None, _SET] = None,
) -> None:
    """Run every configured stage (dedup, filter, safety, recaption, contamination, shard).

    Example: `polysense data curate --config docs/curate.py --workers 2`
    """
    from polysense.data.curate import load_config

    cfg = load_config(config)
    if workers is not None:
        cfg = dataclasses.replace(cfg, workers=workers)
    if engine is not None:
        cfg = dataclasses.replace(cfg, engine=engine)
    _run(cfg, overrides or [])


@data_app.command("noisy")
def data_noisy(
    out: Annotated[Path, typer.Option(help="Output directory (shards, truth.jsonl).")],
    world: Annotated[Path, typer.Option(help="A generated world.")] = Path("runs/world"),
    n_base: Annotated[int, typer.Option(help="Clean scenes before injection.")] = 8000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Build a noisy corpus from the world, with ground truth of what was injected.

    Example: `polysense data noisy --out runs/noisy --n-base 2000`
    """
    from polysense.data.noisy import build_noisy_corpus

    summary = build_noisy_corpus(world, out, n_base=n_base, seed=seed)
    console.print(f"{summary['n_total']} samples {summary['kinds']} -> {out}")


@data_app.command("verify")
def data_verify(
    path: Annotated[Path, typer.Argument(help="A directory with manifest.json and shards.")],
) -> None:
    """Recount and re-hash every shard listed in the manifest.

    Example: `polysense data verify runs/curated`
    """
    from polysense.data.curate import verify_manifest

    manifest = verify_manifest(path)
    console.print(f"{len(manifest['shards'])} shards, {manifest['count']} samples: checksums ok")


@bench_app.command("curation")
def bench_curation(
    out: Annotated[Path, typer.Option(help="Output directory for curation.json/.md/.png.")],
    world: Annotated[str, typer.Option(help="A generated world.")] = "runs/world",
    ckpt: Annotated[str, typer.Option(help="Checkpoint for the filter.")] = "runs/quickstart/ckpt",
    n_base: Annotated[int, typer.Option(help="Clean scenes in the noisy corpus.")] = 8000,
    steps: Annotated[int, typer.Option(help="Training steps for each run.")] = 600,
    max_minutes: Annotated[float, typer.Option(help="Wall-clock cap per training.")] = 5.0,
    workers: Annotated[int, typer.Option(help="Curation worker processes.")] = 1,
) -> None:
    """Noisy corpus -> curate -> train clip-tiny on raw and curated for the same budget ->
    zero-shot and R@5 on the clean test split, stage counts and throughput.

    Example: `flock /tmp/polysense-heavy.lock polysense bench curation --out runs/bench`
    """
    from polysense.bench.curation import run_curation_bench

    run_curation_bench(
        out,
        world=world,
        ckpt=ckpt,
        n_base=n_base,
        steps=steps,
        max_minutes=max_minutes,
        workers=workers,
    )
    console.print((out / "curation.md").read_text(), markup=False, highlight=False)
