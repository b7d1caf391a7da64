"""Training loop of the text-to-image diffusion model (presets/t2i.py), top to bottom.

The batch, the timesteps, the noise and the condition dropout of step `s` are all drawn from a
generator seeded by (seed, s), so a run resumed from `state.pt` repeats the uninterrupted one
bit for bit. The text tower is frozen and only read; the U-Net and its EMA copy are trained.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polysense.errors import DataError, PolysenseError
from polysense.train.checkpoint import load_state
from polysense.train.fit import fit
from polysense.train.task import Runtime, Task


@dataclass
class T2IData:
    """Images (N, S, S, 3) uint8, caption ids (M, L) of all captions, the first caption row of
    each image (N,), its caption count (N,), and its number of objects (N,; 0 when unknown)."""

    images: torch.Tensor
    ids: torch.Tensor
    offsets: torch.Tensor
    n_caps: torch.Tensor
    n_objects: torch.Tensor


def load_data(data: str | Path, *, split: str | None, image_size: int, tokenizer: Any) -> T2IData:
    """Image-caption samples of any readable source (a world's `split`) into memory."""
    import numpy as np

    from polysense.data.readers import Rejects, detect_format, read_samples
    from polysense.data.transforms import resize_center_crop

    split = split if detect_format(data) == "world" else None
    arrays, captions, counts = [], [], []
    with Rejects(path=None) as rejects:
        for sample in read_samples(data, split=split, rejects=rejects):
            texts = [t for t in sample.get("text") or [] if t and t.strip()]
            if sample.get("image") is None or not texts:
                continue
            arrays.append(np.asarray(resize_center_crop(sample["image"], image_size)))
            captions.append(texts)
            counts.append(len(sample.get("objects") or []))
    if not arrays:
        raise DataError(f"{data}: no samples with both an image and a caption")
    ids, _ = tokenizer.encode([c for caps in captions for c in caps])
    n_caps = torch.tensor([len(c) for c in captions])
    return T2IData(
        images=torch.from_numpy(np.stack(arrays)),
        ids=ids,
        offsets=torch.cumsum(n_caps, 0) - n_caps,
        n_caps=n_caps,
        n_objects=torch.tensor(counts),
    )


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1 - decay)


class T2IBatches:
    """The batch of step `s` (images in [-1, 1], caption ids, the generator that then draws
    the step's timesteps and noise), all from a generator seeded by (seed, s); single-object
    scenes are drawn `single_weight` times as often."""

    def __init__(self, *, data: T2IData, batch_size: int, seed: int, single_weight: float) -> None:
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.weights = torch.where(data.n_objects == 1, single_weight, 1.0).double()  # (N,)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        from polysense.models.diffusion import from_uint8

        d = self.data
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        idx = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=gen)
        pick = (torch.rand(self.batch_size, generator=gen) * d.n_caps[idx]).long()
        x0 = from_uint8(d.images[idx])  # (B, 3, S, S) in [-1, 1]
        return x0, d.ids[d.offsets[idx] + pick], gen  # ids (B, L)


class T2ITask(Task):
    """Denoising loss of the U-Net under a frozen text condition; an EMA copy follows the
    weights after every step and is what the checkpoint exports."""

    def __init__(self, *, cfg: Any, unet: nn.Module, text: nn.Module) -> None:
        self.run_cfg, self.cfg = cfg, cfg.train
        self.model, self.text = unet, text
        self.ema = copy.deepcopy(unet).requires_grad_(False)

    def attach(self, rt: Runtime) -> None:
        super().attach(rt)
        self.text.to(rt.device)
        self.ema.to(rt.device)

    def param_groups(self) -> list[dict]:
        tc = self.cfg
        params = list(self.model.parameters())
        return [{"params": params, "weight_decay": tc.weight_decay, "base_lr": tc.lr}]

    def loss(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        from polysense.models.diffusion import diffusion_loss

        x0, ids, gen = batch
        cond = self.text(ids.to(self.rt.device))
        with self.rt.autocast():
            loss = diffusion_loss(self.net, x0.to(self.rt.device), *cond, generator=gen)
        return loss.float(), {}

    def after_step(self, step: int) -> None:
        ema_update(self.ema, self.model, min(self.cfg.ema_decay, (1 + step) / (10 + step)))

    def extra_state(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state["ema"])

    def export(self, out: Path) -> None:
        from polysense.models.checkpoint import save_generator
        from polysense.models.diffusion import TextToImage

        save_generator(TextToImage(unet=self.ema, text=self.text), self.run_cfg, out)


def train_t2i(
    cfg: Any,
    *,
    data: str | Path,
    out: Path,
    resume: bool = False,
    progress: bool = True,
    pairs: T2IData | None = None,
) -> dict[str, Any]:
    """Train `cfg` (a T2IRunConfig) on the captioned images at `data`; writes `state.pt`,
    `metrics.jsonl` and the inference checkpoint (`config.json`, `model.safetensors`, `text/`)
    to `out`. Returns a summary (steps, seconds, final loss, samples/s, stopped_early)."""
    from polysense.models.checkpoint import load_model
    from polysense.models.diffusion import TextCondition, UNet

    tc = cfg.train
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if resume:
        load_state(out)  # a missing or foreign state.pt fails here, before any work
    # On resume the tower comes from the run's own copy, so a moved text_ckpt does not matter.
    text_src = out / "text" if resume and (out / "text").is_dir() else cfg.text_ckpt
    clip = load_model(text_src)
    if not hasattr(clip, "text"):
        raise PolysenseError(f"text_ckpt={cfg.text_ckpt}: not a polysense CLIP checkpoint")
    text = TextCondition(clip=clip)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, text_width=text.width))
    if pairs is None:
        pairs = load_data(
            data, split="train", image_size=cfg.model.image_size, tokenizer=clip.tokenizer
        )
    if len(pairs.images) < 1:
        raise DataError(f"{data}: no training images")
    torch.manual_seed(tc.seed)
    task = T2ITask(cfg=cfg, unet=UNet(cfg=cfg.model), text=text)
    batches = T2IBatches(
        data=pairs, batch_size=tc.batch_size, seed=tc.seed, single_weight=tc.single_weight
    )
    result = fit(task, tc, data=batches, out=out, resume=resume, progress=progress)
    return {
        "train_steps": result.steps,
        "train_seconds": result.seconds,
        "final_loss": result.final_loss,
        "train_samples_per_s": result.train_samples_per_s,
        "stopped_early": result.stopped_early,
    }


def run_t2i(
    cfg: Any, *, data: Path, out: Path, resume: bool, eval_splits: tuple[str, ...]
) -> dict[str, Any]:
    """The `polysense train t2i-*` runner: train, evaluate when `eval.clip` is set, write
    OUT/metrics.json."""
    from rich.console import Console

    from polysense.config import to_dict
    from polysense.fileio import atomic_write_json

    summary = train_t2i(cfg, data=data, out=out, resume=resume)
    console = Console(soft_wrap=True)
    console.print(
        f"trained {summary['train_steps']} steps in {summary['train_seconds']:.0f} s "
        f"({summary['train_samples_per_s']:.0f} samples/s); final loss {summary['final_loss']:.4f}"
        + (" (stopped at the time budget)" if summary["stopped_early"] else "")
    )
    metrics: dict[str, Any] = {}
    if cfg.eval.clip and eval_splits:
        from polysense.eval.t2i import evaluate_t2i

        metrics = evaluate_t2i(
            ckpt=out,
            clip=Path(cfg.eval.clip),
            data=str(data),
            splits=eval_splits,
            limit=cfg.eval.limit,
            steps=cfg.eval.steps,
            guidance=cfg.eval.guidance,
        )
    metrics |= summary | {"config": to_dict(cfg)}
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
