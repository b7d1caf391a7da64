"""Training the language model and the VLM, written out top to bottom (nanoGPT style).

Three stages, each a preset (presets/vlm.py) and one call of `train_stage`:

- `lm-tiny`: the GPT alone, next-token prediction on the world's text (captions, and the chat
  template filled with questions/answers and captions but no image).
- `vlm-tiny-stage1` (align): vision tower and LM frozen, the projector learns to turn image tokens
  into LM inputs from captions.
- `vlm-tiny-stage2` (instruct): LM unfrozen (optionally the top ViT blocks at a lower learning
  rate), on instructions built from the world: captions, QA pairs, "what is written here?" on the
  OCR images; its last fifth tunes the captions by self-critical sequence training (`scst_loss`:
  sampled captions, CIDEr-D reward, the other samples' mean as baseline).

What trains is config (`train.train_lm`, `train_projector`, `train_vision_top`); frozen parameters
have requires_grad False and are not in the optimiser. The batch of step s is a pure function of
(seed, s), so `--resume` from `state.pt` repeats the uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from polysense.config import to_dict
from polysense.data.loader import normalize
from polysense.data.transforms import resize_center_crop
from polysense.errors import DataError, PolysenseError
from polysense.fileio import atomic_write_json
from polysense.models.vlm import (
    CAPTION_INSTRUCTION,
    GPT,
    IMAGE,
    OCR_INSTRUCTION,
    VLM,
    ChatTokenizer,
    LMRunConfig,
    VLMRunConfig,
    VLMTrainConfig,
    build_vlm,
    chat_prompt,
    conversation,
    load_lm,
    load_vlm,
    read_config,
    save_vlm,
)
from polysense.models.vlm_hf import is_hf_dir
from polysense.train.checkpoint import load_state, save_state, trim_metrics
from polysense.train.fit import device_for
from polysense.train.log import StepLog
from polysense.train.optim import lr_factor, set_lr

# ---------------------------------------------------------------------------------------------
# data


@dataclass
class SplitData:
    """One split in memory: images (N, H, W, 3) uint8, OCR strips (N, h, k*h, 3) uint8 or None,
    and per scene its captions, QA pairs, object list and OCR text."""

    keys: list[str]
    images: torch.Tensor
    ocr: torch.Tensor | None
    captions: list[list[str]]
    qa: list[list[dict[str, str]]]
    objects: list[list[dict[str, Any]]]
    ocr_text: list[str]

    def __len__(self) -> int:
        return len(self.keys)


def load_split(
    path: str | Path,
    split: str | None,
    *,
    image_size: int,
    limit: int | None = None,
    rejects_path: Path | None = None,
) -> SplitData:
    """Read a world split (or any source with images + captions; QA/objects/OCR when present)."""
    from polysense.data.readers import Rejects, read_samples

    keys, images, ocr, captions, qa, objects, ocr_text = [], [], [], [], [], [], []
    with Rejects(path=rejects_path) as rejects:
        for s in read_samples(path, split=split, rejects=rejects, limit=limit):
            texts = [t for t in s.get("text") or [] if t and t.strip()]
            if s.get("image") is None or not texts:
                rejects.add(key=s.get("key", "?"), reason="no_image_or_caption", source=str(path))
                continue
            keys.append(s["key"])
            images.append(np.asarray(resize_center_crop(s["image"], image_size), dtype=np.uint8))
            captions.append(texts)
            qa.append([q for q in s.get("qa") or [] if q.get("question") and q.get("answer")])
            objects.append(list(s.get("objects") or []))
            ocr_text.append(str(s.get("ocr_text") or ""))
            if s.get("ocr_image") is not None:
                strip = s["ocr_image"].convert("RGB")
                k = max(1, round(strip.width / strip.height))
                strip = strip.resize((k * image_size, image_size))
                ocr.append(np.asarray(strip, dtype=np.uint8))
    where = f"{path}" + (f" (split {split})" if split else "")
    if not keys:
        raise DataError(f"{where}: no samples with both an image and a caption")
    has_ocr = len(ocr) == len(keys) and len({a.shape for a in ocr}) == 1
    return SplitData(
        keys=keys,
        images=torch.from_numpy(np.stack(images)),
        ocr=torch.from_numpy(np.stack(ocr)) if has_ocr else None,
        captions=captions,
        qa=qa,
        objects=objects,
        ocr_text=ocr_text,
    )


def world_texts(data: SplitData) -> list[str]:
    """The text an LM pretrains on: captions, and the chat template (without its image) filled
    with each scene's captions, questions and answers, and OCR text."""
    texts = []
    for caps, qa, ocr in zip(data.captions, data.qa, data.ocr_text, strict=True):
        texts += caps
        texts += [_text_only(CAPTION_INSTRUCTION, c) for c in caps]
        texts += [_text_only(q["question"], q["answer"]) for q in qa]
        if len(qa) > 1:  # QA of the scene as one conversation (4 turns fit any context)
            turns = [(q["question"], q["answer"]) for q in qa[:4]]
            chat = conversation(turns[:-1], turns[-1][0]) + " " + turns[-1][1]
            texts.append(chat.replace(IMAGE, "").replace(": \n", ":\n"))
        if ocr:
            texts.append(_text_only(OCR_INSTRUCTION, ocr))
    return texts


def _text_only(instruction: str, response: str) -> str:
    return chat_prompt(instruction).replace(IMAGE, "").replace(": \n", ":\n") + " " + response


def tile_pixels(strips: torch.Tensor, size: int, mean: Any, std: Any) -> torch.Tensor:
    """uint8 (B, H, k*H, 3) -> normalised tiles (B, k, 3, H, H), left to right."""
    b, h, w, _ = strips.shape
    k = w // size
    tiles = strips.reshape(b, h, k, size, 3).permute(0, 2, 1, 3, 4).reshape(b * k, h, size, 3)
    return normalize(tiles, mean, std).reshape(b, k, 3, h, size)


@dataclass
class Example:
    """One training row: a scene (or its OCR strip) and its (instruction, response) turns."""

    index: int
    task: str  # caption / qa / ocr
    turns: list[tuple[str, str]]


def sample_examples(data: SplitData, tc: VLMTrainConfig, step: int) -> list[Example]:
    """The batch of `step`: scenes drawn with replacement, a task per row by the mixture."""
    gen = np.random.default_rng([tc.seed, step])
    tasks = ["caption", "qa", "ocr"]
    weights = np.array([tc.mix_caption, tc.mix_qa, tc.mix_ocr if data.ocr is not None else 0.0])
    if weights.sum() <= 0:
        raise PolysenseError("train.mix_caption + mix_qa + mix_ocr is 0 (or OCR data is missing)")
    picks = gen.choice(3, size=tc.batch_size, p=weights / weights.sum())
    rows = gen.integers(len(data), size=tc.batch_size)
    out = []
    for i, t in zip(rows.tolist(), picks.tolist(), strict=True):
        task = tasks[t]
        if task == "qa" and not data.qa[i]:
            task = "caption"
        if task == "caption":
            caps = data.captions[i]
            out.append(Example(i, task, [(CAPTION_INSTRUCTION, caps[gen.integers(len(caps))])]))
        elif task == "qa":
            order = gen.permutation(len(data.qa[i]))[: max(1, tc.qa_turns)]
            qa = [(data.qa[i][j]["question"], data.qa[i][j]["answer"]) for j in order]
            out.append(Example(i, task, qa))
        else:
            out.append(Example(i, task, [(OCR_INSTRUCTION, data.ocr_text[i])]))
    return out


def vlm_batch(model: VLM, data: SplitData, examples: list[Example]) -> Any:
    """Token rows + image tokens of the examples -> a left-padded `Batch` with answer targets."""
    v = model.cfg.vision
    scenes = [e.index for e in examples if e.task != "ocr"]
    strips = [e.index for e in examples if e.task == "ocr"]
    pix: dict[tuple[str, int], torch.Tensor] = {}
    if scenes:
        x = normalize(data.images[scenes], v.image_mean, v.image_std)[:, None]  # (b, 1, 3, H, W)
        for i, t in zip(scenes, model.encode_tiles(x), strict=True):
            pix[("scene", i)] = t
    if strips:
        x = tile_pixels(data.ocr[strips], v.image_size, v.image_mean, v.image_std)
        for i, t in zip(strips, model.encode_tiles(x), strict=True):
            pix[("ocr", i)] = t
    rows, targets, tokens = [], [], []
    for e in examples:
        row, flags = model.tokenizer.conversation_ids(e.turns)  # the tokenizer's chat template
        rows.append(row)
        targets.append(flags)
        tokens.append(pix[("ocr" if e.task == "ocr" else "scene", e.index)])
    return model.build_batch(rows, tokens, targets=targets)


def lm_batch(lm: GPT, tok: ChatTokenizer, texts: list[str]) -> tuple[torch.Tensor, ...]:
    """Texts -> left-padded (embeds (B, T, C), key_mask (B, T), labels (B, T)), all targets."""
    rows = [[tok.bos_id, *ids, tok.eos_id] for ids in tok.encode_batch(texts)]
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.bool)
    for r, row in enumerate(rows):
        ids[r, t - len(row) :] = torch.tensor(row)
        mask[r, t - len(row) :] = True
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    device = lm.token_embed.weight.device
    return lm.token_embed(ids.to(device)), mask.to(device), labels.to(device)


# ---------------------------------------------------------------------------------------------
# freezing and the optimiser


def set_trainable(model: VLM | GPT, tc: VLMTrainConfig) -> None:
    """requires_grad from the config: LM (only its LoRA adapters when train.lora_rank > 0),
    projector (with the tile embedding), top ViT blocks."""
    model.requires_grad_(False)
    lm = model if isinstance(model, GPT) else model.lm
    for name, p in lm.named_parameters():
        p.requires_grad_(tc.train_lm and (not tc.lora_rank or ".lora_" in name))
    if isinstance(model, GPT):
        return
    model.projector.requires_grad_(tc.train_projector)
    model.tile_embed.requires_grad_(tc.train_projector)
    n = tc.train_vision_top
    if n > 0:
        for block in model.visual.blocks[-n:]:
            block.requires_grad_(True)
        model.visual.ln_post.requires_grad_(True)


def prepare_lm(model: VLM | GPT, tc: VLMTrainConfig) -> None:
    """LoRA adapters (peft) on the LM when train.lora_rank > 0, and gradient checkpointing of
    the LM and the ViT when train.grad_checkpointing."""
    lm = model if isinstance(model, GPT) else model.lm
    if tc.lora_rank:
        from polysense.models.vlm_hf import add_lora

        add_lora(
            lm,
            rank=tc.lora_rank,
            alpha=tc.lora_alpha,
            dropout=tc.lora_dropout,
            targets=tc.lora_targets,
        )
    if tc.grad_checkpointing:
        if isinstance(lm, GPT):
            lm.grad_checkpointing = True
        else:
            lm.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        if isinstance(model, VLM):
            model.visual.set_grad_checkpointing(True)


def build_optimizer(model: nn.Module, tc: VLMTrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only; no decay on 0/1-D tensors and embeddings; the
    vision tower's parameters at `lr_vision`."""
    groups: dict[tuple[bool, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        vision = name.startswith("visual.")
        decay = p.ndim >= 2 and "embed" not in name and "queries" not in name
        lr = tc.lr_vision if vision else tc.lr
        g = groups.setdefault(
            (vision, decay),
            {
                "params": [],
                "weight_decay": tc.weight_decay if decay else 0.0,
                "base_lr": lr,
                "lr": lr,
            },
        )
        g["params"].append(p)
    if not groups:
        raise PolysenseError(
            "nothing to train: train.train_lm, train.train_projector and train.train_vision_top "
            "are all off"
        )
    return torch.optim.AdamW(list(groups.values()), lr=tc.lr, betas=tc.betas)


# ---------------------------------------------------------------------------------------------
# the loop


def _prepare(cfg: LMRunConfig | VLMRunConfig, data: Path, out: Path, resume: bool):
    """Model, tokenizer, run config (as really built) and the training split in memory."""
    image_size = 32
    if isinstance(cfg, VLMRunConfig) and resume:
        image_size = load_vlm(out).cfg.vision.image_size
    elif isinstance(cfg, VLMRunConfig) and cfg.init.vlm:
        image_size = load_vlm(cfg.init.vlm).cfg.vision.image_size
    elif isinstance(cfg, VLMRunConfig) and cfg.init.vision and is_hf_dir(cfg.init.vision):
        image_size = json.loads((Path(cfg.init.vision) / "config.json").read_text())[
            "vision_config"
        ].get("image_size", 224)
    elif isinstance(cfg, VLMRunConfig) and cfg.init.vision:
        from polysense.models.clip import read_run_config

        image_size = read_run_config(cfg.init.vision).model.vision.image_size
    from polysense.data.readers import detect_format

    split = "train" if detect_format(data) == "world" else None
    train = load_split(data, split, image_size=image_size, rejects_path=out / "rejects.jsonl")
    if isinstance(cfg, LMRunConfig):
        if resume:
            lm, tok, saved = load_lm(out)
            return lm.train(), tok, dataclasses.replace(cfg, model=saved.model), train
        tok = ChatTokenizer.train(world_texts(train), vocab_size=cfg.model.vocab_size)
        model_cfg = dataclasses.replace(cfg.model, vocab_size=tok.vocab_size)
        torch.manual_seed(cfg.train.seed)
        return GPT(cfg=model_cfg).train(), tok, dataclasses.replace(cfg, model=model_cfg), train
    if resume:
        model = load_vlm(out)
        return model.train(), model.tokenizer, dataclasses.replace(cfg, model=model.cfg), train
    torch.manual_seed(cfg.train.seed)
    hf_lm = bool(cfg.init.lm) and is_hf_dir(cfg.init.lm)  # brings its own tokenizer
    model, run = build_vlm(cfg, texts=None if hf_lm else world_texts(train))
    return model, model.tokenizer, run, train


def train_stage(
    cfg: LMRunConfig | VLMRunConfig,
    *,
    data: str | Path,
    out: Path,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one stage; writes state.pt, metrics.jsonl and the checkpoint (config.json,
    model.safetensors, tokenizer.json) to `out`. Returns a summary."""
    out, data = Path(out), Path(data)
    out.mkdir(parents=True, exist_ok=True)
    tc = cfg.train
    state = load_state(out) if resume else None
    model, tok, cfg, train = _prepare(cfg, data, out, resume and state is not None)
    prepare_lm(model, tc)
    model.to(device_for(0))  # CUDA when present (POLYSENSE_DEVICE=cpu keeps the CPU)
    set_trainable(model, tc)
    optimizer = build_optimizer(model, tc)
    start, elapsed_before = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed_before = state["step"], state["elapsed"]
        torch.set_rng_state(state["rng"])
        trim_metrics(out, start)
    else:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    texts = world_texts(train) if isinstance(model, GPT) else []
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())

    def save(step: int, seconds: float) -> None:
        save_state(
            out,
            {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "elapsed": seconds,
                "rng": torch.get_rng_state(),
                "config": to_dict(cfg),
            },
        )
        save_vlm(model, cfg, tok, out)

    t0 = time.perf_counter()
    loss_value, step, stopped = math.nan, start, False
    xe_steps = round(tc.steps * (1 - tc.scst.fraction))  # the cross-entropy part of the schedule
    reward = None
    if tc.scst.fraction:
        _check_scst(tc, model)
        from polysense.eval.captioning import CiderD, tokenize

        reward = CiderD([[tokenize(c) for c in caps] for caps in train.captions])
    log = StepLog(train=tc, out=out, start=start, elapsed_before=elapsed_before, progress=progress)
    with log:
        for step in range(start, tc.steps):
            schedule_step = step
            if tc.max_minutes:
                elapsed = elapsed_before + time.perf_counter() - t0
                schedule_step = max(step, int(elapsed / (tc.max_minutes * 60) * tc.steps))
                if schedule_step >= tc.steps:
                    stopped = True
                    break
            extra: dict[str, float] = {}
            if reward is not None and schedule_step >= xe_steps:
                set_lr(optimizer, tc.scst.lr / tc.lr)
                log.batch_size = tc.scst.batch_size * tc.scst.samples  # samples/s: captions drawn
                loss, extra["reward"] = scst_loss(model, train, tc, step, reward)
            else:
                set_lr(
                    optimizer,
                    lr_factor(
                        step if step < tc.warmup_steps else schedule_step,
                        warmup=tc.warmup_steps,
                        total=xe_steps,
                        min_ratio=tc.min_lr_ratio,
                    ),
                )
                loss = _xe_loss(model, tok, train, texts, tc, step)
            if not torch.isfinite(loss):
                raise PolysenseError(
                    f"loss is {loss.item()} at step {step}; lower train.lr (now {tc.lr})"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            trainable = [p for p in model.parameters() if p.requires_grad]
            grad_norm = nn.utils.clip_grad_norm_(trainable, tc.grad_clip or math.inf)
            optimizer.step()
            loss_value = loss.item()
            done = step + 1
            if log.due(done):
                lr = optimizer.param_groups[0]["lr"]
                log.write(done, loss=loss_value, lr=lr, grad_norm=float(grad_norm), **extra)
            if tc.ckpt_every and done % tc.ckpt_every == 0 and done < tc.steps:
                save(done, elapsed_before + time.perf_counter() - t0)
        else:
            step = tc.steps
    seconds = elapsed_before + time.perf_counter() - t0
    save(step, seconds)
    summary = {
        "steps": step,
        "final_loss": loss_value,
        "train_seconds": seconds,
        "train_samples_per_s": (step - start) * tc.batch_size / max(time.perf_counter() - t0, 1e-9),
        "stopped_early": stopped,
        "trainable_params": n_trainable,
        "total_params": n_total,
    }
    atomic_write_json(out / "train_summary.json", summary)
    return summary


def _autocast(precision: str, model: nn.Module) -> Any:
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")


def _xe_loss(
    model: VLM | GPT,
    tok: ChatTokenizer,
    data: SplitData,
    texts: list[str],
    tc: VLMTrainConfig,
    step: int,
) -> torch.Tensor:
    """The cross-entropy of step `step`: next-token loss on world text (the LM alone) or on the
    answer tokens of the step's instruction rows (the VLM)."""
    if isinstance(model, GPT):
        gen = np.random.default_rng([tc.seed, step])
        picked = [texts[i] for i in gen.integers(len(texts), size=tc.batch_size)]
        embeds, mask, labels = lm_batch(model, tok, picked)
        with _autocast(tc.precision, model):
            logits, _ = model(embeds, mask)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    return _vlm_loss(model, data, sample_examples(data, tc, step), tc.precision)


def _check_scst(tc: VLMTrainConfig, model: VLM | GPT) -> None:
    sc = tc.scst
    if isinstance(model, GPT):
        raise PolysenseError(
            "train.scst tunes a VLM's captions; for the LM use train.scst.fraction=0"
        )
    if not 0 <= sc.fraction < 1:
        raise PolysenseError(f"train.scst.fraction={sc.fraction}: use a value in [0, 1)")
    if sc.samples < 2:
        raise PolysenseError(
            f"train.scst.samples={sc.samples}: each sample's baseline is the others' mean; use >= 2"
        )
    if sc.temperature <= 0:
        raise PolysenseError(f"train.scst.temperature={sc.temperature}: use a value > 0")


def scst_loss(
    model: VLM, data: SplitData, tc: VLMTrainConfig, step: int, reward: Any
) -> tuple[torch.Tensor, float]:
    """Self-critical loss of step `step` and the mean reward of its samples. Per image,
    `scst.samples` captions are drawn from softmax(logits / T); a caption's advantage is its
    CIDEr-D (`reward`, a `CiderD` over the training references) minus the mean of the image's
    other captions; the loss is -sum(advantage * log p(caption)) over the caption tokens (the
    end token included when drawn), divided by their number. Special tokens are never drawn."""
    from polysense.decoding import LMStepper, MaskedStepper, sample_or_greedy
    from polysense.eval.captioning import tokenize

    sc, v = tc.scst, model.cfg.vision
    rows = np.random.default_rng([tc.seed, step]).integers(len(data), size=sc.batch_size).tolist()
    pixels = normalize(data.images[rows], v.image_mean, v.image_std)[:, None]  # (B, 1, 3, H, W)
    with _autocast(tc.precision, model):
        tokens = model.encode_tiles(pixels).repeat_interleave(sc.samples, 0)  # (B*K, N, C)
    prompt = model.prompt_ids(chat_prompt(CAPTION_INSTRUCTION))
    eos, banned = model.tokenizer.eos_id, model.banned_ids()
    with torch.no_grad():
        prefix = model.build_batch([prompt] * len(tokens), list(tokens.detach()))
        lm_stepper = LMStepper(model.lm)
        logits, state = lm_stepper.start(prefix.embeds, prefix.key_mask)
        stepper = MaskedStepper(lm_stepper, banned)
        logits = stepper.mask(logits)
        gen = torch.Generator(device=logits.device).manual_seed(tc.seed * 1_000_003 + step)
        drawn = sample_or_greedy(
            stepper,
            logits,
            state,
            max_new_tokens=sc.max_new_tokens,
            stop_ids=(eos,),
            temperature=sc.temperature,
            generator=gen,
        )
    texts = [tokenize(model.tokenizer.decode(ids)) for ids in drawn]
    scores = torch.tensor(
        [
            reward.scores(
                [tokenize(c) for c in data.captions[i]],
                texts[b * sc.samples : (b + 1) * sc.samples],
            )
            for b, i in enumerate(rows)
        ]
    )  # (B, K)
    others = (scores.sum(1, keepdim=True) - scores) / (sc.samples - 1)
    advantage = (scores - others).flatten().to(model.device)  # (B*K,)
    # a caption that stopped before max_new_tokens drew the end token: it is part of the action
    seqs = [prompt + ids + [eos] * (len(ids) < sc.max_new_tokens) for ids in drawn]
    with _autocast(tc.precision, model):
        logp = model.sequence_logprobs(
            seqs,
            list(tokens),
            n_prompt=[len(prompt)] * len(seqs),
            temperature=sc.temperature,
            banned=banned,
        )  # (B*K,)
    n_tokens = sum(len(x) - len(prompt) for x in seqs)
    return -(advantage * logp).sum() / max(n_tokens, 1), float(scores.mean())


def _vlm_loss(model: VLM, data: SplitData, examples: list[Example], precision: str) -> torch.Tensor:
    """Mean answer-token loss; each task's rows run as their own micro-batch, so that short
    rows (captions) are not padded to the length of long ones (OCR: 4 tiles; QA: 4 turns)."""
    groups = [[e for e in examples if e.task == task] for task in ("caption", "qa", "ocr")]
    total, count = None, 0
    for group in groups:
        if not group:
            continue
        with _autocast(precision, model):
            batch = vlm_batch(model, data, group)
            part = model.loss(batch, reduction="sum")
        count += int((batch.labels != -100).sum())
        total = part if total is None else total + part
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------
# runners (`polysense train PRESET`)


def _lm_val_loss(out: Path, data: Path, split: str, limit: int = 2000) -> float:
    lm, tok, _ = load_lm(out)
    texts = world_texts(load_split(data, split, image_size=32, limit=limit))[:limit]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(texts), 256):
            embeds, mask, labels = lm_batch(lm, tok, texts[i : i + 256])
            logits, _ = lm(embeds, mask)
            n = int((labels != -100).sum())
            total += (
                float(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100))
                * n
            )
            count += n
    return total / max(count, 1)


def run_lm(
    cfg: LMRunConfig, *, data: Path, out: Path, resume: bool, eval_splits: tuple[str, ...]
) -> dict[str, Any]:
    """`polysense train lm-tiny`: pretrain the GPT on world text; report held-out token loss."""
    from polysense.data.readers import detect_format

    summary = train_stage(cfg, data=data, out=out, resume=resume)
    metrics: dict[str, Any] = {}
    if detect_format(data) == "world":
        for i, split in enumerate(eval_splits or ()):
            loss = _lm_val_loss(out, data, split)
            figures = {"lm_loss": loss, "lm_perplexity": math.exp(loss), "split": split}
            metrics |= figures if i == 0 else {split: figures}
    metrics |= summary | {"config": to_dict(read_config(out))}  # as built (LM width, ...)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def run_vlm(
    cfg: VLMRunConfig, *, data: Path, out: Path, resume: bool, eval_splits: tuple[str, ...]
) -> dict[str, Any]:
    """`polysense train vlm-tiny-stage1/2`: train, then evaluate captioning (with baselines), VQA,
    POPE, CHAIR and OCR on each split; write OUT/metrics.json."""
    from polysense.data.readers import detect_format

    summary = train_stage(cfg, data=data, out=out, resume=resume)
    metrics: dict[str, Any] = {}
    if detect_format(data) == "world" and eval_splits:
        model = load_vlm(out)
        for i, split in enumerate(eval_splits):
            clip = cfg.init.vision if cfg.init.vision and Path(cfg.init.vision).is_dir() else None
            figures = evaluate_vlm(model, data, split=split, clip=clip) | {"split": split}
            metrics |= figures if i == 0 else {split: figures}
            _print_table(figures, f"{cfg.name} on {data} ({split})")
    metrics |= summary | {"config": to_dict(read_config(out))}  # as built (LM width, ...)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


@torch.no_grad()
def evaluate_vlm(
    model: VLM,
    data: str | Path,
    *,
    split: str,
    batch_size: int = 256,
    limit: int | None = None,
    clip: str | Path | None = None,
) -> dict[str, Any]:
    """Captioning (BLEU/CIDEr-D, with nearest-neighbour and most-frequent-caption baselines; the
    neighbours in the space of the CLIP checkpoint `clip` when given), CHAIR on the same
    captions, VQA, POPE (three samplings) and OCR on one split."""
    from polysense.eval import captioning, hallucination, ocr, vqa
    from polysense.models.clip import load_model

    model.eval()
    split_data = load_split(data, split, image_size=model.cfg.vision.image_size, limit=limit)
    train = load_split(data, "train", image_size=model.cfg.vision.image_size)
    clip_model = load_model(clip) if clip is not None else None
    cap = captioning.evaluate(
        model, split_data, train=train, batch_size=batch_size, clip=clip_model
    )
    metrics = {k: v for k, v in cap.items() if k != "captions"}
    metrics |= hallucination.chair_metrics(cap["captions"], split_data.objects)
    metrics |= vqa.evaluate(model, split_data, batch_size=batch_size)
    metrics |= hallucination.evaluate_pope(model, split_data, train=train, batch_size=batch_size)
    if split_data.ocr is not None:
        metrics |= ocr.evaluate(model, split_data, batch_size=batch_size)
    metrics["n_samples"] = len(split_data)
    return metrics


def _print_table(metrics: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
        elif isinstance(value, dict):
            for sub, v in value.items():
                if isinstance(v, float):
                    table.add_row(f"{key}.{sub}", f"{v:.4f}")
    Console().print(table)
