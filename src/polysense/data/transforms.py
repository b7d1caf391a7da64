"""Image preprocessing with Pillow + numpy (no torchvision): PIL images -> normalised tensors.

The recipe is CLIP's: convert to RGB, resize the shorter side to `size` with bicubic filtering,
centre-crop to a square, scale to [0, 1] and normalise per channel; or SigLIP's, which resizes to
`size` x `size` without cropping (`resize="square"`). Both equal transformers' PIL image
processors (CLIPImageProcessor, SiglipImageProcessor) step for step: transparency composited
onto white, Pillow's bicubic `resize` with no reducing gap, the same integer crop offsets. Images that already
have the model's size are not resampled (Pillow returns a copy).

Training augmentations (`Augment`, all off by default, the `data.*` config fields): a random
resized crop, colour jitter, and a horizontal flip that skips every sample whose captions name a
side ("left of" would stop being true). Each draws from the generator it is given, so a batch
stays a pure function of (seed, step).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance

from polysense.errors import DataError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def to_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB, any transparency (an alpha band, a palette's transparent index)
    composited onto white, as transformers' `convert_to_rgb` does; RGB images pass unchanged."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` (bicubic, aspect kept), then crop the centre square."""
    image = to_rgb(image)
    w, h = image.size
    if (w, h) == (size, size):
        return image
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    image = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """Resize to `size` x `size` (bicubic), the aspect ratio not kept: SigLIP's preprocessing."""
    return to_rgb(image).resize((size, size), resample=Image.Resampling.BICUBIC)


RESIZERS = {"shortest_edge": resize_center_crop, "square": resize_square}


def random_resized_crop(
    image: Image.Image,
    *,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.6, 1.0),
) -> Image.Image:
    """Crop a random square covering a `scale` fraction of the shorter side's square area, resize."""
    image = to_rgb(image)
    w, h = image.size
    frac = float(rng.uniform(scale[0], scale[1]))
    side = max(1, round(min(w, h) * frac**0.5))
    left = int(rng.integers(0, w - side + 1))
    top = int(rng.integers(0, h - side + 1))
    crop = image.crop((left, top, left + side, top + side))
    if crop.size == (size, size):
        return crop
    return crop.resize((size, size), resample=Image.Resampling.BICUBIC)


SIDES = re.compile(r"\b(left|right)(most|wards?)?\b", re.IGNORECASE)


def names_a_side(captions: Sequence[str]) -> bool:
    """Whether any caption says left or right (a flip would make it false)."""
    return any(SIDES.search(c) for c in captions)


@dataclass(frozen=True, kw_only=True)
class Augment:
    """Training augmentations; the defaults turn every one off.

    `crop_scale_min` < 1: a random square crop covering [crop_scale_min, 1] of the shorter
    side's square (replacing the model's resize); `jitter` > 0: brightness, contrast and
    saturation each scaled by a factor in [1 - jitter, 1 + jitter]; `flip`: mirror with
    probability 1/2 unless a caption names a side."""

    crop_scale_min: float = 1.0
    jitter: float = 0.0
    flip: bool = False

    @property
    def active(self) -> bool:
        return self.crop_scale_min < 1.0 or self.jitter > 0 or self.flip


def train_image(
    image: Image.Image,
    *,
    size: int,
    resize: str,
    augment: Augment,
    rng: np.random.Generator,
    captions: Sequence[str],
) -> np.ndarray:
    """One training image as uint8 (size, size, 3): the model's resize, or the augmentations of
    `augment` drawn from `rng` (with everything off, exactly the resize `collect_pairs` does)."""
    if augment.crop_scale_min < 1.0:
        image = random_resized_crop(image, size=size, rng=rng, scale=(augment.crop_scale_min, 1.0))
    else:
        image = RESIZERS[resize](image, size)
    if augment.jitter > 0:
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            factor = float(rng.uniform(1 - augment.jitter, 1 + augment.jitter))
            image = enhancer(image).enhance(factor)
    if augment.flip and not names_a_side(captions) and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(image, dtype=np.uint8)


def images_to_tensor(
    images: Sequence[Image.Image],
    *,
    size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    resize: str = "shortest_edge",
) -> torch.Tensor:
    """PIL images -> float32 tensor (B, 3, size, size), normalised with `mean`/`std`, resized by
    `resize` ("shortest_edge": shorter side + centre crop; "square": both sides)."""
    if resize not in RESIZERS:
        raise DataError(f"resize={resize!r}: use one of {', '.join(RESIZERS)}")
    resizer = RESIZERS[resize]
    if len(images) == 0:
        raise DataError("images_to_tensor got an empty list of images")
    arrays = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise DataError(
                f"image {i} is a {type(image).__name__}, not a PIL image; open files with "
                "PIL.Image.open(path) or pass a (B, 3, H, W) tensor instead"
            )
        arrays.append(np.asarray(resizer(image, size), dtype=np.float32))
    x = np.stack(arrays) / 255.0  # (B, H, W, 3)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # (B, 3, H, W)


def normalize(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W), scaled to [0, 1] then standardised."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W)
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub_(m).div_(s).contiguous()


def tile_pixels(
    strips: torch.Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """uint8 (B, H, k*H, 3) strips (the world's OCR text) -> normalised tiles (B, k, 3, H, H),
    left to right: the tensors `VLM.pixels` makes of the same strips as PIL images."""
    b, h, w, _ = strips.shape
    k = w // size
    tiles = strips.reshape(b, h, k, size, 3).permute(0, 2, 1, 3, 4).reshape(b * k, h, size, 3)
    return normalize(tiles, mean, std).reshape(b, k, 3, h, size)
