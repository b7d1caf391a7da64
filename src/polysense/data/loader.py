"""Image-caption pairs in memory (the decoded cache) and the deterministic batch order every
epoch-mode loader draws from.

Images are decoded once into a uint8 tensor at the model's resolution (a 20k-scene world at
32 px is 60 MB) and all captions are tokenised up front, so a training step costs no I/O: the
fast path `polysense.data.pipeline` takes when the decoded set fits `data.cache_max_gb`. The
batch for step `s` is a pure function of (seed, s) (`EpochOrder`): a resumed run sees exactly
the batches an uninterrupted one would, and under torchrun each rank takes its slice of the
global batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polysense.data.tokenizer import Tokenizer
from polysense.data.transforms import RESIZERS, normalize, resize_center_crop
from polysense.data.world import DIRECTIONS
from polysense.errors import DataError


@dataclass
class PairData:
    """N images with their captions; `images` is (N, H, W, 3) uint8."""

    keys: list[str]
    images: torch.Tensor
    captions: list[list[str]]

    def __len__(self) -> int:
        return len(self.keys)


def collect_pairs(
    samples: Iterable[dict],
    *,
    image_size: int,
    resize: str = "shortest_edge",
    source: str = "data",
    max_samples: int | None = None,
) -> PairData:
    """Keep the samples that have an image and at least one caption, each image resized as the
    model's `vision.resize` says (shorter side + centre crop, or square). More than
    `max_samples` (what fits `data.cache_max_gb`) is a DataError naming the fix."""
    resizer = RESIZERS[resize]
    keys, arrays, captions = [], [], []
    for sample in samples:
        texts = [t for t in sample.get("text") or [] if t and t.strip()]
        if sample.get("image") is None or not texts:
            continue
        if max_samples is not None and len(keys) >= max_samples:
            raise DataError(_over_budget(source, max_samples))
        keys.append(sample["key"])
        arrays.append(np.asarray(resizer(sample["image"], image_size), dtype=np.uint8))
        captions.append(texts)
    if not keys:
        raise DataError(f"{source}: no samples with both an image and a caption")
    return PairData(keys=keys, images=torch.from_numpy(np.stack(arrays)), captions=captions)


def _over_budget(source: str, max_samples: int) -> str:
    return (
        f"{source}: more than {max_samples} samples, whose decoded arrays exceed "
        "data.cache_max_gb; convert the source to webdataset shards (`polysense data shard "
        "SOURCE --out DIR`) and train on DIR, which streams, or raise data.cache_max_gb"
    )


def load_pairs(
    path: str | Path,
    *,
    split: str | None,
    image_size: int,
    resize: str = "shortest_edge",
    image_key: str = "image",
    caption_key: str = "caption",
    rejects_path: Path | None = None,
    limit: int | None = None,
    max_samples: int | None = None,
) -> PairData:
    """Read any supported source (world, webdataset, CSV/JSONL, COCO, image folder) into memory;
    a wrong column is named with its config override (`train` has no --image-key)."""
    from polysense.data.readers import CONFIG_FIX, Rejects, read_samples

    where = f"{path}" + (f" (split {split})" if split else "")
    with Rejects(path=rejects_path) as rejects:  # closing moves the rejects file into place
        samples = read_samples(
            path,
            split=split,
            image_key=image_key,
            caption_key=caption_key,
            rejects=rejects,
            limit=limit,
            key_fix=CONFIG_FIX,
        )
        return collect_pairs(
            samples, image_size=image_size, resize=resize, source=where, max_samples=max_samples
        )


class EpochOrder:
    """The deterministic sample order of the epoch mode, shared by the in-memory and the
    streaming loaders: the batch of step s is a pure function of (seed, s).

    Each epoch is a fresh permutation of the N samples seeded by (seed, epoch) (the last
    N % batch_size of it are left out); each sample of a batch draws one of its captions with
    the uniforms `u`, seeded by (seed, step). Under `world` processes each rank takes the
    contiguous slice `part` of the global batch."""

    def __init__(self, *, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if batch_size % world:
            raise DataError(f"batch_size={batch_size} must be divisible by {world} processes")
        if n < batch_size:
            raise DataError(
                f"{n} training samples is fewer than batch_size={batch_size}; "
                "lower train.batch_size or add data"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = n // batch_size
        per_rank = batch_size // world
        self.part = slice(rank * per_rank, (rank + 1) * per_rank)
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=gen)
            self._perm_epoch = epoch
        return self._perm

    def global_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sample indices (B,), caption uniforms (B,) in [0, 1)) of the global batch at `step`;
        sample j's caption is number floor(u[j] * its caption count)."""
        epoch, j = divmod(step, self.steps_per_epoch)
        batch = self._permutation(epoch)[j * self.batch_size : (j + 1) * self.batch_size]
        gen = torch.Generator().manual_seed(self.seed * 7_919 + step)
        return batch, torch.rand(len(batch), generator=gen)


class PairBatches:
    """Deterministic in-memory batches of (images, caption ids) indexed by step, in the
    `EpochOrder` (the decoded cache: every image decoded once, every caption tokenised once)."""

    def __init__(
        self,
        *,
        data: PairData,
        tokenizer: Tokenizer,
        batch_size: int,
        seed: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.order = EpochOrder(
            n=len(data), batch_size=batch_size, seed=seed, rank=rank, world=world
        )
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.mean, self.std = mean, std
        self.rank, self.world = rank, world
        self.steps_per_epoch = self.order.steps_per_epoch
        flat = [c for caps in data.captions for c in caps]
        ids, self.n_truncated = tokenizer.encode(flat)
        self.n_caps = torch.tensor([len(c) for c in data.captions])  # (N,)
        self.offsets = torch.cumsum(self.n_caps, 0) - self.n_caps  # (N,) first caption index
        self.ids = ids  # (total_captions, L)

    def indices(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sample indices, caption indices) of this rank's part of the global batch at `step`."""
        batch, u = self.order.global_batch(step)
        pick = (u * self.n_caps[batch]).long()  # (B,)
        part = self.order.part
        return batch[part], self.offsets[batch[part]] + pick[part]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (b, 3, H, W) float32, ids (b, L) long) for this rank at `step`."""
        idx, caption_idx = self.indices(step)
        return normalize(self.data.images[idx], self.mean, self.std), self.ids[caption_idx]


# ---------------------------------------------------------------------------------------------
# more than images and captions: the data of a multi-tower model (audio, video, ImageBind-style)


@dataclass
class TowerData:
    """N samples holding every modality a multi-tower model trains on (None where unused).

    `images` (N, H, W, 3) uint8; `audio` (N, S) float16 at the model's rate (half the memory of
    float32; 16-bit PCM sources lose nothing); `video` (N, T, H, W, 3) uint8; `captions` one list
    per sample (empty lists when the model has no text tower)."""

    keys: list[str]
    captions: list[list[str]]
    images: torch.Tensor | None = None
    audio: torch.Tensor | None = None
    video: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.keys)


def tower_arrays(
    sample: dict,
    *,
    modalities: tuple[str, ...],
    image_size: int = 32,
    audio_samples: int = 16000,
    video_frames: int = 8,
    video_size: int = 32,
) -> dict[str, np.ndarray] | None:
    """One sample's arrays as the tower cache holds them ("image" (H, W, 3) uint8, "audio" (S,)
    float16, "video" (T, H, W, 3) uint8), or None when it lacks one of `modalities`; audio is
    centre-cropped or padded to `audio_samples` (already at the model's rate), videos are
    `video_frames` frames (sampled uniformly) resized to `video_size`."""
    from polysense.data.readers import fit_clip, sample_frame_indices

    texts = [t for t in sample.get("text") or [] if t and t.strip()]
    if ("text" in modalities and not texts) or any(
        sample.get(m) is None for m in modalities if m != "text"
    ):
        return None
    out = {}
    if "image" in modalities:
        out["image"] = np.asarray(resize_center_crop(sample["image"], image_size))
    if "audio" in modalities:
        out["audio"] = fit_clip(sample["audio"], audio_samples).astype(np.float16)
    if "video" in modalities:
        video = sample["video"]
        video = video[sample_frame_indices(len(video), video_frames)]  # (T, H, W, 3)
        if video.shape[1:3] != (video_size, video_size):
            from PIL import Image

            video = np.stack(
                [np.asarray(resize_center_crop(Image.fromarray(f), video_size)) for f in video]
            )
        out["video"] = video
    return out


def collect_towers(
    samples: Iterable[dict],
    *,
    modalities: tuple[str, ...],
    image_size: int = 32,
    audio_samples: int = 16000,
    video_frames: int = 8,
    video_size: int = 32,
    source: str = "data",
    max_samples: int | None = None,
) -> TowerData:
    """Keep the samples that have every modality in `modalities`, as `tower_arrays` makes them;
    more than `max_samples` is the DataError `collect_pairs` raises."""
    keys: list[str] = []
    captions: list[list[str]] = []
    cols: dict[str, list[np.ndarray]] = {m: [] for m in ("image", "audio", "video")}
    for sample in samples:
        arrays = tower_arrays(
            sample,
            modalities=modalities,
            image_size=image_size,
            audio_samples=audio_samples,
            video_frames=video_frames,
            video_size=video_size,
        )
        if arrays is None:
            continue
        if max_samples is not None and len(keys) >= max_samples:
            raise DataError(_over_budget(source, max_samples))
        keys.append(sample["key"])
        texts = [t for t in sample.get("text") or [] if t and t.strip()]
        captions.append(texts if "text" in modalities else [])
        for name, array in arrays.items():
            cols[name].append(array)
    if not keys:
        raise DataError(f"{source}: no samples with all of {', '.join(modalities)}")

    def stack(name: str) -> torch.Tensor | None:
        return torch.from_numpy(np.stack(cols[name])) if cols[name] else None

    return TowerData(
        keys=keys,
        captions=captions,
        images=stack("image"),
        audio=stack("audio"),
        video=stack("video"),
    )


def load_towers(
    path: str | Path,
    *,
    split: str | None,
    model: Any,
    caption_key: str = "caption",
    image_key: str = "image",
    rejects_path: Path | None = None,
    limit: int | None = None,
    max_samples: int | None = None,
) -> TowerData:
    """Read any supported source into memory for the towers of `model` (a `ModelConfig`); a
    wrong column is named with its config override, as in `load_pairs`."""
    from polysense.data.readers import CONFIG_FIX, Rejects, read_samples

    where = f"{path}" + (f" (split {split})" if split else "")
    audio, video = model.audio, model.video
    with Rejects(path=rejects_path) as rejects:
        samples = read_samples(
            path,
            split=split,
            image_key=image_key,
            caption_key=caption_key,
            rejects=rejects,
            limit=limit,
            sample_rate=audio.sample_rate if "audio" in model.towers else None,
            key_fix=CONFIG_FIX,
        )
        return collect_towers(
            samples,
            modalities=tuple(model.towers),
            image_size=model.vision.image_size,
            audio_samples=round(audio.sample_rate * audio.clip_seconds),
            video_frames=video.num_frames,
            video_size=video.image_size,
            source=where,
            max_samples=max_samples,
        )


def with_direction(caption: str, direction: str) -> str:
    """A world motion caption ("a red circle moving left") with its direction replaced."""
    head, _, _ = caption.rpartition(" moving ")
    return f"{head} moving {direction}"


def motion_negatives(caption: str) -> list[str]:
    """The caption with each of the world's other directions, in `DIRECTIONS` order: the hard
    negatives of its clip ("... moving left" -> "... moving right", "... up", "... down")."""
    own = caption.rpartition(" moving ")[2]
    if " moving " not in caption or own not in DIRECTIONS:
        raise DataError(
            f"train.hard_negatives=motion needs captions ending in 'moving "
            f"{'|'.join(DIRECTIONS)}' (a world's motion_caption), got {caption!r}"
        )
    return [with_direction(caption, d) for d in DIRECTIONS if d != own]


def motion_negative_ids(
    tokenizer: Tokenizer, captions: list[str], ids: torch.Tensor
) -> torch.Tensor:
    """(n, H, L) ids of each caption's `motion_negatives`, given the captions' own ids (n, L); a
    caption whose direction truncation cuts off (a "negative" equal to it) is a DataError."""
    negatives = [n for c in captions for n in motion_negatives(c)]
    flat, _ = tokenizer.encode(negatives)  # (n H, L)
    hard = flat.view(len(captions), -1, flat.shape[1])  # (n, H, L)
    cut = (hard == ids[:, None]).all(dim=2).any(dim=1)  # (n,)
    if cut.any():
        raise DataError(
            f"{int(cut.sum())} captions lose their direction to truncation at "
            f"{flat.shape[1]} tokens (e.g. {captions[int(cut.nonzero()[0])]!r}); raise "
            "model.text.context_length"
        )
    return hard


class TowerBatches(PairBatches):
    """`PairBatches` for any set of towers: `batch(step)` -> {modality: tensor} for this rank.

    The same (seed, step) -> samples and caption choice as `PairBatches`, so resuming is exact.
    With `hard_negatives="motion"` the batch also holds "hard_text" (b, H, L): the ids of the
    drawn caption with each other direction (`motion_negatives`), fixed by the caption drawn."""

    def __init__(
        self,
        *,
        data: TowerData,
        tokenizer: Tokenizer | None,
        batch_size: int,
        seed: int,
        image_mean: tuple[float, ...],
        image_std: tuple[float, ...],
        video_mean: tuple[float, ...],
        video_std: tuple[float, ...],
        hard_negatives: str = "none",
        rank: int = 0,
        world: int = 1,
    ) -> None:
        has_text = tokenizer is not None and any(data.captions)
        pair_view = PairData(
            keys=data.keys,
            images=torch.empty(0),
            captions=data.captions if has_text else [["-"] for _ in data.keys],
        )
        super().__init__(
            data=pair_view,
            tokenizer=tokenizer if has_text else _NoTokens(),
            batch_size=batch_size,
            seed=seed,
            mean=image_mean,
            std=image_std,
            rank=rank,
            world=world,
        )
        self.towers, self.has_text = data, has_text
        self.video_mean, self.video_std = video_mean, video_std
        self.hard_ids: torch.Tensor | None = None  # (total_captions, H, L)
        if hard_negatives == "motion":
            if not has_text:
                raise DataError("train.hard_negatives=motion needs a text tower and captions")
            flat = [c for caps in data.captions for c in caps]
            self.hard_ids = motion_negative_ids(tokenizer, flat, self.ids)
        elif hard_negatives != "none":
            raise DataError(f"hard_negatives={hard_negatives!r}: use 'none' or 'motion'")

    def batch(self, step: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """{"image": (b, 3, H, W), "text": (b, L), "audio": (b, S), "video": (b, T, 3, H, W)},
        plus "hard_text": (b, H, L) with hard negatives."""
        idx, caption_idx = self.indices(step)
        d, raw = self.towers, {}
        if d.images is not None:
            raw["image"] = d.images[idx]
        if self.has_text:
            raw["text"] = self.ids[caption_idx]
        if self.hard_ids is not None:
            raw["hard_text"] = self.hard_ids[caption_idx]  # (b, H, L)
        if d.audio is not None:
            raw["audio"] = d.audio[idx]
        if d.video is not None:
            raw["video"] = d.video[idx]
        return model_inputs(
            raw, image=(self.mean, self.std), video=(self.video_mean, self.video_std)
        )


def model_inputs(
    raw: dict[str, torch.Tensor],
    *,
    image: tuple[tuple[float, ...], tuple[float, ...]],
    video: tuple[tuple[float, ...], tuple[float, ...]],
) -> dict[str, torch.Tensor]:
    """A tower batch as the model takes it: "image" uint8 (b, H, W, 3) -> standardised float32
    (b, 3, H, W) with `image` = (mean, std), "video" uint8 (b, T, H, W, 3) -> (b, T, 3, H, W)
    with `video`'s, "audio" float16 (b, S) -> float32; token ids unchanged."""
    out = {}
    for name, x in raw.items():
        if name == "image":
            out[name] = normalize(x, *image)
        elif name == "video":
            frames = normalize(x.flatten(0, 1), *video)  # (b T, 3, H, W)
            out[name] = frames.view(*x.shape[:2], *frames.shape[1:])  # (b, T, 3, H, W)
        elif name == "audio":
            out[name] = x.float()  # (b, S)
        else:
            out[name] = x
    return out


class _NoTokens:
    """Stands in for a tokenizer when a model has no text tower (one dummy id per caption)."""

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, int]:
        return torch.zeros(len(texts), 1, dtype=torch.long), 0
