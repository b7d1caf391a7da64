"""The training data of the contrastive family (image-text and any towers): the decoded cache
when the set is small, else batches streamed from webdataset shards through torch DataLoader
workers (`polysense.data.streaming`).

    source = open_pairs("runs/shards", data=cfg.data, model=cfg.model, split=None)
    batches = step_batches(source, data=cfg.data, model=cfg.model, tokenizer=tok, ...)
    images, ids = batches.batch(step)  # what `fit` calls, step after step

Three ways to batches, chosen by `data.cache` and `data.sampling` (docs/data.md):
- the decoded cache (`PairBatches`, `TowerBatches`): every sample decoded once into memory;
  `auto` takes it when the decoded arrays (N x H x W x 3 bytes for images) fit
  `data.cache_max_gb` and no augmentation is on (the world's 32 px);
- the epoch mode (`EpochStepData`): item s of a map-style dataset is this rank's batch of step
  s in the cache's own `EpochOrder`, each sample read by random access (`ShardIndex`: offsets
  from the tar headers, one `os.pread` per member) and decoded, resized and augmented in the
  DataLoader's workers. With augmentation off its batches equal the cache's bit for bit, and a
  resumed run sees exactly the batches an uninterrupted one would. Memory: the index (~100
  bytes a sample) plus the batches in flight, whatever the set's size;
- the resampled mode (`ResampledStepData`, image-text): webdataset draws shards with
  replacement per worker (local or remote URLs), a shuffle buffer mixes samples; batches are
  seeded by (seed, rank, worker, start step), so a resumed run continues with fresh draws, not
  at the sample where it stopped.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from polysense.config import ConfigError, DataConfig, ModelConfig
from polysense.data.loader import (
    EpochOrder,
    PairBatches,
    PairData,
    TowerBatches,
    TowerData,
    load_pairs,
    load_towers,
    model_inputs,
    motion_negative_ids,
    normalize,
)
from polysense.data.readers import (
    Rejects,
    SampleError,
    decode_tar_sample,
    detect_format,
    shard_files,
)
from polysense.data.shard_index import ShardIndex, build_index, text_member
from polysense.data.streaming import (
    EpochStepData,
    PairRecipe,
    ResampledStepData,
    StepStream,
    TowerRecipe,
    captions_of,
)
from polysense.data.tokenizer import Tokenizer
from polysense.data.transforms import Augment
from polysense.errors import DataError

TOKENIZER_SAMPLES = 200_000  # the resampled mode trains a BPE on this many samples' captions


@dataclass(frozen=True)
class ShardPairs:
    """Streamed samples: the local shards' index (epoch mode) or shard URLs (resampled mode),
    never decoded pixels."""

    urls: tuple[str, ...]
    index: ShardIndex | None = None
    caption_key: str = "caption"

    def captions(self) -> Iterator[list[str]]:
        """Every sample's captions, read again from the shards (the resampled mode: the first
        TOKENIZER_SAMPLES), for training a tokenizer without holding them all."""
        if self.index is not None:
            for i in range(len(self.index)):
                yield captions_of(self.index.sample(i, media=False))
            return
        for n, raw in enumerate(_raw_stream(list(self.urls))):
            if n >= TOKENIZER_SAMPLES:
                return
            members = [(k, v) for k, v in raw.items() if text_member(k, self.caption_key)]
            try:
                texts = captions_of(
                    decode_tar_sample(
                        members, key=raw["__key__"], source="", caption_key=self.caption_key
                    )
                )
            except DataError:
                continue
            if texts:
                yield texts


Source = PairData | TowerData | ShardPairs


def augment_of(data: DataConfig) -> Augment:
    """The `Augment` that a `DataConfig` asks for."""
    return Augment(crop_scale_min=data.crop_scale_min, jitter=data.jitter, flip=data.flip)


def is_url(path: str) -> bool:
    """Whether `path` names remote shards (a URL or a `pipe:` command) rather than a local path."""
    return "://" in path or path.startswith("pipe:")


def open_pairs(
    path: str | Path,
    *,
    data: DataConfig,
    model: ModelConfig,
    split: str | None,
    rejects_path: Path | None = None,
) -> Source:
    """The training samples at `path` for a model of config `model` (a `ModelConfig`), cached
    or streamed as `data` (a `DataConfig`) says; errors name the field and the fix."""
    augment = augment_of(data)
    towers = tuple(model.towers)
    multi = towers != ("image", "text")
    limit = data.limit or None
    text = str(path)
    if multi and (data.sampling != "epoch" or augment.active):
        raise ConfigError(
            f"towers {','.join(towers)} train in the epoch mode without augmentations; set "
            "data.sampling=epoch and leave data.crop_scale_min, data.jitter and data.flip off"
        )
    if data.sampling == "resampled":
        if data.cache == "on" or limit:
            raise ConfigError(
                "data.sampling=resampled streams shards with replacement; use data.cache=auto "
                "or off and data.limit=0"
            )
        urls = _expand(text) if is_url(text) else shard_files(path, split=split)
        if urls is None:
            raise DataError(_shard_it(path))
        return ShardPairs(urls=tuple(urls), caption_key=data.caption_key)
    if is_url(text):
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
    budget = int(data.cache_max_gb * 1e9) // decoded_bytes(model)  # samples the cache holds
    index = None
    # bounds on N known without indexing: a manifest's count, data.limit
    known = [n for n in (_listed_count(Path(path), split), limit) if n]
    fits = data.cache == "auto" and not augment.active and bool(known) and min(known) <= budget
    if shards is not None and data.cache != "on" and not fits:
        index = build_index(
            shards,
            modalities=towers,
            image_key=data.image_key,
            caption_key=data.caption_key,
            sample_rate=model.audio.sample_rate if "audio" in towers else None,
            workers=max(1, data.num_workers),  # the loader's processes, before they start
        )
        n = min(len(index), limit or len(index))
        if data.cache == "auto" and n <= budget and not augment.active:
            index = None  # it fits: the decoded cache
    elif shards is None and (data.cache == "off" or augment.active):
        raise DataError(_shard_it(path))
    if index is None:
        read = {
            "split": split,
            "image_key": data.image_key,
            "caption_key": data.caption_key,
            "rejects_path": rejects_path,
            "limit": limit,
            "max_samples": budget if data.cache == "auto" else None,
        }
        if multi:
            return load_towers(path, model=model, **read)
        return load_pairs(
            path, image_size=model.vision.image_size, resize=model.vision.resize, **read
        )
    if "text" not in towers:
        index = index.subset(np.arange(len(index)) < (limit or len(index)))
        return ShardPairs(urls=index.shards, index=index, caption_key=data.caption_key)
    return _with_captions(index, limit=limit, rejects_path=rejects_path, source=text)


def decoded_bytes(model: ModelConfig) -> int:
    """Bytes one sample takes in the decoded cache: uint8 image and video, float16 audio."""
    towers, n = model.towers, 0
    if "image" in towers:
        n += 3 * model.vision.image_size**2
    if "audio" in towers:
        n += 2 * round(model.audio.sample_rate * model.audio.clip_seconds)
    if "video" in towers:
        n += 3 * model.video.num_frames * model.video.image_size**2
    return max(n, 1)


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
                texts = captions_of(index.sample(i, media=False))
            except SampleError as exc:
                key, shard = str(index.keys[i]), index.shards[int(index.shard[i])]
                rejects.add(key=key, reason=exc.reason, source=shard, detail=exc.detail)
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
    data: DataConfig,
    model: ModelConfig,
    tokenizer: Tokenizer | None,
    batch_size: int,
    seed: int,
    hard_negatives: str = "none",
    rank: int = 0,
    world: int = 1,
) -> PairBatches | StepStream:
    """The step data `fit` trains on, for `source` as `open_pairs` opened it: `batch(step)`
    gives (images, ids) for image-text models, {modality: tensor} for other towers."""
    vision, video = model.vision, model.video
    if isinstance(source, TowerData):
        return TowerBatches(
            data=source,
            tokenizer=tokenizer,
            batch_size=batch_size,
            seed=seed,
            image_mean=vision.image_mean,
            image_std=vision.image_std,
            video_mean=video.image_mean,
            video_std=video.image_std,
            hard_negatives=hard_negatives,
            rank=rank,
            world=world,
        )
    if isinstance(source, PairData):
        assert tokenizer is not None
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
    recipe = _recipe(source, model=model, data=data, tokenizer=tokenizer, hard=hard_negatives)
    if isinstance(recipe, TowerRecipe):

        def finish(raw: dict) -> Any:
            image, clip = (vision.image_mean, vision.image_std), (video.image_mean, video.image_std)
            return model_inputs(raw, image=image, video=clip)

    else:

        def finish(raw: dict) -> Any:
            return normalize(raw["image"], vision.image_mean, vision.image_std), raw["text"]

    workers = data.num_workers
    if source.index is None:  # resampled
        if batch_size % world:
            raise DataError(f"batch_size={batch_size} must be divisible by {world} processes")
        assert isinstance(recipe, PairRecipe)

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
        steps = EpochStepData(index=source.index, order=order, recipe=recipe)

        def open_at(step: int) -> DataLoader:
            return _loader(steps, workers=workers, sampler=range(step, sys.maxsize))

    return StepStream(open_at=open_at, finish=finish)


def _recipe(
    source: ShardPairs,
    *,
    model: ModelConfig,
    data: DataConfig,
    tokenizer: Tokenizer | None,
    hard: str,
) -> PairRecipe | TowerRecipe:
    """What a worker makes of each sample for this model (hard negatives checked up front)."""
    towers = tuple(model.towers)
    if towers == ("image", "text"):
        assert tokenizer is not None
        return PairRecipe(
            tokenizer=tokenizer,
            image_size=model.vision.image_size,
            resize=model.vision.resize,
            augment=augment_of(data),
        )
    if hard not in ("none", "motion"):
        raise DataError(f"hard_negatives={hard!r}: use 'none' or 'motion'")
    has_text = "text" in towers and tokenizer is not None
    if hard == "motion":
        if not has_text:
            raise DataError("train.hard_negatives=motion needs a text tower and captions")
        flat = [c for caps in caption_lists(source) for c in caps]
        for i in range(0, len(flat), 4096):  # every caption keeps its direction (or fail now)
            chunk = flat[i : i + 4096]
            motion_negative_ids(tokenizer, chunk, tokenizer.encode(chunk)[0])
    audio = model.audio
    return TowerRecipe(
        tokenizer=tokenizer if has_text else None,
        modalities=towers,
        image_size=model.vision.image_size,
        audio_samples=round(audio.sample_rate * audio.clip_seconds),
        video_frames=model.video.num_frames,
        video_size=model.video.image_size,
        hard_negatives=hard == "motion",
    )


def _raw_stream(urls: list[str]) -> Iterator[dict[str, Any]]:
    """Raw tar samples of `urls` in order (webdataset; a bad shard is warned about, skipped)."""
    import webdataset as wds

    return iter(
        wds.DataPipeline(
            wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=wds.warn_and_continue)
        )
    )
