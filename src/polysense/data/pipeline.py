"""The training data pipeline of the contrastive family: batches streamed from webdataset shards
through torch DataLoader workers, or the decoded in-memory cache when the set is small.

    source = open_pairs("runs/shards", data=cfg.data, model=cfg.model, split=None)
    batches = step_batches(source, data=cfg.data, model=cfg.model, tokenizer=tok, ...)
    images, ids = batches.batch(step)  # what `fit` calls, step after step

Three ways to batches, chosen by `data.cache` and `data.sampling` (docs/data.md):
- the decoded cache (`PairBatches`): every image decoded once into memory; `auto` takes it when
  N x H x W x 3 bytes fit `data.cache_max_gb` and no augmentation is on (the world's 32 px);
- the epoch mode (`EpochStepData`): a map-style dataset whose item s is this rank's batch of
  step s, in the cache's own `EpochOrder`, each sample read by random access (`ShardIndex`:
  offsets from the tar headers, one `os.pread` per member) and decoded, resized and augmented
  in the DataLoader's workers. With augmentation off its batches equal the cache's bit for bit,
  and a resumed run sees exactly the batches an uninterrupted one would. Memory: the index
  (~100 bytes a sample) plus the batches in flight, whatever the set's size;
- the resampled mode (`ResampledStepData`): webdataset draws shards with replacement per
  worker (local or remote URLs), a shuffle buffer mixes samples. Its batches are seeded by
  (seed, rank, worker, start step): a resumed run continues with fresh draws, not at the sample
  where it stopped.
"""

from __future__ import annotations

import json
import os
import random
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from polysense.config import ConfigError
from polysense.data.loader import (
    EpochOrder,
    PairBatches,
    PairData,
    TowerBatches,
    TowerData,
    load_pairs,
    load_towers,
    normalize,
)
from polysense.data.readers import (
    Rejects,
    decode_tar_sample,
    detect_format,
    shard_files,
)
from polysense.data.shard_index import ShardIndex, build_index, text_member
from polysense.data.tokenizer import Tokenizer
from polysense.data.transforms import Augment, train_image
from polysense.errors import DataError

TOKENIZER_SAMPLES = 200_000  # the resampled mode trains a BPE on this many samples' captions


@dataclass(frozen=True)
class ShardPairs:
    """Streamed image-caption pairs: the local shards' index (epoch mode) or shard URLs
    (resampled mode), never decoded pixels."""

    urls: tuple[str, ...]
    index: ShardIndex | None = None
    caption_key: str = "caption"

    def captions(self) -> Iterator[list[str]]:
        """Every sample's captions, read again from the shards (the resampled mode: the first
        TOKENIZER_SAMPLES), for training a tokenizer without holding them all."""
        if self.index is not None:
            for i in range(len(self.index)):
                yield _texts(self.index.sample(i, images=False))
            return
        for n, raw in enumerate(_raw_stream(list(self.urls))):
            if n >= TOKENIZER_SAMPLES:
                return
            members = [(k, v) for k, v in raw.items() if text_member(k, self.caption_key)]
            try:
                texts = _texts(
                    decode_tar_sample(
                        members, key=raw["__key__"], source="", caption_key=self.caption_key
                    )
                )
            except DataError:
                continue
            if texts:
                yield texts


Source = PairData | TowerData | ShardPairs


def _texts(sample: dict[str, Any]) -> list[str]:
    return [t for t in sample.get("text") or [] if t and t.strip()]


def augment_of(data: Any) -> Augment:
    """The `Augment` that a `DataConfig` asks for."""
    return Augment(crop_scale_min=data.crop_scale_min, jitter=data.jitter, flip=data.flip)


def _is_url(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def open_pairs(
    path: str | Path,
    *,
    data: Any,
    model: Any,
    split: str | None,
    rejects_path: Path | None = None,
) -> Source:
    """The training samples at `path` for a model of config `model` (a `ModelConfig`), cached
    or streamed as `data` (a `DataConfig`) says; errors name the field and the fix."""
    augment = augment_of(data)
    multi = tuple(model.towers) != ("image", "text")
    limit = data.limit or None
    if multi:
        if data.cache == "off" or data.sampling != "epoch" or augment.active:
            raise ConfigError(
                f"towers {','.join(model.towers)} train from the decoded cache only; set "
                "data.cache=auto, data.sampling=epoch and leave the augmentations off"
            )
        return load_towers(
            path,
            split=split,
            model=model,
            image_key=data.image_key,
            caption_key=data.caption_key,
            rejects_path=rejects_path,
            limit=limit,
        )
    text = str(path)
    if data.sampling == "resampled":
        if data.cache == "on" or limit:
            raise ConfigError(
                "data.sampling=resampled streams shards with replacement; use data.cache=auto "
                "or off and data.limit=0"
            )
        urls = _expand(text) if _is_url(text) else shard_files(path, split=split)
        if urls is None:
            raise DataError(_shard_it(path))
        return ShardPairs(urls=tuple(urls), caption_key=data.caption_key)
    if _is_url(text):
        raise DataError(
            f"{text}: remote shards stream in the resampled mode only; add "
            "--set data.sampling=resampled"
        )
    if data.cache == "on" and augment.active:
        raise ConfigError(
            "augmentations (data.crop_scale_min, data.jitter, data.flip) apply to streamed "
            "batches; set data.cache=auto or off"
        )
    shards = shard_files(path, split=split)
    per_sample = 3 * model.vision.image_size**2  # decoded bytes of one cached image
    budget = int(data.cache_max_gb * 1e9) // per_sample  # samples that fit the cache
    index = None
    # bounds on N known without indexing: a manifest's count, data.limit
    known = [n for n in (_listed_count(Path(path), split), limit) if n]
    fits = data.cache == "auto" and not augment.active and bool(known) and min(known) <= budget
    if shards is not None and data.cache != "on" and not fits:
        index = build_index(shards, image_key=data.image_key, caption_key=data.caption_key)
        n = min(len(index), limit or len(index))
        if data.cache == "auto" and n <= budget and not augment.active:
            index = None  # it fits: the decoded cache
    elif shards is None and (data.cache == "off" or augment.active):
        raise DataError(_shard_it(path))
    if index is None:
        return load_pairs(
            path,
            split=split,
            image_size=model.vision.image_size,
            resize=model.vision.resize,
            image_key=data.image_key,
            caption_key=data.caption_key,
            rejects_path=rejects_path,
            limit=limit,
            max_samples=budget if data.cache == "auto" else None,
        )
    return _with_captions(index, limit=limit, rejects_path=rejects_path, source=text)


def _listed_count(path: Path, split: str | None) -> int | None:
    """The sample count a world's or `polysense data shard`'s manifest.json lists, if any."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        if manifest.get("generator") == "polysense.world":
            return int(manifest["splits"][split or "train"]["count"])
        if manifest.get("generator") == "polysense.curate" and split is None:
            return int(manifest["count"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def _shard_it(path: str | Path) -> str:
    return (
        f"{path}: a {detect_format(path)} source is read into memory; to stream it (data.cache="
        f"off, augmentations, data.sampling=resampled) convert it to webdataset shards first: "
        f"`polysense data shard {path} --out DIR`, then train with --data DIR"
    )


def _expand(pattern: str) -> list[str]:
    from webdataset.shardlists import expand_urls

    return expand_urls(pattern)


def _with_captions(
    index: ShardIndex, *, limit: int | None, rejects_path: Path | None, source: str
) -> ShardPairs:
    """The indexed samples with a usable caption (their caption members read once, not their
    images): a bad caption member is a reject, as the tar reader makes it; the first `limit`."""
    keep = np.zeros(len(index), dtype=bool)
    kept = 0
    with Rejects(path=rejects_path) as rejects:
        for i in range(len(index)):
            if limit and kept >= limit:
                break
            try:
                texts = _texts(index.sample(i, images=False))
            except DataError as exc:
                reason = str(exc).rsplit(": ", 1)[-1].split(" (", 1)[0]
                rejects.add(key=str(index.keys[i]), reason=reason, source=source, detail=str(exc))
                continue
            keep[i] = bool(texts)
            kept += keep[i]
    if not keep.any():
        raise DataError(f"{source}: no samples with both an image and a caption")
    index = index.subset(keep)
    return ShardPairs(urls=index.shards, index=index, caption_key=index.caption_key)


def caption_lists(source: Source) -> Iterable[list[str]]:
    """Every sample's captions (streamed for shards), e.g. to train a BPE tokenizer on."""
    return source.captions() if isinstance(source, ShardPairs) else source.captions


# ---------------------------------------------------------------------------------------------
# batches


@dataclass(frozen=True, kw_only=True)
class ImageRecipe:
    """How a worker turns a decoded sample into training pixels and caption ids."""

    tokenizer: Tokenizer
    image_size: int
    resize: str
    augment: Augment

    def pixels(self, image: Any, rng: np.random.Generator, captions: list[str]) -> np.ndarray:
        """uint8 (H, W, 3)."""
        return train_image(
            image,
            size=self.image_size,
            resize=self.resize,
            augment=self.augment,
            rng=rng,
            captions=captions,
        )


class EpochStepData(Dataset):
    """Item `step` = this rank's batch of that step in the `EpochOrder`, decoded from the
    shards: (images (b, H, W, 3) uint8, ids (b, L)). Sample j of the global batch draws its
    augmentation from a generator seeded by (seed, step, j), so every rank and worker count
    gives the same batch. A sample whose image fails to decode is replaced by the next sample
    of the index that decodes (a warning says which)."""

    def __init__(self, *, source: ShardPairs, order: EpochOrder, recipe: ImageRecipe) -> None:
        assert source.index is not None
        self.index, self.order, self.recipe = source.index, order, recipe

    def __len__(self) -> int:
        return sys.maxsize  # any step; the sampler says which

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch, u = self.order.global_batch(step)  # (B,), (B,)
        images, texts = [], []
        for j in range(self.order.part.start, self.order.part.stop):
            i = int(batch[j])
            sample = self._decodable(i)
            captions = _texts(sample)
            pick = int((u[j : j + 1] * len(captions)).long())  # PairBatches' draw, per sample
            texts.append(captions[pick])
            rng = np.random.default_rng((self.order.seed, step, j))
            images.append(self.recipe.pixels(sample["image"], rng, captions))
        ids, _ = self.recipe.tokenizer.encode(texts)  # (b, L)
        return torch.from_numpy(np.stack(images)), ids  # (b, H, W, 3) uint8

    def _decodable(self, i: int) -> dict[str, Any]:
        for k in range(len(self.index)):
            j = (i + k) % len(self.index)
            try:
                sample = self.index.sample(j)
            except DataError as exc:
                warnings.warn(f"{exc}; using the next sample", stacklevel=2)
                continue
            if sample.get("image") is not None and _texts(sample):
                return sample
        raise DataError(f"{self.index.shards[0]}: no sample of the index decodes")


class ResampledStepData(IterableDataset):
    """Batches of `batch` samples drawn with replacement: each worker resamples the shards
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
        recipe: ImageRecipe,
        image_key: str,
        caption_key: str,
    ) -> None:
        self.urls, self.batch, self.buffer, self.recipe = urls, batch, buffer, recipe
        self.seed_parts = (seed, rank, start)
        self.keys = {"image_key": image_key, "caption_key": caption_key}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
        images, texts = [], []
        for raw in samples:
            members = [(k, v) for k, v in raw.items() if not k.startswith("__")]
            try:
                sample = decode_tar_sample(
                    members, key=raw["__key__"], source=raw["__url__"], **self.keys
                )
            except DataError as exc:
                warnings.warn(str(exc), stacklevel=2)
                continue
            captions = _texts(sample)
            if sample.get("image") is None or not captions:
                continue
            texts.append(captions[int(rng.integers(len(captions)))])
            images.append(self.recipe.pixels(sample["image"], rng, captions))
            if len(images) == self.batch:
                ids, _ = self.recipe.tokenizer.encode(texts)
                yield torch.from_numpy(np.stack(images)), ids
                images, texts = [], []


class StepStream:
    """`fit`'s step data over a DataLoader: `batch(step)` takes the loader's next batch while
    steps come in sequence, and opens a new loader at `step` otherwise (the first step, a
    resume). Pixels are standardised here, as the cache does, so both give the same floats."""

    def __init__(
        self,
        *,
        open_at: Callable[[int], DataLoader],
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        self.open_at, self.mean, self.std = open_at, mean, std
        self._batches: Iterator | None = None
        self._next = -1

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (b, 3, H, W) float32, ids (b, L) long) of this rank at `step`."""
        if self._batches is None or step != self._next:
            self.close()
            self._batches = iter(self.open_at(step))
        images, ids = next(self._batches)
        self._next = step + 1
        return normalize(images, self.mean, self.std), ids

    def close(self) -> None:
        """Stop the loader's workers (they also stop when this process dies)."""
        self._batches = None  # the iterator's finaliser shuts its workers down


def _loader(dataset: Dataset, *, workers: int, sampler: Iterable[int] | None) -> DataLoader:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after BPE training
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=sampler,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        generator=torch.Generator().manual_seed(0),  # leaves the global RNG to the model
    )


def step_batches(
    source: Source,
    *,
    data: Any,
    model: Any,
    tokenizer: Tokenizer | None,
    batch_size: int,
    seed: int,
    hard_negatives: str = "none",
    rank: int = 0,
    world: int = 1,
) -> PairBatches | StepStream:
    """The step data `fit` trains on, for `source` as `open_pairs` opened it."""
    vision = model.vision
    if isinstance(source, TowerData):
        return TowerBatches(
            data=source,
            tokenizer=tokenizer,
            batch_size=batch_size,
            seed=seed,
            image_mean=vision.image_mean,
            image_std=vision.image_std,
            video_mean=model.video.image_mean,
            video_std=model.video.image_std,
            hard_negatives=hard_negatives,
            rank=rank,
            world=world,
        )
    assert tokenizer is not None
    if isinstance(source, PairData):
        return PairBatches(
            data=source,
            tokenizer=tokenizer,
            batch_size=batch_size,
            seed=seed,
            mean=vision.image_mean,
            std=vision.image_std,
            rank=rank,
            world=world,
        )
    recipe = ImageRecipe(
        tokenizer=tokenizer,
        image_size=vision.image_size,
        resize=vision.resize,
        augment=augment_of(data),
    )
    workers = data.num_workers
    if source.index is None:  # resampled
        if batch_size % world:
            raise DataError(f"batch_size={batch_size} must be divisible by {world} processes")

        def open_at(step: int) -> DataLoader:
            stream = ResampledStepData(
                urls=source.urls,
                batch=batch_size // world,
                buffer=data.shuffle_buffer,
                seed=seed,
                rank=rank,
                start=step,
                recipe=recipe,
                image_key=data.image_key,
                caption_key=data.caption_key,
            )
            return _loader(stream, workers=workers, sampler=None)

    else:
        order = EpochOrder(
            n=len(source.index), batch_size=batch_size, seed=seed, rank=rank, world=world
        )
        steps = EpochStepData(source=source, order=order, recipe=recipe)

        def open_at(step: int) -> DataLoader:
            return _loader(steps, workers=workers, sampler=range(step, sys.maxsize))

    return StepStream(open_at=open_at, mean=vision.image_mean, std=vision.image_std)


def _raw_stream(urls: list[str]) -> Iterator[dict[str, Any]]:
    """Raw tar samples of `urls` in order (webdataset; a bad shard is warned about, skipped)."""
    import webdataset as wds

    return iter(
        wds.DataPipeline(
            wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=wds.warn_and_continue)
        )
    )
