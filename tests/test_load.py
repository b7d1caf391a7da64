"""`polysense.load` reads a checkpoint of every family as the family's own loader does.

For each family a tiny model is built, saved and read back twice: by `polysense.load` and by the
family's loader in `polysense.models.checkpoint`. Both must give the saved model's outputs on the
same inputs (the saved model is the independent expectation; the loaders must agree with it and
so with each other).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import polysense
import test_vlm_hf
from helpers import tiny_config
from polysense.data.chat import ChatTokenizer, chat_prompt
from polysense.data.tokenizer import Tokenizer
from polysense.errors import PolysenseError
from polysense.models.checkpoint import (
    export_checkpoint,
    load_fusion,
    load_generator,
    load_lm,
    load_model,
    load_vlm,
    model_family,
    save_checkpoint,
    save_fusion,
    save_generator,
    save_vlm,
)
from polysense.models.clip import CLIP, bootstrap_captions, build_model
from polysense.models.diffusion import DiffusionConfig, TextCondition, TextToImage, UNet
from polysense.models.fusion import FusionConfig, FusionModel, FusionRunConfig, fusion_model
from polysense.models.lm import GPT, LMConfig
from polysense.models.vlm import VLM, LMRunConfig, VLMConfig, VLMRunConfig
from polysense.models.warmstart import build_vlm
from polysense.presets import get_preset
from polysense.presets.t2i import T2IRunConfig

CORPUS = bootstrap_captions()[:200]
# tiny HF Llama and CLIP directories (module fixtures of test_vlm_hf)
llama_dir, clip_dir = test_vlm_hf.llama_dir, test_vlm_hf.clip_dir


@pytest.fixture(scope="module")
def clip_run():
    return tiny_config("clip-tiny", "model.vision.layers=1", "model.text.layers=1")


@pytest.fixture(scope="module")
def clip(clip_run):
    torch.manual_seed(0)
    return build_model(clip_run, texts=CORPUS).eval()


def _images(n: int, size: int) -> list[Image.Image]:
    g = torch.Generator().manual_seed(n)
    return [
        Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).byte().numpy())
        for _ in range(n)
    ]


def _same_embeddings(a: CLIP, b: CLIP, ref: CLIP) -> None:
    images, texts = _images(3, ref.cfg.vision.image_size), ["a red circle", "two blue squares"]
    ref.inference_precision = a.inference_precision  # the checkpoint's train.precision
    with torch.no_grad():
        for m in (a, b):
            assert isinstance(m, CLIP) and not m.training
            assert m.inference_precision == ref.inference_precision
            torch.testing.assert_close(m.encode_image(images), ref.encode_image(images))
            torch.testing.assert_close(m.encode_text(texts), ref.encode_text(texts))


@pytest.mark.parametrize("preset", ["clip-tiny", "siglip-tiny"])
def test_contrastive_checkpoint(preset, tmp_path):
    run = tiny_config(preset, "model.vision.layers=1", "model.text.layers=1")
    torch.manual_seed(1)
    model = build_model(run, texts=CORPUS).eval()
    ckpt = save_checkpoint(model, run, tmp_path / "ckpt")
    assert model_family(ckpt) == run.model.family
    _same_embeddings(polysense.load(ckpt), load_model(ckpt), model)


def test_audio_tower_checkpoint(tmp_path):
    run = tiny_config("clip-tiny", "model.towers=image,text,audio", "model.audio.layers=1")
    torch.manual_seed(2)
    model = build_model(run, texts=CORPUS).eval()
    ckpt = save_checkpoint(model, run, tmp_path / "ckpt")
    waves = torch.randn(2, int(run.model.audio.sample_rate * run.model.audio.clip_seconds))
    with torch.no_grad():
        want = model.encode_audio(waves)
        for loaded in (polysense.load(ckpt), load_model(ckpt)):
            torch.testing.assert_close(loaded.encode_audio(waves), want)


def test_hugging_face_clip_directory(clip_dir):
    """A tiny transformers CLIPModel directory: its image features are the reference."""
    from transformers import CLIPModel

    assert model_family(clip_dir) == "clip"
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = CLIPModel.from_pretrained(clip_dir).eval().get_image_features(pixel_values=pixels)
        want = torch.nn.functional.normalize(getattr(want, "pooler_output", want), dim=-1)
        for m in (polysense.load(clip_dir), load_model(clip_dir)):
            assert isinstance(m, CLIP) and not m.training
            torch.testing.assert_close(m.encode_image(pixels), want, atol=1e-5, rtol=1e-4)


def test_fusion_checkpoint(tmp_path):
    tok = Tokenizer.train(CORPUS, vocab_size=300, context_length=24)
    cfg = FusionConfig(
        style="late", width=32, layers=1, heads=2, vocab_size=tok.vocab_size, pad_id=tok.pad_id,
        eot_id=tok.eot_id,
    )  # fmt: skip
    torch.manual_seed(3)
    model = fusion_model(cfg).eval()
    run = FusionRunConfig(name="fusion-test", model=cfg)
    save_fusion(model, run, tok, tmp_path / "ckpt")
    assert model_family(tmp_path / "ckpt") == "fusion"
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=g)
    ids = tok(["a red circle", "a blue star left of a green square"])
    audio = torch.randn(2, cfg.audio_samples, generator=g) * 0.3
    present = torch.ones(2, 3, dtype=torch.bool)
    loaded = polysense.load(tmp_path / "ckpt")
    own, own_tok, own_cfg = load_fusion(tmp_path / "ckpt")
    assert isinstance(loaded, FusionModel) and not loaded.training
    assert loaded.run_cfg == own_cfg == run
    assert torch.equal(loaded.tokenizer(["a red circle"]), own_tok(["a red circle"]))
    with torch.no_grad():
        want = model(images, ids, audio, present)["answer"]
        for m in (loaded, own):
            torch.testing.assert_close(m(images, ids, audio, present)["answer"], want)


def test_lm_checkpoint(tmp_path):
    tok = ChatTokenizer.train(CORPUS, vocab_size=300)
    cfg = LMConfig(vocab_size=tok.vocab_size, context_length=64, width=32, layers=1, heads=2)
    torch.manual_seed(4)
    model = GPT(cfg=cfg).eval()
    run = LMRunConfig(name="lm-test", model=cfg)
    save_vlm(model, run, tok, tmp_path / "ckpt")
    assert model_family(tmp_path / "ckpt") == "lm"
    loaded = polysense.load(tmp_path / "ckpt")
    own, own_tok, own_cfg = load_lm(tmp_path / "ckpt")
    assert isinstance(loaded, GPT) and loaded.run_cfg == own_cfg == run
    ids = torch.tensor([own_tok.prompt_ids("a red circle left of a blue square")])  # (1, L)
    assert loaded.tokenizer.encode("a red circle") == tok.encode("a red circle")
    with torch.no_grad():
        want = model(model.token_embed(ids), torch.ones_like(ids, dtype=torch.bool))[0]
        for m in (loaded, own):
            got = m(m.token_embed(ids), torch.ones_like(ids, dtype=torch.bool))[0]  # (1, L, V)
            torch.testing.assert_close(got, want)


def test_vlm_checkpoint(clip, tmp_path):
    tok = ChatTokenizer.train(CORPUS, vocab_size=300)
    lm = LMConfig(vocab_size=tok.vocab_size, context_length=128, width=32, layers=1, heads=2)
    cfg = VLMConfig(lm=lm, vision=clip.cfg.vision, projector="mlp2x")
    torch.manual_seed(5)
    model = VLM(cfg=cfg, tokenizer=tok).eval()
    run = VLMRunConfig(name="vlm-test", model=cfg)
    save_vlm(model, run, tok, tmp_path / "ckpt")
    assert model_family(tmp_path / "ckpt") == "vlm"
    images = _images(2, cfg.vision.image_size)
    prompts = [chat_prompt("describe the image."), chat_prompt("what colour is it?")]
    responses = ["a red circle", "blue"]
    with torch.no_grad():
        want = model.score(images, prompts, responses)  # (B,)
        for m in (polysense.load(tmp_path / "ckpt"), load_vlm(tmp_path / "ckpt")):
            assert isinstance(m, VLM) and m.run_cfg == run
            torch.testing.assert_close(m.score(images, prompts, responses), want)


def test_llava_directory(llama_dir, clip_dir, tmp_path):
    """An HF LLaVA directory (export of a VLM with a Llama decoder and an HF CLIP tower)."""
    model, run = build_vlm(test_vlm_hf.llava_run(llama_dir, clip_dir))
    ckpt = save_vlm(model.eval(), run, model.tokenizer, tmp_path / "ckpt")
    llava = export_checkpoint(ckpt, tmp_path / "llava")
    assert model_family(llava) == "vlm"
    images = _images(2, 32)
    prompts = [chat_prompt("describe the image."), chat_prompt("what colour is it?")]
    responses = ["a red circle", "blue"]
    with torch.no_grad():
        want = model.score(images, prompts, responses)
        for m in (polysense.load(llava), load_vlm(llava)):
            assert isinstance(m, VLM) and m.cfg.decoder == "hf"
            torch.testing.assert_close(
                m.score(images, prompts, responses), want, atol=1e-4, rtol=1e-4
            )


def test_t2i_checkpoint(clip, tmp_path):
    cfg = DiffusionConfig(
        image_size=16, channels=(8, 16, 16), heads=2, text_width=clip.text.width, timesteps=100
    )
    torch.manual_seed(6)
    model = TextToImage(unet=UNet(cfg=cfg), text=TextCondition(clip=clip)).eval()
    run = T2IRunConfig(name="t2i-test", model=cfg)
    save_generator(model, run, tmp_path / "ckpt")
    assert model_family(tmp_path / "ckpt") == "t2i"
    prompts = ["a red circle", "a blue star"]
    want = model.generate(prompts, steps=2, seed=7)  # (B, S, S, 3) uint8
    for m in (polysense.load(tmp_path / "ckpt"), load_generator(tmp_path / "ckpt")):
        assert isinstance(m, TextToImage)
        assert torch.equal(m.generate(prompts, steps=2, seed=7), want)


def test_preset_names_and_family_checks(clip, tmp_path):
    a = polysense.load("clip-tiny")
    run = get_preset("clip-tiny")
    torch.manual_seed(run.train.seed)  # the documented recipe: the preset's seed, then build
    ref = build_model(run)
    for x, y in zip(a.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    assert polysense.load("siglip-tiny", family="clip").cfg.family == "siglip"
    with pytest.raises(PolysenseError, match=r"lm-tiny.*train it") as err:
        polysense.load("lm-tiny")
    assert "\n" not in str(err.value)
    ckpt = save_checkpoint(clip, tiny_config("clip-tiny"), tmp_path / "clip")
    with pytest.raises(PolysenseError, match=r"holds a clip model, and a vlm model is needed"):
        polysense.load(ckpt, family="vlm")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"model": {"family": "mystery"}}')
    with pytest.raises(PolysenseError, match="names no model family"):
        polysense.load(tmp_path / "odd")
    with pytest.raises(PolysenseError, match="neither a checkpoint directory nor a preset"):
        polysense.load(tmp_path / "nowhere")
