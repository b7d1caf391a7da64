"""Streamed batches: torch datasets whose items are whole batches, decoded, resized and augmented
in DataLoader worker processes, and `StepStream`, which hands them to `fit` step by step.

- `EpochStepData` (map-style): item s is this rank's batch of step s in the cache's own
  `EpochOrder`, its samples read by random access from a `ShardIndex`;
- `ResampledStepData` (iterable): webdataset draws shards with replacement and mixes samples in
  a shuffle buffer, seeded by (seed, rank, worker, start step).

A recipe says what a sample becomes: `PairRecipe` (image-text: the model's resize or the
augmentations) or `TowerRecipe` (any towers: the arrays the tower cache holds). Workers hand
back raw arrays (uint8 pixels, float16 audio, token ids); `StepStream` standardises them in the
training process exactly as the cache does, so both give the same floats.
"""

from __future__ import annotations

import random
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from polysense.data.loader import EpochOrder, motion_negative_ids, tower_arrays
from polysense.data.readers import decode_tar_sample
from polysense.data.shard_index import ShardIndex
from polysense.data.tokenizer import Tokenizer
from polysense.data.transforms import Augment, train_image
from polysense.errors import DataError

KEY_ORDER = ("image", "text", "hard_text", "audio", "video")  # the cache's batch order


def captions_of(sample: dict[str, Any]) -> list[str]:
    """A decoded sample's non-empty captions."""
    return [t for t in sample.get("text") or [] if t and t.strip()]


@dataclass(frozen=True, kw_only=True)
class PairRecipe:
    """Image-text: the image at the model's size (or augmented), one caption's ids."""

    tokenizer: Tokenizer
    image_size: int
    resize: str
    augment: Augment
    hard_negatives: bool = False  # a video-text loss only

    def usable(self, sample: dict[str, Any]) -> bool:
        return sample.get("image") is not None and bool(captions_of(sample))

    def arrays(
        self, sample: dict[str, Any], rng: np.random.Generator, captions: list[str]
    ) -> dict[str, np.ndarray]:
        image = train_image(
            sample["image"],
            size=self.image_size,
            resize=self.resize,
            augment=self.augment,
            rng=rng,
            captions=captions,
        )
        return {"image": image}  # (H, W, 3) uint8


@dataclass(frozen=True, kw_only=True)
class TowerRecipe:
    """Any towers: the arrays `tower_arrays` makes (what the tower cache holds), and with a text
    tower one caption's ids (plus its motion hard negatives when asked)."""

    tokenizer: Tokenizer | None  # None: no text tower
    modalities: tuple[str, ...]
    image_size: int
    audio_samples: int
    video_frames: int
    video_size: int
    hard_negatives: bool = False

    def usable(self, sample: dict[str, Any]) -> bool:
        if "text" in self.modalities and not captions_of(sample):
            return False
        return all(sample.get(m) is not None for m in self.modalities if m != "text")

    def arrays(
        self, sample: dict[str, Any], rng: np.random.Generator, captions: list[str]
    ) -> dict[str, np.ndarray]:
        arrays = tower_arrays(
            sample,
            modalities=self.modalities,
            image_size=self.image_size,
            audio_samples=self.audio_samples,
            video_frames=self.video_frames,
            video_size=self.video_size,
        )
        assert arrays is not None  # `usable` said so
        return arrays


Recipe = PairRecipe | TowerRecipe


def collate(rows: list[dict[str, np.ndarray]], texts: list[str], recipe: Recipe) -> dict:
    """One batch from its samples' arrays and drawn captions, keys in the cache's order."""
    out: dict[str, torch.Tensor] = {
        name: torch.from_numpy(np.stack([r[name] for r in rows])) for name in rows[0]
    }
    if recipe.tokenizer is not None:
        ids, _ = recipe.tokenizer.encode(texts)  # (b, L)
        out["text"] = ids
        if recipe.hard_negatives:
            out["hard_text"] = motion_negative_ids(recipe.tokenizer, texts, ids)  # (b, H, L)
    return {name: out[name] for name in KEY_ORDER if name in out}


class EpochStepData(Dataset):
    """Item `step` = this rank's raw batch of that step in the `EpochOrder`, decoded from the
    shards. Sample j of the global batch draws its caption as the cache does and its
    augmentation from a generator seeded by (seed, step, j), so any rank and worker count gives
    the same batch. A sample that fails to decode is replaced by the next sample of the index
    that decodes (a warning says which)."""

    def __init__(self, *, index: ShardIndex, order: EpochOrder, recipe: Recipe) -> None:
        self.index, self.order, self.recipe = index, order, recipe

    def __len__(self) -> int:
        return sys.maxsize  # any step; the sampler says which

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        batch, u = self.order.global_batch(step)  # (B,), (B,)
        rows, texts = [], []
        for j in range(self.order.part.start, self.order.part.stop):
            sample = self._decodable(int(batch[j]))
            captions = captions_of(sample) or ["-"]  # no text tower: the cache's dummy caption
            pick = int((u[j : j + 1] * len(captions)).long())  # the cache's draw, per sample
            texts.append(captions[pick])
            rng = np.random.default_rng((self.order.seed, step, j))
            rows.append(self.recipe.arrays(sample, rng, captions))
        return collate(rows, texts, self.recipe)

    def _decodable(self, i: int) -> dict[str, Any]:
        for k in range(len(self.index)):
            j = (i + k) % len(self.index)
            try:
                sample = self.index.sample(j)
            except DataError as exc:
                warnings.warn(f"{exc}; using the next sample", stacklevel=2)
                continue
            if self.recipe.usable(sample):
                return sample
        raise DataError(f"{self.index.shards[0]}: no sample of the index decodes")


class ResampledStepData(IterableDataset):
    """Raw batches of `batch` samples drawn with replacement: each worker resamples the shards
    (webdataset's ResampledShards), shuffles through a buffer and decodes; every random choice
    is seeded by (seed, rank, worker, start step)."""

    def __init__(
        self,
        *,
        urls: tuple[str, ...],
        batch: int,
        buffer: int,
        seed: int,
        rank: int,
        start: int,
        recipe: PairRecipe,
        image_key: str,
        caption_key: str,
    ) -> None:
        self.urls, self.batch, self.buffer, self.recipe = urls, batch, buffer, recipe
        self.seed_parts = (seed, rank, start)
        self.keys = {"image_key": image_key, "caption_key": caption_key}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        import webdataset as wds

        info = get_worker_info()
        seed, rank, start = self.seed_parts
        seq = np.random.SeedSequence((seed, rank, info.id if info else 0, start))
        worker_seed = int(seq.generate_state(1)[0])
        rng = np.random.default_rng(seq)
        samples = wds.DataPipeline(
            wds.ResampledShards(
                list(self.urls), seed=worker_seed, worker_seed=lambda: 0, deterministic=True
            ),
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
            wds.shuffle(self.buffer, initial=self.buffer, rng=random.Random(worker_seed)),
        )
        rows, texts = [], []
        for raw in samples:
            members = [(k, v) for k, v in raw.items() if not k.startswith("__")]
            try:
                sample = decode_tar_sample(
                    members, key=raw["__key__"], source=raw["__url__"], **self.keys
                )
            except DataError as exc:
                warnings.warn(str(exc), stacklevel=2)
                continue
            if not self.recipe.usable(sample):
                continue
            captions = captions_of(sample)
            texts.append(captions[int(rng.integers(len(captions)))])
            rows.append(self.recipe.arrays(sample, rng, captions))
            if len(rows) == self.batch:
                yield collate(rows, texts, self.recipe)
                rows, texts = [], []


class StepStream:
    """`fit`'s step data over a DataLoader: `batch(step)` takes the loader's next batch while
    steps come in sequence, and opens a new loader at `step` otherwise (the first step, a
    resume); `finish` turns a raw batch into the model's inputs in this process."""

    def __init__(
        self, *, open_at: Callable[[int], DataLoader], finish: Callable[[dict], Any]
    ) -> None:
        self.open_at, self.finish = open_at, finish
        self._batches: Iterator | None = None
        self._next = -1

    def batch(self, step: int) -> Any:
        """This rank's batch at `step`, as the decoded cache gives it."""
        if self._batches is None or step != self._next:
            self.close()
            self._batches = iter(self.open_at(step))
        raw = next(self._batches)
        self._next = step + 1
        return self.finish(raw)

    def close(self) -> None:
        """Stop the loader's workers (they also stop when this process dies)."""
        self._batches = None  # the iterator's finaliser shuts its workers down
