"""Performance benchmarks: `polysense bench throughput`, `bench loss-memory`, `bench scaling`,
`bench dataloader`, `bench embed`.

Each writes DIR/NAME.json, DIR/NAME.md and DIR/NAME.png (docs/performance.md explains them).
Run the default sizes alone on the machine (`flock /tmp/polysense-heavy.lock polysense bench ...`
where it is shared); `--quick` shrinks everything to a smoke test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from polysense.cli.app import bench_app, console, load_world
from polysense.errors import PolysenseError


def _show(out: Path, name: str) -> None:
    console.print(f"wrote {out / (name + '.json')}, {name}.md and {name}.png")
    console.print((out / f"{name}.md").read_text(), markup=False, highlight=False)


@bench_app.command("throughput")
def bench_throughput(
    out: Annotated[Path, typer.Option(help="Output directory for throughput.json/.md/.png.")],
    repeats: Annotated[
        int, typer.Option(help="At most this many interleaved rounds per measurement (median).")
    ] = 7,
    seconds: Annotated[
        float,
        typer.Option(help="Stop a measurement's rounds after this many seconds (at least 3)."),
    ] = 30.0,
    batch: Annotated[
        int | None,
        typer.Option(help="Batch for every dims (default: 128 tiny/small, 16 at ViT-B sizes)."),
    ] = None,
    dims: Annotated[
        str,
        typer.Option(
            help="Comma-separated CLIP or SigLIP presets whose dims are compared against HF "
            "CLIPModel / SiglipModel (clip-vit-b16 and siglip-b16-224 too, slowly)."
        ),
    ] = "clip-tiny,clip-small,clip-vit-b32,siglip-tiny",
    quick: Annotated[
        bool, typer.Option(help="One-layer, width-32 models and tiny peaks: a smoke test.")
    ] = False,
    threads: Annotated[
        int | None, typer.Option(help="torch intra-op threads (default: torch's choice).")
    ] = None,
    compile_: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="Also time polysense's inference with torch.compile (inference_compile), "
            "reporting its compile time.",
        ),
    ] = False,
) -> None:
    """Training and inference samples/s of polysense vs HF CLIPModel (CLIP dims) or SiglipModel
    (SigLIP dims), same architecture, weights, batch and threads, interleaved; FLOPs per sample and MFU against the matmul peak measured in
    the same run (fp32, and bf16 where the CPU has bf16 units; elsewhere those variants are
    skipped as "no bf16 units"). Each measurement is bounded by --seconds, not by a count.

    Example: `flock /tmp/polysense-heavy.lock polysense bench throughput --out runs/bench`
    """
    from polysense.bench.throughput import DIMS, run_throughput_bench

    names = tuple(d.strip() for d in dims.split(",") if d.strip())
    if not names:
        raise PolysenseError(f"--dims {dims!r} names no preset; e.g. --dims {','.join(DIMS)}")
    if repeats < 1:
        raise PolysenseError(f"--repeats must be >= 1, got {repeats}")
    if not seconds > 0:
        raise PolysenseError(f"--seconds must be > 0, got {seconds}")
    sizes = {d: batch for d in names} if batch else None
    run_throughput_bench(
        out,
        dims=names,
        batch=sizes,
        repeats=repeats,
        seconds=seconds,
        quick=quick,
        threads=threads,
        compiled=compile_,
    )
    _show(out, "throughput")


@bench_app.command("gpu")
def bench_gpu(
    out: Annotated[Path, typer.Option(help="Output directory for gpu.json/.md/.png.")],
    steps: Annotated[int, typer.Option(help="Training steps of each family's run.")] = 4,
    batch: Annotated[int, typer.Option(help="Batch of each family's run.")] = 16,
    dims: Annotated[
        str | None,
        typer.Option(help="Speed part's preset (default: clip-vit-b16 on CUDA, quick on CPU)."),
    ] = None,
    seconds: Annotated[
        float, typer.Option(help="Bound of each interleaved speed measurement, in seconds.")
    ] = 20.0,
) -> None:
    """The GPU path in one short run: every family (contrastive, fusion, LM + VLM, t2i) trains a
    few steps on the GPU and on the CPU at fp32 (losses compared step by step), the contrastive
    preset under torchrun over the visible GPUs (DDP), and ViT-B/16 training/inference against
    HF CLIPModel with MFU against the GPU's measured peak. Without CUDA it runs on the CPU (what
    CI checks). Exits 1 when a parity check fails.

    Example: `scripts/gpu_check.sh runs/gpu` (= `polysense bench gpu --out runs/gpu`)
    """
    from polysense.bench.gpu import run_gpu_check

    if steps < 1 or batch < 2:
        raise PolysenseError(f"--steps must be >= 1 and --batch >= 2, got {steps} and {batch}")
    if not seconds > 0:
        raise PolysenseError(f"--seconds must be > 0, got {seconds}")
    results = run_gpu_check(out, steps=steps, batch=batch, dims=dims, seconds=seconds)
    _show(out, "gpu")
    if not results["all_parity"]:
        raise typer.Exit(1)


@bench_app.command("loss-memory")
def bench_loss_memory(
    out: Annotated[Path, typer.Option(help="Output directory for loss-memory.json/.md/.png.")],
    quick: Annotated[
        bool, typer.Option(help="One batch of 2048 at dim 32 under a 160 MiB cap: a smoke test.")
    ] = False,
    chunk: Annotated[int, typer.Option(help="Chunk size of the chunked losses.")] = 1024,
    budget_gib: Annotated[
        float | None,
        typer.Option(help="Memory cap per probe in GiB (default: available - 4, at most 24)."),
    ] = None,
) -> None:
    """Peak memory and time of naive (float64), dense and chunked InfoNCE and SigLIP, forward +
    backward, as the global batch grows from 1k to 64k embeddings of dim 512; each probe in a
    child process with a memory cap, so a form that does not fit fails alone.

    Example: `flock /tmp/polysense-heavy.lock polysense bench loss-memory --out runs/bench`
    """
    from polysense.bench.loss_memory import run_loss_memory_bench

    if chunk < 1:
        raise PolysenseError(f"--chunk must be >= 1, got {chunk}")
    if quick:
        run_loss_memory_bench(
            out,
            sizes=(2048,),
            dim=32,
            chunk=256,
            chunks=(128, 512),
            chunk_series_b=2048,
            budget_gib=budget_gib or 160 / 1024,
        )
    else:
        run_loss_memory_bench(out, chunk=chunk, budget_gib=budget_gib)
    _show(out, "loss-memory")


@bench_app.command("scaling")
def bench_scaling(
    out: Annotated[Path, typer.Option(help="Output directory for scaling.json/.md/.png.")],
    data: Annotated[
        Path, typer.Option(help="Training data (a world; a small one is generated if absent).")
    ] = Path("runs/world"),
    preset: Annotated[str, typer.Option(help="Preset to train.")] = "clip-tiny",
    nproc: Annotated[int, typer.Option(help="Processes of the torchrun run.")] = 2,
    threads: Annotated[int, typer.Option(help="Threads in total (split across processes).")] = 2,
    quick: Annotated[bool, typer.Option(help="A one-layer model for 6 steps.")] = False,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Extra config override (repeatable).")
    ] = None,
) -> None:
    """One process vs torchrun --nproc_per_node N (gloo) at the same global batch: samples/s and
    the two loss curves, which must agree to float tolerance.

    Example: `flock /tmp/polysense-heavy.lock polysense bench scaling --out runs/bench --data runs/world`
    """
    from polysense.bench.scaling import DEFAULT_SETS, QUICK_SETS, run_scaling_bench

    if nproc < 2:
        raise PolysenseError(f"--nproc must be >= 2 to compare with one process, got {nproc}")
    if not (data / "manifest.json").is_file() and not data.exists():
        from polysense.data.world import generate_world

        console.print(f"{data} does not exist: generating a 2000-scene world there")
        generate_world(data, n=2000, modalities=("image", "text"), progress=False)
    sets = (*(QUICK_SETS if quick else DEFAULT_SETS), *(set_ or []))
    res = run_scaling_bench(out, data=data, preset=preset, sets=sets, nproc=nproc, threads=threads)
    _show(out, "scaling")
    if res["max_rel_loss_diff"] > 1e-3:
        raise PolysenseError(
            f"the {nproc}-process loss curve differs from the single-process one by "
            f"{res['max_rel_loss_diff']:.1e} (relative); see {out / 'scaling.md'}"
        )


@bench_app.command("quickstart")
def bench_quickstart(
    out: Annotated[Path, typer.Option(help="Output directory for quickstart.json/.md/.png.")],
    world: Annotated[
        Path, typer.Option(help="World to train on (the quickstart's 20k scenes if absent).")
    ] = Path("runs/world"),
    precisions: Annotated[
        str, typer.Option(help="Comma-separated: fp32, bf16 (bf16 is skipped without bf16 units).")
    ] = "fp32,bf16",
    target: Annotated[float, typer.Option(help="Val zero-shot top-1 to time.")] = 0.95,
    eval_every: Annotated[int, typer.Option(help="Steps between val evaluations.")] = 100,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Extra config override (repeatable).")
    ] = None,
) -> None:
    """Time to quality of the quickstart recipe: val zero-shot against training seconds, in fp32
    and in bf16 (where the CPU has bf16 units), and the bf16 / fp32 speed-up to `--target`.

    Example: `flock /tmp/polysense-heavy.lock polysense bench quickstart --out runs/bench`
    (AVX2-only case on a newer CPU: prefix `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`)
    """
    from polysense.bench.quickstart import run_quickstart_bench

    names = tuple(p.strip() for p in precisions.split(",") if p.strip())
    bad = [p for p in names if p not in ("fp32", "bf16")]
    if bad or not names:
        raise PolysenseError(f"--precisions {precisions!r}: use fp32, bf16 or fp32,bf16")
    if not 0 < target <= 1:
        raise PolysenseError(f"--target must be in (0, 1], got {target}")
    if eval_every < 1:
        raise PolysenseError(f"--eval-every must be >= 1, got {eval_every}")
    load_world(world, 20000)  # the quickstart's world, generated where absent
    run_quickstart_bench(
        out,
        world=world,
        precisions=names,
        target=target,
        eval_every=eval_every,
        seed=seed,
        overrides=tuple(set_ or ()),
    )
    _show(out, "quickstart")


@bench_app.command("dataloader")
def bench_dataloader(
    out: Annotated[Path, typer.Option(help="Output directory for dataloader.json/.md/.png.")],
    data: Annotated[
        Path | None,
        typer.Option(help="Webdataset shards of .jpg + .txt (default: synthetic JPEGs, deleted)."),
    ] = None,
    samples: Annotated[int, typer.Option(help="Synthetic samples to write without --data.")] = 4096,
    size: Annotated[int, typer.Option(help="Crop size in pixels.")] = 224,
    batch: Annotated[int, typer.Option(help="Batch size of both loaders.")] = 64,
    workers: Annotated[int, typer.Option(help="DataLoader workers of both loaders.")] = 2,
    rounds: Annotated[int, typer.Option(help="Interleaved passes per loader (median).")] = 3,
    quick: Annotated[bool, typer.Option(help="256 samples, batch 32, one round.")] = False,
) -> None:
    """Samples/s of polysense's streaming loader vs a plain webdataset + Pillow loop, both
    decoding JPEGs and taking a random resized crop at --size through a DataLoader with the same
    workers and batch; interleaved in one run, with the ratio.

    Example: `flock /tmp/polysense-heavy.lock polysense bench dataloader --out runs/bench`
    """
    from polysense.bench.dataloader import run_dataloader_bench

    if quick:
        samples, batch, rounds = 256, 32, 1
    for name, value in (("--samples", samples), ("--size", size), ("--batch", batch)):
        if value < 1:
            raise PolysenseError(f"{name} must be >= 1, got {value}")
    if workers < 0 or rounds < 1:
        raise PolysenseError(f"--workers must be >= 0 and --rounds >= 1 (got {workers}, {rounds})")
    if data is not None and not data.exists():
        raise PolysenseError(f"--data {data} does not exist; pass a folder of .tar shards")
    run_dataloader_bench(
        out, data=data, samples=samples, size=size, batch=batch, workers=workers, rounds=rounds
    )
    _show(out, "dataloader")


@bench_app.command("embed")
def bench_embed(
    out: Annotated[Path, typer.Option(help="Output directory for embed.json/.md/.png.")],
    data: Annotated[
        Path | None,
        typer.Option(help="CSV/JSONL/image folder of image files (default: synthetic JPEGs)."),
    ] = None,
    n: Annotated[int, typer.Option(help="Synthetic images to write without --data.")] = 256,
    dims: Annotated[
        str, typer.Option(help="clip-vit-b32 (ViT-B/32, 224 px) or clip-tiny (quick).")
    ] = "clip-vit-b32",
    batch_size: Annotated[int, typer.Option(help="Images per model call, every variant.")] = 32,
    num_workers: Annotated[
        int | None,
        typer.Option(
            help="DataLoader workers of polysense and of the plain loop's variant (default: "
            "index build's default for polysense, 2 for the plain loop)."
        ),
    ] = None,
    seconds: Annotated[
        float, typer.Option(help="Time each variant gets (whole passes, at least two).")
    ] = 20.0,
    precision: Annotated[
        str, typer.Option(help="auto (bf16 on bf16 hardware, HF with bf16 weights) or fp32.")
    ] = "auto",
    compile_: Annotated[
        bool,
        typer.Option(
            "--compile", help="polysense as `index build --compile` runs (torch.compile)."
        ),
    ] = False,
) -> None:
    """Images/s from files to vectors at 224 px: `index build`'s path (decode in DataLoader
    workers, the model in this process) vs a plain Pillow + CLIPImageProcessor +
    CLIPModel.get_image_features loop with the same weights, batch and threads, alone and with
    the same workers; interleaved in one run, with the ratios.

    Example: `flock /tmp/polysense-heavy.lock polysense bench embed --out runs/bench`
    """
    from polysense.bench.embed import DIMS, run_embed_bench

    if dims not in DIMS:
        raise PolysenseError(f"--dims {dims!r}: use one of {', '.join(DIMS)}")
    for name, value in (("--n", n), ("--batch-size", batch_size)):
        if value < 1:
            raise PolysenseError(f"{name} must be >= 1, got {value}")
    if num_workers is not None and num_workers < 0:
        raise PolysenseError(f"--num-workers must be >= 0, got {num_workers}")
    if not seconds > 0:
        raise PolysenseError(f"--seconds must be > 0, got {seconds}")
    if precision not in ("auto", "fp32"):
        raise PolysenseError(f"--precision {precision!r}: use auto or fp32")
    if data is not None and not data.exists():
        raise PolysenseError(f"--data {data} does not exist; pass a CSV/JSONL or image folder")
    run_embed_bench(
        out,
        data=data,
        n=n,
        dims=dims,
        batch=batch_size,
        workers=num_workers,
        seconds=seconds,
        precision=precision,
        compile=compile_,
    )
    _show(out, "embed")
