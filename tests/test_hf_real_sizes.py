"""Hugging Face CLIP and SigLIP at their real dimensions (one or two layers per tower instead of
12-27: every other size is the published one), each with its family's tokenizer and image
processor: `import_hf` -> `encode_image(PIL)` and `encode_text(strings)` equal transformers'
processor + model within 1e-4 on real-size images of odd shapes, and `export_hf` -> AutoModel +
AutoProcessor on the export equal polysense.

transformers falls back to its PIL image processors here (torchvision is not installed), which
are the reference: CLIPImageProcessorPil and SiglipImageProcessorPil."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoProcessor,
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    SiglipConfig,
    SiglipModel,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from polysense.models.hf import export_hf, import_hf
from test_hf_tokenizers import BATTERY, clip_tok_dir, siglip_tok_dir  # noqa: F401  (fixtures)

# name: (family, image size, patch, vision width/heads/mlp, text width/heads/mlp, projection)
REAL = {
    "clip-vit-b32": ("clip", 224, 32, (768, 12, 3072), (512, 8, 2048), 512),
    "clip-vit-b16": ("clip", 224, 16, (768, 12, 3072), (512, 8, 2048), 512),
    "clip-vit-l14": ("clip", 224, 14, (1024, 16, 4096), (768, 12, 3072), 768),
    "clip-vit-l14-336": ("clip", 336, 14, (1024, 16, 4096), (768, 12, 3072), 768),
    "siglip-b16-224": ("siglip", 224, 16, (768, 12, 3072), (768, 12, 3072), 768),
    "siglip-b16-256": ("siglip", 256, 16, (768, 12, 3072), (768, 12, 3072), 768),
    "siglip-b16-384": ("siglip", 384, 16, (768, 12, 3072), (768, 12, 3072), 768),
    "siglip-so400m-p14-384": ("siglip", 384, 14, (1152, 16, 4304), (1152, 16, 4304), 1152),
}
FAST = ["clip-vit-b32", "siglip-b16-224"]


def odd_images() -> list[Image.Image]:
    """Real-size photos' shapes and modes: landscape, portrait, greyscale, RGBA, tiny, square."""
    rng = np.random.default_rng(0)

    def noise(w: int, h: int, channels: int) -> np.ndarray:
        smooth = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, channels), dtype=np.uint8)
        big = np.kron(smooth, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]  # blocks: real edges
        return np.clip(big + rng.integers(-20, 21, big.shape), 0, 255).astype(np.uint8)

    return [
        Image.fromarray(noise(640, 427, 3)),
        Image.fromarray(noise(300, 500, 3)),
        Image.fromarray(noise(333, 222, 1)[..., 0], mode="L"),
        Image.fromarray(noise(257, 411, 4), mode="RGBA"),
        Image.fromarray(noise(20, 30, 3)),
        Image.fromarray(noise(224, 224, 3)),
    ]


def build(name: str, tmp_path, tok_dir) -> tuple[torch.nn.Module, object, object, object]:
    family, size, patch, (vw, vh, vm), (tw, th, tm), proj = REAL[name]
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    vision = dict(
        hidden_size=vw, num_attention_heads=vh, intermediate_size=vm, num_hidden_layers=1,
        patch_size=patch, image_size=size,
    )  # fmt: skip
    text = dict(
        vocab_size=len(tok), hidden_size=tw, num_attention_heads=th, intermediate_size=tm,
        num_hidden_layers=1, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    if family == "clip":
        text.update(max_position_embeddings=77, bos_token_id=tok.bos_token_id)
        cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj)
        hf = CLIPModel(cfg)
        processor = CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
    else:
        text.update(max_position_embeddings=64, projection_size=proj)
        hf = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        processor = SiglipImageProcessorPil(size={"height": size, "width": size})
    hf.eval()
    directory = tmp_path / name
    hf.save_pretrained(directory)
    tok.save_pretrained(directory)
    processor.save_pretrained(directory)
    return hf, tok, processor, directory


def features(out) -> torch.Tensor:
    return F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)


def hf_encode(hf, tok, processor, images, texts) -> tuple[torch.Tensor, torch.Tensor]:
    length = hf.config.text_config.max_position_embeddings
    batch = tok(
        texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
    )
    text_kwargs = {"input_ids": batch["input_ids"]}
    if isinstance(hf, CLIPModel):
        text_kwargs["attention_mask"] = batch["attention_mask"]
    with torch.no_grad():
        pixels = processor(images, return_tensors="pt")["pixel_values"]
        return (
            features(hf.get_image_features(pixel_values=pixels)),
            features(hf.get_text_features(**text_kwargs)),
        )


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[] if n in FAST else pytest.mark.slow) for n in REAL]
)
def test_import_encodes_like_transformers_and_export_loads(name, tmp_path, request):
    family = REAL[name][0]
    hf, tok, processor, directory = build(
        name, tmp_path, request.getfixturevalue(f"{family}_tok_dir")
    )
    images = odd_images()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, run_cfg = import_hf(directory)
    assert model.cfg.vision.resize == ("shortest_edge" if family == "clip" else "square")
    want_img, want_txt = hf_encode(hf, tok, processor, images, BATTERY)
    with torch.no_grad():
        got_img, got_txt = model.encode_image(images), model.encode_text(BATTERY)
    torch.testing.assert_close(got_img, want_img, rtol=0, atol=1e-4)
    torch.testing.assert_close(got_txt, want_txt, rtol=0, atol=1e-4)

    out = export_hf(model, run_cfg, tmp_path / "export")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torchvision fallback notice
        again = AutoModel.from_pretrained(str(out)).eval()
        loaded = AutoProcessor.from_pretrained(str(out))
    image_proc = AutoImageProcessor.from_pretrained(str(out))
    assert type(image_proc).__name__.startswith("CLIP" if family == "clip" else "Siglip")
    exp_img, exp_txt = hf_encode(again, loaded.tokenizer, loaded.image_processor, images, BATTERY)
    torch.testing.assert_close(exp_img, got_img, rtol=0, atol=1e-4)
    torch.testing.assert_close(exp_txt, got_txt, rtol=0, atol=1e-4)


def test_a_processor_polysense_cannot_reproduce_is_refused(tmp_path, clip_tok_dir):  # noqa: F811
    from polysense.errors import PolysenseError

    _hf, _tok, _, directory = build("clip-vit-b32", tmp_path, clip_tok_dir)
    CLIPImageProcessorPil(
        size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}
    ).save_pretrained(directory)
    with pytest.raises(PolysenseError, match=r"preprocessor_config.json.*shortest_edge"):
        import_hf(directory)
    CLIPImageProcessorPil(size={"shortest_edge": 224}, resample=2).save_pretrained(directory)
    with pytest.raises(PolysenseError, match="resample=2"):
        import_hf(directory)
