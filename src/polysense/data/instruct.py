"""The language model's and the VLM's data: a split in memory and the batch of each step.

`load_split` reads a world split (or any source with images and captions) into a `SplitData`;
`world_texts` is the text an LM pretrains on; `sample_examples` draws the instruction rows of a
step (caption / QA / OCR by the stage's mixture). Every draw is a pure function of (seed, step),
so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polysense.data.chat import (
    CAPTION_INSTRUCTION,
    IMAGE,
    OCR_INSTRUCTION,
    chat_prompt,
    conversation,
)
from polysense.data.transforms import resize_center_crop
from polysense.errors import DataError, PolysenseError


@dataclass
class SplitData:
    """One split in memory: images (N, H, W, 3) uint8, OCR strips (N, h, k*h, 3) uint8 or None,
    and per scene its captions, QA pairs, object list and OCR text."""

    keys: list[str]
    images: torch.Tensor
    ocr: torch.Tensor | None
    captions: list[list[str]]
    qa: list[list[dict[str, str]]]
    objects: list[list[dict[str, Any]]]
    ocr_text: list[str]

    def __len__(self) -> int:
        return len(self.keys)


def load_split(
    path: str | Path,
    split: str | None,
    *,
    image_size: int,
    limit: int | None = None,
    rejects_path: Path | None = None,
) -> SplitData:
    """Read a world split (or any source with images + captions; QA/objects/OCR when present)."""
    from polysense.data.readers import Rejects, read_samples

    keys, images, ocr, captions, qa, objects, ocr_text = [], [], [], [], [], [], []
    with Rejects(path=rejects_path) as rejects:
        for s in read_samples(path, split=split, rejects=rejects, limit=limit):
            texts = [t for t in s.get("text") or [] if t and t.strip()]
            if s.get("image") is None or not texts:
                rejects.add(key=s.get("key", "?"), reason="no_image_or_caption", source=str(path))
                continue
            keys.append(s["key"])
            images.append(np.asarray(resize_center_crop(s["image"], image_size), dtype=np.uint8))
            captions.append(texts)
            qa.append([q for q in s.get("qa") or [] if q.get("question") and q.get("answer")])
            objects.append(list(s.get("objects") or []))
            ocr_text.append(str(s.get("ocr_text") or ""))
            if s.get("ocr_image") is not None:
                strip = s["ocr_image"].convert("RGB")
                k = max(1, round(strip.width / strip.height))
                strip = strip.resize((k * image_size, image_size))
                ocr.append(np.asarray(strip, dtype=np.uint8))
    where = f"{path}" + (f" (split {split})" if split else "")
    if not keys:
        raise DataError(f"{where}: no samples with both an image and a caption")
    has_ocr = len(ocr) == len(keys) and len({a.shape for a in ocr}) == 1
    return SplitData(
        keys=keys,
        images=torch.from_numpy(np.stack(images)),
        ocr=torch.from_numpy(np.stack(ocr)) if has_ocr else None,
        captions=captions,
        qa=qa,
        objects=objects,
        ocr_text=ocr_text,
    )


def world_texts(
    data: SplitData, chat: Callable[[list[tuple[str, str]]], str] | None = None
) -> list[str]:
    """The text an LM pretrains on: captions, and the chat template (without its image) filled
    with each scene's captions, questions and answers, and OCR text. `chat(turns)` renders a
    conversation; by default polysense's `USER: ... ASSISTANT:` template (an HF tokenizer's
    `text_chat` renders its own)."""
    chat = chat or _polysense_chat
    texts = []
    for caps, qa, ocr in zip(data.captions, data.qa, data.ocr_text, strict=True):
        texts += caps
        texts += [chat([(CAPTION_INSTRUCTION, c)]) for c in caps]
        texts += [chat([(q["question"], q["answer"])]) for q in qa]
        if len(qa) > 1:  # QA of the scene as one conversation (4 turns fit any context)
            texts.append(chat([(q["question"], q["answer"]) for q in qa[:4]]))
        if ocr:
            texts.append(chat([(OCR_INSTRUCTION, ocr)]))
    return texts


def _polysense_chat(turns: list[tuple[str, str]]) -> str:
    if len(turns) == 1:
        return _text_only(*turns[0])
    chat = conversation(turns[:-1], turns[-1][0]) + " " + turns[-1][1]
    return chat.replace(IMAGE, "").replace(": \n", ":\n")


def text_prompt(instruction: str) -> str:
    """The chat template's first turn without an image: `USER:\n{instruction}\nASSISTANT:`."""
    return chat_prompt(instruction).replace(IMAGE, "").replace(": \n", ":\n")


def _text_only(instruction: str, response: str) -> str:
    return text_prompt(instruction) + " " + response


def text_rows(tok: Any, texts: list[str]) -> tuple[torch.Tensor, ...]:
    """Texts -> left-padded (ids (B, T), key_mask (B, T), labels (B, T)): [BOS] text [EOS],
    every next token a target (-100 on padding); no BOS for a tokenizer without one (Qwen2)."""
    bos = [] if tok.bos_id is None else [tok.bos_id]
    rows = [[*bos, *ids, tok.eos_id] for ids in tok.encode_batch(texts)]
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.bool)
    for r, row in enumerate(rows):
        ids[r, t - len(row) :] = torch.tensor(row)
        mask[r, t - len(row) :] = True
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    return ids, mask, labels


@dataclass
class Example:
    """One training row: a scene (or its OCR strip) and its (instruction, response) turns."""

    index: int
    task: str  # caption / qa / ocr
    turns: list[tuple[str, str]]


def sample_examples(
    data: SplitData,
    *,
    seed: int,
    step: int,
    batch_size: int,
    mix: tuple[float, float, float],
    qa_turns: int,
) -> list[Example]:
    """The rows of `step`: scenes drawn with replacement, a task per row by the mixture `mix`
    (caption, QA, OCR weights; OCR only where the split has strips), up to `qa_turns` questions
    per QA row."""
    gen = np.random.default_rng([seed, step])
    tasks = ["caption", "qa", "ocr"]
    weights = np.array([mix[0], mix[1], mix[2] if data.ocr is not None else 0.0])
    if weights.sum() <= 0:
        raise PolysenseError("train.mix_caption + mix_qa + mix_ocr is 0 (or OCR data is missing)")
    picks = gen.choice(3, size=batch_size, p=weights / weights.sum())
    rows = gen.integers(len(data), size=batch_size)
    out = []
    for i, t in zip(rows.tolist(), picks.tolist(), strict=True):
        task = tasks[t]
        if task == "qa" and not data.qa[i]:
            task = "caption"
        if task == "caption":
            caps = data.captions[i]
            out.append(Example(i, task, [(CAPTION_INSTRUCTION, caps[gen.integers(len(caps))])]))
        elif task == "qa":
            order = gen.permutation(len(data.qa[i]))[: max(1, qa_turns)]
            qa = [(data.qa[i][j]["question"], data.qa[i][j]["answer"]) for j in order]
            out.append(Example(i, task, qa))
        else:
            out.append(Example(i, task, [(OCR_INSTRUCTION, data.ocr_text[i])]))
    return out


@dataclass
class ExampleBatches:
    """The VLM stages' step data (`polysense.train.fit.StepData`): step s -> its rows."""

    data: SplitData
    seed: int
    batch_size: int
    mix: tuple[float, float, float]
    qa_turns: int

    def batch(self, step: int) -> list[Example]:
        return sample_examples(
            self.data,
            seed=self.seed,
            step=step,
            batch_size=self.batch_size,
            mix=self.mix,
            qa_turns=self.qa_turns,
        )


@dataclass
class TextBatches:
    """The LM stage's step data: step s -> `batch_size` texts drawn with replacement."""

    texts: list[str]
    seed: int
    batch_size: int

    def batch(self, step: int) -> list[str]:
        gen = np.random.default_rng([self.seed, step])
        return [self.texts[i] for i in gen.integers(len(self.texts), size=self.batch_size)]
