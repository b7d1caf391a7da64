"""The training loop, written out top to bottom (nanoGPT style), for every contrastive preset.

    result = train(get_preset("clip-tiny"), data="runs/world", out=Path("runs/clip-tiny"))

Single process on CPU by default; under `torchrun --nproc_per_node N` the same function runs
DistributedDataParallel (gloo on CPU, NCCL on GPU) with cross-process negatives in the loss and
each rank taking its slice of every global batch. `resume=True` continues from `state.pt` and
reproduces the uninterrupted run bit for bit: the batch at step s depends only on (seed, s).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from polysense.config import RunConfig, to_dict
from polysense.data.loader import (
    PairBatches,
    PairData,
    TowerBatches,
    TowerData,
    load_pairs,
    load_towers,
)
from polysense.data.readers import detect_format
from polysense.data.tokenizer import HF_TOKENIZER_FILES, Tokenizer
from polysense.errors import PolysenseError
from polysense.fileio import atomic_write_json
from polysense.losses import ContrastiveLoss
from polysense.precision import resolve_precision
from polysense.train.checkpoint import append_metrics, load_state, save_state, trim_metrics
from polysense.train.fit import device_for, distributed
from polysense.train.log import StepLog
from polysense.train.optim import build_optimizer, lr_factor, set_lr


@dataclass
class TrainResult:
    out: Path
    steps: int
    final_loss: float
    train_samples_per_s: float
    seconds: float
    skipped_steps: int
    stopped_early: bool  # a time budget (max_minutes) or limit (time_limit_minutes) ended it


def load_init(path: str) -> nn.Module:
    """The model `train.init` names (a polysense checkpoint or a Hugging Face CLIP/SigLIP
    directory), on the CPU, with its tokenizer; a clear error when it cannot start a run."""
    from polysense.models.clip import load_model

    try:
        model = load_model(path)
    except PolysenseError as exc:
        raise PolysenseError(f"train.init={path}: {exc}") from None
    if tuple(model.cfg.towers) != ("image", "text"):
        raise PolysenseError(
            f"train.init={path}: a {','.join(model.cfg.towers)} model; --init starts image-text "
            "models only"
        )
    if model.tokenizer is None:
        raise PolysenseError(
            f"train.init={path} has no tokenizer polysense can read, and the text tower knows "
            "only its ids; add the model's tokenizer files (tokenizer.json, spiece.model ...)"
        )
    return model


def build_tokenizer(cfg: RunConfig, captions: list[list[str]]) -> Tokenizer:
    text = cfg.model.text
    if text.pretrained == "minilm":
        return Tokenizer.minilm(context_length=text.context_length)
    flat = (c for caps in captions for c in caps)
    return Tokenizer.train(flat, vocab_size=text.vocab_size, context_length=text.context_length)


def _towers(model: nn.Module) -> dict[str, nn.Module]:
    found = {"image": getattr(model, "visual", None), "text": getattr(model, "text", None)}
    return {name: tower for name, tower in found.items() if tower is not None}


def _set_locked(model: nn.Module, tower: str, locked: bool) -> None:
    if tower not in _towers(model):
        return
    for p in _towers(model)[tower].parameters():
        p.requires_grad_(not locked)


def _autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast when `precision` ("auto", "fp32", "bf16") resolves to bf16 on `device`."""
    bf16 = resolve_precision(precision, device) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _embed(model: nn.Module, images: torch.Tensor, ids: torch.Tensor, precision: str):
    """Forward under optional bf16 autocast; embeddings come back in float32 for the loss."""
    with _autocast(images.device, precision):
        out = model(images, ids)
    return out["image_embeds"].float(), out["text_embeds"].float(), out


def _tower_loss(
    net: nn.Module,
    loss_fn: ContrastiveLoss,
    inputs: dict[str, torch.Tensor],
    pairs: tuple[tuple[str, str], ...],
    precision: str,
) -> torch.Tensor:
    """Sum of the contrastive losses of the aligned modality pairs (one shared temperature).

    `inputs["hard_text"]` (B, H, L), when present, holds captions that belong to each video and
    must score below its own (`train.hard_negatives`): they go through the text tower in the
    same forward as the batch's captions and join the video-text loss only."""
    inputs = dict(inputs)
    hard_ids = inputs.pop("hard_text", None)  # (B, H, L)
    if hard_ids is not None:
        n, h = hard_ids.shape[:2]
        inputs["text"] = torch.cat([inputs["text"], hard_ids.flatten(0, 1)])  # (B + B H, L)
    device = next(iter(inputs.values())).device
    with _autocast(device, precision):
        out = net(inputs=inputs)
    emb = {m: e.float() for m, e in out["embeds"].items()}
    scale, bias = out["logit_scale"].log(), out["logit_bias"]
    if hard_ids is None:
        return sum(loss_fn(emb[a], emb[b], scale, bias) for a, b in pairs)
    hard = emb["text"][n:].view(n, h, -1)  # (B, H, D)
    emb["text"] = emb["text"][:n]  # (B, D)
    return sum(
        loss_fn(emb["video"], emb["text"], scale, bias, hard)  # the video is the row side
        if {a, b} == {"video", "text"}
        else loss_fn(emb[a], emb[b], scale, bias)
        for a, b in pairs
    )


def train(
    cfg: RunConfig,
    *,
    data: str | Path,
    out: Path,
    resume: bool = False,
    progress: bool = True,
    pairs: PairData | TowerData | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
) -> TrainResult:
    """Train `cfg` on the image-caption pairs at `data` (any supported source; a world's train
    split), writing `state.pt`, `metrics.jsonl` and the exported model to `out`.

    `evaluate(model) -> {name: value}` runs every `train.eval_every` steps on rank 0 and its
    figures join `metrics.jsonl` (e.g. validation zero-shot accuracy as training goes).

    A model with other towers than image + text (`model.towers`, e.g. audio,text or
    image,text,audio) trains the same way on `TowerData`: each step sums the contrastive loss of
    every aligned pair (`ModelConfig.loss_pairs`, image as the anchor beyond two towers)."""
    from polysense.models.clip import CLIP, save_checkpoint

    tc = cfg.train
    rank, world = distributed()
    device = device_for(rank)
    out = Path(out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    init = None
    if tc.init:  # its architecture and tokenizer replace the preset's model; weights come below
        init = load_init(tc.init)
        cfg = dataclasses.replace(cfg, model=init.cfg)
    if tc.grad_accum < 1 or tc.batch_size % tc.grad_accum:
        raise PolysenseError(
            f"train.grad_accum={tc.grad_accum} must be >= 1 and divide train.batch_size="
            f"{tc.batch_size}"
        )
    multi = tuple(cfg.model.towers) != ("image", "text")
    if multi and tc.grad_accum > 1:
        raise PolysenseError(
            f"train.grad_accum > 1 supports image-text models only (towers: "
            f"{','.join(cfg.model.towers)}); use 1 and a smaller train.batch_size"
        )
    if tc.hard_negatives != "none" and not any(
        {"video", "text"} == set(pair) for pair in cfg.model.loss_pairs()
    ):
        raise PolysenseError(
            f"train.hard_negatives={tc.hard_negatives} needs a video-text loss (towers "
            f"{','.join(cfg.model.towers)}); use towers video,text or train.hard_negatives=none"
        )
    if world > 1 and tc.grad_accum > 1:
        raise PolysenseError("train.grad_accum > 1 is not supported under torchrun yet; use 1")
    if world > 1 and max(tc.unlock_image_at, tc.unlock_text_at) >= 0:
        raise PolysenseError(
            "staged unfreezing (train.unlock_*_at) is not supported under torchrun yet: DDP fixes "
            "its trainable parameters at start; run it in one process or drop the unlock"
        )

    state = load_state(out) if resume else None
    if pairs is None and multi:
        pairs = load_towers(
            data,
            split="train" if detect_format(data) == "world" else None,
            model=cfg.model,
            image_key=cfg.data.image_key,
            caption_key=cfg.data.caption_key,
            rejects_path=out / "rejects.jsonl" if rank == 0 else None,
            limit=cfg.data.limit or None,
        )
    elif pairs is None:
        pairs = load_pairs(
            data,
            split="train" if detect_format(data) == "world" else None,
            image_size=cfg.model.vision.image_size,
            resize=cfg.model.vision.resize,
            image_key=cfg.data.image_key,
            caption_key=cfg.data.caption_key,
            rejects_path=out / "rejects.jsonl" if rank == 0 else None,
            limit=cfg.data.limit or None,
        )
    tokenizer: Tokenizer | None = None  # a model without a text tower has none
    if init is not None:
        tokenizer = init.tokenizer  # kept: the weights know only its ids
    elif "text" in cfg.model.towers:
        if state is not None and any((out / f).is_file() for f in HF_TOKENIZER_FILES):
            tokenizer = Tokenizer.from_file(out, context_length=cfg.model.text.context_length)
        else:
            tokenizer = build_tokenizer(cfg, pairs.captions)
        # The model's vocabulary is the tokenizer's (a BPE on little text may stop short).
        text_cfg = dataclasses.replace(cfg.model.text, vocab_size=tokenizer.vocab_size)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, text=text_cfg))

    torch.manual_seed(tc.seed)
    model = CLIP(cfg=cfg.model, tokenizer=tokenizer, inference_precision=tc.precision).to(device)
    if tc.grad_checkpointing:
        model.set_grad_checkpointing(True)
    optimizer = build_optimizer(model, tc)
    start_step, skipped, bad_in_a_row, elapsed_before = 0, 0, 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, skipped = state["step"], state["skipped_steps"]
        elapsed_before = state["elapsed"]
        torch.set_rng_state(state["rng"])
        if rank == 0:
            trim_metrics(out, start_step)
    else:
        if init is not None:
            model.load_state_dict(init.state_dict())
        if "video" in cfg.model.towers and cfg.model.video.init_from_image:
            model.video.load_image_weights(cfg.model.video.init_from_image)
        if rank == 0:
            (out / "metrics.jsonl").unlink(missing_ok=True)

    if multi != isinstance(pairs, TowerData):
        raise PolysenseError(
            f"towers {','.join(cfg.model.towers)} train on "
            f"{'TowerData (load_towers)' if multi else 'PairData (load_pairs)'}, "
            f"got {type(pairs).__name__}"
        )
    batches: PairBatches
    if multi:
        batches = TowerBatches(
            data=pairs,
            tokenizer=tokenizer,
            batch_size=tc.batch_size,
            seed=tc.seed,
            image_mean=cfg.model.vision.image_mean,
            image_std=cfg.model.vision.image_std,
            video_mean=cfg.model.video.image_mean,
            video_std=cfg.model.video.image_std,
            hard_negatives=tc.hard_negatives,
            rank=rank,
            world=world,
        )
    else:
        batches = PairBatches(
            data=pairs,
            tokenizer=tokenizer,
            batch_size=tc.batch_size,
            seed=tc.seed,
            mean=cfg.model.vision.image_mean,
            std=cfg.model.vision.image_std,
            rank=rank,
            world=world,
        )

    def apply_locks(step: int) -> None:
        for tower, locked, unlock_at in (
            ("image", tc.lock_image, tc.unlock_image_at),
            ("text", tc.lock_text, tc.unlock_text_at),
        ):
            _set_locked(model, tower, locked and not (0 <= unlock_at <= step))

    loss_fn = ContrastiveLoss(family=cfg.model.family, chunk=tc.loss_chunk, distributed=world > 1)
    net: nn.Module = model
    apply_locks(start_step)  # before DDP, which registers the trainable parameters once
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)

    def save(step: int, seconds: float) -> None:
        if rank != 0:
            return
        save_state(
            out,
            {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "skipped_steps": skipped,
                "elapsed": seconds,
                "rng": torch.get_rng_state(),
                "config": to_dict(cfg),
            },
        )
        save_checkpoint(model, cfg, out)

    t_start = time.perf_counter()
    log = StepLog(
        train=tc,
        out=out,
        start=start_step,
        elapsed_before=elapsed_before,
        progress=progress and rank == 0,
    )
    loss_value, step, stopped_early = float("nan"), start_step, False
    micro = tc.batch_size // world // tc.grad_accum
    with log:
        for step in range(start_step, tc.steps):
            # With a time budget the schedule follows whichever runs out first, steps or time,
            # so a run cut short by the clock still ends with an annealed learning rate.
            # `time_limit_minutes` only stops the run (a safety net); the schedule stays by step.
            schedule_step = step
            if tc.max_minutes or tc.time_limit_minutes:
                elapsed = torch.tensor([elapsed_before + time.perf_counter() - t_start])
                if world > 1:  # every rank must stop at the same step
                    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                if tc.max_minutes:
                    schedule_step = max(
                        step, int(elapsed.item() / (tc.max_minutes * 60) * tc.steps)
                    )
                if schedule_step >= tc.steps or (
                    tc.time_limit_minutes and elapsed.item() >= tc.time_limit_minutes * 60
                ):
                    stopped_early = True
                    if rank == 0:  # the bar shows where the schedule stopped (full on a budget)
                        log.bar.update(log.position(step, elapsed.item()))
                    break
            apply_locks(step)
            factor = lr_factor(  # warmup always counts real steps; the decay may follow time
                step if step < tc.warmup_steps else schedule_step,
                warmup=tc.warmup_steps,
                total=tc.steps,
                min_ratio=tc.min_lr_ratio,
            )
            set_lr(optimizer, factor)
            optimizer.zero_grad(set_to_none=True)
            finite = True
            if multi:  # any towers: the summed loss of the aligned pairs
                inputs = {m: x.to(device) for m, x in batches.batch(step).items()}
                loss = _tower_loss(net, loss_fn, inputs, cfg.model.loss_pairs(), tc.precision)
                finite = bool(torch.isfinite(loss))
                if finite:
                    loss.backward()
            elif tc.grad_accum == 1:
                images, ids = batches.batch(step)
                img, txt, o = _embed(net, images.to(device), ids.to(device), tc.precision)
                loss = loss_fn(img, txt, o["logit_scale"].log(), o["logit_bias"])
                finite = bool(torch.isfinite(loss))
                if finite:
                    loss.backward()
            else:
                images, ids = batches.batch(step)
                images, ids = images.to(device), ids.to(device)
                loss, finite = _accumulated_step(net, loss_fn, images, ids, micro, tc.precision)
            if world > 1:
                flag = torch.tensor([0.0 if finite else 1.0], device=device)
                dist.all_reduce(flag)
                finite = flag.item() == 0
            if not finite:
                skipped += 1
                bad_in_a_row += 1
                optimizer.zero_grad(set_to_none=True)
                if bad_in_a_row >= tc.max_bad_steps:
                    raise PolysenseError(
                        f"loss was NaN/inf for {bad_in_a_row} steps in a row (at step {step}); "
                        f"lower train.lr (now {tc.lr}) or set train.precision=fp32"
                    )
                continue
            bad_in_a_row = 0
            # total gradient norm before clipping (inf disables clipping but still measures it)
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf)
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, cfg.model.max_logit_scale)
            if world > 1:  # each rank's loss is its share; the batch loss is their mean
                loss = loss.detach().clone()
                dist.all_reduce(loss)
                loss /= world
            loss_value = loss.item()
            done = step + 1
            if rank == 0 and log.due(done):
                log.write(
                    done,
                    loss=loss_value,
                    lr=optimizer.param_groups[0]["lr"],
                    logit_scale=float(model.logit_scale.detach().exp()),
                    grad_norm=float(grad_norm),
                )
            if evaluate and tc.eval_every and done % tc.eval_every == 0 and rank == 0:
                figures = evaluate(model)
                append_metrics(
                    out,
                    {
                        "step": done,
                        **figures,
                        "elapsed_s": elapsed_before + time.perf_counter() - t_start,
                    },
                )
            if tc.ckpt_every and done % tc.ckpt_every == 0 and done < tc.steps:
                save(done, elapsed_before + time.perf_counter() - t_start)
        else:
            step = tc.steps
    seconds = elapsed_before + time.perf_counter() - t_start
    save(step, seconds)
    trained = step - start_step
    result = TrainResult(
        out=out,
        steps=step,
        final_loss=loss_value,
        train_samples_per_s=trained * tc.batch_size / max(time.perf_counter() - t_start, 1e-9),
        seconds=seconds,
        skipped_steps=skipped,
        stopped_early=stopped_early,
    )
    if rank == 0:
        atomic_write_json(
            out / "train_summary.json", dataclasses.asdict(result) | {"out": str(out)}
        )
    if world > 1:
        dist.barrier()
    return result


def _accumulated_step(
    net: nn.Module,
    loss_fn: ContrastiveLoss,
    images: torch.Tensor,
    ids: torch.Tensor,
    micro: int,
    precision: str,
) -> tuple[torch.Tensor, bool]:
    """Gradient accumulation with the full batch's negatives (open_clip's feature cache).

    First embed every micro-batch without gradient; then, micro-batch by micro-batch, recompute
    its embeddings with gradient and back-propagate the full-batch loss through them with the
    other micro-batches' cached embeddings as constants. The temperature (and bias) get their
    gradient once, in the first pass, so the sum equals one full-batch backward.
    """
    chunks = list(zip(images.split(micro), ids.split(micro), strict=True))
    with torch.no_grad():
        cached = [_embed(net, x, t, precision)[:2] for x, t in chunks]
    total = None
    for j, (x, t) in enumerate(chunks):
        img_j, txt_j, o = _embed(net, x, t, precision)
        img = torch.cat([img_j if k == j else c[0] for k, c in enumerate(cached)])
        txt = torch.cat([txt_j if k == j else c[1] for k, c in enumerate(cached)])
        scale, bias = o["logit_scale"].log(), o["logit_bias"]
        if j > 0:
            scale = scale.detach()
            bias = bias.detach() if bias is not None else None
        loss = loss_fn(img, txt, scale, bias)
        if not torch.isfinite(loss):
            return loss, False
        loss.backward()
        total = loss.detach() if total is None else total
    return total, True
