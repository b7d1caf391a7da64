"""The training loop, written out top to bottom (nanoGPT style), for every contrastive preset.

    result = train(get_preset("clip-tiny"), data="runs/world", out=Path("runs/clip-tiny"))

Single process on CPU by default; under `torchrun --nproc_per_node N` the same function runs
DistributedDataParallel (gloo on CPU, NCCL on GPU) with cross-process negatives in the loss and
each rank taking its slice of every global batch. `resume=True` continues from `state.pt` and
reproduces the uninterrupted run bit for bit: the batch at step s depends only on (seed, s).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polysense.config import RunConfig, to_dict
from polysense.data.loader import PairData, TowerData
from polysense.data.pipeline import ShardPairs, caption_lists, open_pairs, step_batches
from polysense.data.tokenizer import HF_TOKENIZER_FILES, Tokenizer
from polysense.errors import PolysenseError
from polysense.losses import ContrastiveLoss
from polysense.precision import resolve_precision
from polysense.train.checkpoint import load_state
from polysense.train.fit import FitResult, device_for, distributed, fit
from polysense.train.optim import param_groups
from polysense.train.task import Runtime, Task

TrainResult = FitResult  # what `train` returns (the one loop's result)


def load_init(path: str) -> nn.Module:
    """The model `train.init` names (a polysense checkpoint or a Hugging Face CLIP/SigLIP
    directory), on the CPU, with its tokenizer; a clear error when it cannot start a run."""
    from polysense.models.checkpoint import load_model

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
    pairs: PairData | TowerData | ShardPairs | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
) -> TrainResult:
    """Train `cfg` on the image-caption pairs at `data` (any supported source; a world's train
    split), writing `state.pt`, `metrics.jsonl` and the exported model to `out`.

    `evaluate(model) -> {name: value}` runs every `train.eval_every` steps on rank 0 and its
    figures join `metrics.jsonl` (e.g. validation zero-shot accuracy as training goes).

    A model with other towers than image + text (`model.towers`, e.g. audio,text or
    image,text,audio) trains the same way on `TowerData`: each step sums the contrastive loss of
    every aligned pair (`ModelConfig.loss_pairs`, image as the anchor beyond two towers)."""
    from polysense.models.checkpoint import tower_weights
    from polysense.models.clip import CLIP

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

    # read once to fail early on a missing or foreign state.pt; fit reads it again to resume
    resumed = resume and load_state(out) is not None
    if pairs is None:  # cached or streamed, as cfg.data says (polysense.data.pipeline)
        pairs = open_pairs(
            data,
            data=cfg.data,
            model=cfg.model,
            split=None,  # a world's train split; a URL is no local path to look at
            rejects_path=out / "rejects.jsonl" if rank == 0 else None,
        )
    tokenizer: Tokenizer | None = None  # a model without a text tower has none
    if init is not None:
        tokenizer = init.tokenizer  # kept: the weights know only its ids
    elif "text" in cfg.model.towers:
        if resumed and any((out / f).is_file() for f in HF_TOKENIZER_FILES):
            tokenizer = Tokenizer.from_file(out, context_length=cfg.model.text.context_length)
        else:
            tokenizer = build_tokenizer(cfg, caption_lists(pairs))
        # The model's vocabulary is the tokenizer's (a BPE on little text may stop short).
        text_cfg = dataclasses.replace(cfg.model.text, vocab_size=tokenizer.vocab_size)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, text=text_cfg))

    torch.manual_seed(tc.seed)
    model = CLIP(cfg=cfg.model, tokenizer=tokenizer, inference_precision=tc.precision).to(device)
    if tc.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if not resumed:
        if init is not None:
            model.load_state_dict(init.state_dict())
        if "video" in cfg.model.towers and cfg.model.video.init_from_image:
            field = "model.video.init_from_image"
            image = tower_weights(cfg.model.video.init_from_image, "visual.", field=field)
            model.video.load_image_weights(image)

    if multi != isinstance(pairs, TowerData):
        raise PolysenseError(
            f"towers {','.join(cfg.model.towers)} train on "
            f"{'TowerData (load_towers)' if multi else 'PairData or ShardPairs (open_pairs)'}, "
            f"got {type(pairs).__name__}"
        )
    batches = step_batches(
        pairs,
        data=cfg.data,
        model=cfg.model,
        tokenizer=tokenizer,
        batch_size=tc.batch_size,
        seed=tc.seed,
        hard_negatives=tc.hard_negatives,
        rank=rank,
        world=world,
    )

    task = ContrastiveTask(cfg=cfg, model=model, world=world)
    try:
        return fit(
            task,
            tc,
            data=batches,
            out=out,
            resume=resumed,
            progress=progress,
            rt=Runtime(
                device=device,
                rank=rank,
                world=world,
                precision=resolve_precision(tc.precision, device),
            ),
            evaluate=evaluate,
            eval_every=tc.eval_every,
        )
    finally:
        close = getattr(batches, "close", None)  # a streamed loader's workers
        if close is not None:
            close()


class ContrastiveTask(Task):
    """The contrastive loss of the aligned tower pairs (image-text, or any towers), with staged
    unfreezing, feature-cache gradient accumulation and the temperature clamp."""

    distributed = True  # PairBatches / TowerBatches give each rank its slice

    def __init__(self, *, cfg: RunConfig, model: nn.Module, world: int) -> None:
        self.run_cfg, self.cfg, self.model = cfg, cfg.train, model
        self.multi = tuple(cfg.model.towers) != ("image", "text")
        self.loss_fn = ContrastiveLoss(
            family=cfg.model.family, chunk=cfg.train.loss_chunk, distributed=world > 1
        )
        self.micro = cfg.train.batch_size // world // cfg.train.grad_accum

    def param_groups(self) -> list[dict]:
        groups = param_groups(self.model, self.cfg)
        for group in groups:
            group.pop("names")
        return groups

    def before_step(self, step: int) -> None:
        tc = self.cfg
        for tower, locked, unlock_at in (
            ("image", tc.lock_image, tc.unlock_image_at),
            ("text", tc.lock_text, tc.unlock_text_at),
        ):
            _set_locked(self.model, tower, locked and not (0 <= unlock_at <= step))

    def backward(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float], bool]:
        device, precision = self.rt.device, self.rt.precision
        if self.multi:  # any towers: the summed loss of the aligned pairs
            inputs = {m: x.to(device) for m, x in batch.items()}
            pairs = self.run_cfg.model.loss_pairs()
            loss = _tower_loss(self.net, self.loss_fn, inputs, pairs, precision)
        elif self.cfg.grad_accum > 1:
            images, ids = batch[0].to(device), batch[1].to(device)
            loss, finite = _accumulated_step(
                self.net, self.loss_fn, images, ids, self.micro, precision
            )
            return loss, {}, finite
        else:
            images, ids = batch
            img, txt, o = _embed(self.net, images.to(device), ids.to(device), precision)
            loss = self.loss_fn(img, txt, o["logit_scale"].log(), o["logit_bias"])
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
        return loss, {}, finite

    def after_step(self, step: int) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, self.run_cfg.model.max_logit_scale)

    def log_fields(self) -> dict[str, float]:
        return {"logit_scale": float(self.model.logit_scale.detach().exp())}

    def extra_state(self) -> dict[str, Any]:
        return {"config": to_dict(self.run_cfg)}

    def export(self, out: Path) -> None:
        from polysense.models.checkpoint import save_checkpoint

        save_checkpoint(self.model, self.run_cfg, out)


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
