"""Training the VLM on LLaVA-format conversation JSON (data/llava.py): token rows and targets
equal the chat template rendered by hand (polysense's GPT) or `apply_chat_template` (tiny HF
Llama / Qwen2 tokenizers, built here), bad entries go to the rejects file with their reason,
`polysense train vlm-tiny-stage2 --data FILE.json` runs and `polysense ask` answers, and a killed
run resumes exactly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from polysense.data.chat import ChatTokenizer, chat_prompt
from polysense.data.llava import (
    ConversationBatches,
    conversation_ids,
    is_llava,
    llava_texts,
    read_llava,
)
from polysense.errors import PolysenseError
from polysense.models.checkpoint import load_vlm, save_checkpoint
from polysense.models.clip import build_model
from polysense.models.lm import LMConfig
from polysense.models.vlm import VLM, InitConfig, VLMConfig, VLMRunConfig, VLMTrainConfig
from polysense.models.warmstart import build_vlm
from polysense.train.vlm import conversation_batch, train_stage
from test_vlm_hf import _ids, clip_dir, llama_dir, llava_run, qwen2_dir  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore")

RED = [
    {"from": "human", "value": "<image>\nWhat colour is the shape?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "Is it round?"},
    {"from": "gpt", "value": "yes, a circle"},
]
BLUE = [  # the placeholder after the text, as some LLaVA entries have it
    {"from": "human", "value": "How many shapes?\n<image>"},
    {"from": "gpt", "value": "one"},
    {"from": "human", "value": "Where is it?"},
    {"from": "gpt", "value": "at the top left"},
    {"from": "human", "value": "What colour?"},
    {"from": "gpt", "value": "blue"},
]
TEXT = [
    {"from": "human", "value": "What is a triangle?"},
    {"from": "gpt", "value": "a shape with three sides"},
    {"from": "human", "value": "and a square?"},
    {"from": "gpt", "value": "four sides"},
]
# the turns each good entry trains on (<image> taken out of the first human turn)
TURNS = {
    "red": (("What colour is the shape?", "red"), ("Is it round?", "yes, a circle")),
    "blue": (("How many shapes?", "one"), ("Where is it?", "at the top left"), ("What colour?", "blue")),
    "text": (("What is a triangle?", "a shape with three sides"), ("and a square?", "four sides")),
}  # fmt: skip
BAD = {  # key -> the reason it is rejected
    "missing": "missing_image",
    "no-answer": "no_gpt_turn",
    "wrong-type": "bad_conversations",
}


def _shape(path: Path, colour: tuple[int, int, int], size: tuple[int, int]) -> None:
    image = Image.new("RGB", size, (240, 240, 240))
    image.paste(colour, (4, 4, 16, 16))
    image.save(path)


@pytest.fixture(scope="module")
def llava_json(tmp_path_factory) -> Path:
    """LLaVA's layout: the JSON beside the image folder, images named relative to it."""
    root = tmp_path_factory.mktemp("llava")
    (root / "images").mkdir()
    _shape(root / "images" / "red.png", (220, 30, 30), (32, 32))
    _shape(root / "images" / "blue.png", (30, 30, 220), (48, 40))  # resized by the tower
    entries = [
        {"id": "red", "image": "images/red.png", "conversations": RED},
        {"id": "missing", "image": "images/nope.png", "conversations": RED},
        {"id": "blue", "image": "images/blue.png", "conversations": BLUE},
        {"id": "text", "conversations": TEXT},
        {"id": "no-answer", "image": "images/red.png", "conversations": RED[:1]},
        {"id": "wrong-type", "image": "images/red.png", "conversations": "red"},
    ]
    path = root / "llava.json"
    path.write_text(json.dumps(entries, indent=2))
    return path


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory) -> Path:
    from helpers import tiny_config

    cfg = tiny_config("clip-tiny", "model.vision.layers=2")
    torch.manual_seed(0)
    return save_checkpoint(build_model(cfg), cfg, tmp_path_factory.mktemp("llava-clip"))


def _rejects(path: Path) -> dict[str, str]:
    return {r["key"]: r["reason"] for r in map(json.loads, path.read_text().splitlines())}


def test_reader_keeps_the_good_entries_and_rejects_the_bad_with_reasons(llava_json, tmp_path):
    assert is_llava(llava_json)
    data = read_llava(llava_json, rejects_path=tmp_path / "rejects.jsonl")
    assert [c.key for c in data.items] == ["red", "blue", "text"]
    assert {c.key: c.turns for c in data.items} == TURNS
    root = llava_json.parent / "images"
    assert [c.image for c in data.items] == [root / "red.png", root / "blue.png", None]
    assert _rejects(tmp_path / "rejects.jsonl") == BAD and data.rejected == 3
    with pytest.raises(PolysenseError, match="none of its 1 entries"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps([{"id": "x", "conversations": TEXT[:1]}]))
        read_llava(bad)


def test_placeholder_rules_and_format_detection(tmp_path):
    entries = [
        {"id": "later", "image": "a.png", "conversations": [*TEXT[:2], *RED[:2]]},
        {"id": "twice", "image": "a.png", "conversations": [RED[0], {"from": "gpt", "value": "<image>"}]},
        {"id": "no-image", "conversations": RED},
        {"id": "order", "image": "a.png", "conversations": [RED[0], RED[2], RED[1]]},
        {"id": "role", "conversations": [{"from": "system", "value": "hi"}, *TEXT]},
        {"id": "gpt-first", "conversations": [TEXT[1], *TEXT]},  # LLaVA drops a leading gpt turn
        {"id": "implicit", "image": "a.png", "conversations": TEXT},  # the image goes first
    ]  # fmt: skip
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = tmp_path / "x.json"
    path.write_text(json.dumps(entries))
    data = read_llava(path, rejects_path=tmp_path / "r.jsonl")
    assert [c.key for c in data.items] == ["gpt-first", "implicit"]
    assert data.items[0].turns == data.items[1].turns == TURNS["text"]
    assert data.items[0].image is None and data.items[1].image == tmp_path / "a.png"
    assert _rejects(tmp_path / "r.jsonl") == {
        "later": "placeholder_not_first",
        "twice": "several_placeholders",
        "no-image": "placeholder_without_image",
        "order": "turns_out_of_order",
        "role": "unknown_role",
    }
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [], "annotations": []}))
    assert not is_llava(coco) and not is_llava(tmp_path / "a.png")
    long = tmp_path / "long.json"  # a first entry past the first MiB the sniff reads
    long.write_text(json.dumps([{"id": "x" * 2**21, "conversations": TEXT}], indent=1))
    assert is_llava(long)


def _tiny_vlm(llava_json: Path) -> VLM:
    data = read_llava(llava_json)
    tok = ChatTokenizer.train(llava_texts(data), vocab_size=300)
    from helpers import tiny_config

    torch.manual_seed(0)
    cfg = VLMConfig(
        lm=LMConfig(vocab_size=tok.vocab_size, context_length=128, width=32, layers=2, heads=2),
        vision=tiny_config().model.vision,
    )
    return VLM(cfg=cfg, tokenizer=tok).eval()


def _by_hand(tok: ChatTokenizer, first: str, turns) -> tuple[list[int], list[bool]]:
    """polysense's template written out: `[BOS]{first turn}` then per answer ` {answer}[EOS]`,
    later questions as `\\nUSER: {q}\\nASSISTANT:`; the answers and their [EOS] are targets."""
    ids, flags = [tok.bos_id, *tok.encode(first)], []
    flags = [False] * len(ids)
    for k, (q, a) in enumerate(turns):
        if k:
            p = tok.encode(f"\nUSER: {q}\nASSISTANT:")
            ids, flags = ids + p, flags + [False] * len(p)
        r = [*tok.encode(f" {a}"), tok.eos_id]
        ids, flags = ids + r, flags + [True] * len(r)
    return ids, flags


def test_polysense_rows_and_targets_equal_the_template_by_hand(llava_json):
    model = _tiny_vlm(llava_json)
    tok, data = model.tokenizer, read_llava(llava_json)
    firsts = {
        "red": "USER: <image>\nWhat colour is the shape?\nASSISTANT:",
        "blue": "USER: <image>\nHow many shapes?\nASSISTANT:",
        "text": "USER:\nWhat is a triangle?\nASSISTANT:",  # no image: the LM's text-only form
    }
    expected = [_by_hand(tok, firsts[c.key], c.turns) for c in data.items]
    got = [conversation_ids(tok, c.turns, image=c.image is not None) for c in data.items]
    assert got == expected
    # the training batch: each image where its row's <image> was, labels = the flagged tokens
    with torch.no_grad():
        batch = conversation_batch(model, data, [0, 1, 2])
        red = model.image_tokens([Image.open(llava_json.parent / "images" / "red.png")])[0]
    n_img = len(red)
    for r, (ids, flags) in enumerate(expected):
        length = len(ids) + (n_img - 1 if data.items[r].image else 0)
        assert int(batch.key_mask[r].sum()) == length
        labels = batch.labels[r][batch.labels[r] != -100].tolist()
        assert labels == [i for i, f in zip(ids, flags, strict=True) if f]
    t = batch.embeds.shape[1]
    at = t - len(expected[0][0]) - n_img + 1 + expected[0][0].index(tok.image_id)
    torch.testing.assert_close(batch.embeds[0, at : at + n_img], red)


@pytest.mark.parametrize("lm_fixture", ["llama_dir", "qwen2_dir"])
def test_hf_rows_equal_apply_chat_template_and_target_the_assistant_turns(
    llava_json, lm_fixture, request
):
    lm_dir, vision = request.getfixturevalue(lm_fixture), request.getfixturevalue("clip_dir")
    model, _ = build_vlm(llava_run(lm_dir, vision))
    tok, data = model.tokenizer, read_llava(llava_json)
    for conv in data.items:
        msgs = []
        for k, (q, a) in enumerate(conv.turns):
            content = f"<image>\n{q}" if k == 0 and conv.image else q
            msgs += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
        ids, flags = conversation_ids(tok, conv.turns, image=conv.image is not None)
        assert ids == _ids(tok.hf.apply_chat_template(msgs, tokenize=True))
        assert ids.count(tok.image_id) == (conv.image is not None)
        want = [False] * len(ids)  # each assistant turn: after the generation prompt, to its end
        for k in range(len(conv.turns)):
            before = tok.hf.apply_chat_template(
                msgs[: 2 * k + 1], add_generation_prompt=True, tokenize=True
            )
            upto = tok.hf.apply_chat_template(msgs[: 2 * k + 2], tokenize=True)
            want[len(_ids(before)) : len(_ids(upto))] = [True] * (
                len(_ids(upto)) - len(_ids(before))
            )
        assert flags == want
        answers = tok.hf.decode([i for i, f in zip(ids, flags, strict=True) if f])
        assert all(a in answers for _, a in conv.turns) and "USER" not in answers.upper()


def _run(clip: Path, **train) -> VLMRunConfig:
    base = {"batch_size": 2, "steps": 3, "warmup_steps": 1, "log_every": 1, "ckpt_every": 2}
    return VLMRunConfig(
        name="llava-test",
        model=VLMConfig(lm=LMConfig(vocab_size=300, context_length=128, width=32, layers=2, heads=2)),
        train=VLMTrainConfig(**(base | train)),
        init=InitConfig(vision=str(clip)),
    )  # fmt: skip


def test_batches_are_a_function_of_seed_and_step(llava_json):
    data = read_llava(llava_json)
    a = ConversationBatches(data=data, seed=3, batch_size=5)
    b = ConversationBatches(data=data, seed=3, batch_size=5)
    assert [a.batch(s) for s in (7, 0, 7)] == [b.batch(7), b.batch(0), b.batch(7)]
    assert len({tuple(a.batch(s)) for s in range(20)}) > 1
    assert {i for s in range(20) for i in a.batch(s)} == {0, 1, 2}


@pytest.mark.parametrize("decoder", ["polysense", "hf"])
def test_a_killed_run_on_llava_data_resumes_exactly(
    decoder, llava_json, clip_ckpt, tmp_path, monkeypatch, request
):
    """Killed at step 3 (after the checkpoint of step 2), the resumed run ends with the
    uninterrupted run's weights, bit for bit: polysense's GPT built from scratch, or a tiny HF
    Qwen2 under an HF CLIP tower (its processor, LLaVA's feature layer)."""
    from test_vlm import run_whole_and_killed

    run = _run(clip_ckpt, steps=4, train_vision_top=1)
    if decoder == "hf":
        hf = llava_run(request.getfixturevalue("qwen2_dir"), request.getfixturevalue("clip_dir"))
        run = dataclasses.replace(hf, train=run.train)
    full, killed = run_whole_and_killed(run, llava_json, tmp_path, monkeypatch, at=3)
    a, b = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _rejects(full / "rejects.jsonl") == BAD
    assert load_vlm(full).cfg.decoder == decoder
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]  # the resumed run went on from step 2, not from the start


def test_scst_on_conversations_is_a_clear_error(llava_json, clip_ckpt, tmp_path):
    from polysense.models.vlm import SCSTConfig

    run = _run(clip_ckpt, scst=SCSTConfig(fraction=0.2))
    with pytest.raises(PolysenseError, match=r"--set train.scst.fraction=0"):
        train_stage(run, data=llava_json, out=tmp_path / "x", progress=False)


def test_cli_trains_stage2_on_llava_json_and_ask_answers(llava_json, clip_ckpt, tmp_path):
    from polysense.cli import app

    out = tmp_path / "stage2"
    sets = [
        "init.vlm=", f"init.vision={clip_ckpt}", "model.lm.width=32", "model.lm.layers=2",
        "model.lm.heads=2", "model.lm.vocab_size=300", "train.steps=3", "train.batch_size=2",
        "train.warmup_steps=1", "train.scst.fraction=0", "train.max_minutes=0",
        "train.train_vision_top=1",
    ]  # fmt: skip
    # the file away from its images, as LLaVA keeps them: --image-root says where they are
    moved = tmp_path / "annotations" / "llava.json"
    moved.parent.mkdir()
    moved.write_text(llava_json.read_text())
    args = ["train", "vlm-tiny-stage2", "--data", str(moved), "--out", str(out)]
    args += [x for s in sets for x in ("--set", s)] + ["--eval-splits", ""]
    args += ["--image-root", str(llava_json.parent)]
    runner = CliRunner()
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["rejected"] == 3
    assert _rejects(out / "rejects.jsonl") == BAD
    image, question = llava_json.parent / "images" / "red.png", "What colour is the shape?"
    res = runner.invoke(app, ["ask", "--ckpt", str(out), str(image), question])
    assert res.exit_code == 0, res.output
    model = load_vlm(out)
    want = model.generate([Image.open(image)], [chat_prompt(question)], max_new_tokens=16)[0]
    assert res.output.strip() == want
    assert dataclasses.asdict(model.cfg.lm)["width"] == 32


def test_lm_stage_on_llava_json_is_a_one_line_error(llava_json, tmp_path, capsys):
    from test_cli_errors import run_cli

    out = str(tmp_path / "lm")
    code, _, err = run_cli(capsys, "train", "lm-tiny", "--data", str(llava_json), "--out", out)
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert str(llava_json) in err and "vlm-tiny-stage1/2" in err


def test_image_root_errors_name_the_flag_and_the_fix(llava_json, tmp_path, capsys):
    from polysense.data.world import generate_world
    from test_cli_errors import run_cli

    world = generate_world(tmp_path / "world", n=20, seed=0, progress=False)
    out = str(tmp_path / "out")
    cases = [
        (("vlm-tiny-stage2", str(llava_json), str(tmp_path / "nope")), "no such directory"),
        (("vlm-tiny-stage2", str(world), str(tmp_path)), "is not one"),
        (("clip-tiny", str(world), str(tmp_path)), "contrastive presets"),
        (("lm-tiny", str(world), str(tmp_path)), "lm-tiny reads its data where it is"),
    ]
    for (preset, data, root), words in cases:
        args = ("train", preset, "--data", data, "--out", out, "--image-root", root)
        code, _, err = run_cli(capsys, *args, "--set", "train.steps=1")
        assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "--image-root" in err and words in err, err
