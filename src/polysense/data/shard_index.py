"""Random access into webdataset .tar shards: where each sample's members lie in its shard.

A tar stores every member's bytes contiguously after a 512-byte header, so reading the headers
once (`tarfile`, seeking over the data) gives each member's (offset, size), and a sample's bytes
can later be read with one `os.pread` per member, in any order, by any process. The index keeps
only the members a sample decodes from (its image and caption members) in flat numpy arrays:
about 100 bytes per sample (half of it the key), so 150,000 samples cost ~15 MB, whatever the
images' size.

Reading the headers costs one pass over each shard (~0.1 s per 1,000-sample shard here). Each
shard's table is therefore cached under `$POLYSENSE_CACHE/shard-index` (default
`~/.cache/polysense`; `POLYSENSE_CACHE=off` turns it off), keyed by the shard's real path, size,
inode, modification time and its first and last 64 KiB, so a rewritten shard is read again (a
change inside a shard that keeps all of these is caught only when a read comes up short); the
cache is plain `.npz` arrays read without pickle. Shards not in the cache are read by `workers` processes at once.

Samples are grouped as webdataset groups them (consecutive members sharing `base_plus_ext`'s
key, suffixes lower-cased, `__meta__` and non-regular members skipped), in shard order, so the
index lists the samples in the order `read_samples` yields them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from webdataset.tariterators import base_plus_ext

from polysense.data.readers import IMAGE_EXTS, VIDEO_EXTS, decode_tar_sample
from polysense.errors import DataError
from polysense.fileio import atomic_path

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
    workers: int = 1,
) -> ShardIndex:
    """Index the samples of `shards` that have a member for each of `modalities` (image, text,
    audio, video), keeping only those members. Shards missing from the cache are read by
    `workers` processes.

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
    for s, table in enumerate(shard_tables(shards, workers=workers)):
        for key, members in table:
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


Table = list[tuple[str, list[tuple[str, int, int]]]]  # (key, [(suffix, data offset, size)])


def shard_tables(shards: Sequence[str], *, workers: int = 1) -> Iterator[Table]:
    """Each shard's table in order: from the cache where it holds the shard as it is now, else
    read (by `workers` processes when `PARALLEL_FROM` or more are missing) and then cached. The
    problems a read met are warned here, in the calling process."""
    tables: dict[int, Table] = {}
    missing = []
    for i, path in enumerate(shards):
        cached = _cached(path)
        if cached is None:
            missing.append(i)
        else:
            tables[i] = cached
    read = map(_scan, (shards[i] for i in missing))
    pool = None
    if workers > 1 and len(missing) >= PARALLEL_FROM:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
        pool = ProcessPoolExecutor(max_workers=min(workers, len(missing)), mp_context=ctx)
        read = pool.map(_scan, (shards[i] for i in missing), chunksize=4)
    try:
        for i, (table, problems) in zip(missing, read, strict=True):
            for problem in problems:
                warnings.warn(problem, stacklevel=3)
            if not problems:
                _store(shards[i], table)
            tables[i] = table
    finally:
        if pool is not None:
            pool.shutdown()
    for i in range(len(shards)):
        yield tables.pop(i)


PARALLEL_FROM = 8  # fewer missing shards are read here: starting a process costs more
FINGERPRINT = 65536  # bytes read at each end of a shard for its cache key
INDEX_VERSION = 1  # bump when the table's meaning changes: old cache files are then unread


def cache_root() -> Path | None:
    """The shard-index cache directory, or None when `POLYSENSE_CACHE=off`."""
    root = os.environ.get("POLYSENSE_CACHE", "")
    if root.lower() == "off":
        return None
    base = Path(root) if root else Path.home() / ".cache" / "polysense"
    return base / "shard-index"


def _cache_file(path: str) -> Path | None:
    root = cache_root()
    if root is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    ident = (
        f"{INDEX_VERSION}\0{os.path.realpath(path)}\0{st.st_size}\0{st.st_ino}\0{st.st_mtime_ns}"
    )
    digest = hashlib.sha256(ident.encode())
    try:  # the bytes at both ends too: a rewrite within the clock's tick keeps size and mtime
        with open(path, "rb") as f:
            digest.update(f.read(FINGERPRINT))
            f.seek(max(st.st_size - FINGERPRINT, 0))
            digest.update(f.read(FINGERPRINT))
    except OSError:
        return None
    name = digest.hexdigest()
    return root / name[:2] / f"{name}.npz"


def _cached(path: str) -> Table | None:
    file = _cache_file(path)
    if file is None or not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            keys, counts = z["keys"].tolist(), z["counts"].tolist()
            suffix, offset, size = z["suffix"].tolist(), z["offset"].tolist(), z["size"].tolist()
    except (OSError, ValueError, KeyError):
        return None  # unreadable: read the shard again
    if sum(counts) != len(suffix):
        return None
    table, m = [], 0
    for key, n in zip(keys, counts, strict=True):
        table.append(
            (key, list(zip(suffix[m : m + n], offset[m : m + n], size[m : m + n], strict=True)))
        )
        m += n
    return table


def _store(path: str, table: Table) -> None:
    """Cache one shard's table; a cache that cannot be written only costs the next read."""
    file = _cache_file(path)
    if file is None:
        return
    members = [m for _, ms in table for m in ms]
    arrays = {
        "keys": np.array([k for k, _ in table], dtype=str),
        "counts": np.array([len(ms) for _, ms in table], dtype=np.int32),
        "suffix": np.array([m[0] for m in members], dtype=str),
        "offset": np.array([m[1] for m in members], dtype=np.int64),
        "size": np.array([m[2] for m in members], dtype=np.int64),
    }
    try:
        with atomic_path(file) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    except OSError:
        pass


def _scan(path: str) -> tuple[Table, list[str]]:
    """One shard read: its table and the problems met (a shard cut short, an unreadable one)."""
    problems: list[str] = []
    return list(_shard_samples(path, problems)), problems


def _shard_samples(
    path: str, problems: list[str]
) -> Iterator[tuple[str, list[tuple[str, int, int]]]]:
    """(key, [(suffix, data offset, size)]) per sample of one shard, grouped as webdataset's
    `group_by_keys` groups a tar stream (a repeated suffix keeps the first); what goes wrong is
    appended to `problems`."""
    key: str | None = None
    members: list[tuple[str, int, int]] = []
    try:
        file_size = os.path.getsize(path)
        with tarfile.open(path, mode="r:") as tar:
            while True:
                try:
                    info = tar.next()
                except tarfile.TarError as exc:  # cut short: keep what came before
                    problems.append(f"{path}: {exc}; later samples of this shard are skipped")
                    break
                if info is None:
                    break
                tar.members.clear()  # tarfile keeps every header otherwise
                if not info.isreg() or _META.match(info.name):
                    continue
                if info.offset_data + info.size > file_size:
                    problems.append(f"{path}: cut short; its last sample is skipped")
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
        problems.append(f"{path}: not a readable tar ({exc}); skipped")
    if key is not None:
        yield key, members
