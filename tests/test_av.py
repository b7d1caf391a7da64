"""Multi-tower training (audio, video, ImageBind-style), presets, runner, bench and CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from polysense.cli import app
from polysense.config import (
    AudioConfig,
    ConfigError,
    ModelConfig,
    RunConfig,
    TextConfig,
    TrainConfig,
    VideoConfig,
    VisionConfig,
    apply_overrides,
    from_dict,
    to_dict,
)
from polysense.data.world import generate_world
from polysense.errors import PolysenseError
from polysense.losses import ContrastiveLoss
from polysense.models.checkpoint import load_model
from polysense.models.clip import CLIP, build_model
from polysense.presets import available_presets, get_preset
from polysense.train.loop import _tower_loss, train

TINY = [
    "model.embed_dim=32",
    "model.vision.width=32",
    "model.vision.layers=1",
    "model.vision.heads=2",
    "model.text.width=32",
    "model.text.layers=1",
    "model.text.heads=2",
    "model.text.vocab_size=300",
    "model.audio.width=32",
    "model.audio.layers=1",
    "model.audio.heads=2",
    "model.video.width=32",
    "model.video.layers=1",
    "model.video.heads=2",
    "model.video.num_frames=4",
    "train.batch_size=16",
    "train.steps=4",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.max_minutes=0",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("av") / "world"
    generate_world(root, n=120, workers=1, progress=False)
    return root


def test_presets_are_registered_with_their_towers():
    assert {"clap-tiny", "video-clip-tiny", "av-tiny", "imagebind-tiny"} <= set(available_presets())
    assert get_preset("clap-tiny").model.towers == ("audio", "text")
    assert get_preset("video-clip-tiny").data.caption_key == "motion_caption"
    bind = get_preset("imagebind-tiny").model
    assert bind.loss_pairs() == (("image", "text"), ("image", "audio"))
    assert get_preset("av-tiny").model.loss_pairs() == (("image", "audio"),)
    cfg = apply_overrides(get_preset("clip-tiny"), ["model.towers=image,text,video"])
    assert cfg.model.towers == ("image", "text", "video")


def test_image_text_configs_and_checkpoints_from_before_still_load(tmp_path):
    cfg = apply_overrides(get_preset("clip-tiny"), TINY)
    old = to_dict(cfg)
    for key in ("towers", "anchor", "audio", "video", "audio_proj", "video_proj"):
        del old["model"][key]  # a config.json written before the audio/video towers existed
    again = from_dict(RunConfig, old)
    assert again.model.towers == ("image", "text")
    model = build_model(again)
    assert not any(k.startswith(("audio", "video")) for k in model.state_dict())
    with pytest.raises(PolysenseError, match="towers"):
        CLIP(cfg=dataclasses.replace(cfg.model, towers=("image", "smell")), tokenizer=None)
    with pytest.raises(PolysenseError, match="anchor"):
        CLIP(cfg=dataclasses.replace(cfg.model, towers=("audio", "text", "video")), tokenizer=None)
    with pytest.raises(ConfigError):
        apply_overrides(cfg, ["model.audio.nope=1"])


def test_imagebind_loss_is_the_sum_of_the_anchor_pairs():
    torch.manual_seed(0)
    cfg = ModelConfig(
        embed_dim=16,
        towers=("image", "text", "audio"),
        vision=VisionConfig(width=32, layers=1, heads=2, patch_size=8),
        text=TextConfig(vocab_size=300, width=32, layers=1, heads=2),
        audio=AudioConfig(n_mels=32, patch_freq=8, patch_time=10, width=32, layers=1, heads=2),
    )
    model = build_model(RunConfig(model=cfg))
    inputs = {
        "image": torch.randn(4, 3, 32, 32),
        "text": model.tokenize(["a red circle", "a blue star", "two squares", "a green star"]),
        "audio": torch.randn(4, 16000) * 0.1,
    }
    loss_fn = ContrastiveLoss(family="clip", chunk=0, distributed=False)
    got = _tower_loss(model, loss_fn, inputs, cfg.loss_pairs(), "fp32")
    img, txt, aud = (model.encode(m, inputs[m]) for m in ("image", "text", "audio"))
    scale = model.clamped_logit_scale()
    want = loss_fn(img, txt, scale, None) + loss_fn(img, aud, scale, None)
    torch.testing.assert_close(got, want)


def test_audio_text_training_lowers_the_loss_and_resumes_exactly(world, tmp_path):
    cfg = apply_overrides(
        get_preset("clap-tiny"),
        [*TINY, "train.steps=6", "train.ckpt_every=2", "train.eval_every=3", "train.lr=3e-3"],
    )

    class Killed(Exception):
        pass

    def kill_at_3(model):  # the process "dies" after step 3; state.pt holds step 2
        raise Killed

    full = train(cfg, data=world, out=tmp_path / "full", progress=False)
    with pytest.raises(Killed):
        train(cfg, data=world, out=tmp_path / "cut", progress=False, evaluate=kill_at_3)
    resumed = train(cfg, data=world, out=tmp_path / "cut", resume=True, progress=False)
    assert resumed.steps == full.steps == 6
    a, b = load_model(tmp_path / "full"), load_model(tmp_path / "cut")
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    losses = [
        json.loads(x)["loss"] for x in (tmp_path / "full/metrics.jsonl").read_text().splitlines()
    ]
    assert losses[-1] < losses[0]
    emb = a.encode_audio(torch.zeros(2, 16000))
    assert emb.shape == (2, 32)


@pytest.mark.slow
def test_every_av_runner_trains_evaluates_and_writes_metrics(world, tmp_path):
    from polysense.eval.audio import eval_avc_task, eval_task

    for name, keys in (
        ("clap-tiny", ["audio_zeroshot_top1"]),
        ("video-clip-tiny", ["v2t_r1", "single_frame_v2t_r1", "direction_accuracy"]),
        ("av-tiny", ["avc_accuracy", "avc_2afc"]),
        ("imagebind-tiny", ["zeroshot_top1", "audio_zeroshot_top1", "avc_accuracy"]),
    ):
        cfg = apply_overrides(get_preset(name), TINY)
        out = tmp_path / name
        result = CliRunner().invoke(
            app,
            ["train", name, "--data", str(world), "--out", str(out), "--eval-splits", "test,val"]
            + [x for o in TINY for x in ("--set", o)],
        )
        assert result.exit_code == 0, result.output
        metrics = json.loads((out / "metrics.json").read_text())
        for key in keys:
            assert 0.0 <= metrics[key] <= 1.0 and 0.0 <= metrics["val"][key] <= 1.0, (name, key)
        assert metrics["config"]["model"]["towers"] == list(cfg.model.towers)
    kwargs = {"data": str(world), "split": "test", "batch_size": 64, "limit": None, "clip": None}
    avc = eval_avc_task(ckpt=tmp_path / "av-tiny", **kwargs)
    assert 0.0 <= avc["avc_accuracy"] <= 1.0
    with pytest.raises(PolysenseError, match="towers"):
        eval_task(ckpt=tmp_path / "av-tiny", **kwargs)  # no text tower


def test_video_init_from_an_image_checkpoint_happens_at_the_start_only(world, tmp_path):
    image_cfg = apply_overrides(get_preset("clip-tiny"), [*TINY, "model.vision.stem=patch"])
    image = build_model(image_cfg)
    from polysense.models.checkpoint import save_checkpoint

    save_checkpoint(image, image_cfg, tmp_path / "image")
    cfg = apply_overrides(
        get_preset("video-clip-tiny"),
        [*TINY, "model.video.stem=patch", f"model.video.init_from_image={tmp_path / 'image'}"],
    )
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=1, lr=1e-9))
    train(cfg, data=world, out=tmp_path / "video", progress=False)
    video = load_model(tmp_path / "video").video
    torch.testing.assert_close(video.pos_embed, image.visual.pos_embed, atol=1e-6, rtol=0)


def test_video_attention_flops_grow_quadratically_for_joint_and_linearly_for_divided():
    from polysense.bench.video_attention import measure

    spec = {
        "image_size": 32,
        "patch_size": 8,
        "width": 32,
        "layers": 1,
        "heads": 2,
        "batch_size": 1,
        "repeats": 1,
        "threads": 1,
    }
    f = {(k, t): measure(k, t, spec) for k in ("joint", "divided") for t in (4, 8)}
    n = 16  # patches per frame
    # Attention products over L tokens cost ~L^2: joint L = 1 + T N; divided (T+1) (N+1)^2
    # spatial terms (cls copy per frame) plus N T^2 temporal ones.
    joint = ((1 + 8 * n) / (1 + 4 * n)) ** 2
    divided = (8 * (n + 1) ** 2 + n * 64) / (4 * (n + 1) ** 2 + n * 16)
    ratio = {k: f[(k, 8)]["attn_gflops"] / f[(k, 4)]["attn_gflops"] for k in ("joint", "divided")}
    assert ratio["joint"] == pytest.approx(joint, rel=0.05)
    assert ratio["divided"] == pytest.approx(divided, rel=0.05)
    for k in ("joint", "divided"):
        assert f[(k, 8)]["latency_ms"] > 0 and f[(k, 8)]["peak_mem_mb"] >= 0


@pytest.mark.slow
def test_bench_video_attention_command_writes_json_md_png(tmp_path):
    args = ["bench", "video-attention", "--out", str(tmp_path), "--frames", "2,4"]
    args += ["--image-size", "32", "--width", "32", "--layers", "1", "--repeats", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "video-attention.json").read_text())
    for t in ("2", "4"):
        for kind in ("joint", "divided"):
            assert {"gflops", "latency_ms", "peak_mem_mb"} <= set(data["frames"][t][kind])
    assert (tmp_path / "video-attention.png").stat().st_size > 1000
    bad = CliRunner().invoke(
        app, ["bench", "video-attention", "--out", str(tmp_path), "--frames", "8,4"]
    )
    assert isinstance(bad.exception, PolysenseError) and "increasing" in str(bad.exception)


def test_train_config_rejects_accumulation_for_other_towers(world, tmp_path):
    cfg = apply_overrides(get_preset("av-tiny"), [*TINY, "train.grad_accum=2"])
    with pytest.raises(PolysenseError, match="grad_accum"):
        train(cfg, data=world, out=tmp_path / "x", progress=False)
    assert TrainConfig().grad_accum == 1 and VideoConfig().attention == "divided"


def test_tower_batches_follow_the_pair_order_and_normalise_like_the_model():
    from polysense.data.loader import PairBatches, PairData, TowerBatches, TowerData
    from polysense.data.tokenizer import Tokenizer
    from polysense.models.clip import bootstrap_captions
    from polysense.models.video import videos_to_tensor

    gen = torch.Generator().manual_seed(0)
    n, caps = 12, [[f"a red circle {i}", f"a blue star {i}"] for i in range(12)]
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=gen)
    video = torch.randint(0, 256, (n, 4, 32, 32, 3), dtype=torch.uint8, generator=gen)
    tok = Tokenizer.train(bootstrap_captions(), vocab_size=300, context_length=16)
    vc = VideoConfig(num_frames=4)
    norm = {"image_mean": vc.image_mean, "image_std": vc.image_std}
    towers = TowerBatches(
        data=TowerData(keys=[str(i) for i in range(n)], captions=caps, images=images, video=video),
        tokenizer=tok,
        batch_size=4,
        seed=3,
        video_mean=vc.image_mean,
        video_std=vc.image_std,
        **norm,
    )
    pairs = PairBatches(
        data=PairData(keys=[str(i) for i in range(n)], images=images, captions=caps),
        tokenizer=tok,
        batch_size=4,
        seed=3,
        mean=vc.image_mean,
        std=vc.image_std,
    )
    for step in (0, 5):
        got, (want_img, want_ids) = towers.batch(step), pairs.batch(step)
        assert torch.equal(got["image"], want_img) and torch.equal(got["text"], want_ids)
        idx, _ = pairs.indices(step)
        torch.testing.assert_close(got["video"], videos_to_tensor(video[idx], vc))


# ---------------------------------------------------------------------------------------------
# motion hard negatives for video-text training (train.hard_negatives=motion)


def test_motion_negatives_change_only_the_direction_and_never_give_the_caption(world):
    from polysense.data.loader import motion_negatives
    from polysense.data.readers import read_samples
    from polysense.data.world import DIRECTIONS
    from polysense.errors import DataError

    captions = [
        s["text"][0] for s in read_samples(world, split="train", caption_key="motion_caption")
    ]
    assert len(captions) > 50
    for caption in captions:
        negatives = motion_negatives(caption)
        head, own = caption.rsplit(" ", 1)
        assert len(negatives) == 3 and caption not in negatives
        assert [n.rsplit(" ", 1)[0] for n in negatives] == [head] * 3
        assert [n.rsplit(" ", 1)[1] for n in negatives] == [d for d in DIRECTIONS if d != own]
    assert motion_negatives("a red circle and a blue star moving up") == [
        "a red circle and a blue star moving left",
        "a red circle and a blue star moving right",
        "a red circle and a blue star moving down",
    ]
    for bad in ("a red circle", "a red circle moving sideways"):
        with pytest.raises(DataError, match="moving"):
            motion_negatives(bad)


def _video_batches(hard_negatives: str, seed: int = 3, context_length: int = 32):
    from polysense.data.loader import TowerBatches, TowerData
    from polysense.data.tokenizer import Tokenizer
    from polysense.models.clip import bootstrap_captions

    gen = torch.Generator().manual_seed(0)
    n = 12
    caps = [[f"a red circle moving {d}", f"two blue stars moving {d}"] for d in ["up", "left"] * 6]
    video = torch.randint(0, 256, (n, 4, 32, 32, 3), dtype=torch.uint8, generator=gen)
    tok = Tokenizer.train(
        [*bootstrap_captions(), *(c for cs in caps for c in cs)],
        vocab_size=300,
        context_length=context_length,
    )
    vc = VideoConfig(num_frames=4)
    batches = TowerBatches(
        data=TowerData(keys=[str(i) for i in range(n)], captions=caps, video=video),
        tokenizer=tok,
        batch_size=4,
        seed=seed,
        image_mean=vc.image_mean,
        image_std=vc.image_std,
        video_mean=vc.image_mean,
        video_std=vc.image_std,
        hard_negatives=hard_negatives,
    )
    return batches, tok, caps


def test_tower_batches_hold_the_drawn_captions_motion_negatives_by_seed_and_step():
    from polysense.data.loader import motion_negatives
    from polysense.errors import DataError

    hard, tok, caps = _video_batches("motion")
    plain, _, _ = _video_batches("none")
    flat = [c for cs in caps for c in cs]
    for step in (0, 4, 7):  # 3 steps per epoch: a new permutation at 3 and 6
        got = hard.batch(step)
        _, caption_idx = hard.indices(step)
        drawn = [flat[i] for i in caption_idx]
        want = torch.stack([tok.encode(motion_negatives(c))[0] for c in drawn])  # (4, 3, L)
        assert got["hard_text"].shape == (4, 3, 32)
        assert torch.equal(got["hard_text"], want)
        assert torch.equal(got["text"], tok.encode(drawn)[0])
        for i, c in enumerate(drawn):  # a negative is never the positive caption
            assert not (got["hard_text"][i] == got["text"][i]).all(dim=1).any(), c
        # off: the same batch without the hard captions
        off = plain.batch(step)
        assert set(off) == {"text", "video"} and set(got) == {"text", "video", "hard_text"}
        assert all(torch.equal(off[k], got[k]) for k in off)
    # a fresh loader (a resumed run) draws the same hard captions at a step, whatever came before
    again, _, _ = _video_batches("motion")
    assert torch.equal(again.batch(7)["hard_text"], hard.batch(7)["hard_text"])
    other, _, _ = _video_batches("motion", seed=4)
    assert not torch.equal(other.batch(7)["hard_text"], hard.batch(7)["hard_text"])
    # captions cut before their direction would give negatives equal to the caption
    with pytest.raises(DataError, match="context_length"):
        _video_batches("motion", context_length=12)


def _video_text_model() -> CLIP:
    torch.manual_seed(0)
    cfg = ModelConfig(
        embed_dim=16,
        towers=("video", "text"),
        text=TextConfig(vocab_size=300, width=32, layers=1, heads=2),
        video=VideoConfig(num_frames=4, width=32, layers=1, heads=2),
    )
    return build_model(RunConfig(model=cfg))


def test_video_text_loss_with_motion_negatives_matches_the_reference():
    from polysense.data.loader import motion_negatives
    from polysense.losses import clip_loss_naive

    model = _video_text_model()
    captions = ["a red circle moving left", "a blue star moving up", "two squares moving down"]
    hard = [motion_negatives(c) for c in captions]
    inputs = {
        "video": torch.randn(3, 4, 3, 32, 32),
        "text": model.tokenize(captions),
        "hard_text": torch.stack([model.tokenize(h) for h in hard]),  # (3, 3, L)
    }
    loss_fn = ContrastiveLoss(family="clip", chunk=0, distributed=False)
    pairs = model.cfg.loss_pairs()
    got = _tower_loss(model, loss_fn, inputs, pairs, "fp32")
    vid, txt = model.encode("video", inputs["video"]), model.encode("text", captions)
    hard_txt = torch.stack([model.encode("text", h) for h in hard])  # (3, 3, D)
    scale = model.clamped_logit_scale()
    want = clip_loss_naive(vid.double(), txt.double(), scale.double(), hard_txt.double())
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    without = clip_loss_naive(vid.double(), txt.double(), scale.double())
    assert got.item() > without.item()  # three more negatives in each video's row
    # the same pair listed text-first still takes the video as the row side
    flipped = _tower_loss(model, loss_fn, inputs, (("text", "video"),), "fp32")
    torch.testing.assert_close(flipped, got)
    # off: no "hard_text" gives exactly the plain in-batch loss
    del inputs["hard_text"]
    plain = _tower_loss(model, loss_fn, inputs, pairs, "fp32")
    assert torch.equal(plain, loss_fn(vid, txt, scale, None))


def test_video_training_with_motion_negatives_resumes_exactly(world, tmp_path):
    cfg = apply_overrides(
        get_preset("video-clip-tiny"), [*TINY, "train.steps=4", "train.ckpt_every=2"]
    )
    assert cfg.train.hard_negatives == "motion" and TrainConfig().hard_negatives == "none"

    class Killed(Exception):
        pass

    def kill(model):
        raise Killed

    full = train(cfg, data=world, out=tmp_path / "full", progress=False)
    cut = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_every=3))
    with pytest.raises(Killed):
        train(cut, data=world, out=tmp_path / "cut", progress=False, evaluate=kill)
    train(cfg, data=world, out=tmp_path / "cut", resume=True, progress=False)
    a, b = load_model(tmp_path / "full"), load_model(tmp_path / "cut")
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    assert full.steps == 4
    bind = apply_overrides(get_preset("imagebind-tiny"), [*TINY, "train.hard_negatives=motion"])
    with pytest.raises(PolysenseError, match="hard_negatives"):
        train(bind, data=world, out=tmp_path / "bind", progress=False)
