"""Files to image vectors, with decode in worker processes overlapping the model (issue 23).

torch DataLoader workers read the source undecoded (`read_samples(decode=False)`: paths, or a
tar's bytes), decode, resize, crop and normalise each image exactly as `CLIP.preprocess` does,
and hand whole batches to the main process, which runs only the model (`encode_image` under
`inference_mode`, at the model's `inference_precision`). So the model never waits on Pillow.

Worker w of W makes batches b with b % W == w, each of `batch_size` consecutive samples of the
stream; every worker reads the whole (undecoded) stream, which is cheap beside decoding. The main
process takes the batches back in stream order, so vectors come out in reading order, as the
one-process path gives them. A bad image is a reject (reason as the reader gives it); `limit`
counts good samples, as `read_samples(limit=...)` does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from polysense.data.readers import Rejects, read_samples
from polysense.data.transforms import RESIZERS
from polysense.devices import resolve_device
from polysense.errors import PolysenseError

# a reader's undecoded media (paths or bytes) that only the reader's own decoding would use
_UNDECODED = ("audio", "video", "ocr_image")


@dataclass(frozen=True, kw_only=True)
class EmbedOptions:
    """Where and how images are embedded: `device` ("cpu", "cuda", "cuda:N" or "auto": cuda
    when available), images per model call, DataLoader worker processes (0: decode in the
    main process, between model calls; None: `auto_workers`), and `compile`: the image tower
    through torch.compile (`CLIP.inference_compile`; compiled at the first batch of each size)."""

    device: str = "cpu"
    batch_size: int = 256
    num_workers: int | None = None
    compile: bool = False


def auto_workers(device: torch.device) -> int:
    """Decode workers by default: on a GPU min(4, CPUs); on the CPU only the cores the model's
    torch threads leave idle (at most 4), so 0 where its threads use every core. Measured on 2
    cores at ViT-B/32 bf16 (docs/performance.md): decoding in the main process gave 91 images/s,
    in 1 or 2 workers 77, since a worker preempts one of the model's two threads and the other
    waits for it."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    if device.type == "cuda":
        return min(4, cpus)
    return max(0, min(4, cpus - torch.get_num_threads()))


def check_options(options: EmbedOptions) -> tuple[torch.device, int]:
    """The torch device and worker count of valid `options`; a bad value is a one-line error
    naming its flag."""
    size, workers = options.batch_size, options.num_workers
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise PolysenseError(f"--batch-size {size!r}: must be a positive integer, e.g. 64")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)):
        raise PolysenseError(f"--num-workers {workers!r}: must be 0 or more, e.g. 2")
    if workers is not None and workers < 0:
        raise PolysenseError(f"--num-workers {workers!r}: must be 0 or more, e.g. 2")
    device = resolve_device(options.device)
    return device, auto_workers(device) if workers is None else workers


@dataclass(frozen=True)
class Preprocess:
    """`CLIP.preprocess`'s recipe as plain values, so that worker processes can apply it."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str

    @classmethod
    def of(cls, model: Any) -> Preprocess:
        v = model.cfg.vision
        return cls(
            size=v.image_size, mean=tuple(v.image_mean), std=tuple(v.image_std), resize=v.resize
        )

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> (B, 3, S, S) float32, equal bit for bit to `images_to_tensor`'s: each
        8-bit value maps through a (3, 256) table holding `(v / 255 - mean) / std`, computed in
        float32 as `images_to_tensor` computes it (0.4 against 1.1 ms an image for the float
        arithmetic on the whole batch, measured here)."""
        resizer = RESIZERS[self.resize]
        levels = np.arange(256, dtype=np.float32)[None, :] / 255.0  # (1, 256)
        mean = np.asarray(self.mean, np.float32)[:, None]  # (3, 1)
        table = (levels - mean) / np.asarray(self.std, np.float32)[:, None]  # (3, 256)
        batch = torch.empty(len(images), 3, self.size, self.size)  # (B, 3, S, S)
        if get_worker_info() is not None:
            batch.share_memory_()  # filled in place: sending it to the main process copies nothing
        out = batch.numpy()
        for i, image in enumerate(images):
            pixels = np.asarray(resizer(image, self.size)).transpose(2, 0, 1)  # (3, S, S) uint8
            for c in range(3):
                np.take(table[c], pixels[c], out=out[i, c])
        return batch


@dataclass
class EmbeddedBatch:
    """Consecutive samples of the stream: those with an image and their (n, D) float32 vectors
    (row i is samples[i]), and those without an image, in stream order."""

    samples: list[dict[str, Any]]
    vectors: np.ndarray  # (n, D)
    missing: list[dict[str, Any]]


def _decode(image: Any) -> Image.Image:
    """An undecoded image (path or bytes) -> RGB, with the reader's caps; raises its reject."""
    from polysense.data.readers import _decode_image  # the reader's own decoding and caps

    return _decode_image(image if isinstance(image, bytes) else Path(image))


class _Batches(IterableDataset):
    """Decoded batches of a source: each item is one batch b, made by worker b % W."""

    def __init__(
        self,
        *,
        data: str | Path,
        split: str | None,
        image_root: str | Path | None,
        batch_size: int,
        preprocess: Preprocess,
        keep: Callable[[Image.Image], Any] | None,
    ) -> None:
        self.data, self.split, self.image_root = data, split, image_root
        self.batch_size, self.preprocess, self.keep = batch_size, preprocess, keep

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            yield from self._batches()
        except PolysenseError as exc:  # raised as is in the main process: a one-line error
            yield {"index": -1, "error": exc}

    def _batches(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        size = self.batch_size
        rejects = Rejects()  # reader rejects, each placed before the sample that follows it
        stream = read_samples(
            self.data, split=self.split, rejects=rejects, decode=False, image_root=self.image_root
        )
        batch: list[dict[str, Any]] = []
        events: list[tuple[int, dict[str, str]]] = []  # (stream position, reject record)
        position = 0
        for sample in stream:
            mine = (position // size) % workers == worker
            if mine:
                events += [(position, r) for r in rejects.records]
                batch.append(sample)
            rejects.records.clear()
            position += 1
            if mine and position % size == 0:
                yield self._decoded(position // size - 1, batch, events)
                batch, events = [], []
        last = position // size  # the batch after the last full one (maybe empty)
        if last % workers == worker:
            events += [(position, r) for r in rejects.records]
            if batch or events:
                yield self._decoded(last, batch, events)

    def _decoded(
        self, index: int, batch: list[dict[str, Any]], events: list[tuple[int, dict[str, str]]]
    ) -> dict[str, Any]:
        """Batch `index`: its samples decoded, each bad image a reject at its position."""
        start = index * self.batch_size
        rows, images = [], []
        for i, sample in enumerate(batch):
            meta = {k: v for k, v in sample.items() if k != "image" and k not in _UNDECODED}
            if "image" in sample:
                try:
                    image = _decode(sample["image"])
                except Exception as exc:  # the reader's _Skip: a reject with its reason
                    record = {
                        "key": str(sample.get("key")),
                        "reason": getattr(exc, "reason", "undecodable_image"),
                        "source": str(sample.get("source", "")),
                        "detail": getattr(exc, "detail", f"{type(exc).__name__}: {exc}"),
                    }
                    events.append((start + i, record))
                    continue
                images.append(image)
                if self.keep is not None:
                    meta["kept"] = self.keep(image)
            rows.append((start + i, meta, "image" in sample))
        pixels = self.preprocess(images) if images else None  # (n, 3, S, S)
        return {"index": index, "rows": rows, "events": events, "pixels": pixels}


def _as_is(item: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's per-item hook: keep items as built (no numpy -> tensor conversion)."""
    return item


def _in_order(items: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Items by their "index" 0, 1, 2 ... (workers answer in turn; a worker that is done skips
    its turn, so an item may arrive early)."""
    waiting: dict[int, dict[str, Any]] = {}
    want = 0
    for item in items:
        if "error" in item:
            raise item["error"]
        waiting[item["index"]] = item
        while want in waiting:
            yield waiting.pop(want)
            want += 1
    yield from (waiting[k] for k in sorted(waiting))


def embed_files(
    model: Any,
    data: str | Path,
    *,
    options: EmbedOptions = EmbedOptions(),
    rejects: Rejects,
    split: str | None = None,
    image_root: str | Path | None = None,
    limit: int | None = None,
    keep: Callable[[Image.Image], Any] | None = None,
) -> Iterator[EmbeddedBatch]:
    """The image vectors of every sample of `data` (any `read_samples` source), batch by batch
    in reading order. Bad samples go to `rejects`; `limit` stops after that many good samples;
    `keep(image)` (a module-level function: it runs in the workers) is stored in each sample as
    "kept", e.g. the PNG an index stores. The model moves to `options.device`."""
    device, workers = check_options(options)
    model = model.to(device)
    if options.compile:
        model.inference_compile = True
    # a source that cannot be read fails here, in this process, not in a worker
    next(read_samples(data, split=split, decode=False, image_root=image_root), None)
    dataset = _Batches(
        data=data,
        split=split,
        image_root=image_root,
        batch_size=options.batch_size,
        preprocess=Preprocess.of(model),
        keep=keep,
    )
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        collate_fn=_as_is,
        pin_memory=device.type == "cuda",
    )
    good = 0
    for item in _in_order(iter(loader)):
        events = sorted(item["events"], key=lambda e: e[0])  # (position, record)
        rows = item["rows"]  # (position, meta, has_image), in order
        if limit is not None and good + len(rows) >= limit:
            rows = rows[: limit - good]
            end = rows[-1][0] if rows else -1
            events = [e for e in events if e[0] <= end]
        for _, record in events:
            rejects.add(**record)
        with_image = [i for i, (_, _, has) in enumerate(rows) if has]
        vectors = np.zeros((0, 0), np.float32)
        if with_image:
            pixels = item["pixels"][: len(with_image)]  # (n, 3, S, S)
            with torch.inference_mode():
                emb = model.encode_image(pixels.to(device, non_blocking=True))  # (n, D)
            vectors = emb.float().cpu().numpy()
        yield EmbeddedBatch(
            samples=[rows[i][1] for i in with_image],
            vectors=vectors,
            missing=[meta for _, meta, has in rows if not has],
        )
        good += len(rows)
        if limit is not None and good >= limit:
            return
