"""The VLM: KV cache, left padding, the <image> placeholder, projectors, freezing, resume."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from helpers import tiny_config
from polysense.data import instruct
from polysense.data.chat import CAPTION_INSTRUCTION, ChatTokenizer, chat_prompt
from polysense.data.instruct import load_split, world_texts
from polysense.data.transforms import tile_pixels
from polysense.data.world import generate_world
from polysense.decoding import LMStepper
from polysense.errors import PolysenseError
from polysense.models.checkpoint import load_lm, load_model, load_vlm, save_checkpoint
from polysense.models.clip import build_model
from polysense.models.lm import GPT, LMConfig
from polysense.models.vlm import (
    VLM,
    InitConfig,
    LMRunConfig,
    SCSTConfig,
    VLMConfig,
    VLMRunConfig,
    VLMTrainConfig,
    image_tiles,
)
from polysense.train import vlm as train_vlm
from polysense.train.vlm import VLMTask, train_stage

TINY_LM = LMConfig(vocab_size=400, context_length=128, width=32, layers=2, heads=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vlm-world")
    generate_world(root, n=80, seed=3, modalities=("image", "text", "ocr"), workers=1)
    return root


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory) -> Path:
    cfg = tiny_config("clip-tiny", "model.vision.layers=2")
    torch.manual_seed(0)
    return save_checkpoint(build_model(cfg), cfg, tmp_path_factory.mktemp("clip"))


def _run(clip: Path, **train) -> VLMRunConfig:
    base = {"batch_size": 4, "steps": 3, "warmup_steps": 1, "log_every": 1, "ckpt_every": 2}
    return VLMRunConfig(
        name="vlm-test",
        model=VLMConfig(lm=TINY_LM, projector="mlp2x"),
        train=VLMTrainConfig(**(base | train)),
        init=InitConfig(vision=str(clip)),
    )


@pytest.fixture(scope="module")
def tokenizer(world) -> ChatTokenizer:
    return ChatTokenizer.train(
        world_texts(load_split(world, "train", image_size=32)), vocab_size=400
    )


def _tiny_vlm(tokenizer: ChatTokenizer, projector: str = "mlp2x") -> VLM:
    torch.manual_seed(0)
    cfg = VLMConfig(
        lm=dataclasses.replace(TINY_LM, vocab_size=tokenizer.vocab_size),
        vision=tiny_config().model.vision,
        projector=projector,
        num_queries=5,
    )
    return VLM(cfg=cfg, tokenizer=tokenizer).eval()


def test_kv_cache_decoding_equals_full_recomputation() -> None:
    torch.manual_seed(0)
    lm = GPT(cfg=dataclasses.replace(TINY_LM, vocab_size=50)).eval()
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :3] = False  # row 1 is left-padded: 6 real tokens
    with torch.no_grad():
        full, _ = lm(lm.token_embed(ids), mask)  # (2, 9, V)
        stepper = LMStepper(lm)
        logits, state = stepper.start(lm.token_embed(ids[:, :5]), mask[:, :5])
        steps = [logits]
        for t in range(5, 9):
            logits, state = stepper.step(ids[:, t], state)
            steps.append(logits)
    cached = torch.stack(steps, 1)  # (2, 5, V): predictions at positions 4..8
    torch.testing.assert_close(cached, full[:, 4:], atol=1e-5, rtol=1e-5)


def test_left_padding_leaves_a_row_unchanged() -> None:
    torch.manual_seed(0)
    lm = GPT(cfg=dataclasses.replace(TINY_LM, vocab_size=50)).eval()
    row = torch.randint(0, 50, (1, 6))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), row], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 6, dtype=torch.bool)], 1)
    with torch.no_grad():
        alone, _ = lm(lm.token_embed(row), torch.ones(1, 6, dtype=torch.bool))
        inside, _ = lm(lm.token_embed(padded), mask)
    torch.testing.assert_close(inside[:, 4:], alone, atol=1e-5, rtol=1e-5)


def test_image_tokens_replace_the_placeholder_and_only_answers_are_targets(tokenizer) -> None:
    model = _tiny_vlm(tokenizer)
    prompt = model.prompt_ids(chat_prompt("what color is the circle?"))
    answer = model.response_ids("red")
    image = torch.randn(7, model.cfg.lm.width)
    batch = model.build_batch([prompt + answer], [image], n_prompt=[len(prompt)])
    at = prompt.index(tokenizer.image_id)
    assert batch.embeds.shape[1] == len(prompt) + len(answer) - 1 + 7
    torch.testing.assert_close(batch.embeds[0, at : at + 7], image)
    emb = model.lm.token_embed.weight
    torch.testing.assert_close(batch.embeds[0, at - 1], emb[prompt[at - 1]])
    torch.testing.assert_close(batch.embeds[0, at + 7], emb[prompt[at + 1]])
    targets = batch.labels[0][batch.labels[0] != -100].tolist()
    assert targets == answer  # the answer tokens and EOS, nothing of the prompt or image
    # the last prompt position predicts the first answer token
    assert batch.labels[0, len(prompt) - 2 + 7].item() == answer[0]
    with pytest.raises(PolysenseError, match="no image"):
        model.build_batch([prompt], [None])


def test_loss_is_the_cross_entropy_of_the_answer_tokens(tokenizer) -> None:
    model = _tiny_vlm(tokenizer)
    prompt = model.prompt_ids(chat_prompt("how many shapes are there?"))
    answer = model.response_ids("two")
    image = torch.randn(3, model.cfg.lm.width)
    short = model.build_batch([prompt + answer], [image], n_prompt=[len(prompt)])
    # a second, longer row forces left padding of the first
    other = model.prompt_ids(chat_prompt("is there a red circle on the left?")) + answer
    batch = model.build_batch(
        [prompt + answer, other], [image, image], n_prompt=[len(prompt), len(other) - 2]
    )
    with torch.no_grad():
        logits, _ = model.lm(short.embeds, short.key_mask)
        n = len(answer)
        expected = F.cross_entropy(logits[0, -n - 1 : -1], torch.tensor(answer))
        assert model.loss(short).item() == pytest.approx(expected.item(), rel=1e-5)
        total = model.loss(batch, reduction="sum").item()
        logits2, _ = model.lm(batch.embeds[1:], batch.key_mask[1:])
        second = F.cross_entropy(logits2[0, -3:-1], torch.tensor(other[-2:]), reduction="sum")
        assert total == pytest.approx(expected.item() * n + second.item(), rel=1e-4)


@pytest.mark.parametrize("projector", ["linear", "mlp2x", "qformer"])
def test_projectors_map_tiles_to_lm_tokens(tokenizer, projector) -> None:
    model = _tiny_vlm(tokenizer, projector)
    scene = Image.new("RGB", (32, 32), (200, 30, 30))
    strip = Image.new("RGB", (128, 32), (255, 255, 255))
    tokens = model.image_tokens([scene, strip, None])
    n = model.visual.num_patches + 1  # patches + cls per tile
    if projector == "qformer":
        assert [t.shape for t in tokens[:2]] == [(5, 32), (5, 32)]
    else:
        assert [t.shape for t in tokens[:2]] == [(n, 32), (4 * n, 32)]
    assert tokens[2] is None


def test_wide_images_are_cut_into_square_tiles() -> None:
    strip = Image.new("RGB", (128, 32))
    strip.paste((255, 0, 0), (32, 0, 64, 32))
    tiles = image_tiles(strip, size=32, max_tiles=4)
    assert [t.size for t in tiles] == [(32, 32)] * 4
    assert tiles[1].getpixel((5, 5)) == (255, 0, 0) and tiles[0].getpixel((5, 5)) == (0, 0, 0)
    assert len(image_tiles(Image.new("RGB", (40, 32)), size=32, max_tiles=4)) == 1


def test_batched_generation_equals_one_at_a_time(tokenizer) -> None:
    model = _tiny_vlm(tokenizer)
    images = [Image.new("RGB", (32, 32), c) for c in ((200, 30, 30), (30, 30, 200), (9, 9, 9))]
    prompts = [chat_prompt(q) for q in ("what?", "how many squares are there?", "describe")]
    together = model.generate(images, prompts, max_new_tokens=6)
    alone = [
        model.generate([i], [p], max_new_tokens=6)[0] for i, p in zip(images, prompts, strict=True)
    ]
    assert together == alone
    beams = model.generate(images, prompts, max_new_tokens=6, strategy="beam", num_beams=3)
    assert len(beams) == 3


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage1_changes_only_the_projector(world, clip_ckpt, tmp_path) -> None:
    lm_run = LMRunConfig(
        name="lm",
        model=TINY_LM,
        train=VLMTrainConfig(batch_size=8, steps=2, warmup_steps=1, log_every=1),
    )
    train_stage(lm_run, data=world, out=tmp_path / "lm", progress=False)
    gpt, _, _ = load_lm(tmp_path / "lm")
    run = _run(clip_ckpt, train_lm=False, train_projector=True, lr=1e-2)
    run = dataclasses.replace(run, init=dataclasses.replace(run.init, lm=str(tmp_path / "lm")))
    # the projector at initialisation: the same seed builds the same one
    torch.manual_seed(run.train.seed)
    init_model, _ = train_vlm.build_vlm(run, texts=None)
    train_stage(run, data=world, out=tmp_path / "s1", progress=False)
    model = load_vlm(tmp_path / "s1")
    assert _equal(_state(model.lm), _state(gpt))  # bitwise: the LM was frozen
    assert _equal(_state(model.visual), _state(load_model(clip_ckpt).visual))
    assert not _equal(_state(model.projector), _state(init_model.projector))


def test_stage2_trains_the_lm_and_only_the_top_vision_block(world, clip_ckpt, tmp_path) -> None:
    run = _run(clip_ckpt, train_lm=True, train_vision_top=1, mix_qa=1.0, mix_ocr=1.0)
    train_stage(run, data=world, out=tmp_path / "s2", progress=False)
    model, clip = load_vlm(tmp_path / "s2"), load_model(clip_ckpt)
    assert _equal(_state(model.visual.blocks[0]), _state(clip.visual.blocks[0]))
    assert _equal(_state(model.visual.patch_embed), _state(clip.visual.patch_embed))
    assert not _equal(_state(model.visual.blocks[1]), _state(clip.visual.blocks[1]))
    assert not _equal(_state(model.visual.ln_post), _state(clip.visual.ln_post))
    summary = json.loads((tmp_path / "s2" / "train_summary.json").read_text())
    assert 0 < summary["trainable_params"] < summary["total_params"]


def run_whole_and_killed(run, world, tmp_path, monkeypatch, *, at: int) -> tuple[Path, Path]:
    """Train `run` twice: whole into tmp_path/full, and killed at step `at` (after a checkpoint)
    then resumed into tmp_path/killed. Returns the two output directories."""
    train_stage(run, data=world, out=tmp_path / "full", progress=False)
    original = VLMTask.loss

    def killed(self, batch, step):
        if step == at:
            raise KeyboardInterrupt
        return original(self, batch, step)

    monkeypatch.setattr(VLMTask, "loss", killed)
    with pytest.raises(KeyboardInterrupt):
        train_stage(run, data=world, out=tmp_path / "killed", progress=False)
    monkeypatch.setattr(VLMTask, "loss", original)
    train_stage(run, data=world, out=tmp_path / "killed", resume=True, progress=False)
    return tmp_path / "full", tmp_path / "killed"


def test_a_run_killed_in_its_scst_phase_resumes_exactly(world, clip_ckpt, tmp_path, monkeypatch):
    """Steps 0-1 cross-entropy, 2-3 self-critical; killed at step 3 (after the checkpoint of
    step 2), the resumed run ends with the uninterrupted run's weights, bit for bit. The
    cross-entropy's cosine runs over its own two steps, then SCST's constant rate."""
    scst = SCSTConfig(fraction=0.5, batch_size=2, samples=2, max_new_tokens=6)
    run = _run(clip_ckpt, steps=4, warmup_steps=0, mix_qa=1.0, scst=scst)
    full, killed = run_whole_and_killed(run, world, tmp_path, monkeypatch, at=3)
    assert _equal(_state(load_vlm(full)), _state(load_vlm(killed)))
    rows = [json.loads(x) for x in (killed / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert ["reward" in r for r in rows] == [False, False, True, True]
    tc = run.train  # cosine from lr to min_lr_ratio * lr over xe_steps = 2: half-way at step 1
    half_way = tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi / 2))
    assert [r["lr"] for r in rows] == pytest.approx([tc.lr, tc.lr * half_way, scst.lr, scst.lr])


class _Reward:
    """Duck-types `CiderD.scores`: a function of the caption alone."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def scores(self, refs: list[str], hyps: list[str]) -> list[float]:
        return [self.fn(h) for h in hyps]


def _mean_reward(model: VLM, data, tc: VLMTrainConfig, reward: _Reward, steps: range) -> float:
    with torch.no_grad():
        return sum(train_vlm.scst_loss(model, data, tc, s, reward)[1] for s in steps) / len(steps)


def test_scst_climbs_the_reward_it_is_given(world, tokenizer) -> None:
    """The policy gradient raises a reward the model does not start out good at: the share of
    the letter 'e' in its sampled captions (measured on held-out draws, steps 1000+)."""
    model = _tiny_vlm(tokenizer).train()
    data = load_split(world, "train", image_size=32)
    sc = SCSTConfig(fraction=0.5, batch_size=8, samples=4, temperature=1.0, max_new_tokens=8)
    tc = VLMTrainConfig(scst=sc)
    reward = _Reward(lambda hyp: hyp.count("e") / max(len(hyp), 1))
    held_out = range(1000, 1004)
    before = _mean_reward(model, data, tc, reward, held_out)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(25):
        loss, _ = train_vlm.scst_loss(model, data, tc, step, reward)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _mean_reward(model, data, tc, reward, held_out)
    assert after > 1.5 * before, (before, after)


def test_scst_with_equal_rewards_has_no_gradient(world, tokenizer) -> None:
    """Every sample scores the same: each advantage is 0, so the loss and its gradient are 0."""
    model = _tiny_vlm(tokenizer).train()
    data = load_split(world, "train", image_size=32)
    tc = VLMTrainConfig(scst=SCSTConfig(fraction=0.5, batch_size=4, samples=3, max_new_tokens=6))
    loss, mean = train_vlm.scst_loss(model, data, tc, 0, _Reward(lambda hyp: 2.5))
    loss.backward()
    assert mean == 2.5 and loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [("fraction", 1.0, "fraction=1.0"), ("samples", 1, "samples=1"), ("temperature", 0.0, "> 0")],
)
def test_bad_scst_settings_are_clear_errors(world, clip_ckpt, tmp_path, field, value, match):
    scst = dataclasses.replace(SCSTConfig(fraction=0.5), **{field: value})
    with pytest.raises(PolysenseError, match=match):
        train_stage(_run(clip_ckpt, scst=scst), data=world, out=tmp_path / "x", progress=False)


def test_runner_writes_the_design_metric_keys(world, clip_ckpt, tmp_path) -> None:
    run = _run(clip_ckpt, steps=2, mix_qa=1.0, mix_ocr=1.0)
    metrics = train_vlm.run_vlm(
        run, data=world, out=tmp_path / "r", resume=False, eval_splits=("val",)
    )
    on_disk = json.loads((tmp_path / "r" / "metrics.json").read_text())
    for key in (
        "bleu4",
        "cider",
        "vqa_accuracy",
        "pope_accuracy",
        "pope_f1",
        "pope_yes_ratio",
        "chair_i",
        "chair_s",
        "ocr_exact_match",
        "ocr_cer",
    ):
        assert key in on_disk and on_disk[key] >= 0.0
        if key not in ("cider", "ocr_cer"):  # CIDEr is on a 0-10 scale, CER can pass 1
            assert on_disk[key] <= 1.0
    assert "bleu4" in metrics["baseline_nn"] and "bleu4" in metrics["baseline_most_frequent"]
    assert "cider" in on_disk["greedy"]  # beam search is the reported decoding, greedy beside it
    for s in ("random", "popular", "adversarial"):
        assert f"pope_{s}_f1" in on_disk


def test_commands_caption_ask_chat(world, clip_ckpt, tmp_path) -> None:
    from polysense.cli import app

    run = _run(clip_ckpt, steps=1)
    train_stage(run, data=world, out=tmp_path / "ck", progress=False)
    img = tmp_path / "scene.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(img)
    runner = CliRunner()
    ck = str(tmp_path / "ck")
    res = runner.invoke(app, ["caption", "--ckpt", ck, str(img), str(img), "--strategy", "beam"])
    assert res.exit_code == 0, res.output
    assert res.output.count(str(img)) == 2
    args = ["caption", "--ckpt", ck, str(img), "--strategy", "mbr", "--samples", "3"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and res.output.count(str(img)) == 1, res.output
    res = runner.invoke(app, ["ask", "--ckpt", ck, str(img), "what color is the square?"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["chat", "--ckpt", ck, str(img)], input="how many shapes?\n\n")
    assert res.exit_code == 0 and res.output.count("vlm>") == 1
    res = runner.invoke(app, ["ask", "--ckpt", ck, str(tmp_path / "nope.png"), "q"])
    assert res.exit_code != 0
    with pytest.raises(PolysenseError, match="not a language model"):
        load_vlm(clip_ckpt)
    assert CAPTION_INSTRUCTION in chat_prompt(CAPTION_INSTRUCTION)


def test_multi_turn_rows_target_every_answer_and_nothing_else(world, tokenizer) -> None:
    model = _tiny_vlm(tokenizer)
    data = load_split(world, "val", image_size=32)
    ex = instruct.Example(0, "qa", [("what color is the circle?", "red"), ("how many?", "two")])
    batch = train_vlm.vlm_batch(model, data, [ex])
    targets = batch.labels[0][batch.labels[0] != -100].tolist()
    assert targets == model.response_ids("red") + model.response_ids("two")
    rows = instruct.sample_examples(
        data, seed=0, step=5, batch_size=16, mix=(0.0, 1.0, 0.0), qa_turns=3
    )
    for e in rows:
        qa = {(q["question"], q["answer"]) for q in data.qa[e.index]}
        assert 1 <= len(e.turns) <= 3 and set(e.turns) <= qa
        assert len(set(e.turns)) == len(e.turns)


def test_training_tiles_equal_inference_tiles(world, tokenizer) -> None:
    """The OCR strips cut in tensors for training equal the PIL path `generate` takes."""
    model = _tiny_vlm(tokenizer)
    data = load_split(world, "val", image_size=32)
    v = model.cfg.vision
    fast = tile_pixels(data.ocr[:2], 32, v.image_mean, v.image_std)  # (2, 4, 3, H, W)
    slow = model.pixels([Image.fromarray(data.ocr[i].numpy()) for i in range(2)])
    torch.testing.assert_close(fast, torch.stack(slow), atol=1e-5, rtol=0)
