"""Standard benchmark formats for the VLM evals (VQAv2, POPE, COCO captions): fixtures written
here, the model's replies fixed by monkeypatching `VLM.generate` (keyed on the image's colour
and the prompt, so a wrong image or question changes the score), expectations by hand or by
pycocoevalcap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from helpers import tiny_config
from polysense.cli import app
from polysense.data.chat import ChatTokenizer
from polysense.errors import PolysenseError
from polysense.models.checkpoint import save_vlm
from polysense.models.lm import LMConfig
from polysense.models.vlm import VLM, VLMConfig, VLMRunConfig

RED, BLUE, GREEN = (200, 20, 20), (20, 20, 200), (20, 200, 20)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    tok = ChatTokenizer.train(["a red circle", "is there a blue square?", "yes no"], vocab_size=300)
    lm = LMConfig(vocab_size=tok.vocab_size, context_length=128, width=32, layers=1, heads=2)
    cfg = VLMConfig(lm=lm, vision=tiny_config().model.vision, projector="mlp2x")
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("vlm-ck")
    return save_vlm(VLM(cfg=cfg, tokenizer=tok).eval(), VLMRunConfig(model=cfg), tok, out)


def _colour(image: Image.Image) -> tuple[int, int, int]:
    """The fixture colour nearest the image's centre pixel (JPEG shifts it a little)."""
    px = image.convert("RGB").getpixel((image.width // 2, image.height // 2))
    return min(
        (RED, BLUE, GREEN), key=lambda c: sum((a - b) ** 2 for a, b in zip(c, px, strict=True))
    )


def fake_replies(monkeypatch, replies: dict[tuple[tuple[int, int, int], str], str]) -> list:
    """VLM.generate answers replies[(colour, text in the prompt)]; returns the calls' prompts."""
    seen: list[str] = []

    def generate(self, images, prompts, **kwargs):
        out = []
        for image, prompt in zip(images, prompts, strict=True):
            seen.append(prompt)
            hits = [r for (c, text), r in replies.items() if c == _colour(image) and text in prompt]
            out.append(hits[0] if len(hits) == 1 else "unknown")
        return out

    monkeypatch.setattr(VLM, "generate", generate)
    return seen


def _image(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), colour).save(path)


def _answers(*pairs: tuple[str, int]) -> list[dict]:
    words = [w for w, k in pairs for _ in range(k)]
    assert len(words) == 10
    return [
        {"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)
    ]


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def _error(*args: str) -> str:
    """The one-line message `polysense` prints (cli.main) for a command that must fail."""
    r = _invoke(*args)
    assert r.exit_code != 0 and isinstance(r.exception, PolysenseError), r.output
    message = str(r.exception)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# VQAv2


@pytest.fixture
def vqav2(tmp_path) -> tuple[Path, Path, Path]:
    root = tmp_path / "val2014"
    _image(root / "COCO_val2014_000000000001.jpg", RED)
    _image(root / "COCO_val2014_000000000003.jpg", BLUE)
    questions = {
        "data_subtype": "val2014",
        "questions": [
            {"image_id": 1, "question": "What color is it?", "question_id": 10},
            {"image_id": 1, "question": "How many circles?", "question_id": 11},
            {"image_id": 3, "question": "Is it blue?", "question_id": 30},
        ],
    }
    ann = [
        (10, 1, _answers(("red", 2), ("maroon", 8)), "red", "other"),
        (11, 1, _answers(("2", 3), ("two", 1), ("3", 6)), "3", "number"),
        (30, 3, _answers(("yes", 3), ("no", 7)), "no", "yes/no"),
    ]
    annotations = {
        "annotations": [
            {"question_id": q, "image_id": i, "answers": a, "multiple_choice_answer": m,
             "answer_type": t, "question_type": "what"}
            for q, i, a, m, t in ann
        ]
    }  # fmt: skip
    qf, af = tmp_path / "questions.json", tmp_path / "annotations.json"
    qf.write_text(json.dumps(questions))
    af.write_text(json.dumps(annotations))
    return qf, af, root


def test_vqav2_soft_accuracy_from_the_official_files(ckpt, vqav2, tmp_path, monkeypatch) -> None:
    qf, af, root = vqav2
    fake_replies(
        monkeypatch,
        {
            (RED, "What color is it?"): "Red.",  # 2 of 10 say red: (2*1/3 + 8*2/3)/10 = 0.6
            (RED, "How many circles?"): "two",  # '2' x3 + 'two' x1 -> 4 matches of '2': 1.0
            (BLUE, "Is it blue?"): "Yes",  # 3 of 10 say yes: (3*2/3 + 7*1)/10 = 0.9
        },
    )
    out, res = tmp_path / "m.json", tmp_path / "answers.json"
    r = _invoke("eval", "vqa", "--ckpt", str(ckpt), "--data", str(qf), "--annotations", str(af),
                "--image-root", str(root), "--results", str(res), "--json", str(out))  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())
    assert m["vqa_accuracy"] == pytest.approx((0.6 + 1.0 + 0.9) / 3)
    assert m["vqa_accuracy_other"] == pytest.approx(0.6)
    assert m["vqa_accuracy_number"] == pytest.approx(1.0)
    assert m["vqa_accuracy_yes_no"] == pytest.approx(0.9)
    assert m["vqa_n_questions"] == 3
    assert json.loads(res.read_text()) == [
        {"question_id": 10, "answer": "Red."},
        {"question_id": 11, "answer": "two"},
        {"question_id": 30, "answer": "Yes"},
    ]


def test_vqav2_errors_are_one_line(ckpt, vqav2, tmp_path, monkeypatch) -> None:
    qf, af, root = vqav2
    fake_replies(monkeypatch, {})
    base = ["eval", "vqa", "--ckpt", str(ckpt), "--data", str(qf), "--annotations", str(af)]
    msg = _error(*base, "--image-root", str(tmp_path / "nowhere"))
    assert "nowhere/COCO_val2014_000000000001.jpg does not exist; pass --image-root" in msg
    msg = _error(*base, "--image-root", str(root), "--split", "val")
    assert f"{qf} is a VQAv2 questions file, which has no splits; drop --split" in msg
    doc = json.loads(af.read_text())
    del doc["annotations"][1]["answers"]
    af.write_text(json.dumps(doc))
    msg = _error(*base, "--image-root", str(root))
    assert msg.startswith(f"{af}: annotations[1] has no 'answers' field; a VQAv2 annotations")
    msg = _error("eval", "vqa", "--ckpt", str(ckpt), "--data", str(qf), "--results", "x.json")
    assert "pass --annotations FILE" in msg
    msg = _error("eval", "chair", "--ckpt", str(ckpt), "--data", str(qf), "--annotations", str(af))
    assert msg == "--annotations does not apply to eval chair; drop it"


# ---------------------------------------------------------------------------------------------
# POPE


def test_pope_file_scores_by_hand(ckpt, tmp_path, monkeypatch) -> None:
    _image(tmp_path / "img" / "a.jpg", RED)
    _image(tmp_path / "img" / "b.jpg", BLUE)
    rows = [  # (image, question, label, the model's reply): the outcome
        ("a.jpg", "Is there a circle in the image?", "yes", "Yes"),  # TP
        ("a.jpg", "Is there a dog in the image?", "no", "yes, there is"),  # FP
        ("a.jpg", "Is there a cat in the image?", "no", "No"),  # TN
        ("b.jpg", "Is there a square in the image?", "yes", "no."),  # FN
        ("b.jpg", "Is there a car in the image?", "no", "Yes."),  # FP
        ("b.jpg", "Is there a tree in the image?", "yes", "yes"),  # TP
    ]
    pope = tmp_path / "coco_pope_random.jsonl"
    pope.write_text(
        "".join(
            json.dumps({"question_id": i, "image": im, "text": q, "label": lab}) + "\n"
            for i, (im, q, lab, _) in enumerate(rows, 1)
        )
    )
    colours = {"a.jpg": RED, "b.jpg": BLUE}
    fake_replies(monkeypatch, {(colours[im], q): r for im, q, _, r in rows})
    out = tmp_path / "m.json"
    args = ["eval", "pope", "--ckpt", str(ckpt), "--data", str(pope)]
    r = _invoke(*args, "--image-root", str(tmp_path / "img"), "--json", str(out))
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())
    # TP 2, FP 2, TN 1, FN 1: accuracy 3/6, precision 2/4, recall 2/3, F1 2PR/(P+R) = 4/7
    assert m["pope_accuracy"] == pytest.approx(3 / 6)
    assert m["pope_precision"] == pytest.approx(2 / 4)
    assert m["pope_recall"] == pytest.approx(2 / 3)
    assert m["pope_f1"] == pytest.approx(4 / 7)
    assert m["pope_yes_ratio"] == pytest.approx(4 / 6)
    assert m["pope_n"] == 6
    msg = _error(*args, "--image-root", str(tmp_path / "img"), "--split", "test")
    assert "is a POPE question file, which has no splits; drop --split" in msg
    msg = _error(*args)
    assert "image a.jpg does not exist; pass --image-root" in msg
    pope.write_text(pope.read_text().replace('"label": "no"', '"label": "maybe"', 1))
    msg = _error(*args, "--image-root", str(tmp_path / "img"))
    assert msg.startswith(f"{pope}: line 2: label 'maybe' is neither 'yes' nor 'no'")
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": [], "annotations": []}))
    msg = _error("eval", "pope", "--ckpt", str(ckpt), "--data", str(coco))
    assert "eval pope reads a world or a POPE question file" in msg


# ---------------------------------------------------------------------------------------------
# COCO captions


def test_coco_captions_score_as_pycocoevalcap(ckpt, tmp_path, monkeypatch) -> None:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    from polysense.data.chat import CAPTION_INSTRUCTION
    from polysense.eval.captioning import tokenize

    images = [(42, "COCO_val2014_000000000042.jpg", RED), (7, "COCO_val2014_000000000007.jpg", BLUE),
              (9, "COCO_val2014_000000000009.jpg", GREEN)]  # fmt: skip
    refs = {
        42: ["A red circle on a white table.", "a big red circle sitting on a table",
             "A red round shape on the table."],
        7: ["a blue square next to a small blue square", "Two blue squares side by side."],
        9: ["a green circle and a green square", "A green circle beside a green square.",
            "green shapes on a plain background"],
    }  # fmt: skip
    generated = {
        RED: "A red circle sitting on a table.",
        BLUE: "two blue squares next to a blue circle",
        GREEN: "a green circle beside a square",
    }
    root = tmp_path / "val2014"
    for _, name, colour in images:
        _image(root / name, colour)
    anns = [{"id": n, "image_id": i, "caption": c} for n, (i, c) in
            enumerate(((i, c) for i, cs in refs.items() for c in cs), 1)]  # fmt: skip
    doc = {
        "info": {},
        "images": [{"id": i, "file_name": f, "width": 40, "height": 40} for i, f, _ in images],
        "annotations": anns,
    }
    data = tmp_path / "captions_val2014.json"
    data.write_text(json.dumps(doc))
    prompts = fake_replies(monkeypatch, {(c, CAPTION_INSTRUCTION): g for c, g in generated.items()})
    out, res = tmp_path / "m.json", tmp_path / "captions_results.json"
    args = ["eval", "caption", "--ckpt", str(ckpt), "--data", str(data)]
    r = _invoke(*args, "--image-root", str(root), "--results", str(res), "--json", str(out))
    assert r.exit_code == 0, r.output
    assert len(prompts) == 3
    m = json.loads(out.read_text())
    colour = {i: c for i, _, c in images}
    assert json.loads(res.read_text()) == [
        {"image_id": i, "caption": generated[colour[i]]} for i, _, _ in images
    ]
    # the reference tool on the same (pre-tokenised: its PTB tokenizer's job) text
    gts = {i: [tokenize(c) for c in cs] for i, cs in refs.items()}
    hyp = {i: [tokenize(generated[colour[i]])] for i in refs}
    bleu, _ = Bleu(4).compute_score(gts, hyp, verbose=0)
    cider, _ = Cider().compute_score(gts, hyp)
    assert bleu[3] > 0.1 and cider > 0.1  # the fixture has 4-gram matches to compare on
    for k in range(4):
        assert m[f"bleu{k + 1}"] == pytest.approx(bleu[k], abs=1e-6)
    assert m["cider"] == pytest.approx(cider, abs=1e-6)
    assert m["caption_n_images"] == 3
    msg = _error(*args, "--image-root", str(root), "--split", "test")
    assert "is a COCO captions file, which has no splits; drop --split" in msg
    del doc["annotations"][0]["caption"]
    data.write_text(json.dumps(doc))
    msg = _error(*args, "--image-root", str(root))
    assert msg.startswith(f"{data}: annotations[0] has no 'caption' field; a COCO captions file")


def test_split_on_a_source_without_splits_is_one_line(ckpt, pairs_jsonl) -> None:
    for task in ("caption", "vqa"):
        msg = _error("eval", task, "--ckpt", str(ckpt), "--data", str(pairs_jsonl), "--split", "x")
        assert msg == (
            f"--split x: {pairs_jsonl} is a jsonl source, which has no splits; drop --split "
            "(it applies to a world, tar shards or a Karpathy JSON)"
        )


# ---------------------------------------------------------------------------------------------
# Winoground


def test_winoground_file_scores_by_hand(ckpt, tmp_path, monkeypatch) -> None:
    # s(image colour, caption): the VLM's log-likelihood, fixed by monkeypatching VLM.score
    table = {
        (RED, "a red thing"): 2, (RED, "a blue thing"): 1,  # ex 0: text, image and group
        (BLUE, "a red thing"): 0, (BLUE, "a blue thing"): 3,
        (RED, "mug on grass"): 2, (RED, "grass on mug"): 1,  # ex 1: text only
        (BLUE, "mug on grass"): 3, (BLUE, "grass on mug"): 4,  # (c0 prefers image 1)
        (RED, "x"): 1, (RED, "y"): 2,  # ex 2: neither (image 0 prefers c1;
        (BLUE, "x"): 0, (BLUE, "y"): 1,  # c1 prefers image 0)
    }  # fmt: skip
    lines = [("a red thing", "a blue thing", "Object"), ("mug on grass", "grass on mug", "Relation"),
             ("x", "y", "Object")]  # fmt: skip
    root = tmp_path / "images"
    for n in range(3):
        _image(root / f"ex_{n}_img_0.png", RED)
        _image(root / f"ex_{n}_img_1.png", BLUE)
    data = tmp_path / "examples.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": n, "caption_0": c0, "caption_1": c1, "image_0": f"ex_{n}_img_0",
                        "image_1": f"ex_{n}_img_1", "tag": "?", "collapsed_tag": tag}) + "\n"
            for n, (c0, c1, tag) in enumerate(lines)
        )
    )  # fmt: skip
    channel = {0: RED, 1: GREEN, 2: BLUE}

    def score(self, images, prompts, responses, **kwargs):
        # the normalised tile's brightest channel names the fixture colour
        cols = [channel[int(px.float().mean((0, 2, 3)).argmax())] for px in images]
        return torch.tensor([float(table[(c, r)]) for c, r in zip(cols, responses, strict=True)])

    monkeypatch.setattr(VLM, "score", score)
    out = tmp_path / "m.json"
    args = ["eval", "winoground", "--ckpt", str(ckpt), "--data", str(data)]
    r = _invoke(*args, "--image-root", str(root), "--json", str(out))
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())
    assert (m["winoground_text"], m["winoground_image"]) == pytest.approx((2 / 3, 1 / 3))
    assert m["winoground_group"] == pytest.approx(1 / 3) and m["winoground_n"] == 3
    assert (m["winoground_text_Object"], m["winoground_image_Object"]) == (0.5, 0.5)
    assert (m["winoground_text_Relation"], m["winoground_group_Relation"]) == (1.0, 0.0)
    msg = _error(*args, "--image-root", str(tmp_path), "--split", "test")
    assert "is a Winoground examples file, which has no splits" in msg
    msg = _error(*args, "--image-root", str(tmp_path))
    assert "line 1: image" in msg and "ex_0_img_0.png does not exist" in msg
