"""Captioners for the recaption stage: `fn(images, metas) -> list[str | None]` (None: no caption).

* "template": a caption built from the scene's object list (the world's ``objects``), e.g.
  "a large red circle at the top left and a small blue star at the center"; None without objects;
* "vlm:CKPT": the multimodal LM of `polysense.models.vlm`, prompted per image through its chat
  template with `recaption.prompt` (default: the VLM's own caption instruction) and decoded as
  `polysense eval caption` decodes (`CAPTION_DECODING`: beam search), so a recaption is what
  `polysense caption --strategy beam` prints for that image;
* "module:function": any function of that signature.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

from PIL import Image

from polysense.errors import PolysenseError

Captioner = Callable[[Sequence[Image.Image | None], Sequence[dict[str, Any]]], list[str | None]]
_COUNTS = {2: "two", 3: "three", 4: "four", 5: "five"}


def _object_phrase(obj: dict[str, Any]) -> str:
    words = [obj.get("size"), obj.get("color"), obj.get("shape")]
    phrase = "a " + " ".join(w for w in words if w)
    position = obj.get("position")
    if position:
        phrase += " in the center" if position == "center" else f" at the {position}"
    return phrase


def template_caption(meta: dict[str, Any]) -> str | None:
    """A caption from the object list: each object with size, colour, shape and position."""
    objects = [o for o in meta.get("objects") or [] if isinstance(o, dict) and o.get("shape")]
    if not objects:
        return None
    phrases = [_object_phrase(o) for o in objects]
    if len(phrases) == 1:
        return phrases[0]
    head = f"{_COUNTS.get(len(phrases), str(len(phrases)))} shapes: "
    return head + ", ".join(phrases[:-1]) + " and " + phrases[-1]


def template_captioner(
    images: Sequence[Image.Image | None], metas: Sequence[dict[str, Any]]
) -> list[str | None]:
    return [template_caption(m) for m in metas]


def _vlm_captioner(ckpt: str, prompt: str) -> Captioner:
    from polysense.data.chat import CAPTION_INSTRUCTION, chat_prompt
    from polysense.eval.captioning import CAPTION_DECODING
    from polysense.models.checkpoint import load_vlm

    model = load_vlm(ckpt)
    # the chat template puts the image where the model was trained to see it (an HF decoder's
    # tokenizer renders the same prompt with its own template)
    wrapped = chat_prompt(prompt or CAPTION_INSTRUCTION)

    def caption(
        images: Sequence[Image.Image | None], metas: Sequence[dict[str, Any]]
    ) -> list[str | None]:
        rows = [i for i, im in enumerate(images) if im is not None]
        texts = model.generate([images[i] for i in rows], [wrapped] * len(rows), **CAPTION_DECODING)
        out: list[str | None] = [None] * len(images)
        for i, text in zip(rows, texts, strict=True):
            out[i] = text.strip() or None
        return out

    return caption


@cache
def get_captioner(spec: str, prompt: str = "") -> Captioner:
    """The captioner named by `spec` (see the module docstring); one per process. `prompt` is
    the VLM's instruction ('' = its caption instruction)."""
    if spec == "template":
        return template_captioner
    if spec.startswith("vlm:"):
        return _vlm_captioner(spec.removeprefix("vlm:"), prompt)
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise PolysenseError(
            f"recaption.captioner={spec!r}: not 'template', 'vlm:CKPT' or an importable "
            f"'module:function' ({exc})"
        ) from exc
