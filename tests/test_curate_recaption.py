"""The recaption stage with a VLM captioner (`recaption.captioner=vlm:CKPT`): each synthetic
caption is exactly what `polysense caption --strategy beam` prints for that image, and a user's
`recaption.prompt` reaches the model through its chat template."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from polysense.data.chat import CAPTION_INSTRUCTION, chat_prompt
from polysense.data.curate import CurateConfig, RecaptionConfig, run_curate
from polysense.data.readers import read_samples
from polysense.data.world import generate_world
from polysense.models.checkpoint import load_vlm, save_checkpoint, save_vlm
from polysense.models.clip import build_model
from polysense.models.lm import LMConfig
from polysense.models.vlm import InitConfig, VLMConfig, VLMRunConfig, VLMTrainConfig
from polysense.models.warmstart import build_vlm
from polysense.train.vlm import train_stage
from test_vlm_hf import _ids, clip_dir, llava_run, qwen2_dir  # noqa: F401


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recap-world")
    generate_world(root, n=40, seed=4, modalities=("image", "text"), workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def vlm_ckpt(world, tmp_path_factory) -> Path:
    """A tiny VLM trained on captions (a random polysense CLIP tower, a fresh GPT) long enough
    that beam search says something other than nothing (after 6 steps it ends at once)."""
    from helpers import tiny_config

    cfg = tiny_config("clip-tiny", "model.vision.layers=2")
    torch.manual_seed(0)
    clip = save_checkpoint(build_model(cfg), cfg, tmp_path_factory.mktemp("recap-clip"))
    run = VLMRunConfig(
        name="recap-vlm",
        model=VLMConfig(
            lm=LMConfig(vocab_size=400, context_length=128, width=32, layers=2, heads=2)
        ),
        train=VLMTrainConfig(batch_size=8, steps=60, warmup_steps=1, lr=1e-2, log_every=20),
        init=InitConfig(vision=str(clip)),
    )
    out = tmp_path_factory.mktemp("recap-vlm")
    train_stage(run, data=world, out=out, progress=False)
    return out


def _samples(out: Path) -> list[tuple[str, bytes, str, dict]]:
    """(key, image bytes, image suffix, metadata) of every output sample, read with tarfile."""
    rows: dict[str, dict] = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                rows.setdefault(key, {})[ext] = tar.extractfile(m).read()
    out_rows = []
    for key, members in sorted(rows.items()):
        ext = next(e for e in ("png", "jpg", "jpeg", "webp") if e in members)
        out_rows.append((key, members[ext], ext, json.loads(members["json"])))
    return out_rows


def _recaption(world: Path, out: Path, ckpt: Path, prompt: str = "") -> list:
    cfg = CurateConfig(
        source=str(world),
        out=str(out),
        stages=("recaption",),
        shard_size=8,
        recaption=RecaptionConfig(captioner=f"vlm:{ckpt}", prompt=prompt),
    )
    run_curate(cfg)
    return _samples(out)


def test_vlm_recaptions_equal_polysense_caption(world, vlm_ckpt, tmp_path):
    from polysense.cli import app

    samples = _recaption(world, tmp_path / "cur", vlm_ckpt)
    assert len(samples) == sum(1 for _ in read_samples(world, split="train", decode=False))
    files = []
    for key, data, ext, _ in samples:  # the very bytes the stage decoded
        files.append(tmp_path / f"{key}.{ext}")
        files[-1].write_bytes(data)
    res = CliRunner().invoke(
        app, ["caption", "--ckpt", str(vlm_ckpt), "--strategy", "beam", *map(str, files)]
    )
    assert res.exit_code == 0, res.output
    printed = {}
    for line in res.output.splitlines():  # "PATH: CAPTION"
        path, _, text = line.partition(":")
        printed[path] = text.strip()
    assert len(printed) == len(files)
    for (_, _, _, meta), path in zip(samples, files, strict=True):
        # an empty caption is no caption: the stage leaves the sample's field out
        assert meta.get("caption_synthetic", "") == printed[str(path)]
    # the captions depend on the image (not one string for all) and are not empty
    assert len({m.get("caption_synthetic") for *_, m in samples} - {None}) > 1


def test_a_custom_prompt_goes_through_the_chat_template(world, vlm_ckpt, tmp_path):
    """`recaption.prompt` is the instruction in the template: the captions equal beam search
    (3 beams, 40 tokens) on the chat prompt holding that instruction, image by image, and differ
    from the captions of the default instruction."""
    instruction = "describe the image"  # not the trained "describe the image."
    samples = _recaption(world, tmp_path / "cur", vlm_ckpt, prompt=instruction)
    model = load_vlm(vlm_ckpt)
    decoding = {"strategy": "beam", "num_beams": 3, "max_new_tokens": 40}
    images = [Image.open(io.BytesIO(data)).convert("RGB") for _, data, _, _ in samples[:6]]
    want = model.generate(images, [chat_prompt(instruction)] * 6, **decoding)
    default = model.generate(images, [chat_prompt(CAPTION_INSTRUCTION)] * 6, **decoding)
    assert [m.get("caption_synthetic", "") for *_, m in samples[:6]] == want
    assert any(want) and want != default


@pytest.mark.filterwarnings("ignore:.*has no tokenizer")  # the HF CLIP: vision only
def test_an_hf_decoder_recaptions_through_its_chat_template(world, tmp_path, request):
    """A VLM on a tiny HF Qwen2 (ChatML) and an HF CLIP tower: the prompt is the tokenizer's
    apply_chat_template of the caption instruction, and the captions equal beam search on it."""
    lm, vision = request.getfixturevalue("qwen2_dir"), request.getfixturevalue("clip_dir")
    model, run = build_vlm(llava_run(lm, vision))
    ckpt = save_vlm(model.eval(), run, model.tokenizer, tmp_path / "ckpt")
    samples = _recaption(world, tmp_path / "cur", ckpt)
    tok = model.tokenizer
    user = [{"role": "user", "content": f"<image>\n{CAPTION_INSTRUCTION}"}]
    rendered = tok.hf.apply_chat_template(user, add_generation_prompt=True, tokenize=True)
    assert model.prompt_ids(chat_prompt(CAPTION_INSTRUCTION)) == _ids(rendered)
    images = [Image.open(io.BytesIO(data)).convert("RGB") for _, data, _, _ in samples[:8]]
    decoding = {"strategy": "beam", "num_beams": 3, "max_new_tokens": 40}
    want = model.generate(images, [chat_prompt(CAPTION_INSTRUCTION)] * 8, **decoding)
    assert [m.get("caption_synthetic", "") for *_, m in samples[:8]] == want and any(want)
