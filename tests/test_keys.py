"""Keys users can trace: a CSV/JSONL item's key is its image path (relative to the table's
folder), rows naming one image are one item, and an index shows where each image came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import tiny_config
from polysense.data.readers import Rejects, path_key, read_samples
from polysense.index import EmbeddingIndex, build_index
from polysense.models.checkpoint import save_checkpoint
from polysense.models.clip import build_model


def png(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = tiny_config("clip-tiny", "model.vision.pool=mean", "model.text.pool=mean")
    return save_checkpoint(build_model(cfg), cfg, tmp_path_factory.mktemp("ckpt"))


def test_keys_are_image_paths_relative_to_the_table(tmp_path):
    for name, colour in (("img/a.png", (255, 0, 0)), ("img/b.png", (0, 0, 255))):
        png(tmp_path / "data" / name, colour)
    png(tmp_path / "shared" / "c.png", (0, 255, 0))
    table = tmp_path / "data" / "pairs.csv"
    rows = [
        "image,caption",
        "./img/a.png,a red square",  # ./ and the absolute path below name the same file
        f"{tmp_path / 'data' / 'img' / 'a.png'},red",
        "img/b.png,a blue square",
        "../shared/c.png,a green square",
    ]
    table.write_text("\n".join(rows) + "\n")
    samples = list(read_samples(table))
    assert [s["key"] for s in samples] == ["img/a.png", "img/b.png", "../shared/c.png"]
    assert samples[0]["text"] == ["a red square", "red"]
    assert path_key(tmp_path / "data" / "img" / "a.png", tmp_path / "data") == "img/a.png"
    # a key or id column still names the item
    table.write_text("id,image,caption\nx7,img/a.png,one\n,img/b.png,two\n")
    assert [s["key"] for s in read_samples(table)] == ["x7", "img/b.png"]


def test_rejects_still_name_the_line(tmp_path):
    """A rejected row is found by its line (it may have no usable image path at all)."""
    png(tmp_path / "ok.png", (1, 2, 3))
    table = tmp_path / "d.csv"
    table.write_text("image,caption\nok.png,fine\nmissing.png,gone\nok.png,\n")
    with Rejects() as rejects:
        samples = list(read_samples(table, rejects=rejects))
    assert [s["key"] for s in samples] == ["ok.png"]
    assert [(r["key"], r["reason"]) for r in rejects.records] == [
        ("line000003", "missing_file"),
        ("line000004", "empty_caption"),
    ]


def test_rows_of_one_image_merge_wherever_they_are(tmp_path):
    """Rows of one image far apart in the file are still one item, with captions in file
    order; a JSONL caption list counts as several rows."""
    for name in ("a.png", "b.png"):
        png(tmp_path / name, (9, 9, 9))
    lines = [
        {"image": "a.png", "caption": "a1", "note": ""},
        {"image": "b.png", "caption": ["b1", "b2"]},
        {"image": "a.png", "caption": ["a2", "a3"], "label": "late", "note": "kept"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    samples = list(read_samples(path))
    assert {s["key"]: s["text"] for s in samples} == {
        "a.png": ["a1", "a2", "a3"],
        "b.png": ["b1", "b2"],
    }
    a = next(s for s in samples if s["key"] == "a.png")
    assert (a["label"], a["note"]) == ("late", "kept")  # the first row that fills a cell


def test_two_tables_go_into_one_index_and_results_name_their_files(tmp_path, ckpt):
    """Line-number keys made every CSV's second row `line000002`, so the second table's rows
    were all rejected as duplicate keys; image-path keys do not collide."""
    colours = {"red.png": (220, 30, 30), "blue.png": (30, 40, 220), "green.png": (30, 170, 40)}
    for name, colour in colours.items():
        png(tmp_path / "data" / "img" / name, colour)
    first = tmp_path / "data" / "part1.csv"
    first.write_text("image,caption\nimg/red.png,a red square\nimg/blue.png,a blue square\n")
    second = tmp_path / "data" / "part2.csv"
    second.write_text("image,caption\nimg/green.png,a green square\n")
    index = build_index(ckpt, first, tmp_path / "index", progress=False)
    assert index.add(second, progress=False) == 1
    index = EmbeddingIndex.open(tmp_path / "index")
    assert len(index) == 3
    assert (tmp_path / "index" / "rejects.jsonl").read_text() == ""
    for name in colours:
        item = index.item(f"img/{name}")
        assert item["image_path"] == f"img/{name}"  # relative: no server path
    hits = index.search_text(["a green square"], k=3)[0]
    assert {h.key for h in hits} == {f"img/{n}" for n in colours}
    assert all(h.image_path == h.key for h in hits)
    text_hits = index.search_text(["a green square"], k=3, modality="text")[0]
    owner = {"a red square": "red", "a blue square": "blue", "a green square": "green"}
    assert all(h.image_path == f"img/{owner[h.caption]}.png" for h in text_hits)
