"""Readers shared by the standard benchmark formats (VQAv2, POPE, COCO captions): a JSON or JSONL
file read with one-line errors, an image opened under --image-root, and the --split rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from polysense.errors import PolysenseError

# The sources with splits (`--split NAME` picks one), as the readers have them.
SPLIT_FORMATS = ("world", "wds", "karpathy")


def read_json(path: str | Path, what: str) -> Any:
    """A JSON document, or a JSONL file as a list of its lines' objects; `what` names the format."""
    p = Path(path)
    if not p.is_file():
        raise PolysenseError(f"{p} does not exist; pass {what}")
    text = p.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise PolysenseError(f"{p}:{n}: not JSON ({exc.msg}); pass {what}") from None
    return rows


def first_entry_has(data: str | Path, *names: str) -> bool:
    """Whether `data` is a JSON/JSONL file whose first entry has all the fields `names` (how a
    benchmark file of one format is told from the other sources)."""
    p = Path(data)
    if not p.is_file() or p.suffix.lower() not in (".json", ".jsonl"):
        return False
    try:
        rows = read_json(p, "a JSON or JSONL file")
    except PolysenseError:
        return False
    first = rows[0] if isinstance(rows, list) and rows else rows
    return isinstance(first, dict) and all(n in first for n in names)


def field(row: Any, name: str, where: str, fix: str) -> Any:
    """row[name], or a one-line error naming the file, the entry, the field and the fix."""
    if not isinstance(row, dict) or name not in row:
        raise PolysenseError(f"{where} has no {name!r} field; {fix}")
    return row[name]


def open_image(root: Path | None, name: str, where: str) -> Image.Image:
    """The RGB image `name` under `root` (or as given when `root` is None)."""
    path = Path(root) / name if root is not None else Path(name)
    if not path.is_file():
        raise PolysenseError(
            f"{where}: image {path} does not exist; pass --image-root, the folder that holds it"
        )
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as exc:
        raise PolysenseError(f"{where}: image {path} is not readable ({exc})") from None


def open_images(root: Path | None, named: list[tuple[str, str]]) -> list[Image.Image]:
    """The image of each (file name, where it is named), each file opened once."""
    opened: dict[str, Image.Image] = {}
    for name, where in named:
        if name not in opened:
            opened[name] = open_image(root, name, where)
    return [opened[name] for name, _ in named]


def no_split(split: str | None, data: str | Path, kind: str) -> None:
    """--split names a world's or a Karpathy JSON's split; `kind` sources have none."""
    if split is not None:
        raise PolysenseError(
            f"--split {split}: {data} is {kind}, which has no splits; drop --split "
            "(it applies to a world, tar shards or a Karpathy JSON)"
        )
