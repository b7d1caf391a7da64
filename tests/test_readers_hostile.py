"""Hostile data (issue 21, defects 6 and 7): each bad row or member is one reject with a reason,
a file that cannot be read at all is one DataError naming it, nothing hangs on a FIFO, and no
caption, line or image is big enough to hold up the tokenizer or exhaust memory."""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from polysense.data import readers
from polysense.data.readers import (
    MAX_CAPTION_CHARS,
    MAX_LINE_BYTES,
    MAX_PIXELS,
    Rejects,
    read_samples,
)
from polysense.data.tokenizer import MAX_TRAIN_CHARS, Tokenizer
from polysense.errors import DataError

fifo_only = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")


def png(path: Path, size: tuple[int, int] = (4, 4), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)
    return path


def read_all(path: Path, **kwargs: Any) -> tuple[list[dict[str, Any]], Rejects]:
    rejects = Rejects()
    return list(read_samples(path, rejects=rejects, **kwargs)), rejects


def finishes(fn: Callable[[], Any], unblock: Path, seconds: float = 20.0) -> Any:
    """Run ``fn`` in a thread; if it is still blocked after ``seconds`` (a reader opened the FIFO
    ``unblock``), open the FIFO's write end so the thread can end, and fail."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(fn())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(unblock, os.O_WRONLY))  # a blocked open() for reading returns now
        thread.join(seconds)
        pytest.fail(f"reading hung on the FIFO {unblock}")
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


# ---------------------------------------------------------------------------------------------
# text that is not UTF-8, fields and lines over the caps


def test_non_utf8_csv_row_is_one_reject_and_the_rest_is_read(tmp_path: Path) -> None:
    png(tmp_path / "ok.png")
    path = tmp_path / "d.csv"
    path.write_bytes(b"image,caption\nok.png,first\nok.png,caf\xe9 in latin-1\nok.png,third\n")
    samples, rejects = read_all(path)
    assert [s["text"] for s in samples] == [["first", "third"]]  # rows of one image merge
    assert rejects.by_reason == {"not_utf8": 1}
    assert rejects.records[0]["key"] == "line000003"  # the header is line 1


def test_non_utf8_jsonl_line_is_one_reject_and_the_rest_is_read(tmp_path: Path) -> None:
    png(tmp_path / "ok.png")
    path = tmp_path / "d.jsonl"
    good = json.dumps({"image": "ok.png", "caption": "fine"}).encode()
    path.write_bytes(good + b'\n{"image": "ok.png", "caption": "\xff\xfe"}\n' + good + b"\n")
    samples, rejects = read_all(path)
    assert [s["text"] for s in samples] == [["fine", "fine"]]  # rows of one image merge
    assert [(r["key"], r["reason"]) for r in rejects.records] == [("line000002", "not_utf8")]


def test_csv_whose_header_is_not_utf8_is_one_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b"image,l\xe9gende\nok.png,x\n")
    with pytest.raises(DataError, match=r"d\.csv: the header line is unreadable: not UTF-8"):
        read_all(path)


def test_deeply_nested_jsonl_line_is_bad_json(tmp_path: Path) -> None:
    png(tmp_path / "ok.png")
    path = tmp_path / "d.jsonl"
    good = json.dumps({"image": "ok.png", "caption": "fine"})
    path.write_text("[" * 200_000 + "\n" + good + "\n")  # RecursionError in json.loads
    samples, rejects = read_all(path)
    assert [s["text"] for s in samples] == [["fine"]]
    assert [(r["key"], r["reason"]) for r in rejects.records] == [("line000001", "bad_json")]


def test_deeply_nested_json_member_of_a_tar_is_bad_json(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    members = {
        "a.png": buf.getvalue(),
        "a.json": b"[" * 200_000,
        "b.png": buf.getvalue(),
        "b.txt": b"a good one",
    }
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples, rejects = read_all(path)
    assert [s["text"] for s in samples] == [["a good one"]]
    assert [(r["key"], r["reason"]) for r in rejects.records] == [("a", "bad_json")]


def test_csv_field_over_the_csv_module_limit_is_one_reject(tmp_path: Path) -> None:
    png(tmp_path / "ok.png")
    path = tmp_path / "d.csv"
    huge = "x" * 200_000  # over csv.field_size_limit() (131072), under MAX_LINE_BYTES
    path.write_text(f"image,caption\nok.png,before\nok.png,{huge}\nok.png,after\n")
    samples, rejects = read_all(path)
    assert [s["text"] for s in samples] == [["before", "after"]]  # rows of one image merge
    assert [(r["key"], r["reason"]) for r in rejects.records] == [("line000003", "field_too_long")]


def test_csv_line_over_the_byte_cap_is_rejected(tmp_path: Path) -> None:
    png(tmp_path / "ok.png")
    path = tmp_path / "d.csv"
    cells = ["y" * 120_000] * 9  # each cell under the csv limit, the line over MAX_LINE_BYTES
    assert len(",".join(cells)) > MAX_LINE_BYTES
    header = "image,caption," + ",".join(f"c{i}" for i in range(9))
    path.write_text(f"{header}\nok.png,long,{','.join(cells)}\nok.png,short\n")
    samples, rejects = read_all(path)
    assert [s["text"] for s in samples] == [["short"]]
    assert [(r["key"], r["reason"]) for r in rejects.records] == [("line000002", "line_too_long")]


def test_jsonl_line_over_the_byte_cap_is_rejected_without_holding_it(tmp_path: Path) -> None:
    png(tmp_path / "ok.png")
    path = tmp_path / "d.jsonl"
    with path.open("w") as fh:
        fh.write(json.dumps({"image": "ok.png", "caption": "x" * (8 * MAX_LINE_BYTES)}) + "\n")
        fh.write(json.dumps({"image": "ok.png", "caption": "after"}) + "\n")
    tracemalloc.start()
    try:
        samples, rejects = read_all(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [s["text"] for s in samples] == [["after"]]
    assert [(r["key"], r["reason"]) for r in rejects.records] == [("line000001", "line_too_long")]
    assert peak < 4 * MAX_LINE_BYTES  # the 8 MiB line was never held whole (nor decoded)


def test_caption_over_the_cap_is_rejected_and_one_at_the_cap_is_kept(tmp_path: Path) -> None:
    png(tmp_path / "ok.png")
    path = tmp_path / "d.jsonl"
    lines = [
        {"image": "ok.png", "caption": "z" * MAX_CAPTION_CHARS},
        {"image": "ok.png", "caption": ["fine", "z" * (MAX_CAPTION_CHARS + 1)]},
        {"image": "ok.png", "caption": "w" * 1_000_000},  # the audit's 1 MB caption
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    samples, rejects = read_all(path)
    assert [len(s["text"][0]) for s in samples] == [MAX_CAPTION_CHARS]
    assert [(r["key"], r["reason"]) for r in rejects.records] == [
        ("line000002", "caption_too_long"),
        ("line000003", "caption_too_long"),
    ]


# ---------------------------------------------------------------------------------------------
# COCO files with the wrong types


def test_coco_entries_with_wrong_types_are_rejects(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png"},
            {"id": [2], "file_name": "b.png"},  # list-valued id
            {"id": 3, "file_name": 7},  # int file_name
            {"file_name": "b.png"},  # no id
            5,  # not an object
        ],
        "annotations": [
            {"image_id": 1, "caption": "an a"},
            {"image_id": [2], "caption": "a b"},  # list-valued image_id
            {"caption": "whose?"},  # no image_id
            {"image_id": 3, "caption": "a three"},
        ],
    }
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco))
    samples, rejects = read_all(path)
    assert [(s["key"], s["text"]) for s in samples] == [("1", ["an a"])]
    assert [(r["key"], r["reason"]) for r in rejects.records] == [
        ("annotation000001", "bad_annotation"),
        ("annotation000002", "bad_annotation"),
        ("image000001", "bad_row"),
        ("3", "bad_row"),
        ("image000003", "bad_row"),
        ("image000004", "bad_row"),
    ]


@pytest.mark.parametrize(
    ("coco", "message"),
    [
        ({"images": 5, "annotations": []}, "'images' must be a list, got int"),
        ({"images": [], "annotations": {"a": 1}}, "'annotations' must be a list, got dict"),
    ],
)
def test_coco_file_with_wrong_top_level_types_is_one_error(
    tmp_path: Path, coco: dict[str, Any], message: str
) -> None:
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError) as err:
        read_all(path)
    assert str(path) in str(err.value) and message in str(err.value)


# ---------------------------------------------------------------------------------------------
# only regular files are opened, and pixels are capped before decoding


@fifo_only
def test_fifo_in_an_image_folder_is_a_reject_not_a_hang(tmp_path: Path) -> None:
    png(tmp_path / "photos" / "cat" / "a.png")
    fifo = tmp_path / "photos" / "cat" / "x.png"
    os.mkfifo(fifo)
    samples, rejects = finishes(lambda: read_all(tmp_path / "photos"), fifo)
    assert [s["key"] for s in samples] == ["cat/a"]
    assert [(r["key"], r["reason"]) for r in rejects.records] == [("cat/x", "not_regular_file")]


@fifo_only
def test_fifo_named_in_a_table_is_a_reject_and_a_fifo_source_is_an_error(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "x.png")
    table = tmp_path / "d.csv"
    table.write_text("image,caption\nx.png,a pipe\n")
    samples, rejects = finishes(lambda: read_all(table), tmp_path / "x.png")
    assert samples == [] and rejects.by_reason == {"not_regular_file": 1}
    source = tmp_path / "pipe.csv"
    os.mkfifo(source)
    with pytest.raises(DataError, match=r"pipe\.csv: not a regular file"):
        finishes(lambda: read_samples(source), source)


def test_huge_png_is_rejected_from_its_header(tmp_path: Path) -> None:
    big = png(tmp_path / "big.png", (12000, 12000), mode="1")  # 144 Mpx in a few KB
    assert big.stat().st_size < 100_000
    png(tmp_path / "ok.png")
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"image": "big.png", "caption": "huge"})
        + "\n"
        + json.dumps({"image": "ok.png", "caption": "small"})
        + "\n"
    )
    samples, rejects = read_all(path)
    assert [s["text"] for s in samples] == [["small"]]
    assert rejects.by_reason == {"too_many_pixels": 1}
    assert "12000x12000" in rejects.records[0]["detail"]


def test_pixel_cap_boundary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert MAX_PIXELS < Image.MAX_IMAGE_PIXELS  # below Pillow's own decompression-bomb limit
    monkeypatch.setattr(readers, "MAX_PIXELS", 100)
    png(tmp_path / "c" / "at.png", (10, 10))
    png(tmp_path / "c" / "over.png", (10, 11))
    samples, rejects = read_all(tmp_path)
    assert [s["key"] for s in samples] == ["c/at"]
    assert [(r["key"], r["reason"]) for r in rejects.records] == [("c/over", "too_many_pixels")]


# ---------------------------------------------------------------------------------------------
# the tokenizer trainer sees bounded texts


def test_tokenizer_trainer_sees_each_text_cut_to_max_train_chars() -> None:
    texts = ["a red circle", "a blue square", "a" * (5 * MAX_TRAIN_CHARS)]
    tok = Tokenizer.train(texts, vocab_size=300)
    # BPE on one run of n 'a's learns merges up to about n 'a's; cut to MAX_TRAIN_CHARS, no token
    # is longer than that (+1 for the byte-level prefix space 'Ġ').
    assert max(len(token) for token in tok.to_json()["model"]["vocab"]) <= MAX_TRAIN_CHARS + 1


def test_csv_with_classic_mac_line_ends_still_reads(tmp_path: Path) -> None:
    """Regression guard for the binary line reader: a lone \\r ends a line, as it did in text
    mode with newline=''."""
    png(tmp_path / "ok.png")
    path = tmp_path / "mac.csv"
    path.write_bytes(b'image,caption\rok.png,one\rok.png,"two\rlines"\rok.png,\xff\r')
    samples, rejects = read_all(path)
    assert [s["text"] for s in samples] == [["one", "two\rlines"]]  # rows of one image merge
    assert [(r["key"], r["reason"]) for r in rejects.records] == [("line000005", "not_utf8")]
