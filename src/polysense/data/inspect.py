"""`polysense data inspect`: read a source once, count what it holds, draw a contact sheet.

The report says how many samples, which modalities, how many captions and how many samples were
rejected and why; the contact sheet shows the first images with their first caption, so a wrong
image column or a broken caption template is visible at a glance.

A directory that is no dataset itself but holds several (a CSV, a JSONL, a COCO file, an image
folder ...) is inspected as a collection: each source is read with its own format into one report
and one rejects file, and a source that cannot be read at all is one ``unreadable_source`` reject.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from polysense.data.readers import Rejects, collection_sources, detect_format, read_samples
from polysense.errors import DataError
from polysense.fileio import atomic_open

# Modalities counted in the report, in display order.
MODALITIES = ("image", "text", "audio", "video", "ocr_image", "ocr_text", "objects", "qa", "label")
# Contact sheet geometry (pixels): each tile is a TILE x TILE image over CAPTION_LINES of text.
TILE = 128
PAD = 8
LINE_H = 14
CAPTION_LINES = 3


@dataclass(frozen=True)
class InspectReport:
    """What `inspect` found; ``splits`` holds the manifest's per-split counts for a world, and
    ``sources`` the number of sources per format for a collection."""

    path: str
    format: str
    n_samples: int
    modalities: dict[str, int]
    n_captions: int
    rejected: int
    reasons: dict[str, int]
    rejects_path: str | None = None
    sheet_path: str | None = None
    split: str | None = None
    splits: dict[str, int] | None = field(default=None)
    sources: dict[str, int] | None = field(default=None)


def _manifest_counts(root: Path) -> dict[str, int] | None:
    """Per-split sample counts from a world manifest.json (``splits[SPLIT]["count"]``)."""
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    counts: dict[str, int] = {}
    for name, entry in (manifest.get("splits") or {}).items():
        if isinstance(entry, int):
            counts[name] = entry
        elif isinstance(entry, dict):
            value = next(
                (entry[k] for k in ("count", "n_samples", "n") if isinstance(entry.get(k), int)),
                None,
            )
            if value is not None:
                counts[name] = value
    return counts or None


def _read_collection(
    sources: list[Path], formats: Counter[str], rejects: Rejects, **options: Any
) -> Iterator[dict[str, Any]]:
    """The samples of every source in turn, each read with its own format (counted in
    ``formats``); a source that cannot be read at all becomes one ``unreadable_source`` reject."""
    for source in sources:
        try:
            formats[detect_format(source)] += 1
            yield from read_samples(source, rejects=rejects, **options)
        except (DataError, OSError) as exc:
            rejects.add(
                key="(source)", reason="unreadable_source", source=str(source), detail=str(exc)
            )


def _progress(samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Show a rich spinner with a running count when stderr is a terminal."""
    if not sys.stderr.isatty():
        yield from samples
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn

    columns = (SpinnerColumn(), TextColumn("reading samples: {task.completed}"))
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("read", total=None)
        for sample in samples:
            bar.advance(task)
            yield sample


def _thumbnail(sample: dict[str, Any]) -> Image.Image:
    """The sample's picture (image, OCR image or first video frame) fitted into TILE x TILE."""
    picture = sample.get("image")
    if not isinstance(picture, Image.Image):
        picture = sample.get("ocr_image")
    if not isinstance(picture, Image.Image) and isinstance(sample.get("video"), np.ndarray):
        picture = Image.fromarray(sample["video"][0])  # first frame, (H, W, 3)
    tile = Image.new("RGB", (TILE, TILE), (40, 40, 40))
    if not isinstance(picture, Image.Image):
        ImageDraw.Draw(tile).text((PAD, TILE // 2), "no image", fill=(200, 200, 200))
        return tile
    scale = TILE / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    # Nearest keeps tiny procedural images crisp when enlarged; Lanczos for shrinking photos.
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    fitted = picture.convert("RGB").resize(size, resample)
    tile.paste(fitted, ((TILE - size[0]) // 2, (TILE - size[1]) // 2))
    return tile


def sheet_size(n: int) -> tuple[int, int]:
    """(width, height) of a contact sheet with ``n`` tiles: a near-square grid, PAD between."""
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    cell_h = TILE + CAPTION_LINES * LINE_H
    return cols * (TILE + PAD) + PAD, rows * (cell_h + PAD) + PAD


def tile_origin(i: int, n: int) -> tuple[int, int]:
    """Top-left pixel of tile ``i`` in a sheet of ``n`` tiles (row-major)."""
    cols = max(1, math.ceil(math.sqrt(n)))
    cell_h = TILE + CAPTION_LINES * LINE_H
    return PAD + (i % cols) * (TILE + PAD), PAD + (i // cols) * (cell_h + PAD)


def write_contact_sheet(samples: list[dict[str, Any]], path: str | Path) -> Path:
    """Draw ``samples`` as a grid of tiles with their first caption wrapped below; atomic write."""
    path = Path(path)
    n = max(1, len(samples))
    sheet = Image.new("RGB", sheet_size(n), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    chars = max(8, int(TILE / max(1.0, draw.textlength("x", font=font))))
    for i, sample in enumerate(samples):
        x, y = tile_origin(i, n)
        sheet.paste(_thumbnail(sample), (x, y))
        caption = (sample.get("text") or [""])[0]
        lines = textwrap.wrap(caption, width=chars, max_lines=CAPTION_LINES, placeholder="…")
        for j, line in enumerate(lines):
            draw.text((x, y + TILE + j * LINE_H), line, fill=(0, 0, 0), font=font)
    with atomic_open(path, "wb") as fh:
        sheet.save(fh, format="PNG")
    return path


def inspect(
    path: str | Path,
    *,
    split: str | None = None,
    image_key: str = "image",
    caption_key: str = "caption",
    rejects_path: str | Path | None = None,
    sheet_path: str | Path | None = None,
    n_sheet: int = 16,
    limit: int | None = None,
) -> InspectReport:
    """Read ``path`` once and report counts, modalities and rejects; optionally draw a sheet.

    ``path`` may be a directory of several sources (see :func:`collection_sources`)."""
    sources = collection_sources(path)
    formats: Counter[str] = Counter()
    fmt = "collection" if sources else detect_format(path)
    if fmt == "collection" and split is not None:
        raise DataError(f"{path}: --split applies to one world or shard set, not a collection")
    if fmt == "world" and split is None:
        split = "train"
    counts = dict.fromkeys(MODALITIES, 0)
    n_samples = n_captions = 0
    shown: list[dict[str, Any]] = []
    with Rejects(rejects_path) as rejects:
        keys = {"image_key": image_key, "caption_key": caption_key}
        if sources:
            samples = islice(_read_collection(sources, formats, rejects, **keys), limit)
        else:
            samples = read_samples(path, split=split, rejects=rejects, limit=limit, **keys)
        for sample in _progress(samples):
            n_samples += 1
            n_captions += len(sample.get("text") or [])
            for name in MODALITIES:
                counts[name] += sample.get(name) is not None
            if sheet_path is not None and len(shown) < n_sheet:
                shown.append(sample)
    if sheet_path is not None:
        write_contact_sheet(shown, sheet_path)
    reasons = sorted(rejects.by_reason.items(), key=lambda kv: (-kv[1], kv[0]))
    return InspectReport(
        path=str(path),
        format=fmt,
        n_samples=n_samples,
        modalities={k: v for k, v in counts.items() if v},
        n_captions=n_captions,
        rejected=rejects.count,
        reasons=dict(reasons),
        rejects_path=str(rejects_path) if rejects_path is not None else None,
        sheet_path=str(sheet_path) if sheet_path is not None else None,
        split=split,
        splits=_manifest_counts(Path(path)) if fmt == "world" else None,
        sources=dict(sorted(formats.items())) if sources else None,
    )


def format_report(report: InspectReport) -> list[str]:
    """The lines `polysense data inspect` prints."""
    modalities = ", ".join(f"{k} {v}" for k, v in report.modalities.items()) or "none"
    lines = [f"path: {report.path}", f"format: {report.format}"]
    if report.split is not None:
        lines.append(f"split: {report.split}")
    if report.splits:
        lines.append(
            "splits (manifest): " + ", ".join(f"{k} {v}" for k, v in report.splits.items())
        )
    if report.sources is not None:
        read = ", ".join(f"{k} {v}" for k, v in report.sources.items()) or "none readable"
        lines.append(f"sources: {read}")
    lines += [
        f"samples: {report.n_samples}",
        f"captions: {report.n_captions}",
        f"modalities: {modalities}",
        f"rejected: {report.rejected}",
    ]
    lines += [f"  {reason}: {n}" for reason, n in report.reasons.items()]
    if report.rejects_path is not None:
        lines.append(f"rejects file: {report.rejects_path}")
    elif report.rejected:
        lines.append("rejects file: not written (pass --rejects FILE to keep the list)")
    if report.sheet_path is not None:
        lines.append(f"contact sheet: {report.sheet_path}")
    return lines
