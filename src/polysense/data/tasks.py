"""Task datasets derived from the world, for fusion models (docs/fusion.md).

Three tasks over the same scenes:

- **VQA as classification**: the world's question–answer pairs, each answer an index into the
  fixed `ANSWERS` vocabulary, with the question type (colour, shape, count, position, exists)
  kept for a per-type breakdown.
- **Image–text matching (ITM)**: balanced true / false captions in three groups. `attr`: "a red
  circle and a blue square" vs the colours swapped between the two objects; `rel`: "a red circle
  left of a blue square" vs the two objects swapped. Both negatives use exactly the words of the
  positive, so a bag of words cannot tell them apart. `random`: a caption of another scene that
  is false here. Every negative is checked false against the scene's objects and boxes.
- **Which object made the sound**: scenes with two or more objects; the audio is the time slot
  of one object's tone cut from the scene's clip (its pitch says the shape, its amplitude
  modulation the colour, nothing says where it is), the answer that object's grid position.
  Audio alone cannot say where, the image alone cannot say which: both are needed.

Everything is held in memory as tensors (a 20k-scene world is about 60 MB of images).
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch
from PIL import Image

from polysense.data.transforms import resize_center_crop
from polysense.data.world import (
    AUDIO_SAMPLES,
    COLORS,
    COLUMNS,
    NUMBER_WORDS,
    POSITIONS,
    ROWS,
    SAMPLE_RATE,
    SHAPES,
    relations_between,
)
from polysense.errors import DataError

# The answer vocabulary: every answer a world question can have, plus the sound task's grid
# positions. Fixed from the world's constants (not from data), so indices never shift.
ANSWERS: tuple[str, ...] = tuple(
    dict.fromkeys([*COLORS, *SHAPES, *NUMBER_WORDS, *COLUMNS, *ROWS, "yes", "no", *POSITIONS])
)
ANSWER_INDEX: dict[str, int] = {a: i for i, a in enumerate(ANSWERS)}
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "position", "exists")
ITM_GROUPS: tuple[str, ...] = ("attr", "rel", "random")
TASKS: tuple[str, ...] = ("vqa", "itm", "sound")
SOUND_QUESTION = "which object made the sound?"
# Audio of the sound task: the first third of a second of the object's slot (a three-object
# scene's slot is exactly this long), so the clip length does not reveal the object count.
SOUND_SAMPLES = AUDIO_SAMPLES // 3


@dataclass
class WorldTasks:
    """The three tasks of one world split. Scene-level tensors are indexed by `*_scene`."""

    split: str
    keys: list[str]
    images: torch.Tensor  # (N, H, W, 3) uint8
    captions: list[list[str]]  # the scene's own captions (for contrastive training)
    vqa_scene: torch.Tensor  # (Q,) long
    vqa_text: list[str]
    vqa_answer: torch.Tensor  # (Q,) long index into ANSWERS
    vqa_type: list[str]
    itm_scene: torch.Tensor  # (M,) long
    itm_text: list[str]
    itm_label: torch.Tensor  # (M,) long, 1 = the caption is true of the image
    itm_group: list[str]
    itm_pair: torch.Tensor  # (M,) long: the positive and its negative share an id; -1 for random
    sound_scene: torch.Tensor  # (S,) long
    sound_audio: torch.Tensor  # (S, SOUND_SAMPLES) float32
    sound_answer: torch.Tensor  # (S,) long index into ANSWERS (a grid position)
    rejects: Counter[str] = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.keys)

    def texts(self) -> list[str]:
        """Every text the tasks use (for training a tokenizer)."""
        return [*self.vqa_text, *self.itm_text, SOUND_QUESTION]

    def sizes(self) -> dict[str, int]:
        return {
            "scenes": len(self.keys),
            "vqa": len(self.vqa_text),
            "itm": len(self.itm_text),
            "sound": len(self.sound_answer),
        }


def _a(color: str, shape: str) -> str:
    return ("an " if color[0] in "aeiou" else "a ") + f"{color} {shape}"


def caption_true(caption: str, objects: list[dict[str, Any]]) -> bool:
    """Is an ITM caption ("a red circle and a blue square", "a red circle left of a blue
    square", "a red circle") true of these objects? Checked from colours, shapes and boxes."""
    by_pair = {(o["color"], o["shape"]): o for o in objects}
    for rel in ("left of", "right of", "above", "below"):
        if f" {rel} " in caption:
            left, right = caption.split(f" {rel} ")
            a, b = _parse_object(left), _parse_object(right)
            if a not in by_pair or b not in by_pair:
                return False
            return rel in relations_between(by_pair[a], by_pair[b])
    return all(_parse_object(part) in by_pair for part in caption.split(" and "))


def _parse_object(text: str) -> tuple[str, str]:
    words = text.split()
    return words[-2], words[-1]


def _itm_items(
    rng: np.random.Generator, objects: list[dict[str, Any]], others: list[str]
) -> list[tuple[str, int, str, bool]]:
    """(caption, label, group, paired) items of one scene: attr and rel pairs when the scene
    allows them, and a random true/false pair always."""
    items: list[tuple[str, int, str, bool]] = []
    n = len(objects)
    swappable = [
        (i, j)
        for i in range(n)
        for j in range(i + 1, n)
        if objects[i]["color"] != objects[j]["color"] and objects[i]["shape"] != objects[j]["shape"]
    ]
    if swappable:
        i, j = swappable[int(rng.integers(len(swappable)))]
        if rng.random() < 0.5:
            i, j = j, i
        a, b = objects[i], objects[j]
        pos = f"{_a(a['color'], a['shape'])} and {_a(b['color'], b['shape'])}"
        neg = f"{_a(b['color'], a['shape'])} and {_a(a['color'], b['shape'])}"
        items += [(pos, 1, "attr", True), (neg, 0, "attr", True)]
    facts = [
        (i, rel, j)
        for i in range(n)
        for j in range(n)
        if i != j
        for rel in relations_between(objects[i], objects[j])
    ]
    if facts:
        i, rel, j = facts[int(rng.integers(len(facts)))]
        a, b = objects[i], objects[j]
        pos = f"{_a(a['color'], a['shape'])} {rel} {_a(b['color'], b['shape'])}"
        neg = f"{_a(b['color'], b['shape'])} {rel} {_a(a['color'], a['shape'])}"
        items += [(pos, 1, "rel", True), (neg, 0, "rel", True)]
    o = objects[int(rng.integers(n))]
    items.append((_a(o["color"], o["shape"]), 1, "random", False))
    for k in rng.permutation(len(others))[:20]:  # another scene's caption that is false here
        if not caption_true(others[k], objects):
            items.append((others[k], 0, "random", False))
            break
    return items


def _audio_slot(audio: np.ndarray, sound: dict[str, Any]) -> np.ndarray:
    start = round(float(sound["start"]) * SAMPLE_RATE)
    clip = np.zeros(SOUND_SAMPLES, dtype=np.float32)
    piece = np.asarray(audio[start : start + SOUND_SAMPLES], dtype=np.float32)
    clip[: len(piece)] = piece
    return clip


def _image(value: Any) -> Image.Image | None:
    """A PIL image from a decoded sample or from raw bytes (read_samples(decode=False))."""
    if value is None or isinstance(value, Image.Image):
        return value
    with Image.open(io.BytesIO(value)) as im:
        return im.convert("RGB")


def _audio(value: Any) -> np.ndarray | None:
    if value is None or isinstance(value, np.ndarray):
        return value
    wave, _ = soundfile.read(io.BytesIO(value), dtype="float32")
    return wave


def build_tasks(
    samples: Iterable[dict[str, Any]], *, split: str, image_size: int = 32, seed: int = 0
) -> WorldTasks:
    """The three tasks from world sample dicts (as `read_samples` yields them). A scene without an
    image or objects is skipped; a question whose answer is outside `ANSWERS`, or a scene whose
    audio or sounds do not match its objects, loses only that item. Counts land in `rejects`."""
    rng = np.random.default_rng([seed, 17])
    rejects: Counter[str] = Counter()
    keys: list[str] = []
    images: list[np.ndarray] = []
    vqa: list[tuple[int, str, int, str]] = []
    scenes: list[dict[str, Any]] = []  # objects and captions only
    sound: list[tuple[int, np.ndarray, int]] = []
    for sample in samples:
        objects = sample.get("objects")
        try:
            image = _image(sample.get("image"))
            audio = _audio(sample.get("audio"))
        except (OSError, ValueError, RuntimeError, soundfile.LibsndfileError):
            rejects["undecodable_media"] += 1
            continue
        if image is None or not isinstance(objects, list) or not objects:
            rejects["no_image_or_objects"] += 1
            continue
        s = len(keys)
        keys.append(str(sample.get("key", s)))
        images.append(np.asarray(resize_center_crop(image, image_size), dtype=np.uint8))
        for qa in sample.get("qa") or []:
            answer = ANSWER_INDEX.get(str(qa.get("answer", "")))
            if answer is None or qa.get("type") not in QUESTION_TYPES:
                rejects["answer_not_in_vocabulary"] += 1
                continue
            vqa.append((s, str(qa["question"]), answer, str(qa["type"])))
        # keep only the light fields: a world sample also holds video, OCR and the whole clip
        scenes.append({"objects": objects, "text": list(sample.get("text") or [])})
        if len(objects) < 2 or audio is None:
            continue
        sounds = {(d["color"], d["shape"]): d for d in sample.get("sounds") or []}
        for o in objects:
            d = sounds.get((o["color"], o["shape"]))
            if d is None or o.get("position") not in ANSWER_INDEX:
                rejects["sound_without_object"] += 1
                continue
            sound.append((s, _audio_slot(audio, d), ANSWER_INDEX[o["position"]]))
    if not keys:
        raise DataError(
            f"split {split}: no scene with an image and an 'objects' list; these tasks need a "
            "world (polysense world generate --out DIR --modalities image,text,audio)"
        )
    # One caption per scene to draw false "random" captions from.
    pool = [" and ".join(_a(o["color"], o["shape"]) for o in sc["objects"][:2]) for sc in scenes]
    itm: list[tuple[int, str, int, str, int]] = []
    pair_id = 0
    for s, scene in enumerate(scenes):
        for caption, label, group, paired in _itm_items(rng, scene["objects"], pool):
            itm.append((s, caption, label, group, pair_id if paired else -1))
            if paired and label == 0:
                pair_id += 1
    return WorldTasks(
        split=split,
        keys=keys,
        images=torch.from_numpy(np.stack(images)),
        captions=[list(sc.get("text") or []) for sc in scenes],
        vqa_scene=torch.tensor([q[0] for q in vqa], dtype=torch.long),
        vqa_text=[q[1] for q in vqa],
        vqa_answer=torch.tensor([q[2] for q in vqa], dtype=torch.long),
        vqa_type=[q[3] for q in vqa],
        itm_scene=torch.tensor([m[0] for m in itm], dtype=torch.long),
        itm_text=[m[1] for m in itm],
        itm_label=torch.tensor([m[2] for m in itm], dtype=torch.long),
        itm_group=[m[3] for m in itm],
        itm_pair=torch.tensor([m[4] for m in itm], dtype=torch.long),
        sound_scene=torch.tensor([x[0] for x in sound], dtype=torch.long),
        sound_audio=(
            torch.from_numpy(np.stack([x[1] for x in sound]))
            if sound
            else torch.zeros(0, SOUND_SAMPLES)
        ),
        sound_answer=torch.tensor([x[2] for x in sound], dtype=torch.long),
        rejects=rejects,
    )


def load_tasks(
    root: str | Path,
    *,
    split: str,
    image_size: int = 32,
    limit: int | None = None,
    seed: int = 0,
    rejects_path: Path | None = None,
) -> WorldTasks:
    """Read a world split and build its tasks; unreadable samples go to `rejects_path`."""
    from polysense.data.readers import Rejects, read_samples

    with Rejects(path=rejects_path) as rejects:
        # Undecoded: only the image and the clip are decoded here (not video or OCR images).
        samples = read_samples(root, split=split, rejects=rejects, limit=limit, decode=False)
        tasks = build_tasks(samples, split=split, image_size=image_size, seed=seed)
        tasks.rejects.update(rejects.by_reason)
    if len(tasks.sound_answer) == 0:
        raise DataError(
            f"{root}: split {split} has no audio; the sound task needs a world written with "
            f"audio: polysense world generate --out {root} --modalities image,text,audio"
        )
    return tasks


def majority_baseline(train: WorldTasks, test: WorldTasks) -> dict[str, Any]:
    """Accuracy on `test` of always answering the most frequent training answer (overall, and
    per question type for VQA); ITM is balanced, so its majority is the larger label share."""
    overall = int(torch.mode(train.vqa_answer).values)
    answers = train.vqa_answer.tolist()
    per_type = {}
    for t in QUESTION_TYPES:
        picked = [a for a, ty in zip(answers, train.vqa_type, strict=True) if ty == t]
        per_type[t] = Counter(picked).most_common(1)[0][0] if picked else overall
    guess = torch.tensor([per_type[t] for t in test.vqa_type])
    itm_major = int(torch.mode(train.itm_label).values)
    sound_major = int(torch.mode(train.sound_answer).values)
    return {
        "vqa": float((test.vqa_answer == overall).float().mean()),
        "vqa_answer": ANSWERS[overall],
        "vqa_per_type_majority": float((test.vqa_answer == guess).float().mean()),
        "itm": float((test.itm_label == itm_major).float().mean()),
        "sound": float((test.sound_answer == sound_major).float().mean()),
    }
