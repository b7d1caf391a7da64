"""Fusion: world task datasets, the three fusion styles, missing modalities, training, bench."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from polysense.data.tasks import (
    ANSWERS,
    SOUND_SAMPLES,
    caption_true,
    load_tasks,
    majority_baseline,
)
from polysense.data.world import SAMPLE_RATE, SHAPE_FREQS, generate_world, relations_between
from polysense.errors import PolysenseError
from polysense.models.checkpoint import load_fusion
from polysense.models.fusion import (
    STYLES,
    CrossAttnFusion,
    FusionConfig,
    FusionRunConfig,
    FusionTrainConfig,
    LateFusion,
)
from polysense.models.warmstart import build_fusion
from polysense.train.fusion import (
    TaskData,
    build_optimizer,
    evaluate,
    itm_metrics,
    modality_dropout,
    train_fusion,
)

TINY = {"width": 32, "layers": 2, "heads": 2, "context_length": 24}
CLI = [sys.executable, "-m", "polysense.cli"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and lose a lot on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world-audio")
    generate_world(
        root, n=100, seed=3, modalities=("image", "text", "audio"), workers=1, progress=False
    )
    return root


@pytest.fixture(scope="module")
def train_tasks(world):
    return load_tasks(world, split="train")


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """More than float noise apart (outputs of a fresh model are small: heads start at 0.02)."""
    return bool((a - b).abs().max() > 1e-4 * a.abs().max())


def _inputs(cfg: FusionConfig, b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.randint(3, cfg.vocab_size, (b, cfg.context_length), generator=g)
    ids[:, 0], ids[:, 10], ids[:, 11:] = 1, 2, 0  # bos, words, eot, padding
    audio = torch.randn(b, cfg.audio_samples, generator=g) * 0.3
    return images, ids, audio


# ---------------------------------------------------------------------------------------------
# tasks


def test_every_world_answer_is_in_the_vocabulary(train_tasks):
    assert train_tasks.rejects.get("answer_not_in_vocabulary", 0) == 0
    sizes = train_tasks.sizes()
    assert sizes["vqa"] > 5 * sizes["scenes"] and sizes["sound"] > 0
    assert {ANSWERS[i] for i in train_tasks.vqa_answer.tolist()} >= {"yes", "no"}


def test_itm_labels_and_swaps_agree_with_the_scene_boxes(world):
    from polysense.data.readers import read_samples

    samples = list(read_samples(world, split="train"))
    tasks = load_tasks(world, split="train")
    objects = [s["objects"] for s in samples]
    for k, text in enumerate(tasks.itm_text):
        objs = objects[int(tasks.itm_scene[k])]
        pairs = {(o["color"], o["shape"]): o for o in objs}
        words = text.split()
        # independent check: named pairs present, and the relation from world.relations_between
        rel = next((r for r in ("left of", "right of", "above", "below") if f" {r} " in text), None)
        if rel:
            a, b = (tuple(p.split()[-2:]) for p in text.split(f" {rel} "))
            truth = a in pairs and b in pairs and rel in relations_between(pairs[a], pairs[b])
        else:
            truth = all(tuple(p.split()[-2:]) in pairs for p in text.split(" and "))
        assert truth == bool(tasks.itm_label[k]), text
        assert caption_true(text, objs) == truth
        assert words[0] in ("a", "an")
    # a swapped negative holds exactly the words of its positive: bag of words cannot separate
    by_pair: dict[int, list[str]] = {}
    for k, p in enumerate(tasks.itm_pair.tolist()):
        if p >= 0:
            by_pair.setdefault(p, []).append(tasks.itm_text[k])
    assert by_pair
    for texts in by_pair.values():
        pos, neg = texts
        assert pos != neg
        strip = lambda t: sorted(w for w in t.split() if w not in ("a", "an"))  # noqa: E731
        assert strip(pos) == strip(neg)
    groups = Counter(zip(tasks.itm_group, tasks.itm_label.tolist(), strict=True))
    for g in ("attr", "rel"):
        assert groups[(g, 1)] == groups[(g, 0)] > 0


def test_sound_clip_pitch_is_the_answer_objects_shape(world):
    from polysense.data.readers import read_samples

    samples = list(read_samples(world, split="train"))
    tasks = load_tasks(world, split="train")
    freqs = np.fft.rfftfreq(SOUND_SAMPLES, 1 / SAMPLE_RATE)
    for k in range(len(tasks.sound_answer)):
        clip = tasks.sound_audio[k].numpy()
        peak = freqs[np.abs(np.fft.rfft(clip)).argmax()]
        objs = samples[int(tasks.sound_scene[k])]["objects"]
        assert len(objs) >= 2
        at = [o for o in objs if o["position"] == ANSWERS[int(tasks.sound_answer[k])]]
        assert len(at) == 1
        assert abs(peak - SHAPE_FREQS[at[0]["shape"]]) < 30  # FFT bins are 3 Hz apart


def test_majority_baseline_by_hand(train_tasks):
    base = majority_baseline(train_tasks, train_tasks)
    counts = Counter(train_tasks.vqa_answer.tolist())
    answer, n = counts.most_common(1)[0]
    assert base["vqa_answer"] == ANSWERS[answer]
    assert base["vqa"] == pytest.approx(n / len(train_tasks.vqa_answer))
    assert base["vqa_per_type_majority"] >= base["vqa"]
    assert base["itm"] == pytest.approx(
        max(train_tasks.itm_label.float().mean().item(), 0.5), abs=0.05
    )


def test_missing_world_is_a_clear_error(tmp_path):
    from polysense.errors import DataError

    with pytest.raises(DataError, match="does not exist"):
        load_tasks(tmp_path / "nope", split="train")
    generate_world(
        tmp_path / "quiet", n=30, modalities=("image", "text"), workers=1, progress=False
    )
    with pytest.raises(DataError, match="--modalities image,text,audio"):
        load_tasks(tmp_path / "quiet", split="train")


# ---------------------------------------------------------------------------------------------
# missing modalities


@pytest.mark.parametrize("p", [0.0, 0.3, 0.7, 1.0])
def test_modality_dropout_properties(p):
    g = torch.Generator().manual_seed(1)
    present = torch.rand(4000, 3, generator=g) < 0.8
    present[:2000] = True
    kept = modality_dropout(present, p, torch.Generator().manual_seed(2))
    assert not (kept & ~present).any()  # never invents a modality
    had = present.any(dim=1)
    assert (kept.any(dim=1) == had).all()  # a sample with inputs keeps at least one
    if p == 0.0:
        assert torch.equal(kept, present)
    if p == 1.0:
        assert (kept.sum(dim=1)[had] == 1).all()
    if 0 < p < 1:
        # full rows: each modality survives with P(not dropped) + P(all dropped) / 3
        expect = (1 - p) + p**3 / 3
        assert kept[:2000].float().mean().item() == pytest.approx(expect, abs=0.03)
    with pytest.raises(PolysenseError):
        modality_dropout(present, 1.5)


@pytest.mark.parametrize("style", STYLES)
def test_missing_modality_ignores_its_input_and_uses_the_token(style):
    torch.manual_seed(0)
    cfg = FusionConfig(style=style, **TINY)
    model = build_fusion(cfg).eval()
    if isinstance(model, CrossAttnFusion):  # open the gates so media can matter at all
        for layer in model.xattn.values():
            layer.gate_attn.data.fill_(1.0)
            layer.gate_ff.data.fill_(1.0)
    images, ids, audio = _inputs(cfg, 4)
    other_images, other_ids, other_audio = _inputs(cfg, 4, seed=9)
    present = torch.ones(4, 3, dtype=torch.bool)
    with torch.no_grad():
        full = model(images, ids, audio, present)["answer"]
        for m, swapped in enumerate(
            (
                (other_images, ids, audio),
                (images, other_ids, audio),
                (images, ids, other_audio),
            )
        ):
            gone = present.clone()
            gone[:2, m] = False  # two samples lack modality m, two have it
            a = model(images, ids, audio, gone)["answer"]
            b = model(*swapped, gone)["answer"]
            torch.testing.assert_close(a[:2], b[:2])  # absent: its input is ignored
            assert differs(model(*swapped, present)["answer"], full)  # present: used
            # the missing token is what the model sees: changing it changes the output
            # (a random shift: a constant one would vanish in the next LayerNorm)
            shift = torch.randn(cfg.width, generator=torch.Generator().manual_seed(m))
            model.missing.data[m] += shift
            assert differs(model(images, ids, audio, gone)["answer"][:2], a[:2])
            model.missing.data[m] -= shift


@pytest.mark.parametrize("style", STYLES)
def test_absent_for_all_skips_the_encoder_with_the_same_result(style):
    torch.manual_seed(0)
    cfg = FusionConfig(style=style, **TINY)
    model = build_fusion(cfg).eval()
    if isinstance(model, CrossAttnFusion):
        for layer in model.xattn.values():
            layer.gate_attn.data.fill_(0.7)
    images, ids, audio = _inputs(cfg, 5)
    present = torch.ones(5, 3, dtype=torch.bool)
    present[:4, 2] = False
    with torch.no_grad():
        mixed = model(images, ids, audio, present)["answer"][:4]  # masked full sequence
        alone = model(images[:4], ids[:4], audio[:4], present[:4])["answer"]  # encoder skipped
    torch.testing.assert_close(mixed, alone, atol=1e-5, rtol=1e-4)


def test_xattn_at_init_is_exactly_its_text_only_path():
    torch.manual_seed(0)
    cfg = FusionConfig(style="xattn", **TINY)
    model = build_fusion(cfg).eval()
    images, ids, audio = _inputs(cfg, 3)
    present = torch.ones(3, 3, dtype=torch.bool)
    with torch.no_grad():
        fused = model(images, ids, audio, present)["fused"]
        text_only = model.text_path(ids, present[:, 1], None)
        other = model(torch.randn_like(images), ids, torch.randn_like(audio), present)["fused"]
    assert torch.equal(fused, text_only)
    assert torch.equal(fused, other)
    for layer in model.xattn.values():  # a non-zero gate lets the image in
        layer.gate_attn.data.fill_(0.5)
    with torch.no_grad():
        assert differs(model(images, ids, audio, present)["fused"], text_only)


def test_cross_attention_equals_masked_self_attention_on_text_and_media():
    """The reference: the ViT's self-attention on [ln_q(x); ln_kv(media)], text keys masked
    out, text rows kept."""
    from polysense.models.fusion import GatedCrossAttention

    torch.manual_seed(0)
    layer = GatedCrossAttention(width=32, heads=4, mlp_ratio=2.0)
    layer.gate_attn.data.fill_(0.7)
    layer.gate_ff.data.fill_(0.3)
    x = torch.randn(3, 5, 32, requires_grad=True)  # (B, L, W)
    media = torch.randn(3, 7, 32, requires_grad=True)  # (B, M, W)
    keep = torch.rand(3, 7) > 0.4
    keep[:, 0] = True

    def reference(x, media):
        seq = torch.cat([layer.ln_q(x), layer.ln_kv(media)], dim=1)  # (B, L + M, W)
        keys = torch.cat([torch.zeros(3, 5, dtype=torch.bool), keep], dim=1)
        out = layer.attn(seq, keys[:, None, None, :])[:, :5]
        y = x + torch.tanh(layer.gate_attn) * out
        return y + torch.tanh(layer.gate_ff) * layer.mlp(layer.ln_ff(y))

    got, want = layer(x, media, keep), reference(x, media)
    torch.testing.assert_close(got, want)
    params = [x, media, layer.attn.qkv.weight, layer.attn.proj.weight, layer.gate_attn]
    g_got = torch.autograd.grad(got.square().sum(), params)
    g_want = torch.autograd.grad(want.square().sum(), params)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gradients_reach_the_gates_at_init():
    torch.manual_seed(0)
    cfg = FusionConfig(style="xattn", **TINY)
    model = build_fusion(cfg)
    images, ids, audio = _inputs(cfg, 3)
    out = model(images, ids, audio, torch.ones(3, 3, dtype=torch.bool))
    out["answer"].square().sum().backward()
    assert all(layer.gate_attn.grad.abs() > 0 for layer in model.xattn.values())


def test_bad_inputs_and_config_are_clear_errors():
    cfg = FusionConfig(style="early", **TINY)
    model = build_fusion(cfg)
    images, ids, audio = _inputs(cfg, 2)
    with pytest.raises(PolysenseError, match="audio"):
        model(images, ids, audio[:, :100], torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(PolysenseError, match="early fusion has none"):
        build_fusion(dataclasses.replace(cfg, freeze_image=True))
    frozen = build_fusion(FusionConfig(style="late", freeze_image=True, **TINY))
    assert not any(p.requires_grad for p in frozen.image.parameters())
    assert all(p.requires_grad for p in frozen.text.parameters())
    # xattn's learned image-token positions train with the image encoder frozen, and matter
    torch.manual_seed(0)
    xattn = build_fusion(FusionConfig(style="xattn", freeze_image=True, **TINY))
    for layer in xattn.xattn.values():
        layer.gate_attn.data.fill_(1.0)
    x_inputs = (*_inputs(xattn.cfg, 2), torch.ones(2, 3, dtype=torch.bool))
    out = xattn(*x_inputs)["answer"]
    out.square().sum().backward()
    assert xattn.pos_media.grad.abs().sum() > 0 and xattn.image.pos_embed.grad is None
    with torch.no_grad():
        xattn.pos_media.add_(torch.randn_like(xattn.pos_media))
        assert differs(xattn(*x_inputs)["answer"], out)
    with pytest.raises(PolysenseError, match="does not exist"):
        build_fusion(dataclasses.replace(cfg, image_init="/nonexistent"))


@pytest.mark.parametrize("style", STYLES)
def test_image_init_copies_the_clip_vision_tower(style, tmp_path):
    from helpers import tiny_config
    from polysense.models.checkpoint import save_checkpoint
    from polysense.models.clip import build_model

    run = tiny_config("clip-tiny", "model.vision.width=32", "model.vision.layers=2")
    run = dataclasses.replace(
        run,
        model=dataclasses.replace(
            run.model, vision=dataclasses.replace(run.model.vision, stem="conv")
        ),
    )
    torch.manual_seed(1)
    clip = build_model(run)
    save_checkpoint(clip, run, tmp_path / "clip")
    cfg = FusionConfig(style=style, image_init=str(tmp_path / "clip"), **TINY)
    model = build_fusion(cfg).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        if style == "early":  # the stem is the CLIP's, token for token
            got = model.image_stem(images)
            want = clip.visual.patch_embed(images)
            assert torch.equal(
                model.blocks[0].attn.qkv.weight, clip.visual.blocks[0].attn.qkv.weight
            )
        else:  # the tokens: clip-tiny pools them by mean, the fusion tower by its cls token
            got, want = model.image.forward_features(images), clip.visual.forward_features(images)
    torch.testing.assert_close(got, want)
    with pytest.raises(PolysenseError, match="does not fit"):
        build_fusion(dataclasses.replace(cfg, width=64, heads=2))


@pytest.mark.parametrize("style", ["late", "xattn"])
def test_text_init_copies_the_clip_text_tower_and_tokenizer(style, tmp_path, train_tasks):
    from helpers import tiny_config
    from polysense.models.checkpoint import save_checkpoint
    from polysense.models.clip import build_model
    from polysense.models.warmstart import with_text_init

    run = tiny_config("clip-tiny", "model.text.width=32", "model.text.layers=2")
    torch.manual_seed(2)
    clip = build_model(run)
    save_checkpoint(clip, run, tmp_path / "clip")
    cfg = FusionConfig(style=style, text_init=str(tmp_path / "clip"), **TINY)
    full = with_text_init(cfg)  # the checkpoint's vocabulary, context, mask and pooling
    t = run.model.text
    assert (full.vocab_size, full.context_length, full.text_causal) == (
        t.vocab_size,
        t.context_length,
        t.causal,
    )
    model = build_fusion(cfg).eval()
    ids = clip.tokenizer(["a red circle", "a blue square left of a green star"])  # (2, L)
    with torch.no_grad():
        if style == "late":  # the whole text tower: the CLIP's pooled features exactly
            torch.testing.assert_close(model.text(ids), clip.text(ids))
        else:
            assert torch.equal(model.token_embed.weight, clip.text.token_embed.weight)
            assert torch.equal(model.pos_text, clip.text.pos_embed)
            assert torch.equal(model.blocks[1].mlp.fc2.weight, clip.text.blocks[1].mlp.fc2.weight)
    # the trainer takes the checkpoint's tokenizer, and a trained model saves and reloads
    # without the init checkpoint
    res = train_fusion(
        dataclasses.replace(_run_cfg(style, steps=2), model=cfg),
        train_tasks,
        out=tmp_path / "fused",
        progress=False,
    )
    assert res.tokenizer.vocab_size == clip.tokenizer.vocab_size
    assert torch.equal(res.tokenizer(["a red circle"]), clip.tokenizer(["a red circle"]))
    with pytest.raises(PolysenseError, match="early fusion has none"):
        build_fusion(dataclasses.replace(cfg, style="early"))
    with pytest.raises(PolysenseError, match="width"):
        build_fusion(dataclasses.replace(cfg, width=64))
    (tmp_path / "clip" / "model.safetensors").unlink()
    loaded, _, _ = load_fusion(tmp_path / "fused")
    for a, b in zip(loaded.state_dict().values(), res.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_itm_metrics_by_hand(train_tasks):
    n = len(train_tasks.itm_text)
    labels = train_tasks.itm_label
    # a scorer right on every item except the first attr positive, which scores below its twin
    scores = labels.float() * 2 - 1
    first = train_tasks.itm_group.index("attr")
    scores[first] = -2.0
    m = itm_metrics(scores, train_tasks, n)
    assert m["itm_accuracy"] == pytest.approx((n - 1) / n)
    n_attr_pairs = sum(
        1
        for g, lab in zip(train_tasks.itm_group, labels.tolist(), strict=True)
        if g == "attr" and lab == 0
    )
    assert m["itm_attr_pairwise"] == pytest.approx((n_attr_pairs - 1) / n_attr_pairs)
    assert m["itm_rel_pairwise"] == 1.0


# ---------------------------------------------------------------------------------------------
# training


def _run_cfg(style: str, **train) -> FusionRunConfig:
    return FusionRunConfig(
        model=FusionConfig(style=style, **TINY),
        train=FusionTrainConfig(batch_size=24, warmup_steps=2, log_every=1, **train),
    )


@pytest.mark.parametrize("style", STYLES)
def test_training_lowers_the_loss(style, train_tasks):
    losses = []
    cfg = _run_cfg(style, steps=20, lr=3e-3, modality_dropout=0.2)
    res = train_fusion(cfg, train_tasks, progress=False, log=lambda r: losses.append(r["loss"]))
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    data = TaskData(
        tasks=train_tasks,
        tokenizer=res.tokenizer,
        mean=res.cfg.model.image_mean,
        std=res.cfg.model.image_std,
    )
    figures = evaluate(res.model, data, condition="no_image")
    assert 0.0 <= figures["vqa_accuracy"] <= 1.0 and "sound_accuracy" in figures


def test_killed_run_resumes_exactly(tmp_path, train_tasks):
    cfg = _run_cfg("early", steps=6, ckpt_every=3)
    whole = train_fusion(cfg, train_tasks, out=tmp_path / "whole", progress=False)

    def kill(record):
        if record["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_fusion(cfg, train_tasks, out=tmp_path / "cut", progress=False, log=kill)
    assert torch.load(tmp_path / "cut" / "state.pt", weights_only=False)["step"] == 3
    resumed = train_fusion(cfg, train_tasks, out=tmp_path / "cut", resume=True, progress=False)
    for (name, a), b in zip(
        whole.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    model, tok, loaded_cfg = load_fusion(tmp_path / "cut")
    assert loaded_cfg == resumed.cfg and tok.vocab_size == resumed.tokenizer.vocab_size
    for a, b in zip(model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # weights that do not fit the config (e.g. from an older model version): a clear error
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "cut" / "model.safetensors")
    weights.pop("missing")
    save_file(weights, str(tmp_path / "cut" / "model.safetensors"))
    with pytest.raises(PolysenseError, match=r"does not fit.*missing"):
        load_fusion(tmp_path / "cut")


# ---------------------------------------------------------------------------------------------
# fusion on a pretrained CLIP: product combine, image layer, cached image features, gate lr


def test_product_combine_adds_the_pairwise_products():
    torch.manual_seed(0)
    model = build_fusion(FusionConfig(style="late", combine="product", **TINY)).eval()
    assert isinstance(model, LateFusion)
    w = TINY["width"]
    vecs = torch.randn(4, 3, w)  # (B, image / text / audio, W)
    image, text, audio = vecs.unbind(1)
    with torch.no_grad():
        model.combine.bias.zero_()
        for block, want in (
            (0, image),
            (2, audio),
            (3, image * text),
            (4, image * audio),
            (5, text * audio),
        ):  # the weight that reads one block of [image, text, audio, it, ia, ta] unchanged
            model.combine.weight.zero_()
            model.combine.weight[:, block * w : (block + 1) * w] = torch.eye(w)
            torch.testing.assert_close(model.combine_vectors(vecs), want)
    assert model.combine.in_features == 6 * w
    with pytest.raises(PolysenseError, match="product"):
        build_fusion(FusionConfig(style="late", combine="outer", **TINY))  # type: ignore[arg-type]


def test_image_layer_minus_two_is_the_second_to_last_block_output():
    torch.manual_seed(0)
    cfg = FusionConfig(style="xattn", image_layer=-2, **{**TINY, "layers": 3})
    model = build_fusion(cfg).eval()
    vit = model.image
    images = _inputs(cfg, 2)[0]
    with torch.no_grad():  # the ViT written out by hand: stem, cls, positions, blocks 0 and 1
        x = vit.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, W)
        x = torch.cat([vit.cls_token.expand(2, -1, -1), x], dim=1) + vit.pos_embed
        x = vit.ln_pre(x)
        second_to_last = vit.blocks[1](vit.blocks[0](x))
        torch.testing.assert_close(model.image_features(images), second_to_last)
        last = build_fusion(dataclasses.replace(cfg, image_layer=-1))
        last.load_state_dict(model.state_dict())
        torch.testing.assert_close(
            last.image_features(images), vit.ln_post(vit.blocks[2](second_to_last))
        )
    # the last image block takes no part in the fused output at image_layer=-2
    for layer in model.xattn.values():
        layer.gate_attn.data.fill_(1.0)
    ids, audio = _inputs(cfg, 2)[1:]
    present = torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():
        before = model(images, ids, audio, present)["answer"]
        for p in vit.blocks[2].parameters():
            p.add_(torch.randn_like(p))
        torch.testing.assert_close(model(images, ids, audio, present)["answer"], before)
    for bad in ({"image_layer": 0}, {"image_layer": -4}, {"image_layer": -2, "style": "late"}):
        with pytest.raises(PolysenseError, match="image_layer"):
            build_fusion(dataclasses.replace(cfg, **bad))


@pytest.mark.parametrize("style", ["late", "xattn"])
def test_cached_image_features_equal_recomputed(style, train_tasks, monkeypatch):
    cfg = _run_cfg(style, steps=4, lr=3e-3)
    layer = -2 if style == "xattn" else -1
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, freeze_image=True, image_layer=layer)
    )
    cached = train_fusion(cfg, train_tasks, progress=False)
    model = cached.model
    data = TaskData(
        tasks=train_tasks,
        tokenizer=cached.tokenizer,
        mean=model.cfg.image_mean,
        std=model.cfg.image_std,
    )
    batch = data.batch("vqa", torch.arange(7, 40))
    with torch.no_grad():
        cache = data.image_features(model)  # (scenes, ...)
        assert cache.shape[0] == len(train_tasks)
        torch.testing.assert_close(cache[batch.scene], model.image_features(batch.images))
        torch.testing.assert_close(
            model(batch.images, batch.ids, batch.audio, batch.present)["answer"],
            model(
                batch.images,
                batch.ids,
                batch.audio,
                batch.present,
                image_features=cache[batch.scene],
            )["answer"],
        )
    # training without the cache (the image encoder run at every step) ends at the same weights
    monkeypatch.setattr(TaskData, "image_features", lambda self, model: None)
    recomputed = train_fusion(cfg, train_tasks, progress=False)
    for (name, a), b in zip(
        cached.model.state_dict().items(), recomputed.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)
    early = build_fusion(FusionConfig(style="early", **TINY))
    with pytest.raises(PolysenseError, match="early fusion"):
        early(
            *_inputs(early.cfg, 2),
            torch.ones(2, 3, dtype=torch.bool),
            image_features=torch.zeros(2, 1),
        )


def test_gate_lr_scale_moves_the_gates_that_much_faster():
    torch.manual_seed(0)
    cfg = FusionConfig(style="xattn", **TINY)
    model = build_fusion(cfg)
    lr, scale = 1e-3, 10.0
    opt = build_optimizer(model, lr, 0.05, gate_lr_scale=scale)
    assert [g["base_lr"] for g in opt.param_groups] == [lr, lr, lr * scale]
    assert opt.defaults["fused"]  # train.optim.adamw: one kernel per step
    images, ids, audio = _inputs(cfg, 3)
    model(images, ids, audio, torch.ones(3, 3, dtype=torch.bool))[
        "answer"
    ].square().sum().backward()
    gate, bias = model.xattn["0"].gate_attn, model.heads.answer.bias  # neither decays
    before = {
        "gate": (gate.detach().clone(), gate.grad.clone()),
        "bias": (bias.detach().clone(), bias.grad.clone()),
    }
    opt.step()
    # Adam's first step with bias correction: -lr * g / (|g| + eps), whatever the scale of g
    for name, p, step_lr in (("gate", gate, lr * scale), ("bias", bias, lr)):
        value, grad = before[name]
        torch.testing.assert_close(p.detach(), value - step_lr * grad / (grad.abs() + 1e-6))


def test_polysense_train_preset_and_bench_help(tmp_path, world):
    from polysense.presets import get_preset, get_runner

    assert get_preset("fusion-xattn-tiny").model.style == "xattn"
    for name in ("fusion-xattn-clip", "fusion-late-clip"):  # documented runs of <= 20 min
        clip_cfg = get_preset(name)
        assert clip_cfg.model.freeze_image and clip_cfg.model.text_init
        assert 0 < clip_cfg.train.max_minutes <= 20
    ft = get_preset("fusion-late-clip-ft")  # the same recipe with a trainable image tower
    assert not ft.model.freeze_image and ft.model.combine == "product"
    assert ft.model.image_init and 0 < ft.train.max_minutes <= 13
    run = get_runner("fusion-early-tiny")
    cfg = dataclasses.replace(_run_cfg("early", steps=3), name="fusion-early-tiny")
    metrics = run(cfg, data=world, out=tmp_path / "ck", resume=False, eval_splits=("test",))
    assert json.loads((tmp_path / "ck" / "metrics.json").read_text()) == json.loads(
        json.dumps(metrics)
    )
    assert 0 <= metrics["vqa_accuracy"] <= 1 and metrics["steps"] == 3
    result = subprocess.run(
        [*CLI, "bench", "fusion", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "Example" in result.stdout
    bad = subprocess.run(
        [*CLI, "bench", "fusion", "--out", str(tmp_path), "--styles", "mid"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        bad.returncode == 2
        and "early,late,xattn,dual" in bad.stderr
        and "Traceback" not in bad.stderr
    )


@pytest.mark.slow
def test_bench_writes_the_issue_shape(tmp_path, world):
    from polysense.bench.fusion import run_fusion_bench

    res = run_fusion_bench(
        tmp_path / "b", data=world, seconds=1.0, eval_limit=60, image_init="", progress=False
    )
    data = json.loads((tmp_path / "b" / "fusion.json").read_text())
    assert set(data["styles"]) == {"early", "late", "xattn", "dual"}
    for name, row in data["styles"].items():
        for key in ("vqa_accuracy", "itm_accuracy", "params", "train_samples_per_s"):
            assert isinstance(row[key], int | float), (name, key)
        for key in ("latency_ms", "peak_mem_mb", "query_10k_ms"):
            assert row[key] > 0, (name, key)
        assert {"image", "text"} <= set(row["missing"]) and row["train_seconds"] >= 1.0
        if name != "dual":
            assert set(row["missing"]["audio"]) == {"sound"}
            assert 0 <= row["dropout"]["missing"]["image"]["vqa"] <= 1
    assert data["styles"]["dual"]["sound_accuracy"] is None
    assert 0 < data["majority_baseline"]["vqa"] < 1
    assert res["train_seconds_per_style"] == 1.0
    assert (tmp_path / "b" / "fusion.png").stat().st_size > 1000
    assert "| early |" in (tmp_path / "b" / "fusion.md").read_text()


# ---------------------------------------------------------------------------------------------
# bench fusion: the dual encoder trains on the one loop


def test_bench_dual_batches_are_a_function_of_the_step_and_keep_captions_with_their_scene(
    train_tasks,
):
    from helpers import tiny_config
    from polysense.bench.fusion import _DualPairs
    from polysense.data.transforms import normalize

    cfg = tiny_config()
    v = cfg.model.vision
    pairs = _DualPairs(train=train_tasks, batch_size=8, tokenize=list, cfg=cfg)
    images, caps = pairs.batch(3)
    again, caps_again = pairs.batch(3)
    assert torch.equal(images, again) and caps == caps_again
    assert not torch.equal(images, pairs.batch(4)[0])
    every = normalize(train_tasks.images, v.image_mean, v.image_std)  # (N, 3, H, W)
    for image, caption in zip(images, caps, strict=True):
        scenes = [i for i in range(len(every)) if torch.equal(every[i], image)]
        assert any(caption in train_tasks.captions[i] for i in scenes), caption


def test_bench_dual_contrastive_task_learns_on_fit_and_clamps_the_temperature(train_tasks):
    """Through `fit`: the contrastive loss on the first batches falls, and the temperature
    clamp (after every step) holds the logit scale at or under its bound."""
    from helpers import tiny_config
    from polysense.bench.fusion import _budget_cfg, _DualContrastiveTask, _DualPairs
    from polysense.losses import clip_loss
    from polysense.models.clip import build_model
    from polysense.train.fit import fit

    cfg = tiny_config()
    torch.manual_seed(0)
    clip = build_model(cfg, texts=[c for caps in train_tasks.captions for c in caps])
    pairs = _DualPairs(train=train_tasks, batch_size=16, tokenize=clip.tokenize, cfg=cfg)

    def mean_loss() -> float:
        with torch.no_grad():
            outs = [clip(*pairs.batch(s)) for s in range(4)]
            return sum(
                float(clip_loss(o["image_embeds"], o["text_embeds"], o["logit_scale"].log()))
                for o in outs
            ) / len(outs)

    before = mean_loss()
    bound = clip.logit_scale.item() - 0.5  # below the initial value: the clamp must act
    loop = dataclasses.replace(
        _budget_cfg(seconds=600, batch_size=16, lr=3e-3, weight_decay=0.1), steps=40
    )
    task = _DualContrastiveTask(model=clip, cfg=loop, max_logit_scale=bound)
    result = fit(task, loop, data=pairs, out=None, progress=False)
    assert result.steps == 40 and not result.stopped_early
    assert clip.logit_scale.item() <= bound
    assert mean_loss() < 0.8 * before
