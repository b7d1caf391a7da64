"""Evaluation: zero-shot, retrieval, linear probe, captioning, VQA, hallucination, compositional.

`polysense eval TASK` runs zeroshot/retrieval/linear-probe itself (`eval.suite`); every other
task is a function named here as "module:function", called as
`fn(ckpt=Path, data=str, split=str | None, batch_size=int, limit=int | None, clip=Path | None)
-> dict` (metrics with the DESIGN.md keys; the caller prints or writes them). A task that reads
benchmark files also takes the keyword arguments it declares among `annotations`, `image_root`
and `results`; the CLI passes those only to a task whose signature has them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from polysense.errors import PolysenseError

FAMILY_TASKS: dict[str, str] = {
    "caption": "polysense.eval.captioning:eval_task",
    "vqa": "polysense.eval.vqa:eval_task",
    "pope": "polysense.eval.hallucination:eval_pope_task",
    "chair": "polysense.eval.hallucination:eval_chair_task",
    "winoground": "polysense.eval.compositional:eval_task",
    "sugarcrepe": "polysense.eval.sugarcrepe:eval_task",
    "ocr": "polysense.eval.ocr:eval_task",
    "audio": "polysense.eval.audio:eval_task",
    "video": "polysense.eval.video:eval_task",
    "avc": "polysense.eval.audio:eval_avc_task",
    "t2i": "polysense.eval.t2i:eval_task",
}


def get_task(name: str) -> Callable[..., dict]:
    """The evaluation function of task `name`; an error lists the tasks there are."""
    if name not in FAMILY_TASKS:
        known = ", ".join(["zeroshot", "retrieval", "all", "linear-probe", *sorted(FAMILY_TASKS)])
        raise PolysenseError(f"unknown eval task {name!r}; available: {known}")
    module, _, attr = FAMILY_TASKS[name].partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise PolysenseError(f"eval task {name!r} is not available in this build ({exc})") from exc
