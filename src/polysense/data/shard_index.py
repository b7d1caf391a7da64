"""Random access into webdataset .tar shards: where each sample's members lie in its shard.

A tar stores every member's bytes contiguously after a 512-byte header, so reading the headers
once (`tarfile`, seeking over the data) gives each member's (offset, size), and a sample's bytes
can later be read with one `os.pread` per member, in any order, by any process. The index keeps
only the members a sample decodes from (its image and caption members) in flat numpy arrays:
about 100 bytes per sample (half of it the key), so 150,000 samples cost ~15 MB, whatever the
images' size.

Samples are grouped as webdataset groups them (consecutive members sharing `base_plus_ext`'s
key, suffixes lower-cased, `__meta__` and non-regular members skipped), in shard order, so the
index lists the samples in the order `read_samples` yields them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from webdataset.tariterators import base_plus_ext

from polysense.data.readers import IMAGE_EXTS, VIDEO_EXTS, decode_tar_sample
from polysense.errors import DataError

_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
MAX_OPEN_SHARDS = 128  # file descriptors one process keeps open at once


def image_member(suffix: str, image_key: str) -> bool:
    """Whether the tar reader decodes a member with this suffix as the sample's image."""
    last = suffix.rsplit(".", 1)[-1]
    return suffix != "ocr.png" and "." + last in IMAGE_EXTS and image_key in ("image", suffix)


def text_member(suffix: str, caption_key: str) -> bool:
    """Whether the tar reader may take the sample's captions from this member."""
    return suffix in ("json", "txt", "caption", caption_key)


def media_member(suffix: str, modality: str) -> bool:
    """Whether the tar reader decodes this member as the sample's audio or video."""
    last = suffix.rsplit(".", 1)[-1]
    if modality == "audio":
        return last in ("wav", "flac", "ogg")
    return modality == "video" and (last == "npy" or "." + last in VIDEO_EXTS)


@dataclass(frozen=True)
class ShardIndex:
    """N samples of local tar shards: sample i's members are rows starts[i]:starts[i + 1] of the
    flat member arrays (offset, size, suffix id into `suffixes`), in tar order."""

    shards: tuple[str, ...]
    keys: np.ndarray  # (N,) str
    shard: np.ndarray  # (N,) int32 index into `shards`
    starts: np.ndarray  # (N + 1,) int64
    offset: np.ndarray  # (M,) int64 byte offset of each member's data
    size: np.ndarray  # (M,) int64
    suffix: np.ndarray  # (M,) int16
    suffixes: tuple[str, ...]
    image_key: str = "image"
    caption_key: str = "caption"
    sample_rate: int | None = None  # audio is resampled to this rate when decoded

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        """Bytes of the index arrays (what one process holds per sample)."""
        arrays = (self.keys, self.shard, self.starts, self.offset, self.size, self.suffix)
        return sum(a.nbytes for a in arrays)

    def subset(self, keep: np.ndarray) -> ShardIndex:
        """The samples where `keep` (N,) bool is true, in the same order."""
        rows = np.flatnonzero(keep)
        counts = np.diff(self.starts)  # (N,) members per sample
        member = np.repeat(np.asarray(keep, dtype=bool), counts)  # (M,)
        starts = np.concatenate([[0], np.cumsum(counts[rows])]).astype(np.int64)
        return dataclasses.replace(
            self,
            keys=self.keys[rows],
            shard=self.shard[rows],
            starts=starts,
            offset=self.offset[member],
            size=self.size[member],
            suffix=self.suffix[member],
        )

    def members(self, i: int, *, media: bool = True) -> Iterator[tuple[str, bytes]]:
        """(suffix, bytes) of sample i's members in tar order (`media=False`: captions only)."""
        fd = _open(self.shards[int(self.shard[i])])
        for m in range(int(self.starts[i]), int(self.starts[i + 1])):
            suffix = self.suffixes[int(self.suffix[m])]
            if not media and not text_member(suffix, self.caption_key):
                continue
            data = os.pread(fd, int(self.size[m]), int(self.offset[m]))
            if len(data) != int(self.size[m]):
                raise DataError(
                    f"{self.shards[int(self.shard[i])]}: sample {self.keys[i]} is cut short "
                    "(the shard changed since it was indexed); rerun to index it again"
                )
            yield suffix, data

    def sample(self, i: int, *, media: bool = True) -> dict:
        """Sample i decoded as `read_samples` decodes it (DataError for a bad member)."""
        return decode_tar_sample(
            self.members(i, media=media),
            key=str(self.keys[i]),
            source=self.shards[int(self.shard[i])],
            image_key=self.image_key,
            caption_key=self.caption_key,
            sample_rate=self.sample_rate,
        )


_FDS: dict[str, int] = {}  # this process's open shards (a forked worker inherits the dict)


def _open(path: str) -> int:
    """A read-only descriptor of `path`; pread never moves a shared file offset, so descriptors
    inherited by forked DataLoader workers stay safe to use."""
    fd = _FDS.get(path)
    if fd is None:
        if len(_FDS) >= MAX_OPEN_SHARDS:
            for old in _FDS.values():
                os.close(old)
            _FDS.clear()
        fd = _FDS[path] = os.open(path, os.O_RDONLY)
    return fd


def build_index(
    shards: Sequence[str],
    *,
    modalities: Sequence[str] = ("image", "text"),
    image_key: str = "image",
    caption_key: str = "caption",
    sample_rate: int | None = None,
) -> ShardIndex:
    """Index the samples of `shards` that have a member for each of `modalities` (image, text,
    audio, video), keeping only those members.

    A shard that cannot be read is skipped with a warning (the tar reader records it as a
    reject); a shard cut short keeps the samples whose members lie wholly inside the file."""

    def wanted(suffix: str, modality: str) -> bool:
        if modality == "image":
            return image_member(suffix, image_key)
        if modality == "text":
            return text_member(suffix, caption_key)
        return media_member(suffix, modality)

    keys: list[str] = []
    shard_of: list[int] = []
    starts = [0]
    offset: list[int] = []
    size: list[int] = []
    suffix: list[int] = []
    vocab: dict[str, int] = {}
    for s, path in enumerate(shards):
        for key, members in _shard_samples(path):
            have = {m: [x for x in members if wanted(x[0], m)] for m in modalities}
            if not all(have.values()):
                continue
            kept = [x for x in members if any(x in found for found in have.values())]
            keys.append(key)
            shard_of.append(s)
            for sfx, o, n in kept:
                offset.append(o)
                size.append(n)
                suffix.append(vocab.setdefault(sfx, len(vocab)))
            starts.append(len(offset))
    return ShardIndex(
        shards=tuple(shards),
        keys=np.array(keys, dtype=str),
        shard=np.array(shard_of, dtype=np.int32),
        starts=np.array(starts, dtype=np.int64),
        offset=np.array(offset, dtype=np.int64),
        size=np.array(size, dtype=np.int64),
        suffix=np.array(suffix, dtype=np.int16),
        suffixes=tuple(vocab),
        image_key=image_key,
        caption_key=caption_key,
        sample_rate=sample_rate,
    )


def _shard_samples(path: str) -> Iterator[tuple[str, list[tuple[str, int, int]]]]:
    """(key, [(suffix, data offset, size)]) per sample of one shard, grouped as webdataset's
    `group_by_keys` groups a tar stream (a repeated suffix keeps the first)."""
    file_size = os.path.getsize(path)
    key: str | None = None
    members: list[tuple[str, int, int]] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            while True:
                try:
                    info = tar.next()
                except tarfile.TarError as exc:  # cut short: keep what came before
                    warnings.warn(
                        f"{path}: {exc}; later samples of this shard are skipped", stacklevel=2
                    )
                    break
                if info is None:
                    break
                tar.members.clear()  # tarfile keeps every header otherwise
                if not info.isreg() or _META.match(info.name):
                    continue
                if info.offset_data + info.size > file_size:
                    break
                prefix, sfx = base_plus_ext(info.name)
                if prefix is None:
                    continue
                if prefix != key:
                    if key is not None:
                        yield key, members
                    key, members = prefix, []
                sfx = sfx.lower()
                if all(m[0] != sfx for m in members):
                    members.append((sfx, info.offset_data, info.size))
    except (OSError, tarfile.TarError) as exc:
        warnings.warn(f"{path}: not a readable tar ({exc}); skipped", stacklevel=2)
    if key is not None:
        yield key, members
