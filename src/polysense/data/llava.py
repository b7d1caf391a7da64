"""LLaVA's instruction data: a JSON list of conversations about an image, trained as they stand.

Each entry is `{"id", "image": "relative/path.jpg", "conversations": [{"from": "human", "value":
"<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}`; an entry without "image" is a
text-only conversation. Images are found relative to the JSON file's folder (LLaVA's layout:
`llava_v1_5_mix665k.json` beside `coco/`, `gqa/` ...) unless the path is absolute. As LLaVA's
`preprocess_multimodal` does, `<image>` is taken out of the first human turn and the image goes
at the start of that turn, where the chat template puts it (`data.chat.chat_prompt`; an HF
tokenizer's `apply_chat_template` with `<image>\\n` before the text).

Only paths and turns are held in memory; a batch decodes its images when it is built
(`train.vlm.conversation_batch`). The rows of step s are a pure function of (seed, s), so a
resumed run sees the batches an uninterrupted one would. Bad entries are skipped and written to
the rejects file (`readers.Rejects`) with their reason.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from polysense.data.chat import IMAGE, ChatTokenizer, chat_turn, conversation
from polysense.data.instruct import text_prompt
from polysense.data.readers import MAX_PIXELS, Rejects
from polysense.errors import DataError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Conversation:
    """One entry: its key, its image file (None: text only) and its (human, gpt) turns."""

    key: str
    image: Path | None
    turns: tuple[tuple[str, str], ...]


@dataclass
class Conversations:
    """A LLaVA file's usable conversations, and how many entries were rejected."""

    path: Path
    items: list[Conversation]
    rejected: int

    def __len__(self) -> int:
        return len(self.items)

    def image(self, conv: Conversation) -> Image.Image | None:
        """The conversation's image, decoded now (RGB); None for a text-only one."""
        if conv.image is None:
            return None
        try:
            with Image.open(conv.image) as im:
                return im.convert("RGB")
        except OSError as exc:
            raise DataError(
                f"{self.path}: entry {conv.key}: image {conv.image} cannot be decoded ({exc}); "
                "replace the file or drop the entry"
            ) from None


def is_llava(path: str | Path) -> bool:
    """Whether `path` is a .json file holding a list whose first entry has "conversations"
    (only that entry is parsed, from the file's first MiB when it fits there)."""
    p = Path(path)
    if p.suffix.lower() != ".json" or not p.is_file():
        return False
    try:
        with p.open(encoding="utf-8-sig") as fh:
            text = fh.read(2**20)
            first = _first_entry(text)
            if first is None and len(text) == 2**20:  # a first entry longer than that
                first = _first_entry(text + fh.read())
    except (OSError, UnicodeDecodeError):
        return False
    return isinstance(first, dict) and "conversations" in first


def _first_entry(text: str) -> Any:
    """The first value of a JSON list `text`, or None."""
    body = text.lstrip()
    if not body.startswith("["):
        return None
    try:
        return json.JSONDecoder().raw_decode(body, len(body) - len(body[1:].lstrip()))[0]
    except ValueError:
        return None


class _Skip(Exception):
    """This entry is rejected with `reason` (`detail` says what was wrong)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _turns(entry: dict[str, Any], has_image: bool) -> tuple[tuple[str, str], ...]:
    """(human, gpt) pairs of an entry, `<image>` taken out of its first human turn."""
    convs = entry.get("conversations")
    if not isinstance(convs, list) or not all(
        isinstance(c, dict) and isinstance(c.get("value"), str) for c in convs
    ):
        raise _Skip("bad_conversations", "'conversations' must be a list of {from, value: str}")
    roles = [ROLES.get(c.get("from")) for c in convs]  # type: ignore[arg-type]
    if None in roles:
        bad = convs[roles.index(None)].get("from")
        raise _Skip("unknown_role", f"'from': {bad!r} (use human/gpt or user/assistant)")
    if roles and roles[0] == "assistant":  # LLaVA drops a conversation's leading gpt turn
        convs, roles = convs[1:], roles[1:]
    values = [c["value"] for c in convs]
    if any(r != ("user" if k % 2 == 0 else "assistant") for k, r in enumerate(roles)):
        raise _Skip("turns_out_of_order", "turns must alternate human, gpt, human, gpt ...")
    marks = [k for k, v in enumerate(values) if IMAGE in v]
    if not has_image and marks:
        raise _Skip("placeholder_without_image", f"a turn holds {IMAGE} but there is no 'image'")
    if sum(v.count(IMAGE) for v in values) > 1:
        raise _Skip("several_placeholders", f"{IMAGE} appears more than once; one image a turn")
    if marks and marks != [0]:
        raise _Skip("placeholder_not_first", f"{IMAGE} must be in the first human turn")
    if marks:
        values[0] = values[0].replace(IMAGE, "").strip()
    pairs = tuple(zip(values[0::2], values[1::2], strict=False))  # a last human turn: no answer
    if not pairs:
        raise _Skip("no_gpt_turn", "no gpt turn answers a human turn: nothing to learn")
    return pairs


def _image_file(entry: dict[str, Any], root: Path) -> Path:
    name = entry["image"]
    if not isinstance(name, str) or not name.strip():
        raise _Skip("bad_image_field", f"'image' must be a file name, not {name!r}")
    path = root / name
    if not path.is_file():
        raise _Skip("missing_image", f"{path} does not exist")
    try:
        with warnings.catch_warnings(record=True), Image.open(path) as im:  # the header only
            width, height = im.size
    except (OSError, Image.DecompressionBombError) as exc:
        raise _Skip("undecodable_image", f"{path}: {type(exc).__name__}: {exc}") from None
    if width * height > MAX_PIXELS:
        raise _Skip("too_many_pixels", f"{path}: {width}x{height} is over {MAX_PIXELS} pixels")
    return path


def read_llava(
    path: str | Path, *, rejects_path: Path | None = None, image_root: str | Path | None = None
) -> Conversations:
    """The usable conversations of a LLaVA file; each bad entry goes to `rejects_path`. Image
    names are read under `image_root` (LLaVA's --image_folder; default: the file's folder)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    if not root.is_dir():
        raise DataError(f"--image-root {root}: no such directory (the folder of {path}'s images)")
    try:
        entries = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(entries, list):
        raise DataError(f"{path}: LLaVA data is a JSON list of conversations")
    items = []
    with Rejects(path=rejects_path) as rejects:
        for n, entry in enumerate(entries):
            key = str(entry.get("id", f"entry{n:06d}")) if isinstance(entry, dict) else str(n)
            try:
                if not isinstance(entry, dict):
                    raise _Skip("bad_entry", f"entry is a {type(entry).__name__}, not an object")
                image = _image_file(entry, root) if "image" in entry else None
                items.append(Conversation(key, image, _turns(entry, image is not None)))
            except _Skip as skip:
                rejects.add(key=key, reason=skip.reason, source=str(path), detail=skip.detail)
    if not items:
        raise DataError(
            f"{path}: none of its {len(entries)} entries is a usable conversation (the reasons "
            f"are in {rejects_path or 'the rejects'}: {dict(rejects.by_reason)})"
        )
    return Conversations(path=path, items=items, rejected=rejects.count)


def llava_texts(data: Conversations) -> list[str]:
    """Each conversation in polysense's template without its image: what a fresh tokenizer
    learns from (the world's `instruct.world_texts` renders its QA the same way)."""
    out = []
    for conv in data.items:
        *history, (question, answer) = conv.turns
        chat = conversation(history, question) + " " + answer
        out.append(chat.replace(IMAGE, "").replace(": \n", ":\n"))
    return out


def conversation_ids(
    tok: Any, turns: Sequence[tuple[str, str]], *, image: bool
) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation in the model's chat template and a flag per token, True on
    what the model learns to say (each answer and its end of turn). With `image`, the first
    human turn holds `<image>` (the tokenizer's own `conversation_ids`); without, none does."""
    if image:
        return tok.conversation_ids(turns)
    if isinstance(tok, ChatTokenizer):
        row, flags = [], []
        for k, (q, a) in enumerate(turns):
            p = tok.prompt_ids(text_prompt(q)) if k == 0 else tok.encode(chat_turn(q))
            r = tok.response_ids(a)
            row += p + r
            flags += [False] * len(p) + [True] * len(r)
        return row, flags
    return tok.conversation_ids(turns, image=False)  # an HF tokenizer (models.vlm_hf)


@dataclass
class ConversationBatches:
    """The VLM stages' step data on LLaVA conversations: step s -> `batch_size` indices into
    `data.items`, drawn with replacement from (seed, s)."""

    data: Conversations
    seed: int
    batch_size: int

    def batch(self, step: int) -> list[int]:
        gen = np.random.default_rng([self.seed, step])
        return gen.integers(len(self.data), size=self.batch_size).tolist()
