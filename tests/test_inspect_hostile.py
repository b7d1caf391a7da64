"""`polysense data inspect` over a directory of every kind of bad file from issue 21: each bad
row, member or file is counted by reason, nothing hangs, the command exits 0. And the advice of a
wrong-column error is a flag the running command has (defect 8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from polysense.data.inspect import format_report, inspect

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")

GOOD = json.dumps({"image": "ok.png", "caption": "a good line"})
# Hand-counted from make_bad_dir below.
EXPECTED_REASONS = {
    "bad_annotation": 2,  # coco_listid.json, coco_noid.json
    "bad_row": 3,  # coco_listid.json, coco_intname.json, coco_noid.json
    "caption_too_long": 1,  # longcaption.jsonl
    "field_too_long": 1,  # bigfield.csv
    "line_too_long": 1,  # longline.jsonl
    "not_regular_file": 1,  # photos/cat/x.png (a FIFO)
    "not_utf8": 2,  # latin1.csv, latin1.jsonl
    "too_many_pixels": 1,  # photos/cat/huge.png
    "unreadable_source": 2,  # coco_images5.json, pipe.jsonl (a FIFO)
}


def make_bad_dir(root: Path) -> Path:
    """Every bad file of the audit beside one good sample per readable source."""
    root.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "ok.png")  # what the tables point to; not a source
    (root / "latin1.csv").write_bytes(b"image,caption\nok.png,good\nok.png,caf\xe9\n")
    (root / "bigfield.csv").write_text(f"image,caption\nok.png,{'x' * 200_000}\nok.png,good\n")
    (root / "latin1.jsonl").write_bytes(GOOD.encode() + b'\n{"caption": "\xff"}\n')
    long_line = json.dumps({"image": "ok.png", "caption": "y " * 600_000})  # 1.2 MB
    (root / "longline.jsonl").write_text(long_line + "\n" + GOOD + "\n")
    one_mb = json.dumps({"image": "ok.png", "caption": "z" * 1_000_000})  # under the line cap
    (root / "longcaption.jsonl").write_text(one_mb + "\n" + GOOD + "\n")
    coco = {
        "coco_images5.json": {"images": 5, "annotations": []},
        "coco_listid.json": {
            "images": [{"id": [1], "file_name": "ok.png"}],
            "annotations": [{"image_id": [1], "caption": "listed"}],
        },
        "coco_intname.json": {
            "images": [{"id": 1, "file_name": 7}],
            "annotations": [{"image_id": 1, "caption": "int name"}],
        },
        "coco_noid.json": {
            "images": [{"file_name": "ok.png"}],
            "annotations": [{"caption": "whose?"}],
        },
    }
    for name, data in coco.items():
        (root / name).write_text(json.dumps(data))
    os.mkfifo(root / "pipe.jsonl")
    cat = root / "photos" / "cat"
    cat.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(cat / "ok.png")
    Image.new("1", (12000, 12000)).save(cat / "huge.png")  # 144 Mpx in a few KB
    os.mkfifo(cat / "x.png")
    return root


def polysense(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "polysense.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bad_dir(tmp_path_factory.mktemp("hostile") / "bad")


def test_inspect_reads_a_directory_of_bad_sources_one_by_one(bad_dir: Path) -> None:
    rejects = bad_dir.parent / "lib.rejects.jsonl"
    report = inspect(bad_dir, rejects_path=rejects)
    assert report.format == "collection"
    assert report.sources == {"coco": 4, "csv": 2, "imagefolder": 1, "jsonl": 3}
    # one good sample from each CSV/JSONL and from the image folder
    assert report.n_samples == 6
    assert report.reasons == EXPECTED_REASONS
    records = [json.loads(line) for line in rejects.read_text().splitlines()]
    unreadable = {Path(r["source"]).name: r["detail"] for r in records if r["key"] == "(source)"}
    assert "'images' must be a list, got int" in unreadable["coco_images5.json"]
    assert "not a regular file" in unreadable["pipe.jsonl"]
    assert "sources: coco 4, csv 2, imagefolder 1, jsonl 3" in format_report(report)


def test_cli_inspect_of_the_bad_directory_exits_zero(bad_dir: Path) -> None:
    rejects = bad_dir.parent / "cli.rejects.jsonl"
    result = polysense("data", "inspect", "bad", "--rejects", str(rejects), cwd=bad_dir.parent)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert "format: collection" in lines and "rejected: 14" in lines
    reasons = [json.loads(line)["reason"] for line in rejects.read_text().splitlines()]
    assert {r: reasons.count(r) for r in set(reasons)} == EXPECTED_REASONS


# ---------------------------------------------------------------------------------------------
# defect 8: the fix a wrong-column error names is a flag of the command that is running


def wrong_column(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(root / "a.png")
    (root / "pairs.csv").write_text("filepath,caption\na.png,a black square\n")
    return root / "pairs.csv"


def test_train_wrong_column_error_names_the_config_override(tmp_path: Path) -> None:
    wrong_column(tmp_path)
    result = polysense("train", "clip-tiny", "--data", "pairs.csv", "--out", "out", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "no 'image' column" in result.stderr
    assert "--set data.image_key=COLUMN" in result.stderr
    assert "--image-key" not in result.stderr  # train refuses that flag


def test_inspect_wrong_column_error_names_its_flag(tmp_path: Path) -> None:
    wrong_column(tmp_path)
    result = polysense("data", "inspect", "pairs.csv", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "name the right one with --image-key COLUMN" in result.stderr
    fixed = polysense("data", "inspect", "pairs.csv", "--image-key", "filepath", cwd=tmp_path)
    assert fixed.returncode == 0, fixed.stderr
    assert "samples: 1" in fixed.stdout.splitlines()
