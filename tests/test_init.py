"""Fine-tuning from a checkpoint (`polysense train PRESET --init CKPT_OR_HF_DIR`, `train.init`) and
the real-size presets.

- The run's first loss is the init checkpoint's own loss on that batch (computed here with the
  reference InfoNCE on the checkpoint's embeddings), and the run keeps the checkpoint's tokenizer.
- From a Hugging Face CLIP directory, a locked text tower (LiT) stays bit-equal to HF's weights
  while the image tower moves, and staged unfreezing releases it.
- clip-vit-b32, clip-vit-b16 and siglip-b16-224 are transformers' own configs of the published
  models, so what they train exports to a directory transformers loads as that architecture."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, SiglipConfig

from helpers import make_pairs, tiny_config
from polysense.config import apply_overrides
from polysense.data.tokenizer import Tokenizer
from polysense.errors import PolysenseError
from polysense.losses import clip_loss_naive
from polysense.models.checkpoint import load_model
from polysense.models.clip import CLIP
from polysense.models.hf import export_hf
from polysense.presets import get_preset
from polysense.train.loop import train
from test_hf_tokenizers import clip_tok_dir, hf_model_dir  # noqa: F401  (a fixture)

N = 16  # one batch: the first step sees every pair, in an order InfoNCE does not depend on


def one_caption_pairs(root: Path) -> Path:
    """N images with one caption each, so the first batch is fully determined."""
    make_pairs(root, N)
    rows = [json.loads(line) for line in (root / "pairs.jsonl").read_text().splitlines()]
    for row in rows:
        row["caption"] = row["caption"][0]
    path = root / "one.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polysense.cli", *args], capture_output=True, text=True, timeout=300
    )


def first_loss(out: Path) -> float:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def own_loss(ckpt: Path, data: Path) -> float:
    """The checkpoint's InfoNCE on all N pairs, computed from its embeddings (float64 reference)."""
    model = load_model(str(ckpt))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    images = [Image.open(data.parent / r["image"]) for r in rows]
    with torch.no_grad():
        img = model.encode_image(images)
        txt = model.encode_text([r["caption"] for r in rows])
        return float(clip_loss_naive(img, txt, model.clamped_logit_scale()))


def test_train_init_starts_from_the_checkpoint_and_keeps_its_tokenizer(tmp_path):
    data = one_caption_pairs(tmp_path / "data")
    common = ["--set", "train.batch_size=16", "--set", "train.precision=fp32", "--eval-splits", ""]
    common += ["--set", "train.log_every=1", "--set", "train.lr=3e-3"]
    first = cli("train", "clip-tiny-full", "--data", str(data), "--out", str(tmp_path / "ck"),
                "--set", "train.steps=20", "--set", "train.lock_text=false", *common)  # fmt: skip
    assert first.returncode == 0, first.stderr
    expected = own_loss(tmp_path / "ck", data)

    tuned = cli("train", "clip-tiny", "--init", str(tmp_path / "ck"), "--data", str(data),
                "--out", str(tmp_path / "ft"), "--set", "train.steps=2", *common)  # fmt: skip
    assert tuned.returncode == 0, tuned.stderr
    assert first_loss(tmp_path / "ft") == pytest.approx(expected, abs=1e-4)
    # a run from random weights starts elsewhere: the check above can fail
    fresh = cli("train", "clip-tiny", "--data", str(data), "--out", str(tmp_path / "fresh"),
                "--set", "train.steps=1", *common)  # fmt: skip
    assert fresh.returncode == 0, fresh.stderr
    assert abs(first_loss(tmp_path / "fresh") - expected) > 0.05

    # the checkpoint's tokenizer, not a new BPE; the model is the checkpoint's architecture
    ck_tok = (tmp_path / "ck" / "tokenizer.json").read_text()
    assert (tmp_path / "ft" / "tokenizer.json").read_text() == ck_tok
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert saved["model"] == json.loads((tmp_path / "ck" / "config.json").read_text())["model"]
    assert saved["train"]["init"] == str(tmp_path / "ck")
    assert saved["train"]["steps"] == 2  # the preset's recipe, with the overrides


def test_train_on_own_data_plots_the_loss_and_says_what_it_did_not_evaluate(tmp_path):
    """A JSONL run writes loss.png as the quickstart does, and the world splits it cannot
    evaluate are named instead of silently skipped."""
    data = one_caption_pairs(tmp_path / "data")
    r = cli("train", "clip-tiny", "--data", str(data), "--out", str(tmp_path / "o"),
            "--set", "train.steps=3", "--set", "train.batch_size=16", "--set", "train.log_every=1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    with Image.open(tmp_path / "o" / "loss.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
    assert "--eval-splits names a world's splits" in " ".join(r.stdout.split())
    assert "loss.png" in r.stdout


def test_train_eval_data_scores_held_out_labelled_images_during_and_after(tmp_path):
    """`--eval-data FOLDER --templates simple`: the zero-shot top-1 in metrics.json equals the
    one computed here by hand from the checkpoint (argmax of cosine to "a photo of a {c}."), and
    with train.eval_every the probe joins metrics.jsonl."""
    data = one_caption_pairs(tmp_path / "data")
    held = tmp_path / "held"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for i, row in enumerate(rows):  # class folders named like "red_circle": `_` reads as a space
        folder = held / row["caption"].removeprefix("a ").replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        Image.open(data.parent / row["image"]).save(folder / f"{i}.png")
    r = cli("train", "clip-tiny", "--data", str(data), "--out", str(tmp_path / "o"),
            "--eval-data", str(held), "--templates", "simple", "--set", "train.steps=4",
            "--set", "train.batch_size=16", "--set", "train.eval_every=2",
            "--set", "train.precision=fp32")  # fmt: skip
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    model = load_model(str(tmp_path / "o"))
    classes = sorted(p.name for p in held.iterdir())
    with torch.no_grad():
        prompts = model.encode_text([f"a photo of a {c.replace('_', ' ')}." for c in classes])
        hits = 0
        for c in classes:
            images = [Image.open(f) for f in sorted((held / c).iterdir())]
            best = (model.encode_image(images) @ prompts.T).argmax(dim=1)
            hits += int((best == classes.index(c)).sum())
    assert metrics["zeroshot_top1"] == pytest.approx(hits / N, abs=1e-9)
    assert metrics["eval_data"] == str(held) and metrics["n_samples"] == N
    logged = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    probes = [row for row in logged if "val_zeroshot_top1" in row]
    assert [row["step"] for row in probes] == [2, 4]
    assert probes[-1]["val_zeroshot_top1"] == pytest.approx(metrics["zeroshot_top1"], abs=1e-9)
    bad = cli("train", "clip-tiny", "--data", str(data), "--out", str(tmp_path / "x"),
              "--templates", "simple")  # fmt: skip
    assert bad.returncode != 0 and "--eval-data PATH" in bad.stderr
    assert "Traceback" not in bad.stderr


def _text_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The text tower's weights (a lock leaves its projection, `text_proj`, training)."""
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("text.")}


def test_init_from_hf_with_a_locked_then_unlocked_text_tower(tmp_path, clip_tok_dir):  # noqa: F811
    hf_dir = hf_model_dir("clip", tmp_path, clip_tok_dir, text_layers=1)[2]
    data = one_caption_pairs(tmp_path / "data")
    start = load_model(str(hf_dir))
    text0 = _text_weights(start)
    visual0 = start.visual.patch_embed.weight.clone()
    cfg = tiny_config("clip-tiny", "train.batch_size=16", "train.lr=1e-2", "train.steps=3",
                      "train.lock_text=true", "train.precision=fp32", f"train.init={hf_dir}")  # fmt: skip
    train(cfg, data=data, out=tmp_path / "lit", progress=False)
    lit = load_model(str(tmp_path / "lit"))
    assert lit.cfg == start.cfg  # the HF architecture, not clip-tiny's
    assert all(torch.equal(lit.state_dict()[k], v) for k, v in text0.items())  # locked: unchanged
    assert not torch.equal(lit.visual.patch_embed.weight, visual0)  # the image tower trained
    assert (tmp_path / "lit" / "tokenizer_config.json").is_file()
    again = Tokenizer.from_file(tmp_path / "lit", context_length=77)
    assert type(again.hf).__name__ == "CLIPTokenizer"  # the family's tokenizer, kept

    staged = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, unlock_text_at=1))
    train(staged, data=data, out=tmp_path / "staged", progress=False)
    moved = load_model(str(tmp_path / "staged")).state_dict()
    assert any(not torch.equal(moved[k], v) for k, v in text0.items())  # released at step 1


def test_init_mistakes_are_one_line_errors(tmp_path):
    data = one_caption_pairs(tmp_path / "data")
    base = ["train", "clip-tiny", "--data", str(data), "--out", str(tmp_path / "o")]
    cases = [
        (["--init", str(tmp_path / "nope")], "no such directory"),
        (["--init", str(tmp_path), "--set", "model.text.layers=2"], "drop the model.* override"),
        (["--init", str(tmp_path / "data")], "train.init="),  # a directory, not a model
    ]
    for extra, needle in cases:
        r = cli(*base, *extra)
        assert r.returncode != 0 and needle in r.stderr, (extra, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    r = cli("train", "fusion-early-tiny", "--data", str(data), "--out", str(tmp_path / "f"),
            "--init", str(tmp_path / "data"))  # fmt: skip
    assert r.returncode != 0 and "contrastive presets" in r.stderr and "Traceback" not in r.stderr


# --- real-size presets --------------------------------------------------------------------------

ARCH_FIELDS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
    "layer_norm_eps", "hidden_act",
)  # fmt: skip


@pytest.mark.parametrize(
    ("preset", "reference"),
    [
        ("clip-vit-b32", CLIPConfig()),
        ("clip-vit-b16", CLIPConfig(vision_config={"patch_size": 16})),
        ("siglip-b16-224", SiglipConfig()),
    ],
)
def test_real_size_presets_are_the_published_architectures(preset, reference, tmp_path):
    """The preset, exported (at one layer per tower, to stay fast; the full depth is compared on
    the config), is transformers' config of the published model field for field."""
    cfg = get_preset(preset)
    assert cfg.model.vision.layers == reference.vision_config.num_hidden_layers
    assert cfg.model.text.layers == reference.text_config.num_hidden_layers
    shallow = apply_overrides(cfg, ["model.vision.layers=1", "model.text.layers=1"])
    model = CLIP(cfg=shallow.model, tokenizer=None)
    out = export_hf(model, shallow, tmp_path / "hf")
    exported = json.loads((out / "config.json").read_text())
    for tower in ("vision_config", "text_config"):
        want = getattr(reference, tower).to_dict()
        want["num_hidden_layers"] = 1
        got = exported[tower]
        for name in ARCH_FIELDS:
            assert got[name] == want[name], (tower, name)
    v, t = exported["vision_config"], exported["text_config"]
    ref_v, ref_t = reference.vision_config, reference.text_config
    assert (v["image_size"], v["patch_size"]) == (ref_v.image_size, ref_v.patch_size)
    assert (t["vocab_size"], t["max_position_embeddings"]) == (
        ref_t.vocab_size,
        ref_t.max_position_embeddings,
    )
    if preset.startswith("clip"):
        assert exported["projection_dim"] == reference.projection_dim
        assert t["eos_token_id"] == reference.text_config.eos_token_id
    else:
        assert t["projection_size"] == ref_t.projection_size
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == (
        "CLIPImageProcessor" if preset.startswith("clip") else "SiglipImageProcessor"
    )


def test_real_size_preset_refuses_model_overrides_with_init_in_python_too():
    cfg = get_preset("clip-vit-b32")
    assert cfg.train.init == "" and cfg.train.lr == pytest.approx(1e-5)
    with pytest.raises(PolysenseError, match=r"train\.init"):
        from polysense.train.loop import load_init

        load_init("/nonexistent/checkpoint")
