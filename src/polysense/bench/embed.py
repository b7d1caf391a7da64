"""`polysense bench embed`: images/s from files to vectors, `index build`'s path vs a plain loop.

One process builds our CLIP and an HF `CLIPModel` holding the same weights (`build_pair`,
checked equal), then times one pass over the same image files with each of:

- polysense: `polysense.index.embed.embed_files`, the function `index build` calls: decode,
  resize, crop and normalise in DataLoader worker processes (by default `auto_workers`: none
  on a CPU whose cores the model's threads use, where decoding between model calls measured
  faster), the model (at its inference precision) in this process;
- plain: the loop users write: `Image.open(path).convert("RGB")`, HF `CLIPImageProcessor`,
  `CLIPModel.get_image_features`, batch after batch in this process;
- plain + workers: the same loop with a torch DataLoader running Pillow and the processor in
  `--num-workers` worker processes (2 when polysense takes its default).

Same files, batch size and torch threads for all; HF runs with bf16 weights where polysense
infers in bf16 (precision "auto" on bf16 hardware), else fp32. Passes run interleaved (A B C,
then C B A, ...) until each variant has had `seconds`; images/s is the median over passes (the
fastest pass is reported too, for a shared machine), each ratio polysense / baseline.
"""

from __future__ import annotations

import csv
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from polysense.bench.dataloader import synthetic_sample
from polysense.bench.report import write_report
from polysense.bench.throughput import build_pair
from polysense.data.readers import Rejects, read_samples
from polysense.errors import PolysenseError
from polysense.index.embed import EmbedOptions, auto_workers, embed_files
from polysense.precision import resolve_precision

# dims -> overrides: the real ViT-B/32, or clip-tiny's widths at 224 px (patch 32) for a quick run
DIMS = {
    "clip-vit-b32": (),
    "clip-tiny": ("model.vision.image_size=224", "model.vision.patch_size=32"),
}
VARIANTS = ("polysense", "plain", "plain_workers")


def write_images(root: str | Path, *, n: int, width: int = 320, height: int = 256) -> Path:
    """`n` synthetic JPEGs (shapes on a gradient) under root/images and root/data.csv listing
    them with a caption; returns the CSV."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    path = root / "data.csv"
    with open(path, "w", newline="") as fh:
        rows = csv.writer(fh)
        rows.writerow(["image", "caption"])
        for i in range(n):
            jpeg, caption = synthetic_sample(i, width=width, height=height)
            (root / "images" / f"{i:06d}.jpg").write_bytes(jpeg)
            rows.writerow([f"images/{i:06d}.jpg", caption])
    return path


def image_paths(data: str | Path) -> list[str]:
    """The image files of a source (CSV/JSONL/image folder), in reading order."""
    paths = [s.get("image") for s in read_samples(data, decode=False)]
    if not paths or not all(isinstance(p, str) for p in paths):
        raise PolysenseError(
            f"--data {data}: the bench reads image files; give a CSV/JSONL with an image column "
            "or an image folder (not tar shards)"
        )
    return paths


def hf_processor(model: Any) -> Any:
    """An HF `CLIPImageProcessor` (its Pillow backend, which transformers picks anyway without
    torchvision) with the model's resize, crop and normalisation."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers < 5
        from transformers import CLIPImageProcessor as Processor

    v = model.cfg.vision
    return Processor(
        size={"shortest_edge": v.image_size},
        crop_size={"height": v.image_size, "width": v.image_size},
        image_mean=list(v.image_mean),
        image_std=list(v.image_std),
    )


def _hf_features(hf: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Unit image vectors (B, D) float32 of HF's model, in its weights' dtype."""
    dtype = next(hf.parameters()).dtype
    with torch.inference_mode():
        out = hf.get_image_features(pixel_values=pixels.to(dtype))  # (B, D)
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return torch.nn.functional.normalize(out.float(), dim=-1)


class _Processed(Dataset):
    """The plain loop's per-image work, for DataLoader workers: open, RGB, processor."""

    def __init__(self, paths: list[str], processor: Any) -> None:
        self.paths, self.processor = paths, processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = Image.open(self.paths[i]).convert("RGB")
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]  # (3, S, S)


def ours_pass(
    model: Any, data: str | Path, *, batch: int, workers: int | None, compile: bool = False
) -> np.ndarray:
    """Every image vector of `data` by `index build`'s path, (N, D) (`compile`: `index build
    --compile`)."""
    options = EmbedOptions(batch_size=batch, num_workers=workers, compile=compile)
    parts = [b.vectors for b in embed_files(model, data, options=options, rejects=Rejects())]
    return np.concatenate(parts)


def plain_pass(
    hf: Any, processor: Any, paths: list[str], *, batch: int, workers: int = 0
) -> np.ndarray:
    """Every image vector by the plain loop, (N, D): in this process, or with `workers`."""
    parts = []
    if workers == 0:
        for start in range(0, len(paths), batch):
            images = [Image.open(p).convert("RGB") for p in paths[start : start + batch]]
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]  # (B, 3, S, S)
            parts.append(_hf_features(hf, pixels).numpy())
    else:
        loader = DataLoader(_Processed(paths, processor), batch_size=batch, num_workers=workers)
        parts = [_hf_features(hf, pixels).numpy() for pixels in loader]
    return np.concatenate(parts)


def _timed(fn: Callable[[], np.ndarray]) -> dict[str, Any]:
    t0 = time.perf_counter()
    n = len(fn())
    seconds = time.perf_counter() - t0
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds}


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Median and fastest images/s per variant, and polysense's ratios to each baseline."""
    median = {k: statistics.median(r["images_per_s"] for r in rs) for k, rs in runs.items()}
    best = {k: max(r["images_per_s"] for r in rs) for k, rs in runs.items()}
    return {
        "images_per_s": median,
        "best_images_per_s": best,
        "ratio": median["polysense"] / median["plain"],
        "ratio_vs_workers": median["polysense"] / median["plain_workers"],
        "best_ratio": best["polysense"] / best["plain"],
        "best_ratio_vs_workers": best["polysense"] / best["plain_workers"],
    }


def run_embed_bench(
    out: str | Path,
    *,
    data: str | Path | None = None,
    n: int = 256,
    dims: str = "clip-vit-b32",
    batch: int = 32,
    workers: int | None = None,
    seconds: float = 20.0,
    precision: str = "auto",
    compile: bool = False,
) -> dict[str, Any]:
    """Time the three variants on `data` (written when None: `n` JPEGs of 320 x 256) and write
    OUT/embed.{json,md,png}. Returns the results. `compile`: polysense's path as `index build
    --compile` runs it (compiled in the warm-up pass, which is not timed)."""
    if dims not in DIMS:
        raise PolysenseError(f"--dims {dims!r}: use one of {', '.join(DIMS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pair = build_pair(dims, batch=2, overrides=DIMS[dims])
    ours, hf = pair.ours, pair.hf
    ours.inference_precision = precision
    bf16 = resolve_precision(precision, "cpu") == "bf16"
    if bf16:  # HF's faster bf16 mode here: bf16 weights (torch_dtype=bfloat16), not autocast
        hf = hf.to(torch.bfloat16)
    processor = hf_processor(ours)
    # None: the index's default (auto_workers); the plain loop's variant then takes 2 workers
    ours_workers = auto_workers(torch.device("cpu")) if workers is None else workers
    plain_workers = 2 if workers is None else workers
    with tempfile.TemporaryDirectory(dir=out, prefix=".embed-images-") as tmp:
        source = Path(data) if data is not None else write_images(tmp, n=n)
        paths = image_paths(source)
        variants: dict[str, Callable[[], np.ndarray]] = {
            "polysense": lambda: ours_pass(
                ours, source, batch=batch, workers=ours_workers, compile=compile
            ),
            "plain": lambda: plain_pass(hf, processor, paths, batch=batch),
            "plain_workers": lambda: plain_pass(
                hf, processor, paths, batch=batch, workers=plain_workers
            ),
        }
        first = {k: fn() for k, fn in variants.items()}  # warm-up pass, and the vectors compared
        diff = max(float(np.abs(first["polysense"] - v).max()) for v in first.values())
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
        start, r = time.perf_counter(), 0
        while r < 2 or time.perf_counter() - start < seconds * len(variants):
            order = list(variants) if r % 2 == 0 else list(variants)[::-1]
            for name in order:
                runs[name].append(_timed(variants[name]))
            r += 1
    summary = summarise(runs)
    v = ours.cfg.vision
    results = {
        "config": {
            "dims": dims,
            "data": str(data) if data is not None else f"{n} synthetic JPEGs, 320x256",
            "images": len(paths),
            "image_size": v.image_size,
            "batch": batch,
            "num_workers": {"polysense": ours_workers, "plain_workers": plain_workers},
            "threads": torch.get_num_threads(),
            "seconds": seconds,
            "passes": r,
            "precision": precision,
            "compile": compile,
            "params": pair.params,
        },
        "precision": {
            "polysense": resolve_precision(precision, "cpu"),
            "hf": "bf16 weights" if bf16 else "fp32",
        },
        "max_abs_diff": diff,
        **summary,
        "runs": runs,
    }
    label = {
        "polysense": f"polysense index path ({ours_workers} workers"
        + (", --compile)" if compile else ")"),
        "plain": "Pillow + CLIPImageProcessor + HF, one process",
        "plain_workers": f"same, DataLoader with {plain_workers} workers",
    }
    table = [
        {
            "variant": label[k],
            "precision": results["precision"]["polysense" if k == "polysense" else "hf"],
            "images/s (median)": summary["images_per_s"][k],
            "images/s (fastest pass)": summary["best_images_per_s"][k],
            "passes": len(runs[k]),
        }
        for k in VARIANTS
    ]
    for key, what in (("ratio", "plain"), ("ratio_vs_workers", "plain + workers")):
        table.append(
            {
                "variant": f"ratio polysense / {what}",
                "images/s (median)": summary[key],
                "images/s (fastest pass)": summary[f"best_{key}"],
            }
        )

    def plot(ax: Any) -> None:
        ax.bar([label[k] for k in VARIANTS], [summary["images_per_s"][k] for k in VARIANTS])
        ax.set_ylabel("images/s, files to vectors")
        ax.set_title(
            f"{dims} at {v.image_size} px, batch {batch}, {torch.get_num_threads()} threads"
        )
        ax.tick_params(axis="x", labelsize=7)

    notes = (
        f"{len(paths)} image files per pass, {r} interleaved rounds; median images/s (and the "
        f"fastest pass). polysense at {results['precision']['polysense']}, HF at "
        f"{results['precision']['hf']}; largest |difference| of the vectors {diff:.2e}. Ratio "
        f"{summary['ratio']:.2f}x vs the plain loop, {summary['ratio_vs_workers']:.2f}x vs it "
        "with workers."
    )
    write_report(out, "embed", results, table, plot, title="Embedding bench", notes=notes)
    return results
