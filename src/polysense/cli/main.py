"""The `polysense` command line: thin typer commands over library functions, printed with rich.

Errors caused by input (a missing file, an unknown key, a value out of range) and by the
environment (a read-only --out, a full disk: any OSError) print one line and exit 2; no traceback.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from polysense.cli.app import (
    app,
    bench_app,
    console,
    data_app,
    demo_app,
    err_console,
    index_app,
    load_world,
    tok_app,
    world_app,
)
from polysense.errors import PolysenseError
from polysense.fileio import writable_dir, write_failure

SPLITS = ("train", "val", "test", "test_novel")
WORLD_SIZES = (32, 64)  # the canvas sizes the world's objects, motion and sounds are tuned for


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

    if size not in WORLD_SIZES:
        raise PolysenseError(
            f"--size {size}: the world is drawn at {' or '.join(map(str, WORLD_SIZES))} px; "
            "pass --size 32 or --size 64"
        )
    writable_dir(out, flag="--out")
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
            help="World dir, .tar/shard pattern, CSV/TSV/JSONL, COCO json, image folder, or a "
            "directory of several of these (each read with its own format)."
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

    captions = [
        c for s in read_samples(data, split=split, decode=False) for c in s.get("text") or []
    ]
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


def _metrics_table(metrics: dict, title: str) -> Table:
    keys = [
        "zeroshot_top1",
        "zeroshot_top5",
        "i2t_r1",
        "i2t_r5",
        "i2t_r10",
        "t2i_r1",
        "t2i_r5",
        "t2i_r10",
    ]
    splits = [metrics.get("split", "eval")] + [
        k for k, v in metrics.items() if isinstance(v, dict) and "n_samples" in v
    ]
    table = Table(title=title)
    table.add_column("metric")
    for split in splits:
        table.add_column(split, justify="right")
    for key in keys:
        values = [metrics.get(key)] + [metrics[s].get(key) for s in splits[1:]]
        if any(v is not None for v in values):
            table.add_row(key, *("-" if v is None else f"{v:.3f}" for v in values))
    return table


def _train_and_evaluate(
    cfg,
    *,
    data: str | Path,
    out: Path,
    resume: bool,
    eval_splits: tuple[str, ...],
    eval_data: Path | None = None,
    classnames: list[str] | None = None,
    templates: tuple[str, ...] | None = None,
) -> dict:
    import torch.distributed as dist

    from polysense.config import to_dict
    from polysense.data.readers import detect_format
    from polysense.eval.suite import data_probe, evaluate_splits, val_zeroshot
    from polysense.eval.suite import evaluate as evaluate_data
    from polysense.fileio import atomic_write_json
    from polysense.models.checkpoint import load_model, read_run_config
    from polysense.train.loop import train

    evaluate = None
    local = isinstance(data, Path)  # else remote shards (a URL): no world splits to evaluate
    if cfg.train.eval_every and eval_data is None and not local:
        raise PolysenseError(
            f"train.eval_every={cfg.train.eval_every} probes a world's val split or --eval-data; "
            f"{data} is remote: give held-out data with --eval-data PATH"
        )
    if cfg.train.eval_every:  # a probe during training: the eval data's, else a world's val
        evaluate = (
            data_probe(eval_data, classnames=classnames, templates=templates)
            if eval_data is not None
            else val_zeroshot(data)
        )
    result = train(cfg, data=data, out=out, resume=resume, evaluate=evaluate)
    if dist.is_initialized():  # under torchrun: rank 0 evaluates and reports, the others stop
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return {}
    console.print(
        f"trained {result.steps} steps in {result.seconds:.0f} s "
        f"({result.train_samples_per_s:.0f} samples/s); final loss {result.final_loss:.4f}"
        + (" (stopped early by the clock)" if result.stopped_early else "")
    )
    _plot_loss(out / "metrics.jsonl", out / "loss.png")
    metrics: dict = {}
    if eval_splits and local and detect_format(data) == "world":
        model = load_model(str(out))
        metrics = evaluate_splits(model, data, splits=eval_splits)
    elif eval_splits and eval_data is None:
        kind = f"a {detect_format(data)}" if local else "a remote"
        console.print(
            f"--eval-splits names a world's splits; {data} is {kind} source, so no split was "
            "evaluated (give held-out data with --eval-data PATH)"
        )
    if eval_data is not None:
        held_out = evaluate_data(
            load_model(str(out)), eval_data, split=None, classnames=classnames, templates=templates
        )
        if metrics:  # a world's splits first; the held-out data's figures beside them
            metrics["eval_data"] = {**held_out, "path": str(eval_data)}
        else:  # the held-out data's figures are the run's (the table shows them)
            metrics = {**held_out, "eval_data": str(eval_data)}
    metrics |= {
        "train_samples_per_s": result.train_samples_per_s,
        "train_steps": result.steps,
        "train_seconds": result.seconds,
        "final_loss": result.final_loss,
        "skipped_steps": result.skipped_steps,
        "config": to_dict(read_run_config(out)),  # the model as trained (--init replaces it)
    }
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def _family_eval_tasks() -> list[str]:
    from polysense.eval import FAMILY_TASKS

    return list(FAMILY_TASKS)


@app.command("train")
def train_cmd(
    preset: Annotated[str, typer.Argument(help="Preset name (see `polysense presets`).")],
    data: Annotated[
        str,
        typer.Option(
            help="Training data: a world dir, any readable source (CSV, JSONL, COCO, folder, "
            ".tar shards), or remote webdataset shards (https://host/s-{000000..000099}.tar, "
            "pipe:curl -s URL) streamed with --set data.sampling=resampled."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Checkpoint dir (config.json, model.safetensors, state.pt, metrics.jsonl)."
        ),
    ],
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override a config field, e.g. --set train.lr=3e-4 (repeatable)."
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from OUT/state.pt exactly where it stopped.")
    ] = False,
    eval_splits: Annotated[
        str,
        typer.Option(help="World splits evaluated after training (comma-separated; empty = none)."),
    ] = "test,test_novel",
    init: Annotated[
        str | None,
        typer.Option(
            help="Start from these weights: a polysense checkpoint or a Hugging Face CLIP/SigLIP "
            "directory. Its architecture and tokenizer replace the preset's model; the preset's "
            "training recipe stays (the same as --set train.init=DIR)."
        ),
    ] = None,
    eval_data: Annotated[
        Path | None,
        typer.Option(
            help="Held-out data evaluated after training (zero-shot where images are labelled, "
            "Recall@K always) and, with --set train.eval_every=N, every N steps on its first "
            "1000 samples (plotted in loss.png)."
        ),
    ] = None,
    classnames: Annotated[
        Path | None,
        typer.Option(help="--eval-data's class names, one a line in class-index order."),
    ] = None,
    templates: Annotated[
        str | None,
        typer.Option(help="--eval-data's prompt templates: openai, simple, world or a file."),
    ] = None,
    image_root: Annotated[
        Path | None,
        typer.Option(
            help="Folder of a LLaVA conversation file's images (LLaVA's --image_folder; "
            "default: the file's folder). For vlm-tiny-stage1/2."
        ),
    ] = None,
) -> None:
    """Train a preset; on a world, evaluate on test and test_novel and write OUT/metrics.json.

    Example: `polysense train clip-tiny --data runs/world --out runs/clip-tiny --set train.steps=500`

    Fine-tune a downloaded CLIP on your captions, text tower locked (LiT):
    `polysense train clip-vit-b32 --init path/to/hf-clip --data my.csv --out runs/ft
    --set train.lock_text=true`
    """
    from polysense.config import apply_overrides
    from polysense.presets import get_preset, get_runner

    overrides = list(set_ or [])
    if init is not None:
        if get_runner(preset) is not None:
            raise PolysenseError(
                f"--init starts the contrastive presets (clip-*, siglip-*, lit-*); {preset} "
                "trains another family, whose config names its own checkpoints (e.g. model.vision)"
            )
        if not Path(init).is_dir():
            raise PolysenseError(
                f"--init {init}: no such directory; give a polysense checkpoint (polysense train "
                "--out) or a Hugging Face CLIP/SigLIP directory (config.json + weights)"
            )
        model_sets = [o for o in overrides if o.strip().startswith("model.")]
        if model_sets:
            raise PolysenseError(
                f"--set {model_sets[0]} with --init: the model comes from {init} (its "
                "architecture must fit its weights); drop the model.* override"
            )
        overrides.append(f"train.init={init}")
    cfg = apply_overrides(get_preset(preset), overrides)
    splits = tuple(s.strip() for s in eval_splits.split(",") if s.strip())
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise PolysenseError(
            f"--eval-splits {eval_splits}: no split {unknown[0]!r}; choose from "
            f"{','.join(SPLITS)} (comma-separated), or --eval-splits '' for none"
        )
    writable_dir(out, flag="--out")
    family_runner = get_runner(preset)
    from polysense.data.pipeline import is_url

    remote = is_url(data)
    source: str | Path = data if remote else Path(data)
    if remote and family_runner is not None:
        raise PolysenseError(
            f"--data {data}: remote shards stream to the contrastive presets (clip-*, siglip-*); "
            f"{preset} trains from local data: download the shards and pass their folder"
        )
    if remote and cfg.data.sampling != "resampled":
        raise PolysenseError(
            f"--data {data}: remote shards stream in the resampled mode only; add "
            "--set data.sampling=resampled"
        )
    if family_runner is not None:
        if eval_data or classnames or templates:
            raise PolysenseError(
                f"--eval-data/--classnames/--templates evaluate the contrastive presets; {preset} "
                f"trains another family: evaluate it with `polysense eval TASK --ckpt {out}`"
            )
        extra = {}
        if image_root is not None:
            if "image_root" not in inspect.signature(family_runner).parameters:
                raise PolysenseError(
                    f"--image-root {image_root}: it locates a LLaVA file's images for the VLM "
                    f"stages (vlm-tiny-stage1/2); {preset} reads its data where it is"
                )
            extra["image_root"] = image_root
        metrics = family_runner(
            cfg, data=Path(data), out=out, resume=resume, eval_splits=splits, **extra
        )
    else:
        if image_root is not None:
            raise PolysenseError(
                f"--image-root {image_root}: it locates a LLaVA file's images for the VLM stages; "
                "the contrastive presets read a CSV/JSONL/COCO file's images relative to it"
            )
        if (classnames or templates) and eval_data is None:
            raise PolysenseError(
                "--classnames/--templates describe --eval-data; give the held-out data with "
                "--eval-data PATH"
            )
        if eval_data is not None and not eval_data.exists():
            raise PolysenseError(f"--eval-data {eval_data}: no such file or directory")
        from polysense.eval.templates import load_classnames, load_templates

        metrics = _train_and_evaluate(
            cfg,
            data=source,
            out=out,
            resume=resume,
            eval_splits=splits,
            eval_data=eval_data,
            classnames=load_classnames(classnames) if classnames else None,
            templates=load_templates(templates) if templates else None,
        )
    if "zeroshot_top1" in metrics or "i2t_r1" in metrics:
        console.print(_metrics_table(metrics, f"{preset} on {data}"))
    plotted = " and loss.png" if (out / "loss.png").is_file() else ""
    console.print(f"wrote {out / 'metrics.json'}{plotted}")


@app.command("eval")
def eval_cmd(
    task: Annotated[
        str,
        typer.Argument(
            help="zeroshot, retrieval, all (both) or linear-probe (contrastive checkpoints); "
            "or a task of another family: " + ", ".join(sorted(_family_eval_tasks())) + "."
        ),
    ],
    ckpt: Annotated[Path, typer.Option(help="Checkpoint directory.")],
    data: Annotated[
        str,
        typer.Option(
            help="World dir, image folder (one sub-folder per class), CSV/JSONL, COCO or "
            "Karpathy JSON (dataset_coco.json, dataset_flickr30k.json), shards."
        ),
    ],
    split: Annotated[
        str | None,
        typer.Option(help="World or Karpathy split (default test for both)."),
    ] = None,
    classnames: Annotated[
        Path | None,
        typer.Option(
            help="Zero-shot / probe class names, one a line, in class-index order (default: the "
            "labels found, `_` read as spaces)."
        ),
    ] = None,
    templates: Annotated[
        str | None,
        typer.Option(
            help="Prompt templates: a set (openai, simple, world) or a file of one template a "
            "line with {} or {c} for the class (default: world on a world, openai elsewhere)."
        ),
    ] = None,
    image_root: Annotated[
        Path | None,
        typer.Option(
            help="Folder the images of a COCO or Karpathy JSON, or of a VQAv2, POPE or "
            "Winoground file, are under."
        ),
    ] = None,
    annotations: Annotated[
        Path | None,
        typer.Option(help="vqa: the VQAv2 annotations JSON of the --data questions file."),
    ] = None,
    results: Annotated[
        Path | None,
        typer.Option(
            help="vqa/caption on a VQAv2 or COCO captions file: write the answers or captions "
            "here (VQA / COCO results format)."
        ),
    ] = None,
    train_data: Annotated[
        str | None,
        typer.Option(help="linear-probe: labelled images to fit it on (default: a world's train)."),
    ] = None,
    c: Annotated[
        float | None,
        typer.Option(
            "--c", help="linear-probe: inverse regularisation C (default: chosen on 20 % of train)."
        ),
    ] = None,
    device: Annotated[
        str, typer.Option(help="Where the model runs: cpu, cuda, cuda:N, mps.")
    ] = "cpu",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics here.")] = None,
    batch_size: Annotated[int, typer.Option(help="Evaluation batch size.")] = 256,
    limit: Annotated[int | None, typer.Option(help="Evaluate at most this many samples.")] = None,
    clip: Annotated[
        Path | None,
        typer.Option(help="A contrastive checkpoint that scores another model (eval t2i)."),
    ] = None,
) -> None:
    """Evaluate a checkpoint: zero-shot top-1/top-5, image<->text Recall@1/5/10, a linear probe,
    or a task of another model family (captioning, VQA, hallucination, ...). The table says how
    many samples each task scored out of how many were read.

    Examples:

    `polysense eval zeroshot --ckpt runs/quickstart/ckpt --data runs/world --split test_novel`

    `polysense eval zeroshot --ckpt runs/clip-b32 --data pets/ --classnames classes.txt --templates openai`

    `polysense eval retrieval --ckpt runs/clip-b32 --data dataset_flickr30k.json --image-root flickr30k-images`

    `polysense eval linear-probe --ckpt runs/clip-b32 --data pets/test --train-data pets/train`

    `polysense eval vqa --ckpt runs/vlm/stage2 --data v2_OpenEnded_mscoco_val2014_questions.json
    --annotations v2_mscoco_val2014_annotations.json --image-root val2014 --results answers.json`

    `polysense eval pope --ckpt runs/vlm/stage2 --data coco_pope_random.json --image-root val2014`

    `polysense eval caption --ckpt runs/vlm/stage2 --data captions_val2014.json --image-root
    val2014 --results captions_results.json`
    """
    import inspect
    import json
    import warnings

    from polysense import load
    from polysense.devices import resolve_device
    from polysense.eval import get_task
    from polysense.eval.suite import TASKS, evaluate, linear_probe
    from polysense.eval.templates import load_classnames, load_templates
    from polysense.fileio import atomic_write_json

    own_tasks = (*TASKS, "all", "linear-probe")
    family_task = get_task(task) if task not in own_tasks else None
    if split is None and _split_format(data, strict=family_task is None) in ("world", "karpathy"):
        split = "test"
    if family_task is not None:
        extra = {"annotations": annotations, "image_root": image_root, "results": results}
        extra = {k: v for k, v in extra.items() if v is not None}
        accepted = inspect.signature(family_task).parameters
        for name in extra:
            if name not in accepted:
                flag = "--" + name.replace("_", "-")
                raise PolysenseError(f"{flag} does not apply to eval {task}; drop it")
        metrics = family_task(
            ckpt=ckpt, data=data, split=split, batch_size=batch_size, limit=limit, clip=clip,
            **extra,
        )  # fmt: skip
    else:
        names = load_classnames(classnames) if classnames is not None else None
        prompts = load_templates(templates) if templates is not None else None
        model = load(str(ckpt), device=str(resolve_device(device)), family="clip")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if task == "linear-probe":
                metrics = linear_probe(
                    model, data, split=split, train_data=train_data, classnames=names, c=c,
                    batch_size=batch_size, limit=limit, image_root=image_root, progress=True,
                )  # fmt: skip
            else:
                metrics = evaluate(
                    model, data, split=split, tasks=TASKS if task == "all" else (task,),
                    batch_size=batch_size, limit=limit, progress=True, classnames=names,
                    templates=prompts, image_root=image_root,
                )  # fmt: skip
        for warning in caught:
            if issubclass(warning.category, UserWarning):
                err_console.print(f"warning: {warning.message}", markup=False, highlight=False)
        metrics["split"] = split or "all"
        console.print(_eval_table(metrics, f"{ckpt} on {data}"))
    if json_out:
        atomic_write_json(json_out, metrics)
        console.print(f"wrote {json_out}")
    else:
        print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, indent=2))


def _split_format(data: str, *, strict: bool) -> str | None:
    """The format of `data`; None for a file or folder the readers do not know (a VQAv2 or POPE
    file, a folder of SugarCrepe files, which its own task reads) unless `strict`."""
    from polysense.data.readers import detect_format
    from polysense.errors import DataError

    try:
        return detect_format(data)
    except DataError:
        if strict or not Path(data).exists():
            raise
        return None


def _eval_table(metrics: dict, title: str) -> Table:
    """The metrics table of `polysense eval`, with what each task scored out of what was read."""
    table = _metrics_table(metrics, title)
    for key in ("linear_probe_top1", "linear_probe_top5"):
        if key in metrics:
            table.add_row(key, f"{metrics[key]:.3f}")
    read = f"of {metrics['n_samples']} read"
    if metrics.get("n_rejected"):
        read += f" ({metrics['n_rejected']} more rejected by the reader)"
    for task in ("zeroshot", "retrieval", "linear_probe"):
        if f"{task}_n_samples" in metrics:
            table.add_row(f"{task} scored", f"{metrics[f'{task}_n_samples']} {read}")
    return table


@app.command("quickstart")
def quickstart(
    out: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/quickstart"),
    world: Annotated[Path, typer.Option(help="World directory (generated when absent).")] = Path(
        "runs/world"
    ),
    n: Annotated[int, typer.Option(help="World size when it has to be generated.")] = 20000,
    seed: Annotated[int, typer.Option(help="Training seed (the result is a function of it).")] = 0,
    time_limit: Annotated[
        float,
        typer.Option(
            help="Safety net in minutes, far above a normal run: if training reaches it, the run "
            "stops, is reported as incomplete and the command exits 1."
        ),
    ] = 30.0,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Config override (repeatable).")
    ] = None,
) -> None:
    """Generate the world if absent, train the `clip-tiny` preset on the CPU for its fixed number
    of steps, evaluate it on test and test_novel, print a table, write OUT/metrics.json and
    OUT/loss.png. The result depends on the seed, not on the machine's speed.

    Example: `polysense quickstart --out runs/quickstart --seed 1`
    """
    import time

    from polysense.config import apply_overrides
    from polysense.fileio import atomic_write_json
    from polysense.presets import get_preset

    start = time.perf_counter()
    manifest = load_world(world, n)
    _print_world_summary(manifest, world)
    cfg = apply_overrides(
        get_preset("clip-tiny"),
        [
            f"train.seed={seed}",
            f"train.time_limit_minutes={time_limit}",
            "train.eval_every=100",
            *(set_ or []),
        ],
    )
    ckpt = out / "ckpt"
    metrics = _train_and_evaluate(
        cfg, data=world, out=ckpt, resume=False, eval_splits=("test", "test_novel")
    )
    metrics["wall_seconds"] = time.perf_counter() - start
    metrics["complete"] = metrics["train_steps"] == cfg.train.steps
    atomic_write_json(out / "metrics.json", metrics)
    _plot_loss(ckpt / "metrics.jsonl", out / "loss.png")
    title = "clip-tiny on the world (quickstart)"
    console.print(_metrics_table(metrics, title if metrics["complete"] else f"{title}: INCOMPLETE"))
    console.print(
        f"wrote {out / 'metrics.json'} and {out / 'loss.png'} in {metrics['wall_seconds']:.0f} s"
    )
    if not metrics["complete"]:
        err_console.print(
            f"[bold red]error:[/] training hit the {time_limit:g}-minute safety limit after "
            f"{metrics['train_steps']} of {cfg.train.steps} steps, so the metrics above are of an "
            "unfinished run, not the quickstart's result. This machine is far slower than "
            "expected (or busy): rerun with a larger --time-limit on a quieter machine."
        )
        raise typer.Exit(1)


DEVICE_HELP = "Where the model embeds: cpu, cuda, cuda:N or auto (cuda when available)."
WORKERS_HELP = (
    "DataLoader worker processes decoding images while the model runs (0: none; default: 0 on "
    "a CPU whose cores the model's threads use, else up to 4)."
)


COMPILE_HELP = (
    "Run the image tower through torch.compile: seconds to a minute of compiling at the first "
    "batch, then faster batches (ViT-B/32 fp32 on 2 cores: 1.24x)."
)


@index_app.command("build")
def index_build(
    ckpt: Annotated[Path, typer.Option(help="Checkpoint directory whose model embeds the data.")],
    data: Annotated[str, typer.Option(help="World dir or any readable source.")],
    out: Annotated[Path, typer.Option(help="Index directory to write (replaced atomically).")],
    split: Annotated[str | None, typer.Option(help="World split to index.")] = None,
    index_type: Annotated[
        str, typer.Option(help="auto (exact up to ~100k vectors, IVF beyond), flat, ivf or hnsw.")
    ] = "auto",
    batch_size: Annotated[int, typer.Option(help="Embedding batch size.")] = 256,
    limit: Annotated[int | None, typer.Option(help="Index at most this many samples.")] = None,
    image_root: Annotated[
        Path | None, typer.Option(help="Folder the images of a COCO or Karpathy JSON are under.")
    ] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "cpu",
    num_workers: Annotated[int | None, typer.Option(help=WORKERS_HELP)] = None,
    compile_: Annotated[bool, typer.Option("--compile", help=COMPILE_HELP)] = False,
) -> None:
    """Embed every image and caption of a dataset and write a searchable index. A CSV/JSONL
    item's key is its image path (rows of one image are one item with all their captions).

    Example: `polysense index build --ckpt runs/quickstart/ckpt --data runs/world --split test --out runs/index`
    """
    from polysense.index import build_index

    writable_dir(out.absolute().parent, flag="--out")
    index = build_index(
        ckpt, data, out, split=split, index_type=index_type, batch_size=batch_size, limit=limit,
        image_root=image_root, device=device, num_workers=num_workers, compile=compile_,
    )  # fmt: skip
    console.print(f"indexed {len(index)} items -> {out}")


@index_app.command("add")
def index_add(
    index: Annotated[Path, typer.Option(help="Existing index directory.")],
    data: Annotated[str, typer.Option(help="World dir or any readable source with new samples.")],
    split: Annotated[str | None, typer.Option(help="World split to add.")] = None,
    batch_size: Annotated[int, typer.Option(help="Embedding batch size.")] = 256,
    image_root: Annotated[
        Path | None, typer.Option(help="Folder the images of a COCO or Karpathy JSON are under.")
    ] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "cpu",
    num_workers: Annotated[int | None, typer.Option(help=WORKERS_HELP)] = None,
    compile_: Annotated[bool, typer.Option("--compile", help=COMPILE_HELP)] = False,
) -> None:
    """Append new samples to an index without re-embedding the old ones. A key already in the
    index (the same image path) is rejected to rejects.jsonl.

    Example: `polysense index add --index runs/index --data runs/world --split val`
    """
    from polysense.index import EmbeddingIndex

    opened = EmbeddingIndex.open(index)
    writable_dir(index.absolute().parent, flag="--index")
    added = opened.add(
        data, split=split, batch_size=batch_size, image_root=image_root, device=device,
        num_workers=num_workers, compile=compile_,
    )  # fmt: skip
    console.print(f"added {added} items to {index}")


@app.command("search")
def search_cmd(
    index: Annotated[Path, typer.Option(help="Index directory.")],
    query: Annotated[str | None, typer.Argument(help="Text query.")] = None,
    image: Annotated[Path | None, typer.Option(help="Image file to query with instead.")] = None,
    k: Annotated[int, typer.Option(help="Number of results.")] = 10,
    modality: Annotated[str, typer.Option(help="What to return: image or text.")] = "image",
    dedup: Annotated[
        float | None, typer.Option(help="Drop results whose cosine to a better one is >= this.")
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
) -> None:
    """Search an index: text->image (default), image->image, image->text, text->text. Each
    result shows its key, score, caption and image file (relative to its source's folder).

    Example: `polysense search --index runs/index "a red circle" --k 5`
    """
    import json

    from PIL import Image, UnidentifiedImageError

    from polysense.index import EmbeddingIndex

    if (query is None) == (image is None):
        raise PolysenseError("give either a text QUERY or --image PATH (exactly one)")
    idx = EmbeddingIndex.open(index)
    if image is not None:
        if not image.is_file():
            raise PolysenseError(f"{image} does not exist")
        try:
            picture = Image.open(image).convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise PolysenseError(f"{image}: not a readable image ({exc})") from None
        hits = idx.search_image([picture], k=k, modality=modality, dedup=dedup)[0]
    else:
        hits = idx.search_text([query], k=k, modality=modality, dedup=dedup)[0]
    if json_out:
        print(
            json.dumps(
                [
                    {
                        "key": h.key,
                        "score": h.score,
                        "caption": h.caption,
                        "modality": h.modality,
                        "image_path": h.image_path,
                    }
                    for h in hits
                ],
                indent=2,
            )
        )
        return
    table = Table(title=f"{query or image} -> {modality}")
    table.add_column("#", justify="right")
    table.add_column("key")
    table.add_column("score", justify="right")
    table.add_column("caption")
    table.add_column("image file")
    for rank, hit in enumerate(hits, 1):
        table.add_row(str(rank), hit.key, f"{hit.score:.4f}", hit.caption, hit.image_path or "-")
    console.print(table)


@bench_app.command("retrieval")
def bench_retrieval(
    out: Annotated[Path, typer.Option(help="Output directory for retrieval.json/.md/.png.")],
    quick: Annotated[
        bool, typer.Option(help="Small sizes (2k, 20k) instead of 1e4, 1e5, 1e6.")
    ] = False,
    index: Annotated[
        Path | None, typer.Option(help="Also measure the HTTP service over this index.")
    ] = None,
) -> None:
    """Flat vs IVF vs HNSW on synthetic embeddings: build time, memory, p50/p99 latency,
    recall@10 against exact search; with --index, server latency vs in-process search.

    Example: `polysense bench retrieval --out runs/bench --index runs/index`
    """
    from polysense.bench.retrieval import DEFAULT_SIZES, QUICK_SIZES, run_retrieval_bench

    run_retrieval_bench(out, sizes=QUICK_SIZES if quick else DEFAULT_SIZES, index_dir=index)
    console.print(f"wrote {out / 'retrieval.json'}, retrieval.md and retrieval.png")
    console.print((out / "retrieval.md").read_text(), markup=False, highlight=False)


@app.command("serve")
def serve_cmd(
    index: Annotated[Path, typer.Option(help="Index directory (from `polysense index build`).")],
    host: Annotated[
        str, typer.Option(help="Interface to bind; loopback by default.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (1..65535).", min=1, max=65535)] = 8000,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            help="Another name clients may send in the Host header (repeatable; `*` for any). "
            "Without it only the bound address and the loopback names are answered, which "
            "stops DNS-rebinding pages from reaching a loopback server."
        ),
    ] = None,
    limit: Annotated[
        list[str] | None,
        typer.Option(
            help="Change one request limit, NAME=VALUE (repeatable), e.g. "
            "--limit max_image_pixels=1000000 --limit max_decodes=4; the names and defaults "
            "are in docs/serve.md and GET /health."
        ),
    ] = None,
) -> None:
    """Serve an index over HTTP: POST /search, GET /items/KEY/image, GET /health, and a search
    page at / (FastAPI + uvicorn; needs the `serve` extra).

    Every request is bounded (bytes, pixels, decodes in flight, connections, header/body
    timeouts); a client over a limit gets a 4xx or a 503 with a message, never the memory.

    Example: `polysense serve --index runs/index --port 8000` then open http://127.0.0.1:8000/
    """
    try:
        from polysense.serve.app import Limits, serve
    except ImportError as exc:
        raise PolysenseError(
            f"polysense serve needs the serve extra ({exc.name} is missing): "
            "pip install 'polysense[serve]'"
        ) from None
    limits = Limits.parse(limit or [])
    serve(index, host=host, port=port, limits=limits, allow_hosts=allow_host or [])


@app.command("import-hf")
def import_hf_cmd(
    src: Annotated[
        Path, typer.Argument(help="A Hugging Face CLIPModel, SiglipModel or LLaVA directory.")
    ],
    out: Annotated[Path, typer.Option(help="polysense checkpoint directory to write.")],
) -> None:
    """Convert Hugging Face CLIP/SigLIP weights (config.json + safetensors) to a polysense
    checkpoint; a LlavaForConditionalGeneration directory becomes a VLM checkpoint.

    Example: `polysense import-hf ./clip-vit-base-patch32 --out runs/clip-b32`
    """
    from polysense.models.checkpoint import import_to_checkpoint

    console.print(f"wrote {import_to_checkpoint(src, out)}")


@app.command("export-hf")
def export_hf_cmd(
    ckpt: Annotated[Path, typer.Argument(help="polysense checkpoint directory.")],
    out: Annotated[
        Path, typer.Option(help="Directory for CLIPModel/SiglipModel/Llava*.from_pretrained.")
    ],
) -> None:
    """Write a polysense checkpoint as a Hugging Face CLIPModel (or SiglipModel) directory; a VLM
    checkpoint (HF decoder, mlp2x projector) as LlavaForConditionalGeneration + LlavaProcessor.

    Example: `polysense export-hf runs/quickstart/ckpt --out runs/quickstart/hf`
    """
    from polysense.models.checkpoint import export_checkpoint

    console.print(f"wrote {export_checkpoint(ckpt, out)}")


def _plot_loss(metrics_jsonl: Path, png: Path) -> None:
    import json

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("matplotlib is not installed (pip install polysense[plot]): no loss plot")
        return
    from polysense.fileio import atomic_open

    text = metrics_jsonl.read_text() if metrics_jsonl.is_file() else ""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    if not train_rows:
        console.print(f"{metrics_jsonl} logs no training step: no loss plot")
        return
    # the periodic evaluation: a world's val zero-shot, or --eval-data's (zero-shot or R@1)
    val_key = next(
        (k for k in ("val_zeroshot_top1", "val_t2i_r1") if any(k in r for r in rows)), ""
    )
    val_rows = [r for r in rows if val_key in r]
    label = {"val_zeroshot_top1": "val zero-shot top-1", "val_t2i_r1": "val text->image R@1"}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if val_rows:
        acc = ax.twinx()
        acc.plot(
            [r["step"] for r in val_rows],
            [r[val_key] for r in val_rows],
            color="tab:orange",
            marker="o",
            label=label[val_key],
        )
        acc.set_ylabel(label[val_key])
        acc.set_ylim(0, 1)
        fig.legend(loc="upper center", ncol=2, fontsize=8)
    fig.tight_layout()
    with atomic_open(png, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)


# The commands of the other areas (fusion, multimodal LM, curation, audio/video, text-to-image,
# performance) live in polysense/cli/<area>.py, one module each; importing them attaches their
# commands to the apps of polysense.cli.app (they import only that module, so no circle).
from polysense.cli import av, curate, fusion, perf, t2i, vlm  # noqa: E402, F401


def _print_error(message: str) -> None:
    err_console.print(f"error: {message}", style="bold red", markup=False, highlight=False)


def main() -> None:
    try:
        app()
    except PolysenseError as exc:
        _print_error(str(exc))
        sys.exit(2)
    except OSError as exc:  # the environment, not the program: a path, a permission, a disk
        where = exc.filename or "a file"
        failure = write_failure(exc, where)
        _print_error(str(failure) if failure else f"{where}: {exc.strerror or exc}; check the path")
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
