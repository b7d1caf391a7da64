"""`data inspect`: counts, rejects and the contact sheet, on tiny hand-made sources."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from polysense.data.inspect import CAPTION_LINES, LINE_H, PAD, TILE, format_report, inspect
from polysense.errors import DataError

COLORS = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (250, 200, 0), (128, 0, 128)]


def write_png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def make_jsonl(root: Path) -> Path:
    """Five good lines with solid-colour 8x8 images, one corrupt PNG and one empty caption."""
    lines = []
    for i, color in enumerate(COLORS):
        write_png(root / f"{i}.png", color)
        lines.append({"image": f"{i}.png", "caption": [f"caption {i}", "second"]})
        if i == 1:
            good = (root / "0.png").read_bytes()
            (root / "bad.png").write_bytes(good[: len(good) // 2])
            lines.append({"image": "bad.png", "caption": "corrupt"})
        if i == 3:
            lines.append({"image": "0.png", "caption": "   "})
    path = root / "data.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def tile_center(i: int, cols: int) -> tuple[int, int]:
    """Hand-computed centre of tile i: tiles TILE wide, captions below, PAD around each."""
    cell_h = TILE + CAPTION_LINES * LINE_H
    x = PAD + (i % cols) * (TILE + PAD) + TILE // 2
    y = PAD + (i // cols) * (cell_h + PAD) + TILE // 2
    return x, y


def test_inspect_jsonl_counts_rejects_and_draws_the_sheet(tmp_path: Path) -> None:
    path = make_jsonl(tmp_path)
    report = inspect(
        path, rejects_path=tmp_path / "out" / "rejects.jsonl", sheet_path=tmp_path / "sheet.png"
    )
    assert report.format == "jsonl"
    assert report.n_samples == 5 and report.n_captions == 10
    assert report.modalities == {"image": 5, "text": 5}
    assert report.rejected == 2
    assert report.reasons == {"empty_caption": 1, "undecodable_image": 1}

    lines = format_report(report)
    assert "format: jsonl" in lines and "samples: 5" in lines
    assert "modalities: image 5, text 5" in lines
    i = lines.index("rejected: 2")
    assert lines[i + 1 : i + 3] == ["  empty_caption: 1", "  undecodable_image: 1"]
    assert f"rejects file: {tmp_path / 'out' / 'rejects.jsonl'}" in lines

    records = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["key"], r["reason"]) for r in records] == [
        ("line000003", "undecodable_image"),
        ("line000006", "empty_caption"),
    ]

    # 5 tiles -> a 3 x 2 grid, each column TILE + PAD wide, each row TILE + captions + PAD high
    sheet = Image.open(tmp_path / "sheet.png")
    cell_h = TILE + CAPTION_LINES * LINE_H
    assert sheet.size == (3 * (TILE + PAD) + PAD, 2 * (cell_h + PAD) + PAD)
    for i, color in enumerate(COLORS):  # each tile shows its sample's colour, scaled up
        assert sheet.getpixel(tile_center(i, cols=3)) == color
    assert sheet.getpixel(tile_center(5, cols=3)) == (255, 255, 255)  # sixth slot stays empty
    # the first caption is drawn under the first tile: dark pixels in its caption band
    band = sheet.crop((PAD, PAD + TILE, PAD + TILE, PAD + cell_h)).convert("L")
    assert band.getextrema()[0] < 100
    assert not list(tmp_path.glob(".sheet.png.*"))  # no temp file left behind


def test_sheet_tile_count_follows_n_sheet(tmp_path: Path) -> None:
    path = make_jsonl(tmp_path)
    inspect(path, sheet_path=tmp_path / "two.png", n_sheet=2)
    sheet = Image.open(tmp_path / "two.png")
    assert sheet.size == (2 * (TILE + PAD) + PAD, (TILE + CAPTION_LINES * LINE_H + PAD) + PAD)
    tile = sheet.crop((PAD, PAD, PAD + TILE, PAD + TILE))
    assert tile.getcolors() == [(TILE * TILE, COLORS[0])]


def test_small_images_are_enlarged_with_nearest_neighbour(tmp_path: Path) -> None:
    # a 4x4 black/white checkerboard enlarged 32x: nearest keeps exactly two colours, in blocks
    board = Image.new("RGB", (4, 4))
    for x in range(4):
        for y in range(4):
            board.putpixel((x, y), (255, 255, 255) if (x + y) % 2 else (0, 0, 0))
    board.save(tmp_path / "board.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "board.png", "caption": "board"}))
    inspect(tmp_path / "d.jsonl", sheet_path=tmp_path / "s.png")
    tile = Image.open(tmp_path / "s.png").crop((PAD, PAD, PAD + TILE, PAD + TILE))
    assert sorted(tile.getcolors()) == [
        (TILE * TILE // 2, (0, 0, 0)),
        (TILE * TILE // 2, (255,) * 3),
    ]
    block = TILE // 4
    assert tile.getpixel((block + 1, 0)) == (255, 255, 255) and tile.getpixel((0, 0)) == (0, 0, 0)


def test_inspect_limit_stops_early_and_without_rejects_file_says_so(tmp_path: Path) -> None:
    path = make_jsonl(tmp_path)
    report = inspect(path, limit=3)
    assert report.n_samples == 3 and report.rejected == 1  # corrupt line 3 comes before sample 3
    lines = format_report(report)
    assert "rejected: 1" in lines and "  undecodable_image: 1" in lines
    assert any(line.startswith("rejects file: not written") for line in lines)
    report = inspect(path, limit=2)  # stops after line 2, before the corrupt line is read
    assert report.n_samples == 2 and report.rejected == 0
    assert "rejected: 0" in format_report(report)


def test_inspect_world_reports_manifest_split_counts(tmp_path: Path) -> None:
    root = tmp_path / "world"
    (root / "val").mkdir(parents=True)
    with tarfile.open(root / "val" / "val-000000.tar", "w") as tar:
        for key, color in (("a", COLORS[0]), ("b", COLORS[1])):
            buf = io.BytesIO()
            Image.new("RGB", (4, 4), color).save(buf, format="PNG")
            meta = json.dumps({"captions": ["x", "y", "z"], "objects": [], "qa": []}).encode()
            for name, data in ((f"{key}.png", buf.getvalue()), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    manifest = {
        "generator": "polysense.world",
        "splits": {"train": {"count": 7}, "val": {"count": 2}},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    report = inspect(root, split="val", sheet_path=tmp_path / "s.png")
    assert report.format == "world" and report.split == "val"
    assert report.splits == {"train": 7, "val": 2}
    assert report.n_samples == 2 and report.n_captions == 6
    assert report.modalities == {"image": 2, "text": 2, "objects": 2, "qa": 2}
    lines = format_report(report)
    assert "splits (manifest): train 7, val 2" in lines and "split: val" in lines
    assert Image.open(tmp_path / "s.png").getpixel(tile_center(1, cols=2)) == COLORS[1]


def test_inspect_missing_path_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        inspect(tmp_path / "nope.jsonl")
