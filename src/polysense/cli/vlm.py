"""`polysense caption`, `polysense ask` and `polysense chat`: talk to a VLM checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from polysense.cli.app import app, bench_app, console
from polysense.errors import PolysenseError

_CKPT = Annotated[Path, typer.Option(help="VLM checkpoint dir (polysense train vlm-tiny-stage2).")]
_STRATEGY = Annotated[
    str,
    typer.Option(
        help="Decoding: greedy, beam, sample, or mbr (the consensus of greedy and --samples "
        "samples: minimum Bayes risk)."
    ),
]
_MAX_NEW = Annotated[int, typer.Option(help="Most tokens to generate.")]
_BEAMS = Annotated[int, typer.Option(help="Beams for --strategy beam.")]
_SAMPLES = Annotated[int, typer.Option(help="Samples per image for --strategy mbr.")]
_TEMP = Annotated[float, typer.Option(help="Temperature for --strategy sample / mbr.")]
_TOP_P = Annotated[float, typer.Option(help="Nucleus mass for --strategy sample / mbr.")]
_SEED = Annotated[int, typer.Option(help="Seed for --strategy sample / mbr.")]


def _open(paths: list[Path]) -> list:
    from PIL import Image

    images = []
    for path in paths:
        if not path.is_file():
            raise PolysenseError(f"{path} does not exist; pass an image file (PNG, JPEG, ...)")
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except OSError as exc:
            raise PolysenseError(f"{path}: not a readable image ({exc})") from None
    return images


def _decode_args(
    strategy: str,
    max_new_tokens: int,
    beams: int,
    temperature: float,
    top_p: float,
    seed: int,
    samples: int = 8,
) -> dict:
    if strategy not in ("greedy", "beam", "sample", "mbr"):
        raise PolysenseError(f"--strategy {strategy!r}: use greedy, beam, sample or mbr")
    return {
        "strategy": strategy,
        "max_new_tokens": max_new_tokens,
        "num_beams": beams,
        "num_samples": samples,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
    }


@app.command("caption")
def caption_cmd(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    ckpt: _CKPT,
    strategy: _STRATEGY = "greedy",
    max_new_tokens: _MAX_NEW = 40,
    beams: _BEAMS = 3,
    samples: _SAMPLES = 8,
    temperature: _TEMP = 0.7,
    top_p: _TOP_P = 0.9,
    seed: _SEED = 0,
) -> None:
    """Describe each image with the VLM (one line per image).

    Example: `polysense caption --ckpt runs/vlm/stage2 scene.png other.png`;
    `--strategy mbr` returns the caption its samples agree on most.
    """
    import torch

    from polysense.data.chat import CAPTION_INSTRUCTION, chat_prompt
    from polysense.models.checkpoint import load_vlm

    model = load_vlm(ckpt)
    opened = _open(images)
    args = _decode_args(strategy, max_new_tokens, beams, temperature, top_p, seed, samples)
    with torch.no_grad():
        out = model.generate(opened, [chat_prompt(CAPTION_INSTRUCTION)] * len(opened), **args)
    for path, text in zip(images, out, strict=True):
        console.print(f"{path}: {text}", highlight=False, markup=False)


@app.command("ask")
def ask_cmd(
    image: Annotated[Path, typer.Argument(help="Image file.")],
    question: Annotated[
        str, typer.Argument(help="The question, e.g. 'what color is the circle?'.")
    ],
    ckpt: _CKPT,
    strategy: _STRATEGY = "greedy",
    max_new_tokens: _MAX_NEW = 16,
    beams: _BEAMS = 3,
    temperature: _TEMP = 0.7,
    top_p: _TOP_P = 0.9,
    seed: _SEED = 0,
) -> None:
    """Answer one question about an image.

    Example: `polysense ask --ckpt runs/vlm/stage2 scene.png "how many shapes are there?"`
    """
    import torch

    from polysense.data.chat import chat_prompt
    from polysense.models.checkpoint import load_vlm

    model = load_vlm(ckpt)
    args = _decode_args(strategy, max_new_tokens, beams, temperature, top_p, seed)
    with torch.no_grad():
        answer = model.generate(_open([image]), [chat_prompt(question)], **args)[0]
    console.print(answer, highlight=False, markup=False)


@app.command("chat")
def chat_cmd(
    image: Annotated[Path, typer.Argument(help="Image file.")],
    ckpt: _CKPT,
    max_new_tokens: _MAX_NEW = 40,
) -> None:
    """Ask questions about an image, one per line, until an empty line or end of input; each
    turn sees the image and the conversation so far (the chat template, turn after turn).

    Example: `polysense chat --ckpt runs/vlm/stage2 scene.png`
    """
    import torch

    from polysense.data.chat import conversation
    from polysense.models.checkpoint import load_vlm

    model = load_vlm(ckpt)
    opened = _open([image])
    history: list[tuple[str, str]] = []
    console.print("ask about the image (empty line to quit)")
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            break
        if not question:
            break
        with torch.no_grad():
            prompt = conversation(history, question)
            reply = model.generate(opened, [prompt], max_new_tokens=max_new_tokens)[0]
        history.append((question, reply))
        console.print(f"vlm> {reply}", highlight=False, markup=False)


@bench_app.command("vlm")
def bench_vlm_cmd(
    ckpt: _CKPT,
    data: Annotated[Path, typer.Option(help="World dir with the split to draw examples from.")],
    out: Annotated[Path, typer.Option(help="Output dir for vlm.json, vlm.md and vlm.png.")],
    split: Annotated[str, typer.Option(help="World split.")] = "test",
    examples: Annotated[int, typer.Option(help="Scenes shown in the figure.")] = 6,
) -> None:
    """Example generations (image, caption, a question and its answer) drawn to a PNG, beside the
    results table of CKPT/metrics.json (written by `polysense train vlm-tiny-stage2`).

    Example: `polysense bench vlm --ckpt runs/vlm/stage2 --data runs/world-all --out runs/vlm/bench`
    """
    import json
    import textwrap

    import torch

    from polysense.bench.report import write_report
    from polysense.data.instruct import load_split
    from polysense.eval.captioning import generate_captions, scene_pixels
    from polysense.eval.vqa import answer_questions
    from polysense.models.checkpoint import load_vlm

    model = load_vlm(ckpt)
    scenes = load_split(data, split, image_size=model.cfg.vision.image_size, limit=examples)
    with torch.no_grad():
        captions = generate_captions(model, scenes.images)
        qa = [q[0] if q else {"question": "", "answer": ""} for q in scenes.qa]
        pix = scene_pixels(model.cfg.vision, scenes.images)
        answers = answer_questions(model, pix, [q["question"] for q in qa])
    rows_out = [
        {
            "key": k,
            "generated": c,
            "reference": refs[0],
            "question": q["question"],
            "answer": q["answer"],
            "predicted": a,
        }
        for k, c, refs, q, a in zip(
            scenes.keys, captions, scenes.captions, qa, answers, strict=True
        )
    ]
    metrics_path = ckpt / "metrics.json"
    table = []
    if metrics_path.is_file():
        m = json.loads(metrics_path.read_text())
        for name, src in (
            ("VLM (beam search, 3 beams)", m),
            ("VLM (greedy)", m.get("greedy", {})),
            ("nearest-neighbour caption", m.get("baseline_nn", {})),
            ("most frequent caption", m.get("baseline_most_frequent", {})),
        ):
            table.append(
                {"model": name}
                | {k: src.get(k) for k in ("bleu1", "bleu4", "cider")}
                | {k: m.get(k) if name.startswith("VLM (beam") else None for k in _VLM_KEYS}
            )

    def plot(ax) -> None:
        ax.axis("off")
        cols = 3
        nrows = (len(rows_out) + cols - 1) // cols
        for j, (row, img) in enumerate(zip(rows_out, scenes.images, strict=True)):
            r, c = divmod(j, cols)
            x0, y0 = c / cols, 1 - (r + 1) / nrows
            inset = ax.inset_axes([x0 + 0.01, y0 + 0.5 / nrows, 0.12, 0.45 / nrows])
            inset.imshow(img.numpy(), interpolation="nearest")
            inset.axis("off")
            text = "\n".join(
                textwrap.wrap(f"gen: {row['generated']}", 34)
                + textwrap.wrap(f"ref: {row['reference']}", 34)
                + textwrap.wrap(f"Q: {row['question']}", 34)
                + [f"A: {row['predicted']} (truth: {row['answer']})"]
            )
            ax.text(x0 + 0.005, y0 + 0.49 / nrows, text, fontsize=5.5, va="top", family="monospace")

    write_report(
        out,
        "vlm",
        {"ckpt": str(ckpt), "split": split, "examples": rows_out},
        table or rows_out,
        plot,
        title="VLM: example generations and results",
        notes=f"Checkpoint {ckpt}, world split {split}; captions by beam search (3 beams).",
    )
    console.print(f"wrote {out / 'vlm.json'}, vlm.md and vlm.png")


_VLM_KEYS = ("vqa_accuracy", "pope_f1", "chair_i", "chair_s", "ocr_exact_match")
