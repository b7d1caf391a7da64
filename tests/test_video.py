"""Video tower: frame sampling, divided vs joint attention, image initialisation, decoding, eval."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F

from polysense.config import ModelConfig, RunConfig, TextConfig, VideoConfig, VisionConfig
from polysense.data.readers import Rejects, read_samples, sample_frame_indices
from polysense.data.tokenizer import Tokenizer
from polysense.errors import DataError, PolysenseError
from polysense.eval.video import still_video, video_retrieval
from polysense.models.checkpoint import save_checkpoint, tower_weights
from polysense.models.clip import CLIP, bootstrap_captions
from polysense.models.video import VideoTransformer, videos_to_tensor
from polysense.models.vit import VisionTransformer

SMALL = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2}


def test_frame_sampling_takes_segment_middles_or_random_frames_in_segments():
    assert sample_frame_indices(8, 4).tolist() == [1, 3, 5, 7]
    assert sample_frame_indices(8, 8).tolist() == list(range(8))
    assert sample_frame_indices(3, 6).tolist() == [0, 0, 1, 1, 2, 2]  # short clips repeat
    picks = sample_frame_indices(100, 10, mode="random", generator=np.random.default_rng(0))
    assert all(10 * i <= p < 10 * (i + 1) for i, p in enumerate(picks))
    with pytest.raises(DataError):
        sample_frame_indices(0, 4)


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_divided_model_from_image_weights_equals_the_image_model_on_a_still_clip(stem):
    torch.manual_seed(0)
    image = VisionTransformer(cfg=VisionConfig(**SMALL, stem=stem))
    for p in image.parameters():  # move LayerNorms etc. off their trivial init
        p.data += 0.05 * torch.randn_like(p)
    video = VideoTransformer(cfg=VideoConfig(**SMALL, stem=stem, num_frames=4, attention="divided"))
    copied = video.load_image_weights(image.state_dict())
    assert "blocks.1.attn.qkv.weight" in copied and "time_embed" not in copied
    x = torch.randn(2, 3, 32, 32)
    clip = x[:, None].expand(-1, 4, -1, -1, -1)  # (B, T, 3, H, W), no motion
    torch.testing.assert_close(video.eval()(clip), image.eval()(x), atol=1e-5, rtol=1e-5)


def test_frame_order_matters_only_through_the_temporal_parts():
    torch.manual_seed(0)
    video = VideoTransformer(cfg=VideoConfig(**SMALL, num_frames=4, attention="divided")).eval()
    x = torch.randn(1, 4, 3, 32, 32)
    n = video.num_patches

    def first_frame_tokens_moved_last() -> torch.Tensor:
        """Tokens of frame 0's content, at time 0 and (clip reversed) at time 3."""
        a = video.forward_features(x)[:, 1 : 1 + n]
        b = video.forward_features(x.flip(1))[:, 1 + 3 * n : 1 + 4 * n]
        return (a - b).abs().max()

    # Zero-initialised temporal branch and time embedding: the frames are a set.
    assert first_frame_tokens_moved_last() < 1e-5
    torch.testing.assert_close(video(x), video(x.flip(1)), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        video.time_embed.normal_(std=1.0)
        for block in video.blocks:
            block.fc_time.weight.normal_(std=0.5)
    assert first_frame_tokens_moved_last() > 0.1


def test_divided_keeps_frames_apart_where_joint_mixes_them():
    torch.manual_seed(0)
    cfg = {**SMALL, "layers": 1, "num_frames": 3}
    n = 16  # patches per frame
    x = torch.randn(1, 3, 3, 32, 32)
    y = x.clone()
    y[:, 0] += 1.0  # change frame 0 only
    for kind, mixes in (("divided", False), ("joint", True)):
        model = VideoTransformer(cfg=VideoConfig(**cfg, attention=kind)).eval()
        frame1 = slice(1 + n, 1 + 2 * n)  # tokens of frame 1
        diff = (model.forward_features(x)[:, frame1] - model.forward_features(y)[:, frame1]).abs()
        assert (diff.max() > 1e-4) == mixes, kind


def test_image_weights_load_from_a_checkpoint_and_mismatches_are_named(tmp_path):
    tok = Tokenizer.train(bootstrap_captions(), vocab_size=300, context_length=16)
    text = TextConfig(vocab_size=300, context_length=16, width=32, layers=1, heads=2)
    clip = CLIP(
        cfg=ModelConfig(embed_dim=16, vision=VisionConfig(**SMALL), text=text), tokenizer=tok
    )
    save_checkpoint(clip, RunConfig(), tmp_path / "ckpt")
    video = VideoTransformer(cfg=VideoConfig(**SMALL, num_frames=2))
    field = "model.video.init_from_image"
    copied = video.load_image_weights(tower_weights(tmp_path / "ckpt", "visual.", field=field))
    torch.testing.assert_close(video.pos_embed, clip.visual.pos_embed)
    assert len(copied) == len(clip.visual.state_dict())
    wide = VideoTransformer(cfg=VideoConfig(**{**SMALL, "width": 64}, num_frames=2))
    with pytest.raises(PolysenseError, match="width"):
        wide.load_image_weights(tower_weights(tmp_path / "ckpt", "visual.", field=field))
    with pytest.raises(PolysenseError, match=r"model\.video\.init_from_image: .* does not exist"):
        tower_weights(tmp_path / "nowhere", "visual.", field=field)


def test_encode_video_samples_frames_from_uint8_clips():
    torch.manual_seed(0)
    tok = Tokenizer.train(bootstrap_captions(), vocab_size=300, context_length=16)
    cfg = ModelConfig(
        embed_dim=16,
        towers=("video", "text"),
        video=VideoConfig(**SMALL, num_frames=4),
        text=TextConfig(vocab_size=300, context_length=16, width=32, layers=1, heads=2),
    )
    model = CLIP(cfg=cfg, tokenizer=tok).eval()
    clips = torch.randint(0, 256, (2, 8, 32, 32, 3), dtype=torch.uint8)
    emb = model.encode_video(clips)
    assert emb.shape == (2, 16)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    manual = model.encode_video(videos_to_tensor(clips[:, [1, 3, 5, 7]], cfg.video))
    torch.testing.assert_close(emb, manual)
    with pytest.raises(PolysenseError, match="no audio tower"):
        model.encode_audio(torch.zeros(1, 16000))


def _write_mp4(path, frames: np.ndarray) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_jsonl_audio_and_video_columns_decode_resample_and_sample(tmp_path):
    frames = np.full((6, 32, 32, 3), 40, dtype=np.uint8)
    for t in range(6):
        frames[t, :, 4 * t : 4 * t + 8] = 220  # a bright bar moving right
    _write_mp4(tmp_path / "clip.mp4", frames)
    rate = 22050
    tone = np.sin(2 * np.pi * 440 * np.arange(rate) / rate).astype(np.float32)
    soundfile.write(tmp_path / "tone.flac", tone, rate)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    rows = [
        {"key": "good", "video": "clip.mp4", "audio": "tone.flac", "caption": "a bar moving right"},
        {"key": "bad", "video": "bad.mp4", "caption": "broken"},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rejects = Rejects()
    samples = list(
        read_samples(tmp_path / "d.jsonl", sample_rate=16000, num_frames=3, rejects=rejects)
    )
    assert [s["key"] for s in samples] == ["good"]
    assert rejects.by_reason == {"bad_video": 1}
    s = samples[0]
    assert s["sample_rate"] == 16000 and len(s["audio"]) == 16000
    assert s["video"].shape == (3, 32, 32, 3)  # frames 1, 3, 5 of 6
    bar_columns = [int(np.argmax(f[16, :, 0] > 130)) for f in s["video"]]
    assert abs(bar_columns[0] - 4) <= 2 and abs(bar_columns[2] - 20) <= 2  # lossy codec


class _MotionOracle:
    """Text: one-hot of the direction word. Video: one-hot of the way the bright mass moves
    (first to last frame); a clip without motion gets the zero vector (all directions tie)."""

    directions = ("left", "right", "up", "down")

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return F.one_hot(
            torch.tensor([self.directions.index(t.split()[-1]) for t in texts]), 4
        ).float()

    def encode_video(self, clips: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(clips), 4)
        for i, clip in enumerate(clips.float()):
            mass = (255 - clip.mean(-1)).clamp(min=0)  # (T, H, W) darkness
            ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
            cx = [(m * xs).sum() / m.sum() for m in (mass[0], mass[-1])]
            cy = [(m * ys).sum() / m.sum() for m in (mass[0], mass[-1])]
            dx, dy = float(cx[1] - cx[0]), float(cy[1] - cy[0])
            if max(abs(dx), abs(dy)) > 0.5:
                k = (0 if dx < 0 else 1) if abs(dx) > abs(dy) else (2 if dy < 0 else 3)
                out[i, k] = 1.0
        return out


def _clip(direction: str, still: int) -> np.ndarray:
    video = np.full((4, 32, 32, 3), 235, dtype=np.uint8)
    dx, dy = {"left": (-2, 0), "right": (2, 0), "up": (0, -2), "down": (0, 2)}[direction]
    for t in range(4):
        x, y = 12 + dx * (t - still), 12 + dy * (t - still)
        video[t, y : y + 8, x : x + 8] = 0
    return video


def test_video_retrieval_credits_motion_and_the_still_baseline_cannot_see_it():
    directions = ["left", "right", "up", "down", "left", "up"]
    samples = [
        {
            "video": _clip(d, still=1),
            "video_image_frame": 1,
            "motion": d,
            "motion_caption": f"scene {i} moving {d}",
        }
        for i, d in enumerate(directions)
    ]
    still = still_video(samples[0])
    assert torch.equal(still[0], still[3]) and torch.equal(
        still[2], torch.as_tensor(samples[0]["video"][1])
    )
    out = video_retrieval(_MotionOracle(), samples)
    assert out["video_n_samples"] == 6
    assert out["direction_accuracy"] == 1.0
    # The still clip ties every direction; argmax picks the first ("left"): 2 of 6 are left.
    assert out["single_frame_direction_accuracy"] == 2 / 6
    assert out["single_frame_v2t_r1"] == 0.0  # ties count against the query
    assert out["v2t_r5"] == 1.0  # only same-direction captions tie with the right one
