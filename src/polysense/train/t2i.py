"""Training loop of the text-to-image diffusion model (presets/t2i.py), top to bottom.

The batch, the timesteps, the noise and the condition dropout of step `s` are all drawn from a
generator seeded by (seed, s), so a run resumed from `state.pt` repeats the uninterrupted one
bit for bit. The text tower is frozen and only read; the U-Net and its EMA copy are trained.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polysense.errors import DataError, PolysenseError


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


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to `min_ratio * lr` at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1 - decay)


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
    from polysense.models.clip import load_model
    from polysense.models.diffusion import (
        TextCondition,
        TextToImage,
        UNet,
        diffusion_loss,
        from_uint8,
        save_generator,
    )
    from polysense.train.checkpoint import load_state, save_state, trim_metrics
    from polysense.train.loop import StepLog

    tc = cfg.train
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    state = load_state(out) if resume else None
    # On resume the tower comes from the run's own copy, so a moved text_ckpt does not matter.
    text_src = out / "text" if state is not None and (out / "text").is_dir() else cfg.text_ckpt
    clip = load_model(text_src)
    if not hasattr(clip, "text"):
        raise PolysenseError(f"text_ckpt={cfg.text_ckpt}: not a polysense CLIP checkpoint")
    text = TextCondition(clip=clip)
    model_cfg = dataclasses.replace(cfg.model, text_width=text.width)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    if pairs is None:
        pairs = load_data(
            data, split="train", image_size=model_cfg.image_size, tokenizer=clip.tokenizer
        )
    if len(pairs.images) < 1:
        raise DataError(f"{data}: no training images")

    torch.manual_seed(tc.seed)
    unet = UNet(cfg=model_cfg)
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    start, elapsed_before = 0, 0.0
    if state is not None:
        unet.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed_before = state["step"], state["elapsed"]
        trim_metrics(out, start)
    else:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    weights = torch.where(pairs.n_objects == 1, tc.single_weight, 1.0).double()  # (N,)

    def save(step: int, seconds: float) -> None:
        save_state(
            out,
            {
                "step": step,
                "model": unet.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "elapsed": seconds,
            },
        )
        save_generator(TextToImage(unet=ema, text=text), cfg, out)

    t0 = time.perf_counter()
    log = StepLog(train=tc, out=out, start=start, elapsed_before=elapsed_before, progress=progress)
    loss_value, step, stopped = math.nan, start, False
    unet.train()
    with log:
        for step in range(start, tc.steps):
            if tc.max_minutes and elapsed_before + time.perf_counter() - t0 >= tc.max_minutes * 60:
                stopped = True
                break
            gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)
            idx = torch.multinomial(weights, tc.batch_size, replacement=True, generator=gen)
            pick = (torch.rand(tc.batch_size, generator=gen) * pairs.n_caps[idx]).long()
            x0 = from_uint8(pairs.images[idx])  # (B, 3, S, S) in [-1, 1]
            cond = text(pairs.ids[pairs.offsets[idx] + pick])
            # Under a time budget the decay follows whichever runs out first, steps or time,
            # so a run cut short by the clock still ends annealed (as in train/loop.py).
            sched = step
            if tc.max_minutes and step >= tc.warmup_steps:
                used = (elapsed_before + time.perf_counter() - t0) / (tc.max_minutes * 60)
                sched = max(step, int(used * tc.steps))
            lr = lr_at(
                sched, lr=tc.lr, warmup=tc.warmup_steps, total=tc.steps, min_ratio=tc.min_lr_ratio
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = diffusion_loss(unet, x0, *cond, generator=gen)
            if not torch.isfinite(loss):
                raise PolysenseError(
                    f"loss is {loss.item()} at step {step}; lower train.lr (now {tc.lr})"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(unet.parameters(), tc.grad_clip or math.inf)
            optimizer.step()
            ema_update(ema, unet, min(tc.ema_decay, (1 + step) / (10 + step)))
            loss_value = loss.item()
            done = step + 1
            if log.due(done):
                log.write(done, loss=loss_value, lr=lr)
            if tc.ckpt_every and done % tc.ckpt_every == 0 and done < tc.steps:
                save(done, elapsed_before + time.perf_counter() - t0)
        else:
            step = tc.steps
    seconds = elapsed_before + time.perf_counter() - t0
    save(step, seconds)
    return {
        "train_steps": step,
        "train_seconds": seconds,
        "final_loss": loss_value,
        "train_samples_per_s": (step - start) * tc.batch_size / max(time.perf_counter() - t0, 1e-9),
        "stopped_early": stopped,
    }


def run_t2i(
    cfg: Any, *, data: Path, out: Path, resume: bool, eval_splits: tuple[str, ...]
) -> dict[str, Any]:
    """The `polysense train t2i-*` runner: train, evaluate when `eval.clip` is set, write
    OUT/metrics.json."""
    from polysense.cli import console
    from polysense.config import to_dict
    from polysense.fileio import atomic_write_json

    summary = train_t2i(cfg, data=data, out=out, resume=resume)
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
