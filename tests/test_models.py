"""Encoders, the dual-tower model, checkpoints and image transforms."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import polysense
from polysense.config import ModelConfig, RunConfig, TextConfig, VisionConfig
from polysense.data.tokenizer import Tokenizer
from polysense.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    images_to_tensor,
    random_resized_crop,
)
from polysense.errors import PolysenseError
from polysense.models.checkpoint import load_model, save_checkpoint
from polysense.models.clip import CLIP, build_model
from polysense.models.text import TextTransformer
from polysense.models.vit import Attention, MAPHead, VisionTransformer

VISION = VisionConfig(image_size=16, patch_size=4, width=32, layers=2, heads=4)
TEXT = TextConfig(vocab_size=300, context_length=12, width=32, layers=2, heads=4)
CAPTIONS = ["a red circle", "a small blue square left of a green star", "two yellow triangles"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CAPTIONS * 10, vocab_size=300, context_length=12)


def tiny_model(tok: Tokenizer, **changes) -> CLIP:
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelConfig(embed_dim=24, vision=VISION, text=TEXT), **changes)
    return CLIP(cfg=cfg, tokenizer=tok).eval()


# --- vision ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pool", "n_tokens"), [("cls", 17), ("map", 16), ("mean", 16), ("cls_mean", 17)]
)
def test_vit_pooling_shapes(pool, n_tokens):
    torch.manual_seed(0)
    vit = VisionTransformer(cfg=dataclasses.replace(VISION, pool=pool)).eval()
    x = torch.randn(3, 3, 16, 16)
    tokens = vit.forward_features(x)
    assert tokens.shape == (3, n_tokens, 32)
    pooled = vit(x)
    assert pooled.shape == (3, 32)
    if pool == "cls":  # the last block computes the cls token alone: equal up to rounding
        torch.testing.assert_close(pooled, tokens[:, 0], atol=1e-6, rtol=1e-5)
    if pool in ("mean", "cls_mean"):
        torch.testing.assert_close(pooled, tokens.mean(1))


def test_cls_mean_vit_has_the_cls_vits_weights_and_tokens():
    """pool="cls_mean" changes only the pooling: a cls ViT's state dict loads into it strictly
    and both give the same tokens, so checkpoints move between the two (fusion, the VLM)."""
    torch.manual_seed(0)
    cls_vit = VisionTransformer(cfg=dataclasses.replace(VISION, pool="cls")).eval()
    mean_vit = VisionTransformer(cfg=dataclasses.replace(VISION, pool="cls_mean")).eval()
    mean_vit.load_state_dict(cls_vit.state_dict())  # strict: the same names and shapes
    x = torch.randn(2, 3, 16, 16)
    tokens = cls_vit.forward_features(x)
    torch.testing.assert_close(mean_vit.forward_features(x), tokens)
    torch.testing.assert_close(mean_vit(x), tokens.mean(1))
    assert not torch.allclose(mean_vit(x), cls_vit(x))


def test_vit_rejects_wrong_image_size():
    vit = VisionTransformer(cfg=VISION)
    with pytest.raises(PolysenseError, match="size=16"):
        vit(torch.randn(1, 3, 32, 32))


def naive_attention(attn: Attention, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) V per head, written out with plain matmuls."""
    B, T, C = x.shape
    H = attn.heads
    d = C // H
    q, k, v = attn.qkv(x).split(C, dim=-1)
    q, k, v = (t.reshape(B, T, H, d).transpose(1, 2) for t in (q, k, v))  # (B, H, T, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, H, T, T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    out = scores.softmax(-1) @ v  # (B, H, T, d)
    return attn.proj(out.transpose(1, 2).reshape(B, T, C))


def test_sdpa_attention_equals_naive_reference():
    torch.manual_seed(0)
    attn = Attention(width=32, heads=4).eval()
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(attn(x), naive_attention(attn, x, None), atol=1e-5, rtol=1e-5)
    mask = torch.ones(7, 7, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    mask[1, :, :, 5:] = False  # padding keys in row 1
    mask |= torch.eye(7, dtype=torch.bool)
    torch.testing.assert_close(attn(x, mask), naive_attention(attn, x, mask), atol=1e-5, rtol=1e-5)


def test_map_head_equals_torch_multihead_attention_pooling():
    torch.manual_seed(0)
    head = MAPHead(width=32, heads=4, mlp_ratio=2.0, act="gelu", ln_eps=1e-6).eval()
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([head.q.weight, head.kv.weight]))
        ref.in_proj_bias.copy_(torch.cat([head.q.bias, head.kv.bias]))
        ref.out_proj.weight.copy_(head.proj.weight)
        ref.out_proj.bias.copy_(head.proj.bias)
    x = torch.randn(3, 9, 32)
    h = ref(head.probe.expand(3, -1, -1), x, x)[0]  # (B, 1, W)
    expected = (h + head.mlp(head.norm(h)))[:, 0]
    torch.testing.assert_close(head(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_grad_checkpointing_gives_same_gradients(tower):
    torch.manual_seed(0)
    if tower == "vision":
        model, x = VisionTransformer(cfg=VISION), torch.randn(2, 3, 16, 16)
    else:
        model, x = TextTransformer(cfg=TEXT), torch.randint(3, 300, (2, 12))
    model.train()
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


# --- text ------------------------------------------------------------------------------------


def test_causal_text_ignores_later_tokens():
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (2, 12))
    changed = ids.clone()
    changed[:, 6] = (ids[:, 6] + 1) % 300
    for causal in (True, False):
        model = TextTransformer(cfg=dataclasses.replace(TEXT, causal=causal)).eval()
        a, b = model.forward_features(ids), model.forward_features(changed)
        later_differs = (a[:, 6:] - b[:, 6:]).abs().max() > 1e-4
        earlier_same = torch.allclose(a[:, :6], b[:, :6], atol=1e-6)
        assert later_differs
        assert earlier_same == causal  # bidirectional: earlier positions see the change


@pytest.mark.parametrize(
    ("causal", "pool"), [(True, "eot"), (False, "eot"), (False, "mean"), (True, "mean")]
)
def test_pooling_is_invariant_to_extra_padding(causal, pool):
    torch.manual_seed(0)
    model = TextTransformer(cfg=dataclasses.replace(TEXT, causal=causal, pool=pool)).eval()
    short = torch.tensor([[1, 50, 60, 70, 2, 0, 0], [1, 80, 2, 0, 0, 0, 0]])  # bos ... eot pad
    long = torch.cat([short, torch.zeros(2, 5, dtype=torch.long)], dim=1)  # 12 = context_length
    torch.testing.assert_close(model(short), model(long), atol=1e-5, rtol=1e-5)
    other = short.clone()
    other[0, 2] = 61  # a real token, not padding: the output must move
    assert (model(other)[0] - model(short)[0]).abs().max() > 1e-4


def test_eot_pooling_takes_the_eot_position():
    torch.manual_seed(0)
    ids = torch.tensor([[1, 50, 60, 2, 0, 0], [1, 2, 0, 0, 0, 0], [1, 9, 9, 9, 9, 2]])
    model = TextTransformer(cfg=TEXT).eval()
    tokens = model.forward_features(ids)
    expected = torch.stack([tokens[i, row.tolist().index(2)] for i, row in enumerate(ids)])
    torch.testing.assert_close(model(ids), expected)
    argmax_model = TextTransformer(cfg=dataclasses.replace(TEXT, eot_id=-1)).eval()
    argmax_model.load_state_dict(model.state_dict())
    ids2 = torch.tensor([[1, 5, 299, 7, 0, 0]])  # highest id at position 2
    torch.testing.assert_close(argmax_model(ids2), argmax_model.forward_features(ids2)[:, 2])


def test_text_rejects_ids_outside_vocab():
    model = TextTransformer(cfg=TEXT)
    with pytest.raises(PolysenseError, match="vocab_size=300"):
        model(torch.tensor([[1, 300, 2]]))


def test_minilm_tower_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    from polysense.data.tokenizer import minilm_dir
    from polysense.models.text import MiniLMText
    from polysense.presets import get_preset

    cfg = get_preset("lit-minilm").model.text
    tower = MiniLMText(cfg=cfg).eval()
    tok = Tokenizer.minilm(context_length=cfg.context_length)
    texts = ["A red circle left of a blue square.", "two small yellow stars", "hello"]
    with torch.no_grad():
        ours = tower(tok(texts))  # (B, 384), masked mean, not normalised
    ref_model = st.SentenceTransformer(str(minilm_dir()), device="cpu")
    ref = ref_model.encode(texts, convert_to_tensor=True)  # sentence-transformers normalises
    assert ours.shape == (3, 384)
    torch.testing.assert_close(F.normalize(ours, dim=-1), ref.cpu(), atol=1e-5, rtol=0)
    assert (ours.norm(dim=-1) - 1).abs().min() > 1e-2  # really the un-normalised mean


# --- CLIP ------------------------------------------------------------------------------------


def test_clip_embeddings_are_unit_vectors_and_inputs_agree(tok):
    model = tiny_model(tok)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(3)]
    img = model.encode_image(images)
    assert img.shape == (3, 24)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    as_tensor = images_to_tensor(images, size=16, mean=CLIP_MEAN, std=CLIP_STD)
    torch.testing.assert_close(model.encode_image(as_tensor), img)
    txt = model.encode_text(CAPTIONS)
    assert txt.shape == (3, 24)
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(model.encode_text(tok(CAPTIONS)), txt)
    out = model(as_tensor, tok(CAPTIONS))
    assert out["logit_bias"] is None
    torch.testing.assert_close(out["image_embeds"], img)


def test_clip_copies_tokenizer_ids_and_checks_vocab(tok):
    model = tiny_model(tok, text=dataclasses.replace(TEXT, pad_id=7, eot_id=8))
    assert (model.cfg.text.pad_id, model.cfg.text.eot_id) == (tok.pad_id, tok.eot_id)
    small = dataclasses.replace(TEXT, vocab_size=tok.vocab_size - 1)
    with pytest.raises(PolysenseError, match="vocab_size"):
        CLIP(cfg=ModelConfig(embed_dim=24, vision=VISION, text=small), tokenizer=tok)


def test_logit_scale_init_and_clamp(tok):
    model = tiny_model(tok)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model(torch.randn(1, 3, 16, 16), tok(["a"]))["logit_scale"].item() == pytest.approx(
        1 / 0.07, rel=1e-5
    )
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.clamped_logit_scale().item() == pytest.approx(math.log(100))
    siglip = tiny_model(tok, family="siglip", init_logit_scale=math.log(10), init_logit_bias=-10.0)
    out = siglip(torch.randn(1, 3, 16, 16), tok(["a"]))
    assert out["logit_scale"].item() == pytest.approx(10.0) and out["logit_bias"].item() == -10.0


def test_projection_none_needs_matching_width(tok):
    with pytest.raises(PolysenseError, match="embed_dim"):
        tiny_model(tok, vision_proj="none")  # width 32 != embed_dim 24


def again_ids(ckpt, tok) -> bool:
    """The saved tokenizer gives the same ids and special ids as the one saved."""
    loaded = Tokenizer.from_file(ckpt, context_length=tok.context_length)
    same = (loaded.pad_id, loaded.bos_id, loaded.eot_id) == (tok.pad_id, tok.bos_id, tok.eot_id)
    texts = [*CAPTIONS, "", "A LONG " * 40]
    return same and torch.equal(loaded.encode(texts)[0], tok.encode(texts)[0])


def test_checkpoint_round_trip(tok, tmp_path):
    model = tiny_model(tok, family="siglip", init_logit_bias=-10.0, text_proj="linear_bias")
    with torch.no_grad():
        model.logit_bias.fill_(-3.5)
    run = RunConfig(name="tiny", model=model.cfg)
    save_checkpoint(model, run, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["name"] == "tiny"
    assert again_ids(tmp_path / "ckpt", model.tokenizer)
    again = polysense.load(str(tmp_path / "ckpt"))
    assert again.cfg == model.cfg and again.logit_bias.item() == -3.5
    images = torch.randn(2, 3, 16, 16)
    assert torch.equal(again.encode_image(images), model.encode_image(images))
    assert torch.equal(again.encode_text(CAPTIONS), model.encode_text(CAPTIONS))


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(PolysenseError, match=r"config\.json does not exist"):
        load_model(tmp_path)
    with pytest.raises(PolysenseError, match="clip-tiny"):
        polysense.load(str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text(json.dumps({"name": "x", "modle": {}}))
    with pytest.raises(PolysenseError, match=str(tmp_path)):
        load_model(tmp_path)


@pytest.mark.parametrize("name", ["clip-tiny", "siglip-tiny"])
def test_presets_load_with_random_init_deterministically(name):
    a, b = polysense.load(name), polysense.load(name)
    size = a.cfg.vision.image_size
    assert a.tokenizer is not None and a.tokenizer.vocab_size <= a.cfg.text.vocab_size
    x = torch.randn(2, 3, size, size)
    emb = a.encode_image(x)
    assert emb.shape == (2, a.cfg.embed_dim)
    assert torch.equal(emb, b.encode_image(x))
    assert a.encode_text(["a red circle left of a blue square"]).shape == (1, a.cfg.embed_dim)


def test_build_model_trains_tokenizer_on_given_texts():
    run = dataclasses.replace(
        RunConfig(), model=ModelConfig(embed_dim=24, vision=VISION, text=TEXT)
    )
    model = build_model(run, texts=["zebra quokka"] * 50)
    assert "quokka" in model.tokenizer.decode(model.tokenizer(["quokka"])[0])
    assert model.tokenizer.vocab_size <= TEXT.vocab_size


# --- transforms ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(50, 70), (70, 50), (16, 16), (40, 40), (20, 90)])
def test_images_to_tensor_matches_hf_clip_processor(shape):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8))
    ref = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    expected = ref(images=[image], return_tensors="pt")["pixel_values"]
    ours = images_to_tensor([image], size=16)
    assert ours.dtype == torch.float32 and ours.shape == (1, 3, 16, 16)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def test_images_to_tensor_hand_computed_and_errors():
    grey = Image.new("L", (8, 8), color=255)  # converted to RGB white
    out = images_to_tensor([grey], size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    torch.testing.assert_close(out, torch.full((1, 3, 8, 8), 2.0))
    with pytest.raises(PolysenseError, match="image 1"):
        images_to_tensor([grey, np.zeros((8, 8, 3))], size=8)


def test_random_resized_crop():
    rng = np.random.default_rng(0)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    crops = [random_resized_crop(image, size=16, rng=rng) for _ in range(4)]
    assert all(c.size == (16, 16) for c in crops)
    assert len({c.tobytes() for c in crops}) > 1
    square = image.crop((0, 0, 30, 30))
    full = random_resized_crop(square, size=16, rng=rng, scale=(1.0, 1.0))
    assert full.tobytes() == square.resize((16, 16), Image.Resampling.BICUBIC).tobytes()


def test_conv_stem_gives_the_patch_grid_and_refuses_hf_export(tmp_path):
    from polysense.models.vit import ConvStem

    stem = ConvStem(in_channels=3, width=48, patch_size=8)
    assert stem(torch.zeros(2, 3, 32, 32)).shape == (2, 48, 4, 4)  # 32 / 8 = 4 tokens a side
    vit = VisionTransformer(
        cfg=VisionConfig(image_size=32, patch_size=8, stem="conv", width=48, layers=1, heads=3)
    )
    assert vit.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 1 + 16, 48)
    with pytest.raises(PolysenseError, match="power-of-two"):
        ConvStem(in_channels=3, width=48, patch_size=6)

    from polysense.models.hf import export_hf
    from polysense.presets import get_preset

    with pytest.raises(PolysenseError, match="stem='conv'"):
        export_hf(polysense.load("clip-tiny"), get_preset("clip-tiny"), tmp_path / "hf")
