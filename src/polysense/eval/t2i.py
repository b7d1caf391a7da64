"""Text-to-image evaluation with a separately trained aligned encoder as the judge.

For single-object prompts of a world split (test, test_novel) a generator draws one image per
prompt, with classifier-free guidance and without it (guidance 1 = the conditional model alone),
and a scoring checkpoint (a polysense CLIP/SigLIP that is *not* the generator's text tower) says:

- attribute accuracy: the fraction of images whose object has the prompt's colour *and* shape.
  The attributes are read by two linear probes on the scorer's image embeddings (colour from the
  image, shape from the object's silhouette), fit on real single-object train images; their
  accuracy on the real images of the same split is reported beside (`probe_accuracy_real`) so
  the judge is validated where it judges.
- CLIP score: mean max(cos(image, prompt), 0) in the scorer's space (CLIPScore with w = 1).
- fid_embed: the Fréchet distance between Gaussians fit to the scorer's image embeddings of the
  generated and the real images (FID with a polysense encoder instead of Inception); the same
  distance between the real split and real val images (`fid_embed_real`) is the floor.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from polysense.errors import PolysenseError

SWEEP = (0.0, 1.0, 3.0, 5.0, 7.0)


# ---------------------------------------------------------------------------------------------
# Fréchet distance


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians (as in FID).

    The matrix square root is scipy's; a tiny imaginary part from round-off is dropped, and a
    singular product (fewer samples than dimensions) gets the usual eps offset on the diagonal."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise PolysenseError(
            f"Fréchet distance needs means (D,) and covariances (D, D) of one size; got "
            f"{mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape}"
        )
    with warnings.catch_warnings():  # singular with fewer samples than dims; handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(mu1)) * 1e-6
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid_embed(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fit to embeddings a (N, D) and b (M, D)."""
    x, y = a.double().numpy(), b.double().numpy()
    return frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))


# ---------------------------------------------------------------------------------------------
# prompts, real images, the attribute probes


@dataclass
class Scenes:
    """Single-object scenes: images (N, S, S, 3) uint8, one prompt each, colour/shape indices."""

    images: torch.Tensor
    prompts: list[str]
    colors: torch.Tensor
    shapes: torch.Tensor


def single_object_scenes(data: str, split: str, limit: int) -> Scenes:
    """The first `limit` one-object scenes of a world split; scene i is prompted with its
    caption i mod (number of captions), so every caption style is used."""
    from polysense.data.readers import detect_format, read_samples
    from polysense.data.world import COLORS, SHAPES

    if detect_format(data) != "world":
        raise PolysenseError(
            f"{data}: eval t2i needs a polysense world (objects with known colour and shape); "
            "generate one with `polysense world generate --out DIR`"
        )
    colors, shapes = list(COLORS), list(SHAPES)
    images, prompts, cs, ss = [], [], [], []
    for sample in read_samples(data, split=split):
        objects = sample.get("objects") or []
        captions = sample.get("text") or []
        if len(objects) != 1 or not captions or sample.get("image") is None:
            continue
        images.append(np.asarray(sample["image"].convert("RGB")))
        prompts.append(captions[len(prompts) % len(captions)])
        cs.append(colors.index(objects[0]["color"]))
        ss.append(shapes.index(objects[0]["shape"]))
        if len(prompts) >= limit:
            break
    if not prompts:
        raise PolysenseError(f"{data} (split {split}): no single-object scenes")
    return Scenes(
        images=torch.from_numpy(np.stack(images)),
        prompts=prompts,
        colors=torch.tensor(cs),
        shapes=torch.tensor(ss),
    )


@torch.no_grad()
def encode_uint8(scorer: Any, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """uint8 images (N, S, S, 3) -> the scorer's unit image embeddings (N, D)."""
    from polysense.data.loader import normalize

    v = scorer.cfg.vision
    if images.shape[1] != v.image_size:
        x = F.interpolate(images.permute(0, 3, 1, 2).float(), size=v.image_size, mode="bilinear")
        images = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    out = [
        scorer.encode_image(normalize(images[i : i + batch_size], v.image_mean, v.image_std))
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out).float().cpu()


def fit_linear_probe(
    features: torch.Tensor, labels: torch.Tensor, classes: int, *, l2: float = 1e-3
) -> torch.nn.Linear:
    """Multinomial logistic regression (L2-regularised, full-batch L-BFGS) -> a Linear layer."""
    torch.manual_seed(0)
    probe = torch.nn.Linear(features.shape[1], classes)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(probe(features), labels) + l2 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe.requires_grad_(False)


def silhouette(images: torch.Tensor, *, color: str = "red", threshold: int = 48) -> torch.Tensor:
    """uint8 images (N, S, S, 3) -> the same scenes with every object pixel (farther than
    `threshold` from the world's background grey in some channel) painted one colour and the
    rest plain background: the shape without its colour."""
    from polysense.data.world import BACKGROUND, COLORS

    fg = (images.int() - BACKGROUND).abs().amax(-1) > threshold  # (N, S, S)
    out = torch.full_like(images, BACKGROUND)
    out[fg] = torch.tensor(COLORS[color], dtype=torch.uint8)
    return out


@dataclass
class AttributeProbe:
    """Colour and shape read by two linear probes on the judge's image embeddings: colour from
    the image, shape from its silhouette painted red (a colour the judge saw with every shape),
    so that the unseen colour-shape pairs of test_novel are read as well as the seen ones (a
    shape probe on the raw image read 53 % of real test_novel shapes, 99 % of test ones)."""

    color: torch.nn.Linear
    shape: torch.nn.Linear

    def predict(self, scorer: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (N, S, S, 3) -> (colour indices (N,), shape indices (N,))."""
        color = self.color(encode_uint8(scorer, images)).argmax(-1)
        shape = self.shape(encode_uint8(scorer, silhouette(images))).argmax(-1)
        return color, shape


def fit_attribute_probe(scorer: Any, data: str, *, n: int = 1500) -> AttributeProbe:
    """Fit the probes on up to `n` real single-object images of the world's train split."""
    from polysense.data.world import COLORS, SHAPES

    train = single_object_scenes(data, "train", n)
    return AttributeProbe(
        color=fit_linear_probe(encode_uint8(scorer, train.images), train.colors, len(COLORS)),
        shape=fit_linear_probe(
            encode_uint8(scorer, silhouette(train.images)), train.shapes, len(SHAPES)
        ),
    )


# ---------------------------------------------------------------------------------------------
# evaluation


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_scorer(clip: Path | None, ckpt: Path) -> Any:
    """The scoring checkpoint; refused when missing or identical to the generator's text tower."""
    from polysense.models.checkpoint import load_model

    if clip is None:
        raise PolysenseError(
            "eval t2i needs --clip CLIPCKPT: a polysense CLIP/SigLIP trained separately from the "
            "generator's text tower (e.g. `polysense train clip-tiny --set train.seed=1 ...`)"
        )
    tower, judge = Path(ckpt) / "text" / "model.safetensors", Path(clip) / "model.safetensors"
    if tower.is_file() and judge.is_file() and _sha(tower) == _sha(judge):
        raise PolysenseError(
            f"--clip {clip} has the same weights as the generator's text tower ({tower}); a judge "
            "must be trained separately: train another with a different train.seed"
        )
    return load_model(clip).eval()


def _scores(
    scorer: Any,
    probe: AttributeProbe,
    images: torch.Tensor,
    emb: torch.Tensor,
    text: torch.Tensor,
    scenes: Scenes,
) -> dict[str, float]:
    color, shape = probe.predict(scorer, images)
    c_ok, s_ok = color == scenes.colors, shape == scenes.shapes
    return {
        "attribute_accuracy": float((c_ok & s_ok).float().mean()),
        "color_accuracy": float(c_ok.float().mean()),
        "shape_accuracy": float(s_ok.float().mean()),
        "clip_score": float((emb * text).sum(-1).clamp(min=0).mean()),
    }


def evaluate_split(
    generator: Any,
    scorer: Any,
    probe: AttributeProbe,
    scenes: Scenes,
    reference: torch.Tensor,
    *,
    guidances: Sequence[float],
    steps: int,
    seed: int,
    progress: bool = True,
) -> dict[float | str, dict[str, float]]:
    """Scores per guidance scale, plus "real" (the judge on the real images of the scenes)."""
    from polysense.eval.zeroshot import progress_bar

    with torch.no_grad():
        text = F.normalize(scorer.encode_text(scenes.prompts).float().cpu(), dim=-1)  # (N, D)
    real = encode_uint8(scorer, scenes.images)
    out: dict[float | str, dict[str, float]] = {
        "real": _scores(scorer, probe, scenes.images, real, text, scenes)
        | {"fid_embed": fid_embed(real, reference)}
    }
    for g in guidances:
        with progress_bar(progress, f"generate (guidance {g:g})") as advance:
            images = generator.generate(
                scenes.prompts, steps=steps, guidance=g, seed=seed, callback=advance
            )
        emb = encode_uint8(scorer, images)
        out[g] = _scores(scorer, probe, images, emb, text, scenes) | {
            "fid_embed": fid_embed(emb, real)
        }
    return out


def evaluate_t2i(
    *,
    ckpt: Path,
    clip: Path | None,
    data: str,
    splits: Sequence[str] = ("test", "test_novel"),
    limit: int = 200,
    steps: int = 25,
    guidance: float = 3.0,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Metrics of splits[0] at the top level and of each other split under its name: keys
    attribute_accuracy(_unguided), color/shape_accuracy(_unguided), clip_score(_unguided,
    _real), fid_embed(_unguided, _real), probe_accuracy_real, n_prompts."""
    from polysense.models.checkpoint import load_generator

    generator = load_generator(ckpt)
    scorer = load_scorer(clip, ckpt)
    probe = fit_attribute_probe(scorer, data)
    metrics: dict[str, Any] = {}
    for i, split in enumerate(dict.fromkeys(splits)):
        scenes = single_object_scenes(data, split, limit)
        reference = encode_uint8(
            scorer, single_object_scenes(data, "val", len(scenes.prompts)).images
        )
        res = evaluate_split(
            generator,
            scorer,
            probe,
            scenes,
            reference,
            guidances=(guidance, 1.0),
            steps=steps,
            seed=seed,
            progress=progress,
        )
        row = dict(res[guidance])
        row |= {f"{k}_unguided": v for k, v in res[1.0].items()}
        row |= {
            "probe_accuracy_real": res["real"]["attribute_accuracy"],
            "clip_score_real": res["real"]["clip_score"],
            "fid_embed_real": res["real"]["fid_embed"],
            "n_prompts": len(scenes.prompts),
        }
        if i == 0:
            metrics |= row | {"split": split}
        else:
            metrics[split] = row
    metrics |= {"guidance": guidance, "steps": steps, "seed": seed, "clip": str(clip)}
    return metrics


def guidance_sweep(
    *,
    ckpt: Path,
    clip: Path | None,
    data: str,
    splits: Sequence[str] = ("test", "test_novel"),
    scales: Sequence[float] = SWEEP,
    limit: int = 64,
    steps: int = 25,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One row per (split, guidance scale): attribute accuracy, CLIP score, fid_embed."""
    from polysense.models.checkpoint import load_generator

    generator = load_generator(ckpt)
    scorer = load_scorer(clip, ckpt)
    probe = fit_attribute_probe(scorer, data)
    rows = []
    for split in splits:
        scenes = single_object_scenes(data, split, limit)
        reference = encode_uint8(
            scorer, single_object_scenes(data, "val", len(scenes.prompts)).images
        )
        res = evaluate_split(
            generator,
            scorer,
            probe,
            scenes,
            reference,
            guidances=scales,
            steps=steps,
            seed=seed,
            progress=progress,
        )
        for g in scales:
            rows.append({"split": split, "guidance": g, **res[g], "n_prompts": len(scenes.prompts)})
    return rows


def eval_task(
    *,
    ckpt: Path,
    data: str,
    split: str | None,
    batch_size: int,
    limit: int | None,
    clip: Path | None,
) -> dict[str, Any]:
    """`polysense eval t2i`: `split` (default test) at the top level, test_novel under its name."""
    del batch_size  # generation batches are fixed by the generator
    first = split or "test"
    splits = (first, "test_novel") if first != "test_novel" else ("test_novel",)
    return evaluate_t2i(ckpt=ckpt, clip=clip, data=data, splits=splits, limit=limit or 200)
