"""Readers: every supported source becomes one stream of sample dicts, bad samples become rejects.

A sample is a dict with optional modalities (see docs/data.md): ``key``, ``source``, ``image``
(PIL RGB), ``text`` (list of captions), ``audio`` (float32 ``(T,)``) + ``sample_rate``, ``video``
(uint8 ``(T, H, W, 3)``), ``ocr_image``, and pass-through fields (``objects``, ``qa``, ``label`` ...).
A bad sample (missing file, undecodable image, empty caption, broken JSON line ...) never stops a
run: it is skipped and recorded in a :class:`Rejects`. A problem that would reject every sample
(no image column, unknown format, missing path) raises :class:`DataError` instead.

Hostile input is bounded before it costs anything: only regular files are opened (a FIFO or a
device would block or never end), lines, captions and decoded pixels have caps (below), checked
before a line is parsed or an image decoded.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import math
import os
import re
import stat
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any

import numpy as np
import soundfile
from PIL import Image
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples

from polysense.errors import DataError

SUPPORTED_FORMATS = ("world", "wds", "csv", "tsv", "jsonl", "coco", "karpathy", "imagefolder")
WORLD_SPLITS = ("train", "val", "test", "test_novel")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mkv", ".mov")  # decoded with PyAV; ".npy" with numpy
# Files that are a dataset of their own; a directory of several is read one by one by `inspect`.
TABLE_EXTS = (".csv", ".tsv", ".jsonl", ".json")
# Caps on hostile input; what goes over one is a reject with the reason in brackets.
MAX_PIXELS = 2**25  # decoded pixels of one image, 32 Mi (8192 x 4096), read from the header
#                     before decoding [too_many_pixels]; Pillow's own limit is ~89 M
MAX_LINE_BYTES = 2**20  # one CSV/TSV/JSONL line, 1 MiB, read past in chunks [line_too_long]
MAX_CAPTION_CHARS = 8192  # one caption [caption_too_long]; CLIP-style models read ~300 of them
# The fix a wrong-column error names: `data inspect` takes flags, `train` config overrides.
FLAG_FIX = MappingProxyType({"image": "--image-key {}", "caption": "--caption-key {}"})
CONFIG_FIX = MappingProxyType(
    {"image": "--set data.image_key={}", "caption": "--set data.caption_key={}"}
)
# Fields a reader sets itself; a CSV column or JSON field with one of these names is not copied.
_RESERVED = frozenset(
    {"key", "source", "image", "text", "audio", "sample_rate", "video", "ocr_image", "image_path"}
)


class Rejects:
    """Counts skipped samples and writes each as one JSON line ``{key, reason, source, detail}``.

    With a ``path``, lines are appended (and flushed) to ``PATH.partial`` as they happen and
    :meth:`close` moves it onto ``PATH`` atomically. The file is always written at close, empty
    when nothing was rejected, so it never shows a stale earlier run. Use as a context manager.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.by_reason: Counter[str] = Counter()
        self.records: list[dict[str, str]] = []
        self._fh: IO[str] | None = None
        self._closed = False

    @property
    def count(self) -> int:
        return sum(self.by_reason.values())

    @property
    def _partial(self) -> Path:
        assert self.path is not None
        return self.path.with_name(self.path.name + ".partial")

    def add(self, *, key: str, reason: str, source: str, detail: str = "") -> None:
        """Record one skipped sample; ``reason`` is a short code such as ``empty_caption``."""
        record = {"key": str(key), "reason": reason, "source": str(source), "detail": detail}
        self.by_reason[reason] += 1
        self.records.append(record)
        if self.path is not None:
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # backslashreplace: a lone surrogate (a key from JSON "\\udc80") is written as
                # its JSON escape instead of failing the write
                self._fh = open(  # noqa: SIM115
                    self._partial, "w", encoding="utf-8", errors="backslashreplace"
                )
            self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._fh.flush()

    def close(self) -> None:
        """Publish the rejects file (atomically); safe to call twice."""
        if self._closed or self.path is None:
            self._closed = True
            return
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._partial.write_text("", encoding="utf-8")
        else:
            self._fh.close()
        os.replace(self._partial, self.path)
        self._closed = True

    def __enter__(self) -> Rejects:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Skip(Exception):
    """Internal: this sample is rejected with ``reason``; the reader records it and moves on."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class _Options:
    split: str | None
    image_key: str
    caption_key: str
    decode: bool
    image_root: Path | None
    caption_template: str
    rejects: Rejects
    key_fix: Mapping[str, str]  # FLAG_FIX or CONFIG_FIX: how wrong-column errors name the fix
    sample_rate: int | None = None  # resample every clip to this rate (None: keep the file's)
    num_frames: int | None = None  # sample this many frames from every video (None: keep all)


# ---------------------------------------------------------------------------------------------
# format detection


def _is_brace_pattern(path: str) -> bool:
    return "{" in path and ".." in path and "}" in path


def _source_file(path: Path) -> Path:
    """``path`` when it is a regular file; DataError for a FIFO, device or socket (never opened:
    reading one would block or never end)."""
    if not stat.S_ISREG(path.stat().st_mode):
        raise DataError(f"{path}: not a regular file (a FIFO, device or socket); pass a data file")
    return path


def _read_text(path: Path) -> str:
    """A whole UTF-8 file (BOM skipped); DataError naming it when it cannot be read."""
    try:
        return _source_file(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc}); save it as UTF-8") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from exc


def _parse_json(text: str) -> Any:
    """``json.loads`` that raises ValueError for deep nesting too (RecursionError otherwise)."""
    try:
        return json.loads(text)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


def _world_manifest(root: Path) -> dict[str, Any] | None:
    """The parsed manifest.json when ``root`` is a polysense world directory, else None."""
    manifest = root / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        data = _parse_json(_read_text(manifest))
    except ValueError as exc:
        raise DataError(f"{manifest}: not valid JSON ({exc}); regenerate the world") from exc
    if isinstance(data, dict) and data.get("generator") == "polysense.world":
        return data
    return None


def _sniff_json(path: Path) -> str | None:
    """'coco' for a JSON object with images+annotations, 'jsonl' for one object per line."""
    text = _read_text(path)
    try:
        whole = _parse_json(text)
    except ValueError:
        whole = None
    if isinstance(whole, dict):
        if "images" in whole and "annotations" in whole:
            return "coco"
        if _is_karpathy(whole):
            return "karpathy"
        return "jsonl"  # a single object on one line is a one-line JSONL file
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        return "jsonl" if isinstance(_parse_json(first), dict) else None
    except ValueError:
        return None


def _has_image_subfolders(root: Path) -> bool:
    for sub in root.iterdir():
        if sub.is_dir() and any(p.suffix.lower() in IMAGE_EXTS for p in sub.iterdir()):
            return True
    return False


def _dir_format(root: Path) -> str | None:
    """'world', 'wds' or 'imagefolder' for a directory that is one dataset, else None."""
    if _world_manifest(root) is not None:
        return "world"
    if any(root.glob("*.tar")) or any(root.glob("*/*.tar")):
        return "wds"
    if _has_image_subfolders(root):
        return "imagefolder"
    return None


def collection_sources(path: str | Path) -> list[Path]:
    """The sources of a directory that is no dataset itself but holds several, for
    `polysense data inspect` to read one by one: its CSV/TSV/JSONL/JSON files (whatever kind of
    file) and its sub-directories that are a dataset (world, tar shards, image folder), sorted.
    Other files (the images and clips the tables point to) are not sources. Empty when ``path``
    is one dataset, or not a directory."""
    root = Path(path)
    if _is_brace_pattern(str(path)) or not root.is_dir() or _dir_format(root) is not None:
        return []
    sources = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            try:
                is_dataset = _dir_format(entry) is not None
            except DataError:  # a broken world manifest: a source, which inspect reports
                is_dataset = True
            if is_dataset:
                sources.append(entry)
        elif entry.suffix.lower() in TABLE_EXTS:
            sources.append(entry)
    return sources


def detect_format(path: str | Path) -> str:
    """Name the format of ``path``: one of :data:`SUPPORTED_FORMATS`.

    A ``.json`` file is COCO when it holds ``images`` and ``annotations``, else JSONL when it
    holds one object per line. Raises DataError for a missing path or an unknown format.
    """
    text = str(path)
    if _is_brace_pattern(text):
        missing = [u for u in expand_urls(text) if not Path(u).is_file()]
        if missing:
            raise DataError(
                f"{text}: shard {missing[0]} does not exist ({len(missing)} of the pattern's "
                "shards are missing); check the brace range"
            )
        return "wds"
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p} does not exist; pass a data file or directory")
    supported = ", ".join(SUPPORTED_FORMATS)
    if p.is_dir():
        fmt = _dir_format(p)
        if fmt is not None:
            return fmt
        raise DataError(
            f"{p}: directory is not a known dataset (no world manifest.json, no .tar shards, no "
            f"class sub-folders with images); supported formats: {supported}"
        )
    _source_file(p)
    suffix = p.suffix.lower()
    simple = {".tar": "wds", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}
    if suffix in simple:
        return simple[suffix]
    if suffix == ".json":
        kind = _sniff_json(p)
        if kind is not None:
            return kind
        raise DataError(
            f"{p}: JSON that is neither COCO (an object with 'images' and 'annotations') nor "
            "JSONL (one object per line)"
        )
    raise DataError(f"{p}: unknown data format '{suffix}'; supported formats: {supported}")


# ---------------------------------------------------------------------------------------------
# decoding helpers: each raises _Skip with a reason code for a bad sample


def _regular(path: Path) -> Path:
    """``path`` when it is a regular file (symlinks followed); a FIFO, device or directory is a
    reject and is never opened."""
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        raise _Skip("missing_file", f"{path} does not exist ({type(exc).__name__})") from exc
    if not stat.S_ISREG(mode):
        raise _Skip("not_regular_file", f"{path} is not a regular file (FIFO, device, folder)")
    return path


def _decode_image(data: bytes | Path, reason: str = "undecodable_image") -> Image.Image:
    """An RGB image; more than MAX_PIXELS (from the header, before decoding) is a reject."""
    src = io.BytesIO(data) if isinstance(data, bytes) else _regular(data)
    try:
        # record=True: Pillow's DecompressionBombWarning (over ~89 Mpx) is not printed; the cap
        # below is lower. Over ~179 Mpx Pillow raises DecompressionBombError itself.
        with warnings.catch_warnings(record=True), Image.open(src) as im:  # header only
            width, height = im.size
            if width * height > MAX_PIXELS:
                raise _Skip(
                    "too_many_pixels",
                    f"{width}x{height} = {width * height} pixels, over the cap of "
                    f"{MAX_PIXELS} (MAX_PIXELS)",
                )
            im.load()  # decode now, so a truncated file fails here and not later in a batch
            return im.convert("RGB")
    except _Skip:
        raise
    except Image.DecompressionBombError as exc:
        raise _Skip("too_many_pixels", f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        raise _Skip(reason, f"{type(exc).__name__}: {exc}") from exc


def resample_audio(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """(S,) at `rate` -> about S * target / rate samples at `target` (polyphase filter)."""
    if rate == target:
        return wave
    from scipy.signal import resample_poly

    g = math.gcd(int(rate), int(target))
    return resample_poly(wave, int(target) // g, int(rate) // g).astype(np.float32)


def fit_clip(wave: np.ndarray, n: int) -> np.ndarray:
    """Centre-crop or zero-pad a (S,) waveform to exactly n samples."""
    if len(wave) >= n:
        start = (len(wave) - n) // 2
        return np.ascontiguousarray(wave[start : start + n], dtype=np.float32)
    out = np.zeros(n, dtype=np.float32)
    out[: len(wave)] = wave
    return out


def sample_frame_indices(
    n_total: int, n: int, *, mode: str = "uniform", generator: np.random.Generator | None = None
) -> np.ndarray:
    """(n,) frame indices out of `n_total`, TSN-style: the clip is cut into n equal segments and
    each gives its middle frame ("uniform") or a random one ("random"); short clips repeat frames."""
    if n_total < 1 or n < 1:
        raise DataError(f"frame sampling needs n_total >= 1 and n >= 1 (got {n_total}, {n})")
    edges = np.linspace(0, n_total, n + 1)
    if mode == "uniform":
        pos = (edges[:-1] + edges[1:]) / 2
    elif mode == "random":
        rng = generator if generator is not None else np.random.default_rng()
        pos = edges[:-1] + rng.random(n) * (edges[1:] - edges[:-1])
    else:
        raise DataError(f"frame sampling mode {mode!r}: use 'uniform' or 'random'")
    return np.minimum(np.floor(pos).astype(np.int64), n_total - 1)


def _decode_audio(data: bytes | Path, target_rate: int | None = None) -> tuple[np.ndarray, int]:
    """WAV/FLAC/OGG via soundfile, mixed down to mono, resampled to `target_rate` if given."""
    try:
        src = io.BytesIO(data) if isinstance(data, bytes) else data
        wave, rate = soundfile.read(src, dtype="float32", always_2d=True)  # (T, channels)
    except Exception as exc:
        raise _Skip("undecodable_audio", f"{type(exc).__name__}: {exc}") from exc
    mono = np.ascontiguousarray(wave.mean(axis=1), dtype=np.float32)  # (T,)
    if target_rate is not None and int(rate) != target_rate:
        return resample_audio(mono, int(rate), target_rate), target_rate
    return mono, int(rate)


def _decode_av(src: io.BytesIO | Path) -> np.ndarray:
    """Every frame of the first video stream of a container file (mp4, webm ...) via PyAV."""
    import av

    with av.open(src if isinstance(src, io.BytesIO) else str(src)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError("the video stream has no frames")
    return np.stack(frames)  # (T, H, W, 3)


def _decode_video(
    data: bytes | Path, suffix: str = ".npy", num_frames: int | None = None
) -> np.ndarray:
    """A (T, H, W, 3) uint8 clip from .npy or a container PyAV reads; `num_frames` sampled
    uniformly when given."""
    try:
        src = io.BytesIO(data) if isinstance(data, bytes) else data
        suffix = (data.suffix if isinstance(data, Path) else suffix).lower()
        video = _decode_av(src) if suffix in VIDEO_EXTS else np.load(src, allow_pickle=False)
    except Exception as exc:
        raise _Skip("bad_video", f"{type(exc).__name__}: {exc}") from exc
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise _Skip("bad_video", f"want uint8 (T, H, W, 3), got {video.dtype} {video.shape}")
    if num_frames is not None:
        video = video[sample_frame_indices(len(video), num_frames)]
    return video  # (T, H, W, 3)


def _captions(value: Any) -> list[str]:
    """A caption cell (string or list of strings) as a non-empty list of stripped captions."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(c, str) for c in items):
        raise _Skip("bad_caption", f"caption must be a string or a list of strings, got {value!r}")
    captions = [c.strip() for c in items if c.strip()]
    if not captions:
        raise _Skip("empty_caption", f"caption is empty: {value!r}")
    longest = max(len(c) for c in captions)
    if longest > MAX_CAPTION_CHARS:
        raise _Skip(
            "caption_too_long",
            f"a caption of {longest} characters, over the cap of {MAX_CAPTION_CHARS} "
            "(MAX_CAPTION_CHARS)",
        )
    return captions


def _guarded(
    rows: Iterable[tuple[str, Any]],
    build: Callable[[str, Any], dict[str, Any]],
    source: str,
    opts: _Options,
) -> Iterator[dict[str, Any]]:
    """Build one sample per ``(key, row)``; a _Skip becomes a reject and the stream goes on."""
    for key, row in rows:
        try:
            sample = build(key, row)
        except _Skip as skip:
            opts.rejects.add(key=key, reason=skip.reason, source=source, detail=skip.detail)
            continue
        yield sample


# ---------------------------------------------------------------------------------------------
# tabular readers: CSV / TSV / JSONL / COCO

_MEDIA = ("audio", "video")
_LONE_CR = re.compile(r"(?<=\r)(?!\n)")  # the empty string after a \r that ends a line


def _open_source(path: Path) -> IO[bytes]:
    try:
        return open(_source_file(path), "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from exc


def _lines(fh: IO[bytes]) -> Iterator[str | _Skip]:
    """The lines of a binary file, decoded as UTF-8 and split at \\n, \\r\\n and a lone \\r (as
    universal newlines do); a line that is not UTF-8, or over MAX_LINE_BYTES (read past in
    chunks, never held whole), comes as the _Skip rejecting it."""
    cap = MAX_LINE_BYTES
    first = True
    while raw := fh.readline(cap + 1):
        if first:
            raw, first = raw.removeprefix(codecs.BOM_UTF8), False
        if len(raw) > cap and not raw.endswith(b"\n"):
            size = len(raw)
            while raw and not raw.endswith(b"\n"):
                raw = fh.readline(2**16)
                size += len(raw)
            yield _Skip("line_too_long", f"{size} bytes, over the cap of {cap} (MAX_LINE_BYTES)")
            continue
        try:
            line, valid = raw.decode("utf-8"), True
        except UnicodeDecodeError:  # bad bytes become lone surrogates, found line by line below
            line, valid = raw.decode("utf-8", "surrogateescape"), False
        # classic Mac line ends: a lone \r inside the \n-line ends a line too
        parts = _LONE_CR.split(line) if "\r" in line.rstrip("\r\n") else [line]
        for part in filter(None, parts):
            if not valid:
                try:
                    part.encode("utf-8")
                except UnicodeEncodeError as exc:
                    where = f"character {exc.start} of the line"
                    yield _Skip("not_utf8", f"not UTF-8 at {where}; save the file as UTF-8")
                    continue
            yield part


def _csv_records(fh: IO[bytes], delimiter: str) -> Iterator[tuple[int, list[str] | _Skip]]:
    """``(last line number, cells)`` per CSV record, or the _Skip of a record that holds a bad
    line (not UTF-8, too long) or that the csv module refuses (a field over its size limit)."""
    bad: dict[int, _Skip] = {}

    def text() -> Iterator[str]:
        for number, line in enumerate(_lines(fh), start=1):
            if isinstance(line, _Skip):
                bad[number] = line
                line = "\n"  # an empty record, or an empty line inside a quoted field
            yield line

    reader = csv.reader(text(), delimiter=delimiter)
    while True:
        try:
            record: list[str] | _Skip = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # the reader starts afresh on the next line
            reason = "field_too_long" if "field larger" in str(exc) else "bad_row"
            record = _Skip(reason, f"csv: {exc}")
        held = sorted(n for n in bad if n <= reader.line_num)
        if held:
            record = bad[held[0]]
            for n in held:
                del bad[n]
        if record != []:  # blank lines are no records
            yield reader.line_num, record


def _resolve(cell: str, base: Path) -> str:
    """A table cell's file path, normalised (``./a.png`` and ``a.png`` are one file)."""
    path = Path(cell)
    return os.path.normpath(path if path.is_absolute() else base / path)


def path_key(path: str | Path, base: str | Path) -> str:
    """The key of a file a table names: its path relative to the table's folder, with ``/``
    (``images/0001.jpg``; ``../shared/a.png`` outside it). Never absolute, so a key shows no
    more of the machine's layout than the table does."""
    return Path(os.path.relpath(path, base)).as_posix()


@dataclass
class _Row:
    """One parsed table row before its files are opened; rows naming one file merge."""

    line_key: str  # where it is in the file (line000003): the key of its rejects
    own_key: str | None  # a `key` or `id` cell
    fields: dict[str, Any]  # pass-through cells
    text: list[str]
    media: dict[str, str]  # {"image" | "audio" | "video": normalised path}

    @property
    def identity(self) -> str:
        """The file that makes rows one item: the image, else the audio, else the video."""
        return next(self.media[m] for m in ("image", *_MEDIA) if m in self.media)


def _row(line_key: str, fields: dict[str, Any], base: Path, opts: _Options) -> _Row:
    """Check one row's captions and media cells (no file is opened yet)."""
    text = _captions(fields.get(opts.caption_key) or "")
    media = {}
    for kind, column in (("image", opts.image_key), *((m, m) for m in _MEDIA)):
        cell = fields.get(column)
        if cell not in (None, ""):
            media[kind] = _resolve(str(cell), base)
    if not media:
        raise _Skip("missing_image", f"no '{opts.image_key}' (or audio/video) value in this row")
    own = fields.get("key") or fields.get("id")
    used = {opts.image_key, opts.caption_key, *_MEDIA, "key", "id"}
    passthrough = {k: v for k, v in fields.items() if k not in used and k not in _RESERVED}
    return _Row(
        line_key=line_key,
        own_key=str(own) if own not in (None, "") else None,
        fields=passthrough,
        text=text,
        media=media,
    )


def _open_media(media: dict[str, str], opts: _Options) -> dict[str, Any]:
    """Open and decode the image / audio / video files of one item."""
    out: dict[str, Any] = {}
    if "image" in media:
        path = _regular(Path(media["image"]))
        out["image_path"] = str(path)
        out["image"] = _decode_image(path) if opts.decode else str(path)
    if "audio" in media:
        path = _regular(Path(media["audio"]))
        if opts.decode:
            out["audio"], out["sample_rate"] = _decode_audio(path, opts.sample_rate)
        else:
            out["audio"] = str(path)
    if "video" in media:
        path = _regular(Path(media["video"]))
        out["video"] = _decode_video(path, num_frames=opts.num_frames) if opts.decode else str(path)
    return out


def _merged_rows(
    read: Callable[[], Iterator[tuple[str, Any]]],
    parse: Callable[[str, Any], _Row],
    table: Path,
    opts: _Options,
) -> Iterator[dict[str, Any]]:
    """One sample per file the rows name, holding every caption of its rows in file order.

    A first pass counts the rows of each file, so an item is yielded at its last row: a table
    sorted by image holds one item at a time, and its rejects come in line order. The key is
    the first `key`/`id` cell of its rows, else :func:`path_key`; each other cell is the first
    row's that fills it.
    """
    remaining: Counter[str] = Counter()
    for line_key, raw in read():
        with contextlib.suppress(_Skip):
            remaining[parse(line_key, raw).identity] += 1

    def finish(line_key: str, row: _Row) -> dict[str, Any]:
        media = _open_media(row.media, opts)
        key = row.own_key or path_key(row.identity, table.parent)
        return {**row.fields, "key": key, "source": str(table), **media, "text": row.text}

    pending: dict[str, _Row] = {}
    for line_key, raw in read():
        try:
            row = parse(line_key, raw)
        except _Skip as skip:
            opts.rejects.add(
                key=line_key, reason=skip.reason, source=str(table), detail=skip.detail
            )
            continue
        first = pending.setdefault(row.identity, row)
        if first is not row:
            first.text.extend(row.text)
            first.own_key = first.own_key or row.own_key
            for name, value in row.fields.items():
                if first.fields.get(name) in (None, ""):  # the first row that fills a cell
                    first.fields[name] = value
        remaining[row.identity] -= 1
        if remaining[row.identity] <= 0:
            done = pending.pop(row.identity)
            yield from _guarded([(done.line_key, done)], finish, str(table), opts)
    # rows the first pass did not see (the file changed in between) still come out
    yield from _guarded(((r.line_key, r) for r in pending.values()), finish, str(table), opts)


def _read_table(path: Path, opts: _Options, delimiter: str) -> Iterator[dict[str, Any]]:
    """CSV/TSV with a header, one caption per row; rows naming one image merge into one item."""
    with _open_source(path) as fh:
        _, header = next(_csv_records(fh, delimiter), (0, []))
    if isinstance(header, _Skip):
        raise DataError(f"{path}: the header line is unreadable: {header.detail}")
    columns = list(header)
    # Audio or video columns can stand in for the image column; captions are required.
    if not {opts.image_key, *_MEDIA} & set(columns):
        raise DataError(
            f"{path}: no '{opts.image_key}' column; columns are {columns}; "
            f"name the right one with {opts.key_fix['image'].format('COLUMN')}"
        )
    if opts.caption_key not in columns:
        raise DataError(
            f"{path}: no '{opts.caption_key}' column; columns are {columns}; "
            f"name the right one with {opts.key_fix['caption'].format('COLUMN')}"
        )

    def read() -> Iterator[tuple[str, list[str] | _Skip]]:
        with _open_source(path) as fh:
            records = _csv_records(fh, delimiter)
            next(records, None)  # the header
            for number, cells in records:
                yield f"line{number:06d}", cells

    def parse(line_key: str, cells: list[str] | _Skip) -> _Row:
        if isinstance(cells, _Skip):
            raise cells
        if len(cells) > len(columns):
            raise _Skip("bad_row", f"{len(cells)} cells, header has {len(columns)}")
        row: dict[str, Any] = dict.fromkeys(columns)  # missing cells are None
        row.update(zip(columns, cells, strict=False))
        return _row(line_key, row, path.parent, opts)

    yield from _merged_rows(read, parse, path, opts)


def _read_jsonl(path: Path, opts: _Options) -> Iterator[dict[str, Any]]:
    """One JSON object per line; ``caption`` may be a string or a list of strings; lines naming
    one image merge into one item."""
    first_fields: list[list[str]] = []  # fields of the first object, for the error message

    def read() -> Iterator[tuple[str, str | _Skip]]:
        with _open_source(path) as fh:
            for i, line in enumerate(_lines(fh), start=1):
                if isinstance(line, _Skip) or line.strip():
                    yield f"line{i:06d}", line

    def parse(line_key: str, line: str | _Skip) -> _Row:
        if isinstance(line, _Skip):
            raise line
        try:
            obj = _parse_json(line)
        except ValueError as exc:
            raise _Skip("bad_json", str(exc)) from exc
        if not isinstance(obj, dict):
            raise _Skip("bad_json", f"line is a {type(obj).__name__}, not an object")
        first_fields[:] = first_fields or [sorted(obj)]
        if opts.caption_key not in obj:
            raise _Skip("missing_caption", f"no '{opts.caption_key}' field")
        return _row(line_key, obj, path.parent, opts)

    before = Counter(opts.rejects.by_reason)
    n_yielded = 0
    for sample in _merged_rows(read, parse, path, opts):
        n_yielded += 1
        yield sample
    # A field name that is wrong on every line is a flag problem, not a data problem.
    new = set(opts.rejects.by_reason - before)
    for reason, field, kind in (
        ("missing_image", opts.image_key, "image"),
        ("missing_caption", opts.caption_key, "caption"),
    ):
        if n_yielded == 0 and new == {reason}:
            raise DataError(
                f"{path}: no line has a '{field}' field; fields are {first_fields[0]}; "
                f"name the right one with {opts.key_fix[kind].format('FIELD')}"
            )


def _coco_image_path(file_name: str, json_path: Path, image_root: Path | None) -> Path:
    if image_root is not None:
        candidates = [image_root / file_name]
    else:
        here = json_path.parent
        # captions_train2017.json -> train2017/, next to the json or one level up (COCO layout)
        split_dir = json_path.stem.split("_")[-1]
        candidates = [
            here / file_name,
            here / "images" / file_name,
            here / split_dir / file_name,
            here.parent / split_dir / file_name,
        ]
    for candidate in candidates:
        if candidate.exists():
            return _regular(candidate)
    raise _Skip("missing_file", f"{file_name} not found in {[str(c.parent) for c in candidates]}")


def _coco_id(value: Any) -> bool:
    """COCO ids are ints (strings are accepted); a list, float, bool or null is not an id."""
    return isinstance(value, int | str) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _read_coco(path: Path, opts: _Options) -> Iterator[dict[str, Any]]:
    """COCO captions: all captions of one image are kept together in ``text``."""
    try:
        data = _parse_json(_read_text(path))
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    for name in ("images", "annotations"):
        if not isinstance(data.get(name) or [], list):
            kind = type(data[name]).__name__
            raise DataError(f"{path}: COCO '{name}' must be a list, got {kind}")
    annotations = data.get("annotations") or []
    if annotations and not any(isinstance(a, dict) and "caption" in a for a in annotations):
        raise DataError(
            f"{path}: COCO annotations hold no 'caption'; this reader reads caption files "
            "(captions_*.json), not instances or keypoints"
        )
    captions: dict[int | str, list[Any]] = {}
    for i, ann in enumerate(annotations):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if isinstance(ann, dict) and "caption" not in ann:
            continue
        if not _coco_id(image_id):
            detail = f"a caption annotation needs an int 'image_id': {_short(ann)}"
            opts.rejects.add(
                key=f"annotation{i:06d}", reason="bad_annotation", source=str(path), detail=detail
            )
            continue
        captions.setdefault(image_id, []).append(ann["caption"])

    def build(key: str, info: Any) -> dict[str, Any]:
        if not isinstance(info, dict):
            raise _Skip("bad_row", f"image entry is a {type(info).__name__}, not an object")
        image_id, file_name = info.get("id"), info.get("file_name")
        if not _coco_id(image_id):
            raise _Skip("bad_row", f"image entry needs an int 'id': {_short(info)}")
        if not isinstance(file_name, str) or not file_name:
            raise _Skip("bad_row", f"image entry needs a 'file_name' string: {_short(info)}")
        if image_id not in captions:
            raise _Skip("missing_caption", f"no caption annotation for image id {key}")
        text = _captions(captions[image_id])
        image_path = _coco_image_path(file_name, path, opts.image_root)
        image = _decode_image(image_path) if opts.decode else str(image_path)
        sample = {"key": key, "source": str(path), "image": image, "text": text}
        return {**sample, "image_path": str(image_path), "image_id": image_id}

    rows = (
        (str(x["id"]) if isinstance(x, dict) and _coco_id(x.get("id")) else f"image{i:06d}", x)
        for i, x in enumerate(data.get("images") or [])
    )
    yield from _guarded(rows, build, str(path), opts)


# ---------------------------------------------------------------------------------------------
# Karpathy split JSON (dataset_coco.json, dataset_flickr30k.json, dataset_flickr8k.json)


def _is_karpathy(data: Any) -> bool:
    """An object whose 'images' entries carry 'sentences' (and which has no COCO 'annotations')."""
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list) or "annotations" in data:
        return False
    first = next((x for x in images if isinstance(x, dict)), None)
    return first is not None and "sentences" in first and "filename" in first


def _read_karpathy(path: Path, opts: _Options) -> Iterator[dict[str, Any]]:
    """Karpathy's split files: ``images[]`` with ``filename`` (under ``filepath`` for COCO),
    ``split`` and ``sentences[].raw``; one sample per image with all its sentences. Images are
    looked for under ``image_root`` (default: the JSON's folder), at ``filepath/filename`` and
    at ``filename``. ``split`` keeps one split (train, val, test, restval)."""
    try:
        data = _parse_json(_read_text(path))
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    images = data["images"]
    if opts.split is not None:
        splits = sorted({str(x.get("split")) for x in images if isinstance(x, dict)})
        if opts.split not in splits:
            raise DataError(f"{path}: no image has split {opts.split!r}; splits: {splits}")
    root = opts.image_root if opts.image_root is not None else path.parent

    def build(key: str, info: Any) -> dict[str, Any]:
        if not isinstance(info, dict):
            raise _Skip("bad_row", f"image entry is a {type(info).__name__}, not an object")
        filename, folder = info.get("filename"), info.get("filepath") or ""
        if not isinstance(filename, str) or not filename or not isinstance(folder, str):
            raise _Skip("bad_row", f"image entry needs a 'filename' string: {_short(info)}")
        sentences = info.get("sentences")
        if not isinstance(sentences, list) or not all(
            isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences
        ):
            raise _Skip(
                "bad_caption", f"'sentences' must be a list of {{'raw': str}}: {_short(info)}"
            )
        text = _captions([s["raw"] for s in sentences])
        candidates = dict.fromkeys([root / folder / filename, root / filename])
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise _Skip(
                "missing_file", f"{filename} not found in {[str(c.parent) for c in candidates]}"
            )
        image_path = _regular(found)
        image = _decode_image(image_path) if opts.decode else str(image_path)
        ids = {k: info[k] for k in ("imgid", "cocoid") if _coco_id(info.get(k))}
        sample = {"key": key, "source": str(path), "image": image, "text": text}
        return {**sample, "image_path": str(image_path), "split": info.get("split"), **ids}

    rows = (
        (
            Path(x.get("filepath") or "", str(x.get("filename"))).as_posix()
            if isinstance(x, dict)
            else f"image{i:06d}",
            x,
        )
        for i, x in enumerate(images)
        if opts.split is None or (isinstance(x, dict) and x.get("split") == opts.split)
    )
    yield from _guarded(rows, build, str(path), opts)


# ---------------------------------------------------------------------------------------------
# image folder


def _read_imagefolder(root: Path, opts: _Options) -> Iterator[dict[str, Any]]:
    """``root/CLASS/*.png``: label = folder name, caption from ``caption_template``."""

    def build(key: str, item: tuple[Path, str]) -> dict[str, Any]:
        image_path, label = item
        image = _decode_image(image_path) if opts.decode else str(_regular(image_path))
        caption = opts.caption_template.format(label=label.replace("_", " "))
        sample = {"key": key, "source": str(image_path), "image": image, "text": [caption]}
        return {**sample, "image_path": str(image_path), "label": label}

    rows = (
        (f"{class_dir.name}/{p.stem}", (p, class_dir.name))
        for class_dir in sorted(d for d in root.iterdir() if d.is_dir())
        for p in sorted(class_dir.iterdir())
        if p.suffix.lower() in IMAGE_EXTS
    )
    yield from _guarded(rows, build, str(root), opts)


# ---------------------------------------------------------------------------------------------
# webdataset tars (world and generic)


def _decode_member(suffix: str, data: bytes, sample: dict[str, Any], opts: _Options) -> None:
    """Decode one tar member into ``sample``; suffix is everything after the key's first dot."""
    last = suffix.rsplit(".", 1)[-1]
    if suffix == "ocr.png":
        sample["ocr_image"] = _decode_image(data, "undecodable_ocr_image") if opts.decode else data
    elif "." + last in IMAGE_EXTS and (opts.image_key in ("image", suffix)):
        sample["image"] = _decode_image(data) if opts.decode else data
    elif last in ("wav", "flac", "ogg"):
        if opts.decode:
            sample["audio"], sample["sample_rate"] = _decode_audio(data, opts.sample_rate)
        else:
            sample["audio"] = data
    elif last == "npy" or "." + last in VIDEO_EXTS:
        decoded = _decode_video(data, "." + last, opts.num_frames) if opts.decode else data
        sample["video"] = decoded
    elif suffix == "json":
        try:
            meta = _parse_json(data.decode("utf-8"))
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise _Skip("bad_json", f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(meta, dict):
            raise _Skip("bad_json", f".json member is a {type(meta).__name__}, not an object")
        for field in (opts.caption_key, "captions", "text"):
            if field in meta:
                sample["text"] = _captions(meta.pop(field))
                break
        for k, v in meta.items():
            if k not in _RESERVED:
                sample.setdefault(k, v)
    elif suffix in ("txt", "caption", opts.caption_key):
        if len(data) > 4 * MAX_CAPTION_CHARS:  # a UTF-8 character is at most 4 bytes
            raise _Skip("caption_too_long", f"a {len(data)}-byte caption member")
        try:
            sample["text"] = _captions(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise _Skip("bad_caption", f"caption is not UTF-8: {exc}") from exc
    elif suffix == "cls":
        value = data.decode("utf-8", "replace").strip()
        sample["label"] = int(value) if value.lstrip("-").isdigit() else value


def _tar_complete(path: Path) -> bool:
    """A whole tar ends with two zero 512-byte blocks; Python's tarfile stops silently without."""
    size = path.stat().st_size
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as fh:
        fh.seek(size - 1024)
        return not any(fh.read(1024))


def _read_tars(urls: list[str], opts: _Options) -> Iterator[dict[str, Any]]:
    """Raw members via webdataset's tar iterators, decoded here so one bad member is a reject."""

    def on_error(exc: Exception) -> bool:
        source = next((str(a) for a in exc.args[1:] if isinstance(a, str)), urls[0])
        opts.rejects.add(key="(shard)", reason="bad_shard", source=source, detail=str(exc.args[0]))
        return True  # keep going with the next shard

    readable = []
    for url in urls:
        try:
            _regular(Path(url))
        except _Skip as skip:  # a FIFO would block the tar reader
            opts.rejects.add(key="(shard)", reason="bad_shard", source=url, detail=skip.detail)
            continue
        readable.append(url)
        if not _tar_complete(Path(url)):
            detail = "no end-of-archive blocks: the shard is cut short, its last samples are lost"
            opts.rejects.add(key="(shard)", reason="truncated_shard", source=url, detail=detail)
    for raw in tarfile_samples(({"url": u} for u in readable), handler=on_error):
        key, source = raw["__key__"], raw["__url__"]
        sample: dict[str, Any] = {"key": key, "source": source}
        try:
            for suffix, data in raw.items():
                if not suffix.startswith("__"):
                    _decode_member(suffix, data, sample, opts)
            if not {"image", "audio", "video", "text"} & set(sample):
                raise _Skip("no_content", f"members {sorted(raw)} hold no image/audio/video/text")
        except _Skip as skip:
            opts.rejects.add(key=key, reason=skip.reason, source=source, detail=skip.detail)
            continue
        yield sample


def _tar_urls(path: str | Path, split: str | None) -> list[str]:
    text = str(path)
    if _is_brace_pattern(text):
        return expand_urls(text)
    p = Path(path)
    if p.is_file():
        if split is not None:
            raise DataError(f"{p}: --split applies to a world or a directory of split folders")
        return [str(p)]
    if split is not None:
        shards = sorted((p / split).glob("*.tar"))
        if not shards:
            found = sorted(d.name for d in p.iterdir() if d.is_dir() and any(d.glob("*.tar")))
            raise DataError(
                f"{p}: no .tar shards in split folder '{split}'; split folders: {found}"
            )
        return [str(s) for s in shards]
    shards = sorted(p.glob("*.tar"))
    if not shards:
        found = sorted(d.name for d in p.iterdir() if d.is_dir() and any(d.glob("*.tar")))
        raise DataError(f"{p}: shards live in split folders {found}; choose one with --split NAME")
    return [str(s) for s in shards]


def _world_shards(root: Path, manifest: dict[str, Any], split: str) -> list[Path]:
    """The shard files of one world split, as listed by the manifest.

    ``manifest["splits"][split]["shards"]`` lists entries ``{"path": "train/shard-000000.tar",
    ...}`` (plain path strings work too); without a list the shards are ``root/SPLIT/*.tar``.
    """
    splits = manifest.get("splits") or {}
    if splits and split not in splits:
        raise DataError(
            f"{root}: world has no split '{split}'; splits: {list(splits)}; use --split"
        )
    entry = splits.get(split)
    listed = entry.get("shards") if isinstance(entry, dict) else entry
    if isinstance(listed, list):
        shards = [root / (s["path"] if isinstance(s, dict) else s) for s in listed]
        missing = [s for s in shards if not s.is_file()]
        if missing:
            raise DataError(
                f"{root}: manifest lists shard {missing[0]} which does not exist; "
                f"regenerate it with `polysense world generate --out {root}`"
            )
        return shards
    shards = sorted((root / split).glob("*.tar"))
    if not shards:
        raise DataError(f"{root}: no shards for split '{split}' (looked for {split}/*.tar)")
    return shards


def _read_world(root: Path, opts: _Options) -> Iterator[dict[str, Any]]:
    manifest = _world_manifest(root)
    assert manifest is not None
    shards = _world_shards(root, manifest, opts.split or "train")
    yield from _read_tars([str(s) for s in shards], opts)


# ---------------------------------------------------------------------------------------------
# entry point


def read_samples(
    path: str | Path,
    *,
    split: str | None = None,
    image_key: str = "image",
    caption_key: str = "caption",
    rejects: Rejects | None = None,
    limit: int | None = None,
    decode: bool = True,
    image_root: str | Path | None = None,
    caption_template: str = "a photo of a {label}",
    sample_rate: int | None = None,
    num_frames: int | None = None,
    key_fix: Mapping[str, str] = FLAG_FIX,
) -> Iterator[dict[str, Any]]:
    """Stream the samples of any supported source (format from :func:`detect_format`).

    ``split`` picks a world split (default ``train``) or a split folder of tar shards.
    ``decode=False`` leaves images/audio/video undecoded: file paths (tabular, image folder) or
    raw bytes (tars). ``limit`` stops after that many good samples. Bad samples go to ``rejects``.
    ``sample_rate`` resamples every audio clip to that rate; ``num_frames`` samples that many
    frames (uniformly) from every video, .npy or a container PyAV decodes (mp4, webm ...).
    ``key_fix`` is how a wrong-column error names the fix: :data:`FLAG_FIX` (``--image-key``)
    or :data:`CONFIG_FIX` (``--set data.image_key=``, for config-driven runs such as `train`).
    """
    fmt = detect_format(path)
    if split is not None and fmt not in ("world", "wds", "karpathy"):
        raise DataError(
            f"{path}: --split applies to a world, tar shards or a Karpathy JSON, not to {fmt}"
        )
    opts = _Options(
        split=split,
        image_key=image_key,
        caption_key=caption_key,
        decode=decode,
        image_root=Path(image_root) if image_root is not None else None,
        caption_template=caption_template,
        rejects=rejects if rejects is not None else Rejects(),
        sample_rate=sample_rate,
        num_frames=num_frames,
        key_fix=key_fix,
    )
    readers: dict[str, Callable[[], Iterator[dict[str, Any]]]] = {
        "world": lambda: _read_world(Path(path), opts),
        "wds": lambda: _read_tars(_tar_urls(path, split), opts),
        "csv": lambda: _read_table(Path(path), opts, ","),
        "tsv": lambda: _read_table(Path(path), opts, "\t"),
        "jsonl": lambda: _read_jsonl(Path(path), opts),
        "coco": lambda: _read_coco(Path(path), opts),
        "karpathy": lambda: _read_karpathy(Path(path), opts),
        "imagefolder": lambda: _read_imagefolder(Path(path), opts),
    }
    samples = readers[fmt]()
    return islice(samples, limit) if limit is not None else samples


# ---------------------------------------------------------------------------------------------
# random access for the streaming pipeline (polysense.data.pipeline)


def shard_files(path: str | Path, *, split: str | None) -> list[str] | None:
    """The local .tar shards of a world split (default train) or a webdataset source, in the
    order the tar reader reads them; None for the other formats (tables, COCO, image folders)."""
    fmt = detect_format(path)
    if fmt == "world":
        manifest = _world_manifest(Path(path))
        assert manifest is not None
        return [str(s) for s in _world_shards(Path(path), manifest, split or "train")]
    if fmt == "wds":
        return _tar_urls(path, split)
    return None


class SampleError(DataError):
    """One sample that cannot be decoded; `reason` is the reject code (``bad_json`` ...)."""

    def __init__(self, *, source: str, key: str, reason: str, detail: str) -> None:
        super().__init__(f"{source}: sample {key}: {reason} ({detail})")
        self.reason, self.detail = reason, detail


def decode_tar_sample(
    members: Iterable[tuple[str, bytes]],
    *,
    key: str,
    source: str,
    image_key: str = "image",
    caption_key: str = "caption",
    sample_rate: int | None = None,
) -> dict[str, Any]:
    """One tar sample from its (suffix, bytes) members, decoded member by member as the tar
    reader decodes it (same caps; audio resampled to `sample_rate` when given); a bad member
    raises SampleError naming the reason."""
    opts = _Options(
        split=None,
        image_key=image_key,
        caption_key=caption_key,
        decode=True,
        image_root=None,
        caption_template="",
        rejects=Rejects(),
        key_fix=CONFIG_FIX,
        sample_rate=sample_rate,
    )
    sample: dict[str, Any] = {"key": key, "source": source}
    try:
        for suffix, data in members:
            _decode_member(suffix, data, sample, opts)
    except _Skip as skip:
        raise SampleError(source=source, key=key, reason=skip.reason, detail=skip.detail) from None
    return sample
