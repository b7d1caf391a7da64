"""Image-caption pairs in memory and the deterministic batch order the trainer draws from.

Images are decoded once into a uint8 tensor at the model's resolution (a 20k-scene world at
32 px is 60 MB) and all captions are tokenised up front, so a training step costs no I/O.
The batch for step `s` is a pure function of (seed, s): a resumed run sees exactly the batches
an uninterrupted one would, and under torchrun each rank takes its slice of the global batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from polysense.data.tokenizer import Tokenizer
from polysense.data.transforms import resize_center_crop
from polysense.errors import DataError


@dataclass
class PairData:
    """N images with their captions; `images` is (N, H, W, 3) uint8."""

    keys: list[str]
    images: torch.Tensor
    captions: list[list[str]]

    def __len__(self) -> int:
        return len(self.keys)


def collect_pairs(samples: Iterable[dict], *, image_size: int, source: str = "data") -> PairData:
    """Keep the samples that have an image and at least one caption."""
    keys, arrays, captions = [], [], []
    for sample in samples:
        texts = [t for t in sample.get("text") or [] if t and t.strip()]
        if sample.get("image") is None or not texts:
            continue
        keys.append(sample["key"])
        arrays.append(np.asarray(resize_center_crop(sample["image"], image_size), dtype=np.uint8))
        captions.append(texts)
    if not keys:
        raise DataError(f"{source}: no samples with both an image and a caption")
    return PairData(keys=keys, images=torch.from_numpy(np.stack(arrays)), captions=captions)


def load_pairs(
    path: str | Path,
    *,
    split: str | None,
    image_size: int,
    image_key: str = "image",
    caption_key: str = "caption",
    rejects_path: Path | None = None,
    limit: int | None = None,
) -> PairData:
    """Read any supported source (world, webdataset, CSV/JSONL, COCO, image folder) into memory."""
    from polysense.data.readers import Rejects, read_samples

    where = f"{path}" + (f" (split {split})" if split else "")
    with Rejects(path=rejects_path) as rejects:  # closing moves the rejects file into place
        samples = read_samples(
            path,
            split=split,
            image_key=image_key,
            caption_key=caption_key,
            rejects=rejects,
            limit=limit,
        )
        return collect_pairs(samples, image_size=image_size, source=where)


def normalize(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W), scaled to [0, 1] then standardised."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W)
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub_(m).div_(s).contiguous()


class PairBatches:
    """Deterministic batches of (images, caption ids) indexed by step.

    Each epoch is a fresh permutation seeded by (seed, epoch); each sample contributes one of
    its captions, drawn with a generator seeded by (seed, step). Under `world` processes the
    global batch of `batch_size` is split in contiguous rank slices.
    """

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
        if batch_size % world:
            raise DataError(f"batch_size={batch_size} must be divisible by {world} processes")
        if len(data) < batch_size:
            raise DataError(
                f"{len(data)} training samples is fewer than batch_size={batch_size}; "
                "lower train.batch_size or add data"
            )
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.mean, self.std = mean, std
        self.rank, self.world = rank, world
        self.steps_per_epoch = len(data) // batch_size
        flat = [c for caps in data.captions for c in caps]
        ids, self.n_truncated = tokenizer.encode(flat)
        self.n_caps = torch.tensor([len(c) for c in data.captions])  # (N,)
        self.offsets = torch.cumsum(self.n_caps, 0) - self.n_caps  # (N,) first caption index
        self.ids = ids  # (total_captions, L)
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(len(self.data), generator=gen)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sample indices, caption indices) of this rank's part of the global batch at `step`."""
        epoch, j = divmod(step, self.steps_per_epoch)
        batch = self._permutation(epoch)[j * self.batch_size : (j + 1) * self.batch_size]
        gen = torch.Generator().manual_seed(self.seed * 7_919 + step)
        pick = (torch.rand(len(batch), generator=gen) * self.n_caps[batch]).long()  # (B,)
        per_rank = self.batch_size // self.world
        part = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        return batch[part], self.offsets[batch[part]] + pick[part]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (b, 3, H, W) float32, ids (b, L) long) for this rank at `step`."""
        idx, caption_idx = self.indices(step)
        return normalize(self.data.images[idx], self.mean, self.std), self.ids[caption_idx]
