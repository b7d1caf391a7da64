"""The language model's and the VLM's training stages: a `VLMTask` on the one loop (`fit`).

Three stages, each a preset (presets/vlm.py) and one call of `train_stage`:

- `lm-tiny`: the GPT alone, next-token prediction on the world's text (captions, and the chat
  template filled with questions/answers and captions but no image).
- `vlm-tiny-stage1` (align): vision tower and LM frozen, the projector learns to turn image tokens
  into LM inputs from captions.
- `vlm-tiny-stage2` (instruct): LM unfrozen (optionally the top ViT blocks at a lower learning
  rate), on instructions built from the world: captions, QA pairs, "what is written here?" on the
  OCR images; its last fifth tunes the captions by self-critical sequence training (`scst_loss`:
  sampled captions, CIDEr-D reward, the other samples' mean as baseline).

`--data` may instead be a LLaVA conversation file (`data/llava.py`): each conversation trains as
it stands, every gpt turn a target (`conversation_batch`).

What trains is config (`train.train_lm`, `train_projector`, `train_vision_top`); frozen parameters
have requires_grad False and are not in the optimiser. `fit` owns the loop: the schedule, the NaN
policy, clipping, checkpoints and exact resume (the batch of step s is a pure function of
(seed, s): `data/instruct.py`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from polysense.config import to_dict
from polysense.data.chat import CAPTION_INSTRUCTION, ChatTokenizer, chat_prompt
from polysense.data.instruct import (
    Example,
    ExampleBatches,
    SplitData,
    TextBatches,
    load_split,
    text_rows,
    world_texts,
)
from polysense.data.llava import (
    ConversationBatches,
    Conversations,
    conversation_ids,
    is_llava,
    llava_texts,
    read_llava,
)
from polysense.data.transforms import normalize, tile_pixels
from polysense.errors import PolysenseError
from polysense.fileio import atomic_write_json
from polysense.models.checkpoint import load_lm, load_vlm, save_hf_lm, save_vlm
from polysense.models.lm import GPT
from polysense.models.vlm import VLM, LMRunConfig, VLMRunConfig, VLMTrainConfig
from polysense.models.vlm_hf import HFCausalLM, HFChatTokenizer, is_hf_dir
from polysense.models.warmstart import build_vlm
from polysense.precision import resolve_precision
from polysense.train.checkpoint import load_state
from polysense.train.fit import fit
from polysense.train.optim import lr_factor
from polysense.train.task import Task

# ---------------------------------------------------------------------------------------------
# batches and losses


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


def conversation_batch(model: VLM, data: Conversations, rows: list[int]) -> Any:
    """The step's LLaVA conversations -> a left-padded `Batch`: images decoded now (the model's
    own preprocessing, as `generate` does), every answer a target. A row longer than the LM's
    context is cut at its end, as LLaVA cuts at model_max_length."""
    convs = [data.items[i] for i in rows]
    tokens = model.image_tokens([data.image(c) for c in convs])
    ids, targets = [], []
    for conv, image in zip(convs, tokens, strict=True):
        row, flags = conversation_ids(model.tokenizer, conv.turns, image=image is not None)
        keep = model.cfg.lm.context_length - (0 if image is None else len(image) - 1)
        ids.append(row[:keep])
        targets.append(flags[:keep])
    return model.build_batch(ids, tokens, targets=targets)


def _autocast(precision: str, model: torch.nn.Module) -> torch.autocast:
    """bf16 autocast on the model's device when `precision` resolves to bf16 there."""
    device = next(model.parameters()).device
    bf16 = resolve_precision(precision, device) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def vlm_loss(
    model: VLM, data: SplitData | Conversations, examples: list, precision: str
) -> torch.Tensor:
    """Mean answer-token loss; each task's rows run as their own micro-batch, so that short
    rows (captions) are not padded to the length of long ones (OCR: 4 tiles; QA: 4 turns).
    LLaVA conversations (`examples`: indices) run as one batch."""
    if isinstance(data, Conversations):
        with _autocast(precision, model):
            batch = conversation_batch(model, data, examples)
            total = model.loss(batch, reduction="sum")
        return total / max(int((batch.labels != -100).sum()), 1)
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


def _check_scst(tc: VLMTrainConfig, model: VLM | GPT | HFCausalLM) -> None:
    sc = tc.scst
    if not isinstance(model, VLM):
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


# ---------------------------------------------------------------------------------------------
# freezing, the optimiser's groups and the task


def set_trainable(model: VLM | GPT | HFCausalLM, tc: VLMTrainConfig) -> None:
    """requires_grad from the config: LM (only its LoRA adapters when train.lora_rank > 0),
    projector (with the tile embedding), top ViT blocks."""
    model.requires_grad_(False)
    lm = model.lm if isinstance(model, VLM) else model
    for name, p in lm.named_parameters():
        p.requires_grad_(tc.train_lm and (not tc.lora_rank or ".lora_" in name))
    if not isinstance(model, VLM):
        return
    model.projector.requires_grad_(tc.train_projector)
    model.tile_embed.requires_grad_(tc.train_projector)
    n = tc.train_vision_top
    if n > 0:
        for block in model.visual.blocks[-n:]:
            block.requires_grad_(True)
        model.visual.ln_post.requires_grad_(True)


def prepare_lm(model: VLM | GPT | HFCausalLM, tc: VLMTrainConfig) -> None:
    """LoRA adapters (peft) on the LM when train.lora_rank > 0, and gradient checkpointing of
    the LM and the ViT when train.grad_checkpointing."""
    lm = model.lm if isinstance(model, VLM) else model
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


def param_groups(model: VLM | GPT | HFCausalLM, tc: VLMTrainConfig) -> list[dict]:
    """AdamW groups over the trainable parameters only; no decay on 0/1-D tensors and
    embeddings; the vision tower's parameters at `lr_vision`."""
    groups: dict[tuple[bool, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        vision = name.startswith("visual.")
        decay = p.ndim >= 2 and "embed" not in name and "queries" not in name
        lr = tc.lr_vision if vision else tc.lr
        g = groups.setdefault(
            (vision, decay),
            {"params": [], "weight_decay": tc.weight_decay if decay else 0.0, "base_lr": lr},
        )
        g["params"].append(p)
    if not groups:
        raise PolysenseError(
            "nothing to train: train.train_lm, train.train_projector and train.train_vision_top "
            "are all off"
        )
    return list(groups.values())


class VLMTask(Task):
    """One LM or VLM stage: cross-entropy on world text (the GPT alone) or on the answer tokens
    of the step's instruction rows (the VLM); then, in the last `scst.fraction` of the
    schedule, the self-critical caption loss at the constant rate `scst.lr`.

    The cross-entropy's warmup + cosine runs over its own part of the schedule (`xe_steps`).
    `fit` calls `lr_factor` before each step's `loss`, so it also picks the step's phase."""

    def __init__(
        self,
        *,
        cfg: LMRunConfig | VLMRunConfig,
        model: VLM | GPT | HFCausalLM,
        tokenizer: ChatTokenizer | HFChatTokenizer,
        data: SplitData | Conversations,
    ) -> None:
        self.run_cfg, self.cfg = cfg, cfg.train
        self.model, self.tokenizer, self.data = model, tokenizer, data
        tc = self.cfg
        prepare_lm(model, tc)  # LoRA adapters (drawn from the torch RNG) before the optimiser
        set_trainable(model, tc)
        self.xe_steps = round(tc.steps * (1 - tc.scst.fraction))  # the cross-entropy part
        self.reward = None
        if tc.scst.fraction:
            _check_scst(tc, model)
            if isinstance(data, Conversations):
                raise PolysenseError(
                    f"train.scst.fraction={tc.scst.fraction}: self-critical tuning needs "
                    f"reference captions and the conversations of {data.path} have none; "
                    "--set train.scst.fraction=0"
                )
            from polysense.eval.captioning import CiderD, tokenize

            self.reward = CiderD([[tokenize(c) for c in caps] for caps in data.captions])
        self.scst_phase = False

    def param_groups(self) -> list[dict]:
        return param_groups(self.model, self.cfg)

    def lr_factor(self, step: int, schedule_step: int) -> float:
        tc = self.cfg
        self.scst_phase = self.reward is not None and schedule_step >= self.xe_steps
        if self.scst_phase:
            return tc.scst.lr / tc.lr
        return lr_factor(
            schedule_step, warmup=tc.warmup_steps, total=self.xe_steps, min_ratio=tc.min_lr_ratio
        )

    def loss(self, batch: list, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if self.scst_phase:  # draws its own images; the step's rows are the cross-entropy's
            loss, reward = scst_loss(self.model, self.data, self.cfg, step, self.reward)
            return loss, {"reward": reward}
        if not isinstance(self.model, VLM):  # the LM stage: polysense's GPT or an HF LM
            ids, mask, labels = (t.to(self.rt.device) for t in text_rows(self.tokenizer, batch))
            embeds = self.model.token_embed(ids)  # (B, T, C)
            with self.rt.autocast():
                logits, _ = self.model(embeds, mask)  # (B, T, V)
            flat = logits.flatten(0, 1).float()
            return F.cross_entropy(flat, labels.flatten(), ignore_index=-100), {}
        return vlm_loss(self.model, self.data, batch, self.rt.precision), {}

    def samples(self, step: int) -> int:
        sc = self.cfg.scst
        return sc.batch_size * sc.samples if self.scst_phase else self.cfg.batch_size

    def export(self, out: Path) -> None:
        if isinstance(self.model, HFCausalLM):
            save_hf_lm(self.model, self.tokenizer, out)
        else:
            save_vlm(self.model, self.run_cfg, self.tokenizer, out)

    def summary(self) -> dict[str, Any]:
        params = list(self.model.parameters())
        return {
            "trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "total_params": sum(p.numel() for p in params),
        }


# ---------------------------------------------------------------------------------------------
# a stage


def _prepare(
    cfg: LMRunConfig | VLMRunConfig,
    data: Path,
    out: Path,
    resume: bool,
    image_root: Path | None = None,
):
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
        from polysense.models.checkpoint import read_run_config

        image_size = read_run_config(cfg.init.vision).model.vision.image_size
    from polysense.data.readers import detect_format

    train: SplitData | Conversations
    if is_llava(data):
        if isinstance(cfg, LMRunConfig):
            raise PolysenseError(
                f"{data} is LLaVA conversations, which train the VLM stages (vlm-tiny-stage1/2); "
                f"{cfg.name or 'the LM stage'} pretrains on a world's text"
            )
        train = read_llava(data, rejects_path=out / "rejects.jsonl", image_root=image_root)
    else:
        split = "train" if detect_format(data) == "world" else None
        train = load_split(data, split, image_size=image_size, rejects_path=out / "rejects.jsonl")
    if isinstance(cfg, LMRunConfig) and cfg.decoder != "polysense":
        return _prepare_hf_lm(cfg, train, out, resume)
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
    texts = llava_texts(train) if isinstance(train, Conversations) else world_texts(train)
    model, run = build_vlm(cfg, texts=None if hf_lm else texts)
    return model, model.tokenizer, run, train


def _prepare_hf_lm(cfg: LMRunConfig, train: SplitData, out: Path, resume: bool):
    """The LM stage with a fresh transformers decoder (`decoder=qwen2`): its tokenizer learns
    the world text, rendered with that tokenizer's own chat template."""
    from polysense.models.hf_decoder import check_arch, fresh_hf_lm

    check_arch(cfg.decoder)
    if cfg.train.lora_rank:
        raise PolysenseError(
            f"train.lora_rank={cfg.train.lora_rank}: LoRA adapts a pretrained LM, and "
            f"decoder={cfg.decoder} trains a fresh one in full; use train.lora_rank=0"
        )
    if resume:
        lm, tok, _ = load_lm(out)
    else:
        lm, tok = fresh_hf_lm(
            cfg.decoder,
            cfg.model,
            lambda base: world_texts(train, base.text_chat),
            seed=cfg.train.seed,
        )
    model_cfg = dataclasses.replace(cfg.model, vocab_size=tok.vocab_size)
    return lm.train(), tok, dataclasses.replace(cfg, model=model_cfg), train


def train_stage(
    cfg: LMRunConfig | VLMRunConfig,
    *,
    data: str | Path,
    out: Path,
    resume: bool = False,
    progress: bool = True,
    image_root: str | Path | None = None,
) -> dict[str, Any]:
    """Train one stage; writes state.pt, metrics.jsonl, train_summary.json and the checkpoint
    (config.json, model.safetensors, tokenizer.json) to `out`. Returns a summary. `image_root`:
    where a LLaVA file's images are (default: its folder)."""
    out, data = Path(out), Path(data)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        load_state(out)  # a missing or foreign state.pt fails here, before any work
    root = Path(image_root) if image_root is not None else None
    if root is not None and not is_llava(data):
        raise PolysenseError(
            f"--image-root reads a LLaVA conversation file's images from another folder; "
            f"{data} is not one (a world or shards hold their images)"
        )
    if root is not None and not root.is_dir():
        raise PolysenseError(f"--image-root {root}: no such directory (where {data}'s images are)")
    model, tok, cfg, train = _prepare(cfg, data, out, resume, root)
    tc = cfg.train
    task = VLMTask(cfg=cfg, model=model, tokenizer=tok, data=train)
    batches: TextBatches | ExampleBatches | ConversationBatches
    if isinstance(train, Conversations):
        batches = ConversationBatches(data=train, seed=tc.seed, batch_size=tc.batch_size)
    elif not isinstance(model, VLM):  # the LM stage: its text through its tokenizer's template
        chat = tok.text_chat if isinstance(tok, HFChatTokenizer) else None
        batches = TextBatches(
            texts=world_texts(train, chat), seed=tc.seed, batch_size=tc.batch_size
        )
    else:
        mix = (tc.mix_caption, tc.mix_qa, tc.mix_ocr)
        batches = ExampleBatches(
            data=train, seed=tc.seed, batch_size=tc.batch_size, mix=mix, qa_turns=tc.qa_turns
        )
    result = fit(task, tc, data=batches, out=out, resume=resume, progress=progress)
    return {
        "steps": result.steps,
        "final_loss": result.final_loss,
        "train_seconds": result.seconds,
        "train_samples_per_s": result.train_samples_per_s,
        "stopped_early": result.stopped_early,
        "skipped_steps": result.skipped_steps,
        **task.summary(),
        **({"rejected": train.rejected} if isinstance(train, Conversations) else {}),
        "config": to_dict(cfg),  # as built (the tokenizer's vocabulary, the LM's width, ...)
    }


# ---------------------------------------------------------------------------------------------
# runners (`polysense train PRESET`)


def run_lm(
    cfg: LMRunConfig, *, data: Path, out: Path, resume: bool, eval_splits: tuple[str, ...]
) -> dict[str, Any]:
    """`polysense train lm-tiny`: pretrain the GPT on world text; report held-out token loss."""
    from polysense.data.readers import detect_format
    from polysense.eval.vlm import lm_val_loss

    summary = train_stage(cfg, data=data, out=out, resume=resume)
    metrics: dict[str, Any] = {}
    if detect_format(data) == "world":
        for i, split in enumerate(eval_splits or ()):
            loss = lm_val_loss(out, data, split)
            figures = {"lm_loss": loss, "lm_perplexity": math.exp(loss), "split": split}
            metrics |= figures if i == 0 else {split: figures}
    metrics |= summary
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def run_vlm(
    cfg: VLMRunConfig,
    *,
    data: Path,
    out: Path,
    resume: bool,
    eval_splits: tuple[str, ...],
    image_root: Path | None = None,
) -> dict[str, Any]:
    """`polysense train vlm-tiny-stage1/2`: train, then evaluate captioning (with baselines), VQA,
    POPE, CHAIR and OCR on each split; write OUT/metrics.json. `image_root`: a LLaVA file's
    image folder (`polysense train --image-root`)."""
    from polysense.data.readers import detect_format
    from polysense.eval.vlm import evaluate_vlm, print_table

    summary = train_stage(cfg, data=data, out=out, resume=resume, image_root=image_root)
    metrics: dict[str, Any] = {}
    if not is_llava(data) and detect_format(data) == "world" and eval_splits:
        model = load_vlm(out)
        for i, split in enumerate(eval_splits):
            clip = cfg.init.vision if cfg.init.vision and Path(cfg.init.vision).is_dir() else None
            figures = evaluate_vlm(model, data, split=split, clip=clip) | {"split": split}
            metrics |= figures if i == 0 else {split: figures}
            print_table(figures, f"{cfg.name} on {data} ({split})")
    metrics |= summary
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
