"""Readers: one test per format on tiny hand-made fixtures, rejects for each bad-input kind."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from polysense.data.readers import Rejects, detect_format, read_samples
from polysense.errors import DataError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def png_bytes(
    color: tuple[int, int, int], size: tuple[int, int] = (6, 4), fmt: str = "PNG"
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def write_png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (6, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(color, size))
    return path


def corrupt_png(path: Path) -> Path:
    """A PNG cut in half: the header parses, decoding fails."""
    data = png_bytes(RED, (16, 16))
    path.write_bytes(data[: len(data) // 2])
    return path


def wav_bytes(wave: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format=fmt, subtype="FLOAT" if fmt == "WAV" else "PCM_16")
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def jbytes(obj: object) -> bytes:
    return json.dumps(obj).encode()


def pixel(image: Image.Image) -> tuple[int, int, int]:
    colors = image.getcolors()
    assert colors is not None and len(colors) == 1, "expected a solid-colour image"
    return colors[0][1]


# ---------------------------------------------------------------------------------------------
# world


def make_world(root: Path) -> dict[str, object]:
    """A two-scene train split and one-scene val split, laid out like polysense.world."""
    rng = np.random.default_rng(0)
    wave = rng.uniform(-0.5, 0.5, size=80).astype(np.float32)
    video = rng.integers(0, 255, size=(3, 4, 4, 3), dtype=np.uint8)
    meta0 = {
        "captions": ["a red circle", "one red circle on the left"],
        "objects": [{"color": "red", "shape": "circle", "box": [0, 0, 3, 3]}],
        "qa": [{"q": "what colour is the circle?", "a": "red"}],
        "label": "red circle",
        "ocr_text": "HELLO",
        "split": "train",
    }
    meta1 = {"captions": ["a green square"], "objects": [], "qa": [], "split": "train"}
    write_tar(
        root / "train" / "train-000000.tar",
        {
            "s000000.png": png_bytes(RED),
            "s000000.json": jbytes(meta0),
            "s000000.ocr.png": png_bytes(WHITE, (12, 5)),
            "s000000.wav": wav_bytes(wave, 8000),
            "s000000.video.npy": npy_bytes(video),
            "s000001.png": png_bytes(GREEN),
            "s000001.json": jbytes(meta1),
        },
    )
    write_tar(
        root / "val" / "val-000000.tar",
        {"v000000.png": png_bytes(BLUE), "v000000.json": jbytes({"captions": ["a blue star"]})},
    )
    manifest = {
        "generator": "polysense.world",
        "seed": 0,
        "splits": {
            "train": {"count": 2, "shards": [{"path": "train/train-000000.tar", "count": 2}]},
            "val": {"count": 1},  # no shard list: found through the val/*.tar layout
        },
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return {"wave": wave, "video": video, "meta0": meta0}


def test_world_reads_every_member_and_passes_fields_through(tmp_path: Path) -> None:
    root = tmp_path / "world"
    truth = make_world(root)
    assert detect_format(root) == "world"
    samples = list(read_samples(root))  # default split: train
    assert [s["key"] for s in samples] == ["s000000", "s000001"]
    s0, s1 = samples
    assert pixel(s0["image"]) == RED and s0["image"].mode == "RGB"
    assert pixel(s1["image"]) == GREEN
    assert s0["text"] == truth["meta0"]["captions"]
    assert s0["objects"] == truth["meta0"]["objects"]
    assert s0["qa"] == truth["meta0"]["qa"]
    assert s0["label"] == "red circle" and s0["ocr_text"] == "HELLO" and s0["split"] == "train"
    assert pixel(s0["ocr_image"]) == WHITE and s0["ocr_image"].size == (12, 5)
    assert s0["sample_rate"] == 8000 and s0["audio"].dtype == np.float32
    np.testing.assert_array_equal(s0["audio"], truth["wave"])
    np.testing.assert_array_equal(s0["video"], truth["video"])
    assert "audio" not in s1 and "video" not in s1
    assert s0["source"].endswith("train-000000.tar")

    val = list(read_samples(root, split="val"))
    assert [s["key"] for s in val] == ["v000000"] and val[0]["text"] == ["a blue star"]


def test_world_unknown_split_is_a_clear_error(tmp_path: Path) -> None:
    make_world(tmp_path / "world")
    with pytest.raises(DataError, match=r"no split 'test'; splits: \['train', 'val'\]"):
        list(read_samples(tmp_path / "world", split="test"))


# ---------------------------------------------------------------------------------------------
# generic webdataset


def make_shards(root: Path) -> list[str]:
    """Three shards with different caption conventions (.txt, .json caption, .caption)."""
    write_tar(
        root / "data-000000.tar",
        {
            "a.jpg": png_bytes(RED, fmt="JPEG"),
            "a.txt": b"a red photo",
            "a.cls": b"3",
            "b.jpg": png_bytes(GREEN, fmt="JPEG"),
            "b.txt": b"a green photo",
        },
    )
    write_tar(
        root / "data-000001.tar",
        {"c.webp": png_bytes(BLUE, fmt="WEBP"), "c.json": jbytes({"caption": "blue", "w": 6})},
    )
    write_tar(root / "data-000002.tar", {"d.png": png_bytes(WHITE), "d.caption": b"white"})
    return ["a", "b", "c", "d"]


def test_wds_directory_single_tar_and_brace_pattern(tmp_path: Path) -> None:
    keys = make_shards(tmp_path / "shards")
    pattern = str(tmp_path / "shards" / "data-{000000..000002}.tar")
    for source in (tmp_path / "shards", pattern):
        assert detect_format(source) == "wds"
        samples = list(read_samples(source))
        assert [s["key"] for s in samples] == keys
        assert [s["text"] for s in samples] == [
            ["a red photo"],
            ["a green photo"],
            ["blue"],
            ["white"],
        ]
    a, _, c, d = samples
    assert a["label"] == 3 and c["w"] == 6 and pixel(d["image"]) == WHITE
    # JPEG is lossy: the decoded colour is near red, not exact
    assert np.abs(np.asarray(a["image"], dtype=int) - RED).max() < 8
    single = list(read_samples(tmp_path / "shards" / "data-000001.tar"))
    assert [s["key"] for s in single] == ["c"]
    partial = str(tmp_path / "shards" / "data-{000001..000002}.tar")
    assert [s["key"] for s in read_samples(partial)] == ["c", "d"]


def test_wds_bad_members_become_rejects(tmp_path: Path) -> None:
    data = png_bytes(RED, (16, 16))
    write_tar(
        tmp_path / "s.tar",
        {
            "good.png": png_bytes(RED),
            "good.txt": b"fine",
            "cut.png": data[: len(data) // 2],
            "cut.txt": b"fine",
            "blank.png": png_bytes(RED),
            "blank.txt": b"   ",
            "brokenjson.png": png_bytes(RED),
            "brokenjson.json": b"{not json",
        },
    )
    with Rejects(tmp_path / "rejects.jsonl") as rejects:
        samples = list(read_samples(tmp_path / "s.tar", rejects=rejects))
    assert [s["key"] for s in samples] == ["good"]
    assert rejects.by_reason == {"undecodable_image": 1, "empty_caption": 1, "bad_json": 1}
    lines = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [(r["key"], r["reason"]) for r in lines] == [
        ("cut", "undecodable_image"),
        ("blank", "empty_caption"),
        ("brokenjson", "bad_json"),
    ]


def test_brace_pattern_with_a_missing_shard_is_an_error(tmp_path: Path) -> None:
    make_shards(tmp_path)
    with pytest.raises(DataError, match=r"data-000003.tar does not exist \(3 of"):
        read_samples(str(tmp_path / "data-{000000..000005}.tar"))


# ---------------------------------------------------------------------------------------------
# CSV / TSV / JSONL / COCO / image folder


def test_csv_one_caption_per_row_relative_paths_and_audio(tmp_path: Path) -> None:
    write_png(tmp_path / "img" / "r.png", RED)
    write_png(tmp_path / "img" / "g.png", GREEN)
    wave = np.linspace(-1, 1, 50, dtype=np.float32)
    stereo = np.stack([wave, -wave * 0.5], axis=1)  # (T, 2): read as the channel mean
    (tmp_path / "a.flac").write_bytes(wav_bytes(stereo, 16000, fmt="FLAC"))
    rows = [
        {"image": "img/r.png", "caption": "red", "label": "r", "audio": "a.flac"},
        {"image": "img/r.png", "caption": "also red", "label": "r", "audio": ""},
        {"image": "img/g.png", "caption": "green", "label": "g", "audio": ""},
    ]
    path = tmp_path / "data.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "caption", "label", "audio"])
        writer.writeheader()
        writer.writerows(rows)
    assert detect_format(path) == "csv"
    samples = list(read_samples(path))
    # the two rows of img/r.png are one item with both captions; its other cells are the first row's
    assert [s["text"] for s in samples] == [["red", "also red"], ["green"]]
    assert [pixel(s["image"]) for s in samples] == [RED, GREEN]
    assert [s["label"] for s in samples] == ["r", "g"]
    assert [s["key"] for s in samples] == ["img/r.png", "img/g.png"]  # the path, not the line
    assert samples[0]["sample_rate"] == 16000
    expected = (wave - 0.5 * wave) / 2  # channel mean, within FLAC 16-bit quantisation
    np.testing.assert_allclose(samples[0]["audio"], expected, atol=2 / 32768)
    assert "audio" not in samples[1]
    assert samples[0]["image_path"] == str(tmp_path / "img" / "r.png")


def test_tsv_with_custom_columns(tmp_path: Path) -> None:
    write_png(tmp_path / "b.png", BLUE)
    path = tmp_path / "data.tsv"
    path.write_text("id\tfilepath\ttitle\nx1\tb.png\ta blue, square\n")
    assert detect_format(path) == "tsv"
    (sample,) = read_samples(path, image_key="filepath", caption_key="title")
    assert sample["key"] == "x1" and sample["text"] == ["a blue, square"]
    assert pixel(sample["image"]) == BLUE


def test_jsonl_string_and_list_captions_video_and_passthrough(tmp_path: Path) -> None:
    write_png(tmp_path / "r.png", RED)
    video = np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3)
    np.save(tmp_path / "clip.npy", video)
    lines = [
        {"image": "r.png", "caption": "red"},
        {"image": str(tmp_path / "r.png"), "caption": ["red one", " ", "red two "], "qa": [1]},
        {"video": "clip.npy", "caption": "a moving thing"},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    samples = list(read_samples(path))
    # "r.png" and its absolute path name one file: one item with the captions of both lines
    assert [s["text"] for s in samples] == [["red", "red one", "red two"], ["a moving thing"]]
    assert [s["key"] for s in samples] == ["r.png", "clip.npy"]
    assert samples[0]["qa"] == [1]  # a field only the second line has is kept
    np.testing.assert_array_equal(samples[1]["video"], video)
    assert "image" not in samples[1]
    # a .json file with one object per line is JSONL too
    (tmp_path / "data.json").write_text(path.read_text())
    assert detect_format(tmp_path / "data.json") == "jsonl"


def make_coco(root: Path) -> Path:
    write_png(root / "images" / "1.png", RED)
    write_png(root / "2.png", GREEN)
    data = {
        "images": [
            {"id": 1, "file_name": "1.png"},
            {"id": 2, "file_name": "2.png"},
            {"id": 3, "file_name": "missing.png"},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "red one"},
            {"id": 11, "image_id": 2, "caption": "green one"},
            {"id": 12, "image_id": 1, "caption": "red two"},
            {"id": 13, "image_id": 1, "caption": "red three"},
            {"id": 14, "image_id": 3, "caption": "lost"},
        ],
    }
    path = root / "captions_train.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_keeps_all_captions_of_an_image_together(tmp_path: Path) -> None:
    path = make_coco(tmp_path)
    assert detect_format(path) == "coco"
    rejects = Rejects()
    samples = list(read_samples(path, rejects=rejects))
    assert [s["key"] for s in samples] == ["1", "2"]
    assert samples[0]["text"] == ["red one", "red two", "red three"]
    assert samples[1]["text"] == ["green one"]
    assert [pixel(s["image"]) for s in samples] == [RED, GREEN]
    assert rejects.by_reason == {"missing_file": 1} and rejects.records[0]["key"] == "3"
    # an explicit image_root is the only place looked at
    rejects = Rejects()
    keys = [s["key"] for s in read_samples(path, image_root=tmp_path / "images", rejects=rejects)]
    assert keys == ["1"] and rejects.count == 2


def test_imagefolder_label_and_caption_template(tmp_path: Path) -> None:
    write_png(tmp_path / "cats" / "b.png", RED)
    write_png(tmp_path / "cats" / "a.png", GREEN)
    write_png(tmp_path / "hot_dogs" / "x.png", BLUE)
    (tmp_path / "hot_dogs" / "notes.txt").write_text("not an image")
    assert detect_format(tmp_path) == "imagefolder"
    samples = list(read_samples(tmp_path))
    assert [s["key"] for s in samples] == ["cats/a", "cats/b", "hot_dogs/x"]
    assert [s["label"] for s in samples] == ["cats", "cats", "hot_dogs"]
    assert samples[2]["text"] == ["a photo of a hot dogs"]
    assert [pixel(s["image"]) for s in samples] == [GREEN, RED, BLUE]
    other = list(read_samples(tmp_path, caption_template="{label}!"))
    assert other[0]["text"] == ["cats!"]


# ---------------------------------------------------------------------------------------------
# rejects and errors


def test_each_bad_input_kind_is_counted_and_written(tmp_path: Path) -> None:
    write_png(tmp_path / "ok.png", RED)
    corrupt_png(tmp_path / "bad.png")
    path = tmp_path / "data.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"image": "ok.png", "caption": "good"}),  # line 1
                json.dumps({"image": "bad.png", "caption": "corrupt"}),  # line 2
                json.dumps({"image": "ok.png", "caption": "  "}),  # line 3
                '{"image": "ok.png", "caption": ',  # line 4
                json.dumps({"image": "gone.png", "caption": "missing"}),  # line 5
                json.dumps({"caption": "no image cell"}),  # line 6
                json.dumps({"image": "ok.png", "caption": "good too"}),  # line 7
            ]
        )
    )
    out = tmp_path / "out" / "rejects.jsonl"
    with Rejects(out) as rejects:
        samples = list(read_samples(path, rejects=rejects))
        assert not out.exists()  # published atomically at close
    assert [s["text"] for s in samples] == [["good", "good too"]]  # lines 1 and 7: one image
    assert rejects.count == 5
    assert rejects.by_reason == {
        "undecodable_image": 1,
        "empty_caption": 1,
        "bad_json": 1,
        "missing_file": 1,
        "missing_image": 1,
    }
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["key"], r["reason"]) for r in records] == [
        ("line000002", "undecodable_image"),
        ("line000003", "empty_caption"),
        ("line000004", "bad_json"),
        ("line000005", "missing_file"),
        ("line000006", "missing_image"),
    ]
    assert all(r["source"] == str(path) for r in records)
    assert "gone.png" in records[3]["detail"]
    assert not out.with_name("rejects.jsonl.partial").exists()


def test_csv_rejects_and_rejects_file_written_even_when_empty(tmp_path: Path) -> None:
    write_png(tmp_path / "ok.png", RED)
    corrupt_png(tmp_path / "bad.png")
    path = tmp_path / "d.csv"
    path.write_text("image,caption\nok.png,fine\nbad.png,x\n,no image\nok.png,\nok.png,a,b\n")
    with Rejects(tmp_path / "r.jsonl") as rejects:
        assert len(list(read_samples(path, rejects=rejects))) == 1
    assert rejects.by_reason == {
        "undecodable_image": 1,
        "missing_image": 1,
        "empty_caption": 1,
        "bad_row": 1,
    }
    keys = [json.loads(x)["key"] for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert keys == ["line000003", "line000004", "line000005", "line000006"]
    with Rejects(tmp_path / "empty.jsonl") as rejects:
        list(read_samples(path, rejects=rejects, limit=1))
    assert (tmp_path / "empty.jsonl").read_text() == "" and rejects.count == 0


def test_missing_column_names_file_columns_and_flag(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("filepath,caption\na.png,hi\n")
    with pytest.raises(DataError) as err:
        list(read_samples(path))
    msg = str(err.value)
    assert str(path) in msg and "'image'" in msg and "['filepath', 'caption']" in msg
    assert "--image-key" in msg
    path.write_text("image,title\na.png,hi\n")
    with pytest.raises(DataError, match=r"no 'caption' column.*--caption-key"):
        list(read_samples(path))


def test_jsonl_wrong_field_for_every_line_is_an_error(tmp_path: Path) -> None:
    write_png(tmp_path / "ok.png", RED)
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"img": "ok.png", "caption": "c"}) for _ in range(3)))
    with pytest.raises(
        DataError, match=r"no line has a 'image' field.*\['caption', 'img'\].*--image-key"
    ):
        list(read_samples(path))
    assert [s["text"] for s in read_samples(path, image_key="img")] == [["c"] * 3]  # one image


def test_missing_path_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere\.csv does not exist"):
        detect_format(tmp_path / "nowhere.csv")
    with pytest.raises(DataError, match="does not exist"):
        read_samples(tmp_path / "nowhere")
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"unknown data format '\.parquet'.*jsonl.*imagefolder"):
        detect_format(tmp_path / "x.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a known dataset"):
        detect_format(tmp_path / "empty")


def test_limit_and_decode_false(tmp_path: Path) -> None:
    for i in range(5):
        write_png(tmp_path / "c" / f"{i}.png", RED)
    corrupt_png(tmp_path / "c" / "9.png")  # sorted last: after the limit, never read
    rejects = Rejects()
    assert len(list(read_samples(tmp_path, limit=3, rejects=rejects))) == 3
    assert rejects.count == 0
    assert len(list(read_samples(tmp_path, rejects=rejects))) == 5 and rejects.count == 1
    raw = next(iter(read_samples(tmp_path, decode=False)))
    assert raw["image"] == str(tmp_path / "c" / "0.png")
    make_shards(tmp_path / "s")
    raw = next(iter(read_samples(tmp_path / "s", decode=False)))
    assert raw["image"] == png_bytes(RED, fmt="JPEG")


def test_split_on_a_flat_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("{}\n")
    with pytest.raises(DataError, match="--split applies"):
        read_samples(path, split="val")


def test_truncated_and_garbage_shards_are_rejected_and_the_rest_is_read(tmp_path: Path) -> None:
    members: dict[str, bytes] = {}
    for i in range(4):
        members[f"k{i}.png"] = png_bytes(RED, (64, 64))
        members[f"k{i}.txt"] = f"caption {i}".encode()
    whole = write_tar(tmp_path / "a.tar", members).read_bytes()
    (tmp_path / "b.tar").write_bytes(whole[: len(whole) // 2])  # cut mid-archive
    (tmp_path / "c.tar").write_bytes(b"not a tar at all " * 10)
    write_tar(tmp_path / "d.tar", {"z.png": png_bytes(BLUE), "z.txt": b"last"})
    rejects = Rejects()
    samples = list(read_samples(tmp_path, rejects=rejects))
    keys = [s["key"] for s in samples]
    assert keys[:4] == ["k0", "k1", "k2", "k3"] and keys[-1] == "z"
    assert 0 < len(keys) - 5 < 4  # b.tar gives the samples before the cut, not all four
    assert rejects.by_reason["truncated_shard"] == 2  # b.tar and c.tar lack end blocks
    assert rejects.by_reason["bad_shard"] == 1  # c.tar does not parse at all
    sources = {r["source"] for r in rejects.records}
    assert sources == {str(tmp_path / "b.tar"), str(tmp_path / "c.tar")}


def test_coco_download_layout_finds_images_in_the_split_folder(tmp_path: Path) -> None:
    # annotations/captions_val2017.json next to val2017/: the layout of the COCO download
    write_png(tmp_path / "val2017" / "000000000139.jpg", BLUE)
    data = {
        "images": [{"id": 139, "file_name": "000000000139.jpg"}],
        "annotations": [{"id": 1, "image_id": 139, "caption": "a blue room"}],
    }
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "captions_val2017.json"
    path.write_text(json.dumps(data))
    (sample,) = read_samples(path)
    assert sample["key"] == "139" and sample["text"] == ["a blue room"]
    assert sample["image_path"] == str(tmp_path / "val2017" / "000000000139.jpg")
    instances = {"images": data["images"], "annotations": [{"image_id": 139, "bbox": [0, 0, 1, 1]}]}
    path.write_text(json.dumps(instances))
    with pytest.raises(DataError, match=r"no 'caption'.*captions_\*\.json"):
        list(read_samples(path))
