"""Hugging Face CLIP/SigLIP import and export, checked against transformers' own forward pass."""

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

import polysense
from polysense.config import ModelConfig, RunConfig, TextConfig, VisionConfig
from polysense.data.tokenizer import Tokenizer
from polysense.data.transforms import images_to_tensor
from polysense.errors import PolysenseError
from polysense.models.checkpoint import export_checkpoint, import_to_checkpoint, load_model
from polysense.models.clip import CLIP
from polysense.models.hf import export_hf, import_hf

# Deliberately unusual sizes: 3 heads of 16, MLP 37 wide, 5x5 patches of 8 px, projection 24.
TEXT = dict(
    vocab_size=99,
    hidden_size=48,
    num_attention_heads=3,
    num_hidden_layers=2,
    intermediate_size=37,
    max_position_embeddings=16,
    pad_token_id=0,
    bos_token_id=97,
    eos_token_id=98,
)
VISION = dict(
    hidden_size=48,
    num_attention_heads=3,
    num_hidden_layers=2,
    intermediate_size=37,
    patch_size=8,
    image_size=40,
)
CAPTIONS = ["a red circle", "a small blue square left of a green star", "two yellow triangles"]


def hf_features(out) -> torch.Tensor:
    """transformers 5 returns a ModelOutput whose pooler_output is the projected feature."""
    feats = out if isinstance(out, torch.Tensor) else out.pooler_output
    return F.normalize(feats, dim=-1)


def hf_embed(hf, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        img = hf_features(hf.get_image_features(pixel_values=images))
        txt = hf_features(hf.get_text_features(input_ids=ids))
    return img, txt


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 40, 40, generator=g)
    ids = torch.randint(3, 97, (3, 16), generator=g)
    ids[:, 0] = 97
    ids[0, 9], ids[0, 10:] = 98, 0  # eot then padding
    ids[1, 15] = 98  # full row
    ids[2, 4], ids[2, 5:] = 98, 0
    return images, ids


def make_hf(family: str, tmp_path, **text_changes):
    torch.manual_seed(0)
    if family == "clip":
        cfg = CLIPConfig(
            text_config={**TEXT, **text_changes}, vision_config=VISION, projection_dim=24
        )
        hf = CLIPModel(cfg)
    else:
        cfg = SiglipConfig(
            text_config={**TEXT, "projection_size": 48, **text_changes}, vision_config=VISION
        )
        hf = SiglipModel(cfg)
        with torch.no_grad():
            hf.logit_scale.fill_(2.3)
            hf.logit_bias.fill_(-7.0)
    hf.eval()
    hf.save_pretrained(tmp_path / f"hf-{family}")
    return hf, tmp_path / f"hf-{family}"


def quiet_import(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return import_hf(path)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_import_then_export_matches_transformers(family, tmp_path):
    hf, src = make_hf(family, tmp_path)
    with pytest.warns(UserWarning, match="as ids"):
        model, run = import_hf(src)
    images, ids = inputs()
    ref_img, ref_txt = hf_embed(hf, images, ids)
    assert ref_img.shape == (3, 24 if family == "clip" else 48)
    with torch.no_grad():
        img, txt = model.encode_image(images), model.encode_text(ids)
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=0)
    assert (ref_txt[0] - ref_txt[1]).abs().max() > 1e-2  # rows differ: the check has teeth

    v, t = run.model.vision, run.model.text
    assert (v.width, v.heads, v.patch_size, v.image_size, v.layers) == (48, 3, 8, 40, 2)
    assert (t.width, t.heads, t.vocab_size, t.context_length) == (48, 3, 99, 16)
    if family == "clip":
        assert (v.act, v.pool, v.ln_pre, t.pool, t.causal) == (
            "quick_gelu",
            "cls",
            True,
            "eot",
            True,
        )
    else:
        assert (v.act, v.pool, v.ln_pre, t.pool, t.causal) == (
            "gelu_pytorch_tanh",
            "map",
            False,
            "last",
            False,
        )
        assert model.logit_scale.item() == pytest.approx(2.3)
        assert model.logit_bias.item() == pytest.approx(-7.0)

    export_hf(model, run, tmp_path / "out")
    cls = CLIPModel if family == "clip" else SiglipModel
    again = cls.from_pretrained(tmp_path / "out").eval()
    img2, txt2 = hf_embed(again, images, ids)
    torch.testing.assert_close(img2, ref_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(txt2, ref_txt, atol=1e-5, rtol=0)
    assert again.logit_scale.reshape(()).item() == pytest.approx(hf.logit_scale.reshape(()).item())

    with torch.no_grad():  # a changed weight must show up: the comparison is not vacuous
        for w in (model.visual.blocks[1].mlp.fc2.weight, model.text.blocks[0].attn.qkv.weight):
            w.add_(0.05 * torch.randn_like(w))  # random: a constant shift is undone by LayerNorm
    assert (model.encode_image(images) - ref_img).abs().max() > 1e-3
    assert (model.encode_text(ids) - ref_txt).abs().max() > 1e-3


def test_legacy_clip_eos_2_pools_at_highest_id(tmp_path):
    hf, src = make_hf("clip", tmp_path, eos_token_id=2)
    model, run = quiet_import(src)
    assert run.model.text.eot_id == -1
    images, ids = inputs()
    ids[:, 12] = 98  # not the first "eos": HF takes the argmax of the ids
    torch.testing.assert_close(
        model.encode_text(ids), hf_embed(hf, images, ids)[1], atol=1e-5, rtol=0
    )
    export_hf(model, run, tmp_path / "out")
    again = CLIPModel.from_pretrained(tmp_path / "out").eval()
    assert again.config.text_config.eos_token_id == 2
    torch.testing.assert_close(hf_embed(again, images, ids)[1], hf_embed(hf, images, ids)[1])


def own_model(family: str) -> CLIP:
    """A polysense model trained from scratch (random here), with its BPE tokenizer."""
    torch.manual_seed(0)
    tok = Tokenizer.train(CAPTIONS * 10, vocab_size=300, context_length=12)
    vision = VisionConfig(image_size=16, patch_size=4, width=32, layers=2, heads=4)
    text = TextConfig(vocab_size=300, context_length=12, width=32, layers=2, heads=4)
    cfg = ModelConfig(embed_dim=24, vision=vision, text=text)
    if family == "siglip":  # the HF-exportable SigLIP architecture (see presets.siglip_tiny)
        cfg = dataclasses.replace(
            cfg,
            family="siglip",
            embed_dim=32,
            vision=dataclasses.replace(vision, pool="map", ln_pre=False, patch_bias=True),
            text=dataclasses.replace(text, causal=False, pool="last", mask_padding=False),
            vision_proj="none",
            text_proj="linear_bias",
            init_logit_bias=-10.0,
        )
    return CLIP(cfg=cfg, tokenizer=tok).eval()


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_export_own_model_with_tokenizer_and_processor(family, tmp_path):
    from transformers import AutoTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = own_model(family)
    assert model.cfg.text.eot_id == 2  # our BPE's [EOS]: HF CLIP reads 2 as "highest id"
    out = export_hf(model, RunConfig(name="own", model=model.cfg), tmp_path / "out")
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
    } <= names
    assert not [n for n in names if n.startswith(".")]  # no temp files left behind

    rng = np.random.default_rng(0)
    pil = [Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)) for _ in range(2)]
    hf_pixels = CLIPImageProcessorPil.from_pretrained(out)(images=pil, return_tensors="pt")
    torch.testing.assert_close(
        hf_pixels["pixel_values"], images_to_tensor(pil, size=16), atol=1e-6, rtol=0
    )

    exported_tok = Tokenizer.from_file(out / "tokenizer.json", context_length=12)
    hf_tok = AutoTokenizer.from_pretrained(out)
    first = exported_tok(CAPTIONS[:1])[0]
    assert hf_tok(CAPTIONS[0])["input_ids"] == first[first != exported_tok.pad_id].tolist()

    cls = CLIPModel if family == "clip" else SiglipModel
    hf = cls.from_pretrained(out).eval()
    if family == "clip":  # eot moved off id 2 (and bos onto it) in weights and tokenizer alike
        assert hf.config.text_config.eos_token_id == exported_tok.eot_id == model.tokenizer.bos_id
    images = images_to_tensor(pil, size=16)
    ref_img, ref_txt = hf_embed(hf, images, exported_tok(CAPTIONS))
    torch.testing.assert_close(model.encode_image(pil), ref_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.encode_text(CAPTIONS), ref_txt, atol=1e-5, rtol=0)

    back, _ = import_hf(out)  # the exported tokenizer is readable: strings work after import
    torch.testing.assert_close(back.encode_text(CAPTIONS), ref_txt, atol=1e-5, rtol=0)
    torch.testing.assert_close(back.encode_image(pil), ref_img, atol=1e-5, rtol=0)


def test_checkpoint_functions_and_load_of_hf_dir(tmp_path):
    hf, src = make_hf("clip", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import_to_checkpoint(src, tmp_path / "ckpt")
        direct = polysense.load(str(src))  # an HF directory is imported on the fly
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["model"]["family"] == "clip"
    images, ids = inputs()
    ref_img, ref_txt = hf_embed(hf, images, ids)
    model = load_model(tmp_path / "ckpt")
    torch.testing.assert_close(model.encode_text(ids), ref_txt, atol=1e-5, rtol=0)
    torch.testing.assert_close(direct.encode_image(images), ref_img, atol=1e-5, rtol=0)
    with pytest.raises(PolysenseError, match="no tokenizer"):
        model.encode_text(["a red circle"])
    export_checkpoint(tmp_path / "ckpt", tmp_path / "back")
    again = CLIPModel.from_pretrained(tmp_path / "back").eval()
    torch.testing.assert_close(hf_embed(again, images, ids)[0], ref_img, atol=1e-5, rtol=0)


def test_clear_errors(tmp_path):
    with pytest.raises(PolysenseError, match=r"config\.json does not exist"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(PolysenseError, match="model_type='bert'"):
        import_hf(tmp_path)
    model = own_model("clip")
    mean_pooled = CLIP(
        cfg=dataclasses.replace(model.cfg, text=dataclasses.replace(model.cfg.text, pool="mean")),
        tokenizer=model.tokenizer,
    )
    with pytest.raises(PolysenseError, match=r"model\.text\.pool='mean' \(HF needs 'eot'\)"):
        export_hf(mean_pooled, RunConfig(), tmp_path / "out")
    siglip = own_model("siglip")
    with_proj = CLIP(
        cfg=dataclasses.replace(siglip.cfg, vision_proj="linear"), tokenizer=siglip.tokenizer
    )
    with pytest.raises(PolysenseError, match="vision_proj='linear'"):
        export_hf(with_proj, RunConfig(), tmp_path / "out")
