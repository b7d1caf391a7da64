"""`polysense bench dataloader`: polysense's streaming pipeline vs a plain webdataset + Pillow loop.

Both read the same webdataset shards of JPEGs and make (B, S, S, 3) uint8 batches at S = 224 px
by decoding each image with Pillow and taking a random resized crop (`random_resized_crop`, the
same function for both), through a torch DataLoader with the same workers and batch size:

- polysense: the epoch mode of `polysense.data.pipeline` (data.cache=off,
  data.crop_scale_min=0.35): random access by the shard index, a whole batch per worker item,
  plus the captions' token ids;
- baseline: `wds.WebDataset(shards).decode("pil").map(crop)` batched by the DataLoader (each
  worker reads its shards front to back).

Each round times one pass over the set with each loader (fresh workers each time), in
alternating order; samples/s is the median over rounds, the ratio polysense / baseline. Without
--data the bench writes its own shards of synthetic JPEGs (shapes on gradients, captions naming
them) and deletes them afterwards.
"""

from __future__ import annotations

import io
import statistics
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from polysense.bench.report import write_report
from polysense.config import apply_overrides
from polysense.data.pipeline import caption_lists, open_pairs, step_batches
from polysense.data.tokenizer import Tokenizer
from polysense.data.transforms import random_resized_crop
from polysense.presets import get_preset

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 60, 220),
    "yellow": (230, 200, 30),
}
SHAPES = ("circle", "square")
CROP_SCALE_MIN = 0.35


def synthetic_sample(i: int, *, width: int, height: int) -> tuple[bytes, str]:
    """Sample i: a JPEG (two shapes on a gradient) and a caption naming them left to right."""
    rng = np.random.default_rng(i)
    ramp = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]  # (1, W, 1)
    base = rng.integers(60, 200, 3).astype(np.float32)
    pixels = np.broadcast_to(base * (0.6 + 0.4 * ramp), (height, width, 3)).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(pixels))
    draw = ImageDraw.Draw(image)
    names = []
    for k in range(2):
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        shape = SHAPES[int(rng.integers(2))]
        r = int(rng.integers(height // 8, height // 4))
        x = int(rng.integers(r, width // 2 - r)) + k * width // 2
        y = int(rng.integers(r, height - r))
        box = [x - r, y - r, x + r, y + r]
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
        names.append(f"a {colour} {shape}")
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), f"{names[0]} left of {names[1]}"


def write_synthetic_shards(
    root: str | Path, *, n: int, width: int = 320, height: int = 256, per_shard: int = 1000
) -> list[Path]:
    """`n` synthetic samples as root/shard-NNNNNN.tar (key.jpg + key.txt), `per_shard` each."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, start in enumerate(range(0, n, per_shard)):
        path = root / f"shard-{s:06d}.tar"
        with tarfile.open(path.with_suffix(".tar.partial"), "w") as tar:
            for i in range(start, min(n, start + per_shard)):
                jpeg, caption = synthetic_sample(i, width=width, height=height)
                for ext, data in (("jpg", jpeg), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        path.with_suffix(".tar.partial").replace(path)
        paths.append(path)
    return paths


def _polysense_loader(shards: Path, *, size: int, batch: int, workers: int) -> DataLoader:
    cfg = apply_overrides(
        get_preset("clip-tiny"),
        [
            f"model.vision.image_size={size}",
            "data.cache=off",
            f"data.crop_scale_min={CROP_SCALE_MIN}",
            f"data.num_workers={workers}",
        ],
    )
    source = open_pairs(shards, data=cfg.data, model=cfg.model, split=None)
    captions = (c for caps in caption_lists(source) for c in caps)
    tokenizer = Tokenizer.train(captions, vocab_size=256, context_length=32)
    stream = step_batches(
        source, data=cfg.data, model=cfg.model, tokenizer=tokenizer, batch_size=batch, seed=0
    )
    trainer_loader = stream.open_at(0)  # what `fit` draws from, before standardising
    steps = len(source.index) // batch  # one epoch: no batch prefetched past its end
    return DataLoader(
        trainer_loader.dataset,
        batch_size=None,
        sampler=range(steps),
        num_workers=workers,
        prefetch_factor=trainer_loader.prefetch_factor,
    )


class _Crop:
    """The baseline's map: PIL image -> uint8 (S, S, 3) random resized crop."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.rng = np.random.default_rng(0)

    def __call__(self, sample: dict[str, Any]) -> np.ndarray:
        image = random_resized_crop(
            sample["jpg"], size=self.size, rng=self.rng, scale=(CROP_SCALE_MIN, 1.0)
        )
        return np.array(image, dtype=np.uint8)  # a writable copy, as torch wants


def _webdataset_loader(shards: Path, *, size: int, batch: int, workers: int) -> DataLoader:
    import webdataset as wds

    urls = [str(p) for p in sorted(shards.glob("*.tar"))]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
    return DataLoader(dataset.map(_Crop(size)), batch_size=batch, num_workers=workers)


def _one_pass(loader: DataLoader, batches: int | None) -> tuple[int, float, list[int]]:
    """(samples, seconds, shape of a batch's images) of `batches` batches (None: all)."""
    t0 = time.perf_counter()
    samples, shape = 0, []
    it: Iterator = iter(loader)
    for k, item in enumerate(it):
        images = item["image"] if isinstance(item, dict) else item  # (B, S, S, 3)
        samples += images.shape[0]
        shape = list(images.shape)
        if batches is not None and k + 1 >= batches:
            break
    seconds = time.perf_counter() - t0
    del it  # its workers stop here, outside the clock
    return samples, seconds, shape


def run_dataloader_bench(
    out: str | Path,
    *,
    data: str | Path | None = None,
    samples: int = 4096,
    size: int = 224,
    batch: int = 64,
    workers: int = 2,
    rounds: int = 3,
) -> dict[str, Any]:
    """Measure both loaders on `data` (shards of .jpg + .txt; written when None) and write
    OUT/dataloader.{json,md,png}. Returns the results."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".dataloader-shards-") as tmp:
        shards = Path(data) if data is not None else Path(tmp)
        if data is None:
            per_shard = max(batch, samples // max(4, 2 * workers))  # >= 1 shard per worker
            write_synthetic_shards(shards, n=samples, per_shard=per_shard)
        loaders = {
            "polysense": lambda: _polysense_loader(shards, size=size, batch=batch, workers=workers),
            "webdataset": lambda: _webdataset_loader(
                shards, size=size, batch=batch, workers=workers
            ),
        }
        for make in loaders.values():  # warm-up: imports, page cache
            _one_pass(make(), 2)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in loaders}
        for r in range(rounds):
            order = list(loaders) if r % 2 == 0 else list(loaders)[::-1]
            for name in order:
                n, seconds, shape = _one_pass(loaders[name](), None)  # one epoch each
                runs[name].append({"samples": n, "seconds": seconds, "shape": shape})
    rates = {
        name: statistics.median(r["samples"] / r["seconds"] for r in rs)
        for name, rs in runs.items()
    }
    ratio = rates["polysense"] / rates["webdataset"]
    results = {
        "config": {
            "samples": samples if data is None else None,
            "data": str(data) if data is not None else "synthetic JPEG 320x256",
            "image_size": size,
            "batch": batch,
            "num_workers": workers,
            "rounds": rounds,
            "crop_scale": [CROP_SCALE_MIN, 1.0],
        },
        "polysense_samples_per_s": rates["polysense"],
        "webdataset_samples_per_s": rates["webdataset"],
        "ratio": ratio,
        "runs": runs,
    }
    table = [
        {
            "loader": name,
            "samples/s (median)": rates[name],
            "samples per pass": runs[name][0]["samples"],
            "batch shape": "x".join(map(str, runs[name][0]["shape"])),
        }
        for name in loaders
    ]
    table.append({"loader": "ratio polysense / webdataset", "samples/s (median)": ratio})

    def plot(ax: Any) -> None:
        ax.bar(list(rates), list(rates.values()), color=["tab:blue", "tab:gray"])
        ax.set_ylabel("samples/s")
        ax.set_title(f"decode + random resized crop at {size} px, {workers} workers, batch {batch}")

    notes = (
        f"One pass per loader per round, {rounds} rounds interleaved; median samples/s. "
        f"Ratio {ratio:.2f}x (polysense / webdataset + Pillow)."
    )
    write_report(out, "dataloader", results, table, plot, title="Data loader bench", notes=notes)
    return results
