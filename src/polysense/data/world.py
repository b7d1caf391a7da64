"""The procedural multimodal world: small scenes of coloured shapes with captions, QA, boxes,
OCR text, sound and motion, written as byte-reproducible webdataset shards (docs/world.md).

Every scene draws from its own generator seeded by (seed, split, index), so shards can be made in
any order or in parallel and still be byte-identical. The layout and text of a scene do not depend
on which modalities are written: OCR, audio and video use their own generators.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from functools import cache
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
from PIL import Image, ImageDraw, ImageFont

from polysense.errors import DataError, PolysenseError
from polysense.fileio import atomic_open, atomic_write_text

GENERATOR = "polysense.world"
GENERATOR_VERSION = "1"

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 30),
    "purple": (140, 60, 180),
    "orange": (240, 120, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Side of the square a shape is inscribed in, as a fraction of the canvas (10 / 15 px at 32 px).
SIZES: dict[str, float] = {"small": 0.3125, "large": 0.46875}
# 3x3 grid of the object centre: rows top/middle/bottom x columns left/center/right.
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLUMNS: tuple[str, ...] = ("left", "center", "right")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
# Held out of train/val/test: one per shape, each a different colour.
NOVEL_PAIRS: tuple[tuple[str, str], ...] = (
    ("green", "circle"),
    ("purple", "square"),
    ("orange", "triangle"),
    ("blue", "star"),
)
SPLITS: tuple[str, ...] = ("train", "val", "test", "test_novel")
SPLIT_PERCENT: dict[str, int] = {"val": 5, "test": 10, "test_novel": 5}  # train: the rest
ALL_MODALITIES: tuple[str, ...] = ("image", "text", "ocr", "audio", "video")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")

SAMPLE_RATE = 16000
AUDIO_SAMPLES = SAMPLE_RATE  # 1 s clips
VIDEO_FRAMES = 8
SHAPE_FREQS: dict[str, float] = {
    "circle": 300.0,
    "square": 500.0,
    "triangle": 800.0,
    "star": 1200.0,
}
COLOR_AM_HZ: dict[str, float] = {
    "red": 4.0,
    "green": 8.0,
    "blue": 12.0,
    "yellow": 16.0,
    "purple": 20.0,
    "orange": 24.0,
}
SIZE_AMPLITUDE: dict[str, float] = {"small": 0.35, "large": 0.6}
AM_DEPTH = 0.8
BACKGROUND = 235  # light neutral grey, +-3 of per-pixel noise

_OBJECT_COUNT_P = (0.4, 0.3, 0.3)  # P(1, 2, 3 objects): >= 1/3 single-object scenes
_PLACE_TRIES = 40
_PLACE_RESTARTS = 1000
MIN_SIZE, MAX_SIZE = 24, 512  # below 24 px three objects rarely fit with room to move
_SHARD_RE = re.compile(r"shard-\d{6}\.tar")


def position_name(row: str, column: str) -> str:
    """'top left', 'middle right', ...; the middle cell is just 'center'."""
    return "center" if (row, column) == ("middle", "center") else f"{row} {column}"


POSITIONS: tuple[str, ...] = tuple(position_name(r, c) for r in ROWS for c in COLUMNS)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in NOVEL_PAIRS)
_PLURALS = {s: s + "s" for s in SHAPES}


def class_names() -> list[str]:
    """The 24 zero-shot classes, "colour shape", colour-major in COLORS x SHAPES order."""
    return [f"{c} {s}" for c, s in ALL_PAIRS]


def split_counts(n: int) -> dict[str, int]:
    """Scenes per split: val 5 %, test 10 %, test_novel 5 % (each floored), train the rest."""
    counts = {split: n * pct // 100 for split, pct in SPLIT_PERCENT.items()}
    return {"train": n - sum(counts.values()), **counts}


def scene_key(split: str, index: int) -> str:
    """Webdataset key of one scene, e.g. 'train-00000123' (no dots)."""
    return f"{split}-{index:08d}"


def scene_rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """The generator of one scene; stream 0 = layout/text/image, 1 = OCR, 2 = audio, 3 = video."""
    return np.random.default_rng([seed, SPLITS.index(split), index, stream])


# ---------------------------------------------------------------------------------------------
# scene: objects, captions, questions, motion


def _shape_px(size_name: str, size: int) -> int:
    return round(SIZES[size_name] * size)


def _travel(size: int) -> tuple[int, int]:
    """(pixels per frame, total pixels over the clip) of the video motion."""
    step = max(1, size // 32)
    return step, step * (VIDEO_FRAMES - 1)


def _position(bbox: Sequence[int], size: int) -> str:
    cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    return position_name(ROWS[min(int(cy * 3 / size), 2)], COLUMNS[min(int(cx * 3 / size), 2)])


def _fits_motion(boxes: list[list[int]], size: int) -> bool:
    """Can the group move by the clip's travel along at least one axis without leaving the canvas?"""
    step, travel = _travel(size)
    need = travel + 2 * (step - 1)  # whole steps must fit on both sides of the still frame
    width = max(b[2] for b in boxes) - min(b[0] for b in boxes)
    height = max(b[3] for b in boxes) - min(b[1] for b in boxes)
    return size - width >= need or size - height >= need


def _apart(a: Sequence[int], b: Sequence[int]) -> bool:
    """Boxes [x0, y0, x1, y1) with at least one pixel of background between them."""
    return a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


def _sample_pairs(rng: np.random.Generator, count: int, novel: bool) -> list[tuple[str, str]]:
    """Distinct (colour, shape) pairs; a test_novel scene holds at least one novel pair."""
    if not novel:
        return [SEEN_PAIRS[i] for i in rng.permutation(len(SEEN_PAIRS))[:count]]
    first = NOVEL_PAIRS[int(rng.integers(len(NOVEL_PAIRS)))]
    rest = [p for p in ALL_PAIRS if p != first]
    pairs = [first] + [rest[i] for i in rng.permutation(len(rest))[: count - 1]]
    return [pairs[i] for i in rng.permutation(count)]


def _place(
    rng: np.random.Generator, pairs: list[tuple[str, str]], size: int
) -> list[dict[str, Any]]:
    """Non-overlapping objects inside the canvas; a large object that does not fit becomes small,
    and the whole layout is redrawn if even that fails (rare, still deterministic)."""
    for _ in range(_PLACE_RESTARTS):
        objects: list[dict[str, Any]] = []
        for color, shape in pairs:
            size_name = "large" if rng.random() < 0.5 else "small"
            box = None
            for name in dict.fromkeys((size_name, "small")):
                side = _shape_px(name, size)
                others = [o["bbox"] for o in objects]
                # One draw of candidate corners per object: numpy calls cost more than the tests.
                for x0, y0 in rng.integers(0, size - side + 1, size=(_PLACE_TRIES, 2)).tolist():
                    cand = [x0, y0, x0 + side, y0 + side]
                    if all(_apart(cand, b) for b in others) and _fits_motion([*others, cand], size):
                        box, size_name = cand, name
                        break
                if box is not None:
                    break
            if box is None:
                break
            objects.append(
                {
                    "color": color,
                    "shape": shape,
                    "size": size_name,
                    "bbox": box,
                    "position": _position(box, size),
                }
            )
        if len(objects) == len(pairs):
            return objects
    raise PolysenseError(f"size={size}: found no layout for {len(pairs)} objects; use --size 32")


def relations_between(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Relations that hold for `a` relative to `b` from their boxes: 'left of' when a ends before
    b starts horizontally, 'above' when a ends before b starts vertically, and so on."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["bbox"], b["bbox"]
    out = []
    if ax1 <= bx0:
        out.append("left of")
    elif bx1 <= ax0:
        out.append("right of")
    if ay1 <= by0:
        out.append("above")
    elif by1 <= ay0:
        out.append("below")
    return out


def _a(obj: dict[str, Any], *, with_size: bool = False) -> str:
    words = (
        f"{obj['size']} {obj['color']} {obj['shape']}"
        if with_size
        else f"{obj['color']} {obj['shape']}"
    )
    return ("an " if words[0] in "aeiou" else "a ") + words


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _captions(rng: np.random.Generator, objects: list[dict[str, Any]]) -> list[str]:
    """Paraphrased captions: attributes, count, position, then relations (or a plain paraphrase)."""
    n = len(objects)
    names = _and([_a(o) for o in objects])
    count = f"{NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}"
    captions = [
        _and([_a(o, with_size=True) for o in objects]),
        (f"{count}: {names}", f"there {'are' if n > 1 else 'is'} {count}: {names}")[
            int(rng.integers(2))
        ],
        _and([f"{_a(o)} in the {o['position']}" for o in objects]),
    ]
    if n == 1:
        templates = ("a picture of {}", "{} on a plain background", "an image of {}")
        captions.append(templates[int(rng.integers(3))].format(_a(objects[0], with_size=True)))
        return captions
    facts = [
        (i, rel, j)
        for i, j in combinations(range(n), 2)
        for rel in relations_between(objects[i], objects[j])
    ]
    for k in rng.permutation(len(facts))[:2]:
        i, rel, j = facts[k]
        if rng.random() < 0.5:  # say it from the other object's side
            i, j, rel = j, i, _INVERSE[rel]
        captions.append(f"{_a(objects[i])} {rel} {_a(objects[j])}")
    return captions


_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _near_boundary(value: float, size: int) -> bool:
    """Within a pixel-scale margin of a grid line: a position question there would be ambiguous."""
    margin = size / 32
    return any(abs(value - size * k / 3) < margin for k in (1, 2))


def _questions(
    rng: np.random.Generator, objects: list[dict[str, Any]], novel: bool, size: int
) -> list[dict[str, str]]:
    """Unambiguous QA: an object is only named by an attribute no other object shares."""
    qa: list[dict[str, str]] = []
    shapes = Counter(o["shape"] for o in objects)
    colors = Counter(o["color"] for o in objects)
    for o in objects:
        if shapes[o["shape"]] == 1:
            qa.append(_q(f"what color is the {o['shape']}?", o["color"], "color"))
    for o in objects:
        if colors[o["color"]] == 1:
            qa.append(_q(f"what shape is the {o['color']} object?", o["shape"], "shape"))
    qa.append(_q("how many shapes are there?", NUMBER_WORDS[len(objects)], "count"))
    asked = SHAPES[int(rng.integers(len(SHAPES)))]
    qa.append(_q(f"how many {_PLURALS[asked]} are there?", NUMBER_WORDS[shapes[asked]], "count"))
    for o in objects:  # (colour, shape) pairs are distinct within a scene
        cx, cy = (o["bbox"][0] + o["bbox"][2]) / 2, (o["bbox"][1] + o["bbox"][3]) / 2
        axes = [ax for ax, v in (("x", cx), ("y", cy)) if not _near_boundary(v, size)]
        if not axes:
            continue
        ref = f"the {o['color']} {o['shape']}"
        if axes[int(rng.integers(len(axes)))] == "x":
            answer = COLUMNS[min(int(cx * 3 / size), 2)]
            qa.append(
                _q(f"is {ref} on the left, in the center or on the right?", answer, "position")
            )
        else:
            answer = ROWS[min(int(cy * 3 / size), 2)]
            qa.append(
                _q(f"is {ref} at the top, in the middle or at the bottom?", answer, "position")
            )
    k = min(2, len(objects))
    present = [(o["color"], o["shape"]) for o in objects]
    absent = [p for p in (ALL_PAIRS if novel else SEEN_PAIRS) if p not in present]
    yes = [present[i] for i in rng.permutation(len(present))[:k]]
    no = [absent[i] for i in rng.permutation(len(absent))[:k]]
    exists = [(p, "yes") for p in yes] + [(p, "no") for p in no]
    for i in rng.permutation(len(exists)):
        (color, shape), answer = exists[i]
        qa.append(_q(f"is there {_a({'color': color, 'shape': shape})}?", answer, "exists"))
    return qa


def _q(question: str, answer: str, kind: str) -> dict[str, str]:
    return {"question": question, "answer": answer, "type": kind}


def _motion(rng: np.random.Generator, objects: list[dict[str, Any]], size: int) -> dict[str, Any]:
    """A direction the whole group can travel in, and which frame shows the still image."""
    step, _ = _travel(size)
    x0 = min(o["bbox"][0] for o in objects)
    y0 = min(o["bbox"][1] for o in objects)
    x1 = max(o["bbox"][2] for o in objects)
    y1 = max(o["bbox"][3] for o in objects)
    room = {"left": (x0, size - x1), "right": (size - x1, x0), "up": (y0, size - y1)}
    room["down"] = (size - y1, y0)  # (room ahead, room behind)
    last = VIDEO_FRAMES - 1
    options = [d for d in DIRECTIONS if room[d][0] // step + room[d][1] // step >= last]
    direction = options[int(rng.integers(len(options)))]
    ahead, behind = room[direction]
    lo, hi = max(0, last - ahead // step), min(last, behind // step)
    frame = int(rng.integers(lo, hi + 1))
    caption = f"{_and([_a(o) for o in objects])} moving {direction}"
    return {
        "motion": direction,
        "motion_step": step,
        "video_image_frame": frame,
        "caption": caption,
    }


def make_scene(rng: np.random.Generator, *, split: str, index: int, size: int) -> dict[str, Any]:
    """One scene's metadata (the json member without the other modalities' fields)."""
    r = rng.random()
    count = 1 if r < _OBJECT_COUNT_P[0] else 2 if r < sum(_OBJECT_COUNT_P[:2]) else 3
    objects = _place(rng, _sample_pairs(rng, count, split == "test_novel"), size)
    captions = _captions(rng, objects)
    qa = _questions(rng, objects, split == "test_novel", size)
    motion = _motion(rng, objects, size)
    relations = [
        [i, rel, j]
        for i, j in combinations(range(len(objects)), 2)
        for rel in relations_between(objects[i], objects[j])
    ]
    label = f"{objects[0]['color']} {objects[0]['shape']}" if count == 1 else None
    return {
        "key": scene_key(split, index),
        "split": split,
        "captions": captions,
        "objects": objects,
        "relations": relations,
        "qa": qa,
        "label": label,
        "_motion": motion,
    }


# ---------------------------------------------------------------------------------------------
# rendering: image, OCR, audio, video


def _star(cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    angles = np.pi / 2 + np.arange(10) * np.pi / 5  # tips at even indices, first tip up
    radii = np.where(np.arange(10) % 2 == 0, radius, radius * 0.5)
    return [(cx + r * np.cos(a), cy - r * np.sin(a)) for a, r in zip(angles, radii, strict=True)]


def _index_map(objects: list[dict[str, Any]], size: int) -> np.ndarray:
    """(H, W) uint8: 0 = background, k = object k-1 (Pillow draws the shapes, aliased)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for k, o in enumerate(objects, start=1):
        x0, y0, x1, y1 = o["bbox"]
        box = (x0, y0, x1 - 1, y1 - 1)
        if o["shape"] == "circle":
            draw.ellipse(box, fill=k)
        elif o["shape"] == "square":
            draw.rectangle(box, fill=k)
        elif o["shape"] == "triangle":
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=k)
        else:  # star: moved down so that its tips are centred vertically in the box
            radius = (x1 - x0 - 1) / 2
            cy = (y0 + y1 - 1) / 2 + radius * (1 - np.cos(np.pi / 5)) / 2
            draw.polygon(_star((x0 + x1 - 1) / 2, cy, radius), fill=k)
    return np.asarray(canvas)


def _compose(
    index: np.ndarray, objects: list[dict[str, Any]], background: np.ndarray
) -> np.ndarray:
    """(..., H, W, 3) uint8: object colours where the index map says, background elsewhere."""
    palette = np.array([[0, 0, 0]] + [COLORS[o["color"]] for o in objects], dtype=np.uint8)
    return np.where(index[..., None] > 0, palette[index], background)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    noise = rng.integers(-3, 4, size=(size, size, 1), dtype=np.int16)
    return np.repeat((BACKGROUND + noise).astype(np.uint8), 3, axis=2)  # (H, W, 3) neutral grey


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)  # 3x faster than 6
    return buf.getvalue()


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=round(size * 0.55))


def render_ocr(text: str, size: int) -> Image.Image:
    """Black text centred on a white (4 * size, size) image, Pillow's default font."""
    image = Image.new("RGB", (4 * size, size), (255, 255, 255))
    ImageDraw.Draw(image).text(
        (2 * size, size / 2), text, fill=(0, 0, 0), font=_font(size), anchor="mm"
    )
    return image


def _ocr_text(rng: np.random.Generator) -> str:
    words = [*COLORS, *SHAPES]
    return f"{words[int(rng.integers(len(words)))].upper()} {int(rng.integers(100))}"


@cache
def _tone(shape: str, color: str, size_name: str, length: int) -> np.ndarray:
    """(length,) float32 read-only: one object's sound, 10 ms raised-cosine fades (no clicks)."""
    t = np.arange(length) / SAMPLE_RATE
    envelope = (1 + AM_DEPTH * np.sin(2 * np.pi * COLOR_AM_HZ[color] * t)) / (1 + AM_DEPTH)
    tone = SIZE_AMPLITUDE[size_name] * envelope * np.sin(2 * np.pi * SHAPE_FREQS[shape] * t)
    fade = SAMPLE_RATE // 100
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, fade))
    tone[:fade] *= ramp
    tone[-fade:] *= ramp[::-1]
    tone = tone.astype(np.float32)
    tone.flags.writeable = False
    return tone


def render_audio(
    rng: np.random.Generator, objects: list[dict[str, Any]]
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """(16000,) float32 clip: one time slot per object, left to right; the shape sets the pitch,
    the colour the amplitude-modulation rate, the size the loudness; plus faint uniform noise."""
    order = sorted(range(len(objects)), key=lambda k: (sum(objects[k]["bbox"][0::2]), k))
    slot = AUDIO_SAMPLES // len(objects)
    wave = (rng.random(AUDIO_SAMPLES, dtype=np.float32) - 0.5) * 0.01  # (T,) noise in +-0.005
    sounds = []
    for slot_i, k in enumerate(order):
        o = objects[k]
        start = slot_i * slot
        end = AUDIO_SAMPLES if slot_i == len(order) - 1 else start + slot
        wave[start:end] += _tone(o["shape"], o["color"], o["size"], end - start)
        sounds.append(
            {
                "color": o["color"],
                "shape": o["shape"],
                "start": start / SAMPLE_RATE,
                "end": end / SAMPLE_RATE,
                "freq": SHAPE_FREQS[o["shape"]],
                "am_hz": COLOR_AM_HZ[o["color"]],
            }
        )
    return np.clip(wave, -1.0, 1.0), sounds


def _wav(wave: np.ndarray) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, wave, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def render_video(
    index: np.ndarray, objects: list[dict[str, Any]], background: np.ndarray, motion: dict[str, Any]
) -> np.ndarray:
    """(T, H, W, 3) uint8: the objects translated by `motion_step` px per frame; frame
    `video_image_frame` is the still image. The move never wraps (checked when placing)."""
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[motion["motion"]]
    moved = []
    for t in range(VIDEO_FRAMES):
        shift = (t - motion["video_image_frame"]) * motion["motion_step"]
        moved.append(np.roll(index, (shift * dy, shift * dx), axis=(0, 1)))
    return _compose(np.stack(moved), objects, background)  # (T, H, W, 3)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def render_sample(
    *, seed: int, split: str, index: int, size: int, modalities: Sequence[str] = ALL_MODALITIES
) -> dict[str, bytes]:
    """The tar members of one scene, in their fixed order: {"png", "json", "ocr.png", "wav",
    "video.npy"} (the last three only when asked for)."""
    rng = scene_rng(seed, split, index)
    scene = make_scene(rng, split=split, index=index, size=size)
    motion = scene.pop("_motion")
    background = _background(rng, size)
    index_map = _index_map(scene["objects"], size)
    members = {"png": _png(_compose(index_map, scene["objects"], background)), "json": b""}
    if "ocr" in modalities:
        scene["ocr_text"] = _ocr_text(scene_rng(seed, split, index, 1))
        members["ocr.png"] = _png(np.asarray(render_ocr(scene["ocr_text"], size)))
    if "audio" in modalities:
        wave, scene["sounds"] = render_audio(scene_rng(seed, split, index, 2), scene["objects"])
        scene["sample_rate"] = SAMPLE_RATE
        members["wav"] = _wav(wave)
    if "video" in modalities:
        members["video.npy"] = _npy(render_video(index_map, scene["objects"], background, motion))
        scene["motion"] = motion["motion"]
        scene["motion_step"] = motion["motion_step"]
        scene["video_image_frame"] = motion["video_image_frame"]
        scene["motion_caption"] = motion["caption"]
    members["json"] = json.dumps(scene, separators=(",", ":")).encode("utf-8")
    return members


# ---------------------------------------------------------------------------------------------
# shards, manifest, generation


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _write_shard(task: tuple[str, str, int, int, int, int, int, tuple[str, ...]]) -> dict[str, Any]:
    """Write one shard (temp file + os.replace); returns its manifest entry."""
    root, split, shard, start, stop, seed, size, modalities = task
    rel = f"{split}/shard-{shard:06d}.tar"
    path = Path(root) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        atomic_open(path, "wb") as fh,
        tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for i in range(start, stop):
            key = scene_key(split, i)
            for ext, data in render_sample(
                seed=seed, split=split, index=i, size=size, modalities=modalities
            ).items():
                tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    return {"path": rel, "count": stop - start, "sha256": digest}


def _check_args(
    n: int, seed: int, size: int, modalities: Sequence[str] | str, shard_size: int, workers: int
) -> tuple[str, ...]:
    def integer(v: object) -> bool:
        return isinstance(v, int | np.integer) and not isinstance(v, bool)

    if not integer(n) or n < 1:
        raise PolysenseError(
            f"n={n!r}: the number of scenes must be an integer >= 1; pass --n 2000"
        )
    if not integer(seed) or seed < 0:
        raise PolysenseError(f"seed={seed!r}: the seed must be an integer >= 0; pass --seed 0")
    if not integer(size) or not MIN_SIZE <= size <= MAX_SIZE:
        raise PolysenseError(
            f"size={size!r}: the canvas size must be an integer from {MIN_SIZE} to {MAX_SIZE} px "
            "(32 and 64 are the tested sizes); pass --size 32"
        )
    if not integer(shard_size) or shard_size < 1:
        raise PolysenseError(
            f"shard_size={shard_size!r}: must be an integer >= 1; pass --shard-size 1000"
        )
    if not integer(workers) or workers < 0:
        raise PolysenseError(
            f"workers={workers!r}: must be >= 0 (0 = one per CPU core); pass --workers 0"
        )
    if isinstance(modalities, str):
        modalities = [m.strip() for m in modalities.split(",") if m.strip()]
    unknown = [m for m in modalities if m not in ALL_MODALITIES]
    if unknown:
        raise PolysenseError(
            f"modalities: unknown {unknown}; choose from {', '.join(ALL_MODALITIES)} "
            "(image and text are always written), e.g. --modalities image,text,audio"
        )
    chosen = {"image", "text", *modalities}
    return tuple(m for m in ALL_MODALITIES if m in chosen)


def generate_world(
    out: str | Path,
    *,
    n: int,
    seed: int = 0,
    size: int = 32,
    modalities: Sequence[str] = ALL_MODALITIES,
    shard_size: int = 1000,
    workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write `n` scenes as `{out}/{split}/shard-NNNNNN.tar` plus `{out}/manifest.json`, and return
    the manifest. Output bytes depend only on (n, seed, size, modalities, shard_size), never on
    `workers` (0 = one process per CPU core). Stale shards of an earlier, larger run are removed."""
    mods = _check_args(n, seed, size, modalities, shard_size, workers)
    n, seed, size, shard_size, workers = (int(v) for v in (n, seed, size, shard_size, workers))
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    counts = split_counts(n)
    tasks = [
        (str(root), split, s, start, min(start + shard_size, counts[split]), seed, size, mods)
        for split in SPLITS
        for s, start in enumerate(range(0, counts[split], shard_size))
    ]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = min(workers or cores or 1, len(tasks))
    entries: dict[tuple[str, str], dict[str, Any]] = {}
    if workers == 1:
        with _progress_bar(progress, n) as advance:
            for task in tasks:
                entries[task[1], task[2]] = entry = _write_shard(task)
                advance(entry["count"])
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            # Submit (which starts the workers) before the progress bar starts its thread.
            futures = {pool.submit(_write_shard, task): task for task in tasks}
            with _progress_bar(progress, n) as advance:
                for future in as_completed(futures):
                    task = futures[future]
                    entries[task[1], task[2]] = entry = future.result()
                    advance(entry["count"])
    splits: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        shards = [entries[t[1], t[2]] for t in tasks if t[1] == split]
        splits[split] = {"count": counts[split], "shards": shards}
        split_dir = root / split
        if split_dir.is_dir():  # shards beyond this run's last one belong to an earlier run
            keep = {Path(e["path"]).name for e in shards}
            for old in split_dir.iterdir():
                if _SHARD_RE.fullmatch(old.name) and old.name not in keep:
                    old.unlink()
    manifest = {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "size": size,
        "n": n,
        "modalities": list(mods),
        "counts": counts,
        "splits": splits,
        "vocab": {
            "colors": list(COLORS),
            "shapes": list(SHAPES),
            "sizes": list(SIZES),
            "positions": list(POSITIONS),
            "relations": list(RELATIONS),
            "directions": list(DIRECTIONS),
        },
        "classes": class_names(),
        "novel_pairs": [list(p) for p in NOVEL_PAIRS],
        "sample_rate": SAMPLE_RATE,
        "video_frames": VIDEO_FRAMES,
    }
    _write_json(root / "manifest.json", manifest)
    return manifest


@contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over scenes (or nothing); yields an `advance(k)` callable."""
    if not enabled:
        yield lambda k: None
        return
    from rich.progress import Progress

    with Progress() as bar:
        task = bar.add_task("world scenes", total=total)
        yield lambda k: bar.update(task, advance=k)


def load_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of a generated world (a directory or its manifest.json)."""
    path = Path(root)
    path = path if path.suffix == ".json" else path / "manifest.json"
    hint = f"generate it with `polysense world generate --out {path.parent}`"
    if not path.is_file():
        raise DataError(f"{path}: world manifest not found; {hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); {hint}") from exc
    if not isinstance(manifest, dict) or manifest.get("generator") != GENERATOR:
        raise DataError(f"{path}: field 'generator' is not '{GENERATOR}'; {hint}")
    return manifest


def shard_paths(root: str | Path, split: str) -> list[Path]:
    """The shard files of one split, in order, as listed by the manifest."""
    manifest = load_manifest(root)
    if split not in manifest["splits"]:
        raise DataError(
            f"{root}: world has no split '{split}'; choose one of {list(manifest['splits'])}"
        )
    base = Path(root) if Path(root).suffix != ".json" else Path(root).parent
    return [base / s["path"] for s in manifest["splits"][split]["shards"]]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
