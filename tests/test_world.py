"""The procedural world: reproducible bytes, split rules, and every modality checked against the
scene's objects by an independent route (pixels, FFT, centroids, regex-parsed questions)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import webdataset as wds
from PIL import Image

from polysense.data import world
from polysense.data.world import (
    COLOR_AM_HZ,
    COLORS,
    NOVEL_PAIRS,
    SHAPE_FREQS,
    SHAPES,
    class_names,
    generate_world,
    load_manifest,
    render_ocr,
    shard_paths,
    split_counts,
)
from polysense.errors import DataError, PolysenseError

SIZE = 32
WORDS = ["zero", "one", "two", "three"]
ALL_MEMBERS = {"png", "json", "ocr.png", "wav", "video.npy"}


def read_split(root: Path, split: str) -> list[dict]:
    """Raw samples of one split through webdataset itself, in shard order."""
    urls = [str(p) for p in shard_paths(root, split)]
    if not urls:
        return []
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def meta(sample: dict) -> dict:
    return json.loads(sample["json"])


def centre(bbox: list[int]) -> tuple[float, float]:
    return (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2


def grid(value: float, names: tuple[str, str, str]) -> str:
    return names[min(int(value * 3 / SIZE), 2)]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)  # nothing here uses torch; kept for the suite's determinism rule
    out = tmp_path_factory.mktemp("world") / "w"
    generate_world(out, n=400, seed=3, size=SIZE, shard_size=64, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def samples(root: Path) -> dict[str, list[dict]]:
    return {split: read_split(root, split) for split in world.SPLITS}


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# ---------------------------------------------------------------------------------------------
# vocabulary


def test_vocabulary_sizes_and_separation():
    assert list(COLORS) == ["red", "green", "blue", "yellow", "purple", "orange"]
    assert SHAPES == ("circle", "square", "triangle", "star")
    names = class_names()
    assert len(names) == 24 == len(set(names)) and names[0] == "red circle"
    # one novel pair per shape, each a different colour
    assert sorted(s for _, s in NOVEL_PAIRS) == sorted(SHAPES)
    assert len({c for c, _ in NOVEL_PAIRS}) == 4
    rgb = np.array(list(COLORS.values()), dtype=float)
    gaps = [np.linalg.norm(a - b) for a, b in combinations(rgb, 2)]
    assert min(gaps) > 80  # well separated
    grey = np.array([world.BACKGROUND] * 3, dtype=float)
    assert min(np.linalg.norm(rgb - grey, axis=1)) > 80  # every colour stands off the background


def test_split_counts_by_hand():
    assert split_counts(1000) == {"train": 800, "val": 50, "test": 100, "test_novel": 50}
    assert split_counts(20) == {"train": 16, "val": 1, "test": 2, "test_novel": 1}
    assert split_counts(19) == {"train": 18, "val": 0, "test": 1, "test_novel": 0}
    for n in range(20, 300):
        counts = split_counts(n)
        assert sum(counts.values()) == n and min(counts.values()) >= 1


# ---------------------------------------------------------------------------------------------
# bytes and layout


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kwargs = {"n": 40, "size": SIZE, "shard_size": 16, "workers": 1, "progress": False}
    a = generate_world(tmp_path / "a", seed=5, **kwargs)
    b = generate_world(tmp_path / "b", seed=5, **kwargs)
    c = generate_world(tmp_path / "c", seed=6, **kwargs)
    fa, fb = files(tmp_path / "a"), files(tmp_path / "b")
    assert fa == fb and a == b
    assert any(name.endswith(".tar") for name in fa)
    sha = {s["path"]: s["sha256"] for v in a["splits"].values() for s in v["shards"]}
    sha_c = {s["path"]: s["sha256"] for v in c["splits"].values() for s in v["shards"]}
    assert sha.keys() == sha_c.keys()
    assert all(sha[p] != sha_c[p] for p in sha)


def test_workers_do_not_change_bytes(tmp_path):
    kwargs = {"n": 60, "seed": 2, "size": SIZE, "shard_size": 8, "progress": False}
    generate_world(tmp_path / "one", workers=1, **kwargs)
    generate_world(tmp_path / "two", workers=2, **kwargs)
    assert files(tmp_path / "one") == files(tmp_path / "two")


def test_manifest_matches_what_is_in_the_tars(root, samples):
    manifest = load_manifest(root)
    assert manifest["generator"] == "polysense.world" and manifest["n"] == 400
    assert manifest["counts"] == {"train": 320, "val": 20, "test": 40, "test_novel": 20}
    assert manifest["classes"] == class_names()
    assert manifest["novel_pairs"] == [list(p) for p in NOVEL_PAIRS]
    for split, entry in manifest["splits"].items():
        assert len(samples[split]) == manifest["counts"][split] == entry["count"]
        assert sum(s["count"] for s in entry["shards"]) == entry["count"]
        for shard in entry["shards"]:
            data = (root / shard["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
            assert re.fullmatch(rf"{split}/shard-\d{{6}}\.tar", shard["path"])
        keys = [s["__key__"] for s in samples[split]]
        assert keys == [f"{split}-{i:08d}" for i in range(len(keys))]
        for s in samples[split]:
            assert {k for k in s if not k.startswith("__")} == ALL_MEMBERS
            assert meta(s)["key"] == s["__key__"] and meta(s)["split"] == split
    # fixed member metadata, fixed order, no dots in keys
    with tarfile.open(root / manifest["splits"]["val"]["shards"][0]["path"]) as tar:
        members = tar.getmembers()
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
        (0, 0, 0, "", "", 0o644)
    }
    exts = [m.name.split(".", 1)[1] for m in members[:5]]
    assert exts == ["png", "json", "ocr.png", "wav", "video.npy"]
    assert all(m.name.count(".") == m.name.split(".", 1)[1].count(".") + 1 for m in members)


def test_rerun_with_fewer_scenes_removes_stale_shards(tmp_path):
    kwargs = {"seed": 0, "size": SIZE, "shard_size": 10, "workers": 1, "progress": False}
    generate_world(tmp_path, n=100, modalities=("image",), **kwargs)
    manifest = generate_world(tmp_path, n=40, modalities=("image",), **kwargs)
    listed = {s["path"] for v in manifest["splits"].values() for s in v["shards"]}
    on_disk = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.tar")}
    assert on_disk == listed
    assert not list(tmp_path.rglob("*.tmp"))


def test_modalities_subset_keeps_scenes_identical(tmp_path, root, samples):
    generate_world(
        tmp_path, n=400, seed=3, size=SIZE, shard_size=64, modalities=("text",), progress=False
    )
    assert load_manifest(tmp_path)["modalities"] == ["image", "text"]
    subset = read_split(tmp_path, "val")
    full = samples["val"]
    for small, big in zip(subset, full, strict=True):
        assert {k for k in small if not k.startswith("__")} == {"png", "json"}
        assert small["png"] == big["png"]
        extra = {
            "ocr_text",
            "sounds",
            "sample_rate",
            "motion",
            "motion_step",
            "video_image_frame",
            "motion_caption",
        }
        assert meta(small) == {k: v for k, v in meta(big).items() if k not in extra}


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"n": 0}, "n=0"),
        ({"n": 10, "size": 8}, "size=8"),
        ({"n": 10, "size": 20}, "size=20"),
        ({"n": 10, "modalities": ("image", "smell")}, "smell"),
        ({"n": 10, "shard_size": 0}, "shard_size=0"),
        ({"n": 10, "workers": -1}, "workers=-1"),
        ({"n": 10, "seed": -3}, "seed=-3"),
    ],
)
def test_bad_arguments_are_clear_errors(tmp_path, kwargs, named):
    with pytest.raises(PolysenseError, match=re.escape(named)):
        generate_world(tmp_path, progress=False, **kwargs)
    assert not (tmp_path / "manifest.json").exists()


def test_load_manifest_errors(tmp_path):
    with pytest.raises(DataError, match=r"manifest\.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"generator": "other"}')
    with pytest.raises(DataError, match="generator"):
        load_manifest(tmp_path)


def test_unknown_split_is_a_clear_error(root):
    with pytest.raises(DataError, match="no split 'dev'"):
        shard_paths(root, "dev")


# ---------------------------------------------------------------------------------------------
# scenes


def test_novel_pairs_only_in_test_novel(samples):
    novel = {tuple(p) for p in NOVEL_PAIRS}
    seen_pairs: set[tuple[str, str]] = set()
    for split in ("train", "val", "test"):
        for s in samples[split]:
            m = meta(s)
            pairs = {(o["color"], o["shape"]) for o in m["objects"]}
            assert not pairs & novel, m["key"]
            seen_pairs |= pairs
            # negatives of existence questions do not leak novel pairs into training text
            asked = {tuple(q["question"].split()[-2:]) for q in m["qa"] if q["type"] == "exists"}
            assert not {(c, sh.rstrip("?")) for c, sh in asked} & novel
    assert seen_pairs.isdisjoint(novel) and len(seen_pairs) == 20  # all 20 seen pairs occur
    assert samples["test_novel"]
    for s in samples["test_novel"]:
        pairs = {(o["color"], o["shape"]) for o in meta(s)["objects"]}
        assert pairs & novel, meta(s)["key"]


def test_object_counts_labels_and_layout(samples):
    scenes = [meta(s) for split in samples.values() for s in split]
    counts = [len(m["objects"]) for m in scenes]
    assert set(counts) == {1, 2, 3}
    assert counts.count(1) / len(counts) >= 1 / 3
    for m in scenes:
        objs = m["objects"]
        pairs = [(o["color"], o["shape"]) for o in objs]
        assert len(set(pairs)) == len(pairs)
        assert m["label"] == (f"{objs[0]['color']} {objs[0]['shape']}" if len(objs) == 1 else None)
        for o in objs:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE and x1 - x0 == y1 - y0
            assert o["size"] in world.SIZES and o["color"] in COLORS and o["shape"] in SHAPES
            cx, cy = centre(o["bbox"])
            row, col = grid(cy, ("top", "middle", "bottom")), grid(cx, ("left", "center", "right"))
            assert o["position"] == (
                "center" if (row, col) == ("middle", "center") else f"{row} {col}"
            )
        for a, b in combinations(objs, 2):  # boxes do not overlap
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["bbox"], b["bbox"]
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0


def test_captions_are_true_of_the_scene(samples):
    relation = re.compile(r"an? (\w+) (\w+) (left of|right of|above|below) an? (\w+) (\w+)")
    placed = re.compile(r"an? (\w+) (\w+) in the ([a-z ]+?)(?= and |, |$)")
    n_relations = 0
    for s in samples["train"]:
        m = meta(s)
        caps, objs = m["captions"], m["objects"]
        assert len(caps) >= 3 and len(set(caps)) == len(caps)
        by_pair = {(o["color"], o["shape"]): o for o in objs}
        for o in objs:  # attribute caption names every object with its size
            assert f"{o['size']} {o['color']} {o['shape']}" in caps[0]
        n = len(objs)
        assert any(
            c.split(":")[0].endswith(f"{WORDS[n]} shape{'s' if n > 1 else ''}") for c in caps
        )
        found = {(c, sh): pos for cap in caps for c, sh, pos in placed.findall(cap)}
        assert found == {p: o["position"] for p, o in by_pair.items()}
        for cap in caps:
            match = relation.fullmatch(cap)
            if not match:
                continue
            n_relations += 1
            c1, s1, rel, c2, s2 = match.groups()
            a, b = by_pair[c1, s1]["bbox"], by_pair[c2, s2]["bbox"]
            holds = {
                "left of": a[2] <= b[0],
                "right of": b[2] <= a[0],
                "above": a[3] <= b[1],
                "below": b[3] <= a[1],
            }
            assert holds[rel], (m["key"], cap, a, b)
    assert n_relations > 50


def test_questions_agree_with_objects(samples):
    patterns = {
        "color": re.compile(r"what color is the (\w+)\?"),
        "shape": re.compile(r"what shape is the (\w+) object\?"),
        "count": re.compile(r"how many (\w+) are there\?"),
        "position": re.compile(r"is the (\w+) (\w+) (on the left|at the top), .*\?"),
        "exists": re.compile(r"is there an? (\w+) (\w+)\?"),
    }
    answers = {"yes": 0, "no": 0}
    types = set()
    for split in samples.values():
        for s in split:
            objs = meta(s)["objects"]
            for qa in meta(s)["qa"]:
                q, ans, kind = qa["question"], qa["answer"], qa["type"]
                types.add(kind)
                assert re.fullmatch(r"[a-z]+", ans), qa
                match = patterns[kind].fullmatch(q)
                assert match, qa
                if kind == "color":  # the shape names exactly one object
                    (hit,) = [o for o in objs if o["shape"] == match[1]]
                    assert ans == hit["color"]
                elif kind == "shape":
                    (hit,) = [o for o in objs if o["color"] == match[1]]
                    assert ans == hit["shape"]
                elif kind == "count":
                    what = match[1]
                    want = (
                        len(objs)
                        if what == "shapes"
                        else sum(o["shape"] + "s" == what for o in objs)
                    )
                    assert ans == WORDS[want]
                elif kind == "position":
                    (hit,) = [o for o in objs if (o["color"], o["shape"]) == (match[1], match[2])]
                    cx, cy = centre(hit["bbox"])
                    if match[3] == "on the left":
                        assert ans == grid(cx, ("left", "center", "right"))
                    else:
                        assert ans == grid(cy, ("top", "middle", "bottom"))
                else:
                    present = any((o["color"], o["shape"]) == (match[1], match[2]) for o in objs)
                    assert ans == ("yes" if present else "no")
                    answers[ans] += 1
    assert types == {"color", "shape", "count", "position", "exists"}
    assert 0.4 <= answers["yes"] / sum(answers.values()) <= 0.6


# ---------------------------------------------------------------------------------------------
# modalities


def test_image_pixels_show_the_objects(samples):
    checked = 0
    for s in samples["train"] + samples["test_novel"]:
        image = np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB"))
        assert image.shape == (SIZE, SIZE, 3)
        inside = np.zeros((SIZE, SIZE), dtype=bool)
        for o in meta(s)["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            inside[y0:y1, x0:x1] = True
            if o["shape"] in ("circle", "square"):
                assert tuple(image[(y0 + y1) // 2, (x0 + x1) // 2]) == COLORS[o["color"]]
                checked += 1
            # the object's colour fills a fair part of its box (shape drawn where the box says)
            region = image[y0:y1, x0:x1]
            share = np.all(region == COLORS[o["color"]], axis=-1).mean()
            assert share > 0.3, (meta(s)["key"], o, share)
        background = image[~inside].astype(int)  # neutral light grey, a little noise
        assert np.all(np.abs(background - world.BACKGROUND) <= 3)
        assert np.all(background.max(axis=1) == background.min(axis=1))
    assert checked > 100


def dominant_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[np.argmax(spectrum)])


def test_audio_pitch_slots_and_timbre(samples):
    singles = 0
    for s in samples["train"]:
        m = meta(s)
        info = soundfile.info(io.BytesIO(s["wav"]))
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (
            16000,
            1,
            16000,
            "PCM_16",
        )
        wave, rate = soundfile.read(io.BytesIO(s["wav"]), dtype="float64")
        objs = m["objects"]
        left_to_right = sorted(objs, key=lambda o: centre(o["bbox"])[0])
        assert [(x["color"], x["shape"]) for x in m["sounds"]] == [
            (o["color"], o["shape"]) for o in left_to_right
        ]
        for sound, o in zip(m["sounds"], left_to_right, strict=True):
            part = wave[round(sound["start"] * rate) : round(sound["end"] * rate)]
            assert abs(dominant_hz(part, rate) - SHAPE_FREQS[o["shape"]]) <= 3
        if len(objs) == 1:
            singles += 1
            o = objs[0]
            f0 = SHAPE_FREQS[o["shape"]]
            assert abs(dominant_hz(wave, rate) - f0) <= 1
            # the colour's amplitude-modulation rate shows as the strongest sideband
            spectrum = np.abs(np.fft.rfft(wave))
            freqs = np.fft.rfftfreq(len(wave), 1 / rate)
            spectrum[np.abs(freqs - f0) <= 2] = 0
            assert abs(abs(freqs[np.argmax(spectrum)] - f0) - COLOR_AM_HZ[o["color"]]) <= 1
    assert singles > 50


def test_video_objects_move_the_stated_way(samples):
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    for s in samples["train"][:150]:
        m = meta(s)
        video = np.load(io.BytesIO(s["video.npy"]))
        assert video.dtype == np.uint8 and video.shape == (world.VIDEO_FRAMES, SIZE, SIZE, 3)
        image = np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB"))
        assert np.array_equal(video[m["video_image_frame"]], image)
        coloured = video.max(axis=-1).astype(int) - video.min(axis=-1) > 20  # (T, H, W)
        counts = coloured.sum(axis=(1, 2))
        assert np.all(counts == counts[0]) and counts[0] > 0  # never clipped by the border
        ys, xs = np.arange(SIZE)[:, None], np.arange(SIZE)[None, :]
        cx = (coloured * xs).sum(axis=(1, 2)) / counts
        cy = (coloured * ys).sum(axis=(1, 2)) / counts
        dx, dy = step[m["motion"]]
        assert np.allclose(np.diff(cx), dx * m["motion_step"])
        assert np.allclose(np.diff(cy), dy * m["motion_step"])
        assert m["motion_caption"].endswith(f"moving {m['motion']}")


def test_ocr_image_holds_its_text(samples):
    words = {w.upper() for w in [*COLORS, *SHAPES]}
    texts = set()
    for s in samples["train"][:100]:
        text = meta(s)["ocr_text"]
        word, number = text.split(" ")
        assert word in words and 0 <= int(number) < 100
        texts.add(text)
        image = np.asarray(Image.open(io.BytesIO(s["ocr.png"])).convert("L"))
        assert image.shape == (SIZE, 4 * SIZE)
        ink = image < 128
        assert ink.sum() > 20
        assert not (ink[0].any() or ink[-1].any() or ink[:, 0].any() or ink[:, -1].any())
        assert np.array_equal(np.asarray(render_ocr(text, SIZE).convert("L")), image)
    assert len(texts) > 50
    assert not np.array_equal(
        np.asarray(render_ocr("RED 1", SIZE)), np.asarray(render_ocr("RED 7", SIZE))
    )


def test_size_64_scales_everything(tmp_path):
    manifest = generate_world(tmp_path, n=20, seed=1, size=64, workers=1, progress=False)
    assert manifest["size"] == 64
    for s in read_split(tmp_path, "train"):
        m = meta(s)
        assert np.asarray(Image.open(io.BytesIO(s["png"]))).shape == (64, 64, 3)
        assert np.load(io.BytesIO(s["video.npy"])).shape == (8, 64, 64, 3)
        assert np.asarray(Image.open(io.BytesIO(s["ocr.png"]))).shape == (64, 256, 3)
        sides = {o["size"]: o["bbox"][2] - o["bbox"][0] for o in m["objects"]}
        assert sides.get("small", 20) == 20 and sides.get("large", 30) == 30


def test_smallest_canvas_and_numpy_arguments(tmp_path):
    manifest = generate_world(
        tmp_path, n=np.int64(60), seed=np.int64(4), size=24, modalities="video", progress=False
    )
    assert manifest["modalities"] == ["image", "text", "video"]
    assert json.loads((tmp_path / "manifest.json").read_text())["seed"] == 4
    for s in read_split(tmp_path, "train"):
        objs = meta(s)["objects"]
        for a, b in combinations(objs, 2):
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["bbox"], b["bbox"]
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0
        assert all(0 <= v <= 24 for o in objs for v in o["bbox"])
        assert np.load(io.BytesIO(s["video.npy"])).shape == (8, 24, 24, 3)


def test_docs_example_is_a_real_scene():
    text = (Path(__file__).parents[1] / "docs" / "world.md").read_text(encoding="utf-8")
    block = re.search(r"```json\n(\{\n  \"key\": \"train-00000000\".*?\n\})\n```", text, re.S)
    assert block, "docs/world.md lost its KEY.json example"
    member = world.render_sample(seed=1, split="train", index=0, size=32)["json"]
    assert json.loads(block[1]) == json.loads(member)
