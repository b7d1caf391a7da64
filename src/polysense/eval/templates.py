"""Zero-shot prompts: the built-in template sets, and class names and templates read from files.

A template holds the class name once, as `{}` (or CLIP_benchmark's `{c}`). A built-in set is
named (`--templates openai`); anything else is a file of one template a line. The world's set is
the world's default only; other data defaults to `openai`, the ImageNet prompt ensemble of
CLIP's zero-shot notebook, which CLIP_benchmark also uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from polysense.errors import DataError

WORLD: tuple[str, ...] = (
    "a {}.",
    "a photo of a {}.",
    "a picture of a {}.",
    "an image showing a {}.",
    "a {} shape.",
)
SIMPLE: tuple[str, ...] = ("a photo of a {}.",)
# The 80 ImageNet prompts of OpenAI's CLIP (notebooks/Prompt_Engineering_for_ImageNet.ipynb).
OPENAI: tuple[str, ...] = tuple(
    f"{t}."
    for t in (
        "a bad photo of a {}", "a photo of many {}", "a sculpture of a {}",
        "a photo of the hard to see {}", "a low resolution photo of the {}", "a rendering of a {}",
        "graffiti of a {}", "a bad photo of the {}", "a cropped photo of the {}",
        "a tattoo of a {}", "the embroidered {}", "a photo of a hard to see {}",
        "a bright photo of a {}", "a photo of a clean {}", "a photo of a dirty {}",
        "a dark photo of the {}", "a drawing of a {}", "a photo of my {}", "the plastic {}",
        "a photo of the cool {}", "a close-up photo of a {}", "a black and white photo of the {}",
        "a painting of the {}", "a painting of a {}", "a pixelated photo of the {}",
        "a sculpture of the {}", "a bright photo of the {}", "a cropped photo of a {}",
        "a plastic {}", "a photo of the dirty {}", "a jpeg corrupted photo of a {}",
        "a blurry photo of the {}", "a photo of the {}", "a good photo of the {}",
        "a rendering of the {}", "a {} in a video game", "a photo of one {}", "a doodle of a {}",
        "a close-up photo of the {}", "a photo of a {}", "the origami {}",
        "the {} in a video game", "a sketch of a {}", "a doodle of the {}", "a origami {}",
        "a low resolution photo of a {}", "the toy {}", "a rendition of the {}",
        "a photo of the clean {}", "a photo of a large {}", "a rendition of a {}",
        "a photo of a nice {}", "a photo of a weird {}", "a blurry photo of a {}",
        "a cartoon {}", "art of a {}", "a sketch of the {}", "a embroidered {}",
        "a pixelated photo of a {}", "itap of the {}", "a jpeg corrupted photo of the {}",
        "a good photo of a {}", "a plushie {}", "a photo of the nice {}",
        "a photo of the small {}", "a photo of the weird {}", "the cartoon {}", "art of the {}",
        "a drawing of the {}", "a photo of the large {}", "a black and white photo of a {}",
        "the plushie {}", "a dark photo of a {}", "itap of a {}", "graffiti of the {}",
        "a toy {}", "itap of my {}", "a photo of a cool {}", "a photo of a small {}",
        "a tattoo of the {}",
    )
)  # fmt: skip
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"openai": OPENAI, "simple": SIMPLE, "world": WORLD}


def _lines(path: Path, what: str, flag: str) -> list[tuple[int, str]]:
    """The non-blank lines of a UTF-8 text file, stripped, with their 1-based numbers."""
    if not path.is_file():
        raise DataError(f"{flag} {path}: no such file; give a text file with one {what} a line")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError) as exc:
        raise DataError(f"{flag} {path}: cannot be read as UTF-8 text ({exc})") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise DataError(f"{flag} {path}: the file is empty; write one {what} a line")
    return lines


def load_templates(spec: str | Path) -> tuple[str, ...]:
    """A built-in set by name (see TEMPLATE_SETS), or a file of one template a line, each with
    `{}` or `{c}` exactly once where the class name goes."""
    if str(spec) in TEMPLATE_SETS:
        return TEMPLATE_SETS[str(spec)]
    path = Path(spec)
    if not path.exists() and path.suffix == "":
        raise DataError(
            f"--templates {spec}: no template set of that name and no such file; use one of "
            f"{', '.join(TEMPLATE_SETS)} or a text file of templates like 'a photo of a {{}}.'"
        )
    templates = []
    for number, line in _lines(path, "template", "--templates"):
        template = line.replace("{c}", "{}")
        if not template.count("{}") == template.count("{") == template.count("}") == 1:
            raise DataError(
                f"--templates {path}, line {number}: {line!r} must hold the class name as {{}} "
                "(or {c}) exactly once, e.g. 'a photo of a {}.'"
            )
        templates.append(template)
    return tuple(templates)


def load_classnames(path: str | Path) -> list[str]:
    """Class names, one a line, in class-index order (an integer label is an index into them)."""
    path = Path(path)
    lines = _lines(path, "class name", "--classnames")
    seen: dict[str, int] = {}
    for number, name in lines:
        if name in seen:
            raise DataError(
                f"--classnames {path}, line {number}: {name!r} is line {seen[name]} too; "
                "give each class once"
            )
        seen[name] = number
    return [name for _, name in lines]


def default_templates(is_world: bool) -> Sequence[str]:
    """The world's own prompts on a world, the `openai` set on any other data."""
    return WORLD if is_world else OPENAI
