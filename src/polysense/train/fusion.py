"""Training and evaluation of fusion models on the world's tasks (VQA, ITM, sound).

Each step draws one sub-batch per task (shares `train.task_mix`), runs the model on each and
sums the losses: cross-entropy over `ANSWERS` for VQA and the sound task, a logistic loss for
image–text matching. Batches are a pure function of (seed, step), so a resumed run sees the same
data as an uninterrupted one; `state.pt` (model, optimiser, step, RNG) is written atomically.

With `model.freeze_image` the image encoder's output (`FusionModel.image_features`) is computed
once per training scene before the first step and looked up by scene index afterwards: the same
values (up to float rounding), and a step costs only the trainable part.

Missing modalities: `modality_dropout` hides each present modality of a sample with probability
`train.modality_dropout` (never all of them) and the model sees its learned missing token
instead. `evaluate(..., condition=)` measures every task with all inputs, with one modality
removed (`no_image`, `no_text`, `no_audio`) or replaced by noise (`noise_image`, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from polysense.data.loader import normalize
from polysense.data.tasks import (
    ANSWERS,
    ITM_GROUPS,
    QUESTION_TYPES,
    SOUND_QUESTION,
    SOUND_SAMPLES,
    TASKS,
    WorldTasks,
)
from polysense.data.tokenizer import Tokenizer
from polysense.errors import PolysenseError
from polysense.fileio import atomic_write_json
from polysense.models.checkpoint import save_fusion
from polysense.models.fusion import MODALITIES, FusionModel, FusionRunConfig, count_params
from polysense.models.warmstart import build_fusion, with_text_init
from polysense.train.checkpoint import load_state
from polysense.train.fit import fit
from polysense.train.optim import NO_DECAY_NAMES, adamw
from polysense.train.task import Task

CONDITIONS: tuple[str, ...] = (
    "all",
    *(f"no_{m}" for m in MODALITIES),
    *(f"noise_{m}" for m in MODALITIES),
)
# Which modalities each task has: VQA and ITM are image + text, the sound task all three.
TASK_MODALITIES: dict[str, tuple[str, ...]] = {
    "vqa": ("image", "text"),
    "itm": ("image", "text"),
    "sound": ("image", "text", "audio"),
}
_NO_DECAY = (*NO_DECAY_NAMES, "missing", "modality_embed", "media_embed", "pos_")


@dataclass
class TaskBatch:
    """One task's inputs and targets; `answer` is -100 and `label` -1 where they do not apply."""

    task: str
    images: torch.Tensor  # (B, 3, H, W) float, normalised
    ids: torch.Tensor  # (B, L) long
    audio: torch.Tensor  # (B, T) float
    present: torch.Tensor  # (B, 3) bool, MODALITIES order
    answer: torch.Tensor  # (B,) long
    label: torch.Tensor  # (B,) float
    index: torch.Tensor  # (B,) long: item index within its task
    scene: torch.Tensor  # (B,) long: scene index within the split

    def to(self, device: torch.device) -> TaskBatch:
        """The same batch with every tensor on `device`."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


def modality_dropout(
    present: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Hide each present modality with probability `p`, independently per sample; a sample that
    would lose all of them keeps one, drawn uniformly among those it had. (B, M) bool -> same."""
    if not 0.0 <= p <= 1.0:
        raise PolysenseError(f"train.modality_dropout={p}: must be in [0, 1]")
    if p == 0.0:
        return present.clone()
    drop = torch.rand(present.shape, generator=generator) < p
    kept = present & ~drop
    empty = present.any(dim=1) & ~kept.any(dim=1)  # (B,)
    if empty.any():
        score = torch.rand(present.shape, generator=generator).masked_fill(~present, -1.0)
        rescue = F.one_hot(score.argmax(dim=1), present.shape[1]).bool()  # (B, M)
        kept = torch.where(empty[:, None], rescue, kept)
    return kept


class TaskData:
    """A split's tasks with their texts tokenised once, turned into `TaskBatch`es on demand."""

    def __init__(self, *, tasks: WorldTasks, tokenizer: Tokenizer, mean: tuple, std: tuple) -> None:
        self.tasks, self.tokenizer, self.mean, self.std = tasks, tokenizer, mean, std
        self.vqa_ids, n1 = tokenizer.encode(tasks.vqa_text)
        self.itm_ids, n2 = tokenizer.encode(tasks.itm_text)
        self.sound_ids = tokenizer([SOUND_QUESTION])[0]
        self.n_truncated = n1 + n2
        self.sizes = {"vqa": len(tasks.vqa_text), "itm": len(tasks.itm_text)}
        self.sizes["sound"] = len(tasks.sound_answer)

    def batch(self, task: str, idx: torch.Tensor) -> TaskBatch:
        t = self.tasks
        b = len(idx)
        present = torch.ones(b, len(MODALITIES), dtype=torch.bool)
        answer = torch.full((b,), -100, dtype=torch.long)
        label = torch.full((b,), -1.0)
        audio = torch.zeros(b, SOUND_SAMPLES)
        if task == "vqa":
            scene, ids, answer = t.vqa_scene[idx], self.vqa_ids[idx], t.vqa_answer[idx]
            present[:, 2] = False
        elif task == "itm":
            scene, ids = t.itm_scene[idx], self.itm_ids[idx]
            label = t.itm_label[idx].float()
            present[:, 2] = False
        elif task == "sound":
            scene, answer, audio = t.sound_scene[idx], t.sound_answer[idx], t.sound_audio[idx]
            ids = self.sound_ids.expand(b, -1).clone()
        else:
            raise PolysenseError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        images = normalize(t.images[scene], self.mean, self.std)
        return TaskBatch(task, images, ids, audio, present, answer, label, idx, scene)

    @torch.no_grad()
    def image_features(self, model: FusionModel, batch_size: int = 512) -> torch.Tensor:
        """`model.image_features` of every scene of the split (N, ...), in batches."""
        images, device = self.tasks.images, next(model.parameters()).device
        return torch.cat(
            [
                model.image_features(
                    normalize(images[s : s + batch_size], self.mean, self.std).to(device)
                )
                for s in range(0, len(images), batch_size)
            ]
        )


class TaskBatches:
    """Deterministic training batches: at `step`, `task_mix` shares of `batch_size` from each
    task, each task walking its own seeded permutation epoch after epoch."""

    def __init__(
        self, *, data: TaskData, batch_size: int, mix: tuple[float, ...], seed: int
    ) -> None:
        if len(mix) != len(TASKS) or min(mix) < 0 or sum(mix) <= 0:
            raise PolysenseError(
                f"train.task_mix={mix}: give {len(TASKS)} non-negative shares ({', '.join(TASKS)})"
            )
        sizes = [round(batch_size * m / sum(mix)) for m in mix[:-1]]
        sizes.append(batch_size - sum(sizes))
        self.sizes = {task: n for task, n in zip(TASKS, sizes, strict=True) if n > 0}
        for task, n in self.sizes.items():
            if data.sizes[task] < n:
                raise PolysenseError(
                    f"task {task} has {data.sizes[task]} items, fewer than its {n} per batch; "
                    "lower train.batch_size or use a larger world"
                )
        self.data, self.seed = data, seed
        self._perms: dict[tuple[str, int], torch.Tensor] = {}

    def indices(self, task: str, step: int) -> torch.Tensor:
        n, total = self.sizes[task], self.data.sizes[task]
        per_epoch = total // n
        epoch, j = divmod(step, per_epoch)
        key = (task, epoch)
        if key not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k[0] != task}
            gen = torch.Generator().manual_seed(
                self.seed * 1_000_003 + TASKS.index(task) * 7 + epoch
            )
            self._perms[key] = torch.randperm(total, generator=gen)
        return self._perms[key][j * n : (j + 1) * n]

    def batch(self, step: int) -> list[TaskBatch]:
        return [self.data.batch(task, self.indices(task, step)) for task in self.sizes]


def task_loss(out: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
    """Summed (not averaged) loss of one sub-batch, so sub-batches add up to the batch's sum."""
    if batch.task == "itm":
        return F.binary_cross_entropy_with_logits(out["itm"], batch.label, reduction="sum")
    return F.cross_entropy(out["answer"], batch.answer, reduction="sum")


def _forward(
    model: nn.Module,
    batch: TaskBatch,
    present: torch.Tensor,
    image_cache: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The model on a batch; `image_cache` (scenes, ...) holds precomputed image features."""
    features = None if image_cache is None else image_cache[batch.scene]
    return model(batch.images, batch.ids, batch.audio, present, image_features=features)


def apply_condition(
    batch: TaskBatch, condition: str, *, vocab_size: int, generator: torch.Generator
) -> TaskBatch:
    """The batch as seen under an evaluation condition: `no_X` marks modality X absent (the model
    uses its missing token); `noise_X` replaces X by noise: Gaussian pixels (in normalised units),
    random word ids in the text's own positions, Gaussian audio of the clip's own RMS."""
    if condition == "all":
        return batch
    kind, _, modality = condition.partition("_")
    if modality not in MODALITIES or kind not in ("no", "noise"):
        raise PolysenseError(f"unknown condition {condition!r}; choose from {list(CONDITIONS)}")
    m = MODALITIES.index(modality)
    if kind == "no":
        present = batch.present.clone()
        present[:, m] = False
        return dataclasses.replace(batch, present=present)
    if modality == "image":
        noise = torch.randn(batch.images.shape, generator=generator)
        return dataclasses.replace(batch, images=noise)
    if modality == "text":
        words = batch.ids > 2  # keep the special tokens (pad, bos, eot are ids 0-2)
        rand = torch.randint(3, vocab_size, batch.ids.shape, generator=generator)
        return dataclasses.replace(batch, ids=torch.where(words, rand, batch.ids))
    rms = batch.audio.pow(2).mean(dim=1, keepdim=True).sqrt()  # (B, 1)
    return dataclasses.replace(
        batch, audio=torch.randn(batch.audio.shape, generator=generator) * rms
    )


@torch.no_grad()
def predict(
    model: nn.Module,
    data: TaskData,
    task: str,
    *,
    condition: str = "all",
    batch_size: int = 256,
    limit: int = 0,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Answer predictions or ITM scores for the first `limit` items of a task (0 = all)."""
    model.eval()
    n = data.sizes[task] if not limit else min(limit, data.sizes[task])
    gen = torch.Generator().manual_seed(seed)
    vocab = model.cfg.vocab_size
    outs: list[torch.Tensor] = []
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(n, start + batch_size))
        batch = apply_condition(data.batch(task, idx), condition, vocab_size=vocab, generator=gen)
        out = _forward(model, batch, batch.present)
        outs.append(out["itm"] if task == "itm" else out["answer"].argmax(dim=-1))
    return {"index": torch.arange(n), "output": torch.cat(outs) if outs else torch.zeros(0)}


def itm_metrics(
    scores: torch.Tensor, tasks: WorldTasks, n: int, threshold: float = 0.0
) -> dict[str, Any]:
    """Binary accuracy (score > threshold means "matches") overall and per group, and pairwise
    accuracy (the true caption scores above its swapped twin) for the attr and rel groups."""
    labels = tasks.itm_label[:n]
    correct = ((scores > threshold).long() == labels).float()
    groups = tasks.itm_group[:n]
    out: dict[str, Any] = {"itm_accuracy": float(correct.mean())}
    for g in ITM_GROUPS:
        sel = torch.tensor([x == g for x in groups], dtype=torch.bool)
        out[f"itm_{g}_accuracy"] = float(correct[sel].mean()) if sel.any() else None
    pair = tasks.itm_pair[:n]
    for g in ("attr", "rel"):
        sel = torch.tensor([x == g for x in groups], dtype=torch.bool) & (pair >= 0)
        pos, neg = {}, {}
        for p, lab, s in zip(
            pair[sel].tolist(), labels[sel].tolist(), scores[sel].tolist(), strict=True
        ):
            (pos if lab == 1 else neg)[p] = s
        both = [p for p in pos if p in neg]
        wins = [pos[p] > neg[p] for p in both]
        out[f"itm_{g}_pairwise"] = sum(wins) / len(wins) if wins else None
    return out


def vqa_metrics(pred: torch.Tensor, tasks: WorldTasks, n: int) -> dict[str, Any]:
    correct = (pred == tasks.vqa_answer[:n]).float()
    out: dict[str, Any] = {"vqa_accuracy": float(correct.mean()) if n else None}
    types = tasks.vqa_type[:n]
    out["vqa_by_type"] = {}
    for t in QUESTION_TYPES:
        sel = torch.tensor([x == t for x in types], dtype=torch.bool)
        out["vqa_by_type"][t] = float(correct[sel].mean()) if sel.any() else None
    return out


def evaluate(
    model: nn.Module,
    data: TaskData,
    *,
    condition: str = "all",
    limit: int = 0,
    tasks: tuple[str, ...] = TASKS,
    batch_size: int = 256,
) -> dict[str, Any]:
    """All metrics of a model on a split under one condition (see `apply_condition`)."""
    out: dict[str, Any] = {}
    for task in tasks:
        if condition != "all" and condition.split("_", 1)[1] not in TASK_MODALITIES[task]:
            continue  # removing audio from a task without audio changes nothing
        res = predict(model, data, task, condition=condition, limit=limit, batch_size=batch_size)
        n = len(res["index"])
        if task == "vqa":
            out.update(vqa_metrics(res["output"], data.tasks, n))
        elif task == "itm":
            out.update(itm_metrics(res["output"], data.tasks, n))
        else:
            correct = res["output"] == data.tasks.sound_answer[:n]
            out["sound_accuracy"] = float(correct.float().mean())
    return out


# ---------------------------------------------------------------------------------------------
# training


def param_groups(model: nn.Module, lr: float, weight_decay: float, gate_lr_scale: float = 1.0):
    """AdamW groups of the trainable parameters: no decay on 0/1-D tensors, embeddings, position
    and missing tokens; the cross-attention gates (if any) in a third group at lr * gate_lr_scale."""
    decay, other, gates = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.rsplit(".", 1)[-1] in ("gate_attn", "gate_ff"):
            gates.append(p)
        elif p.ndim >= 2 and not any(k in name for k in _NO_DECAY):
            decay.append(p)
        else:
            other.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "base_lr": lr},
        {"params": other, "weight_decay": 0.0, "base_lr": lr},
    ]
    if gates:
        groups.append({"params": gates, "weight_decay": 0.0, "base_lr": lr * gate_lr_scale})
    for group in groups:  # the loop rescales "lr" from "base_lr" at every step
        group["lr"] = group["base_lr"]
    return groups


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, gate_lr_scale: float = 1.0
) -> torch.optim.AdamW:
    """AdamW (fused where possible) over `param_groups`, with the betas and eps the fusion
    presets train with (`FusionTrainConfig` defaults)."""
    return adamw(
        param_groups(model, lr, weight_decay, gate_lr_scale), lr=lr, betas=(0.9, 0.98), eps=1e-6
    )


def build_tokenizer(tasks: WorldTasks, cfg: FusionRunConfig) -> Tokenizer:
    """The tokenizer of `model.text_init`'s checkpoint, or one trained on the tasks' texts."""
    if cfg.model.text_init:
        model_cfg = with_text_init(cfg.model)
        return Tokenizer.from_file(
            Path(cfg.model.text_init) / "tokenizer.json", context_length=model_cfg.context_length
        )
    return Tokenizer.train(
        tasks.texts(), vocab_size=cfg.model.vocab_size, context_length=cfg.model.context_length
    )


@dataclass
class FusionTrainResult:
    model: FusionModel
    tokenizer: Tokenizer
    cfg: FusionRunConfig
    steps: int
    seconds: float
    train_samples_per_s: float
    final_loss: float


class FusionTask(Task):
    """The fusion heads' summed loss over one step's task sub-batches (VQA, ITM, sound), with
    modality dropout; a frozen image encoder's features are computed once at the start."""

    def __init__(
        self, *, cfg: FusionRunConfig, model: FusionModel, data: TaskData, tokenizer: Tokenizer
    ) -> None:
        self.run_cfg, self.cfg = cfg, cfg.train
        self.model, self.data, self.tokenizer = model, data, tokenizer
        self.image_cache: torch.Tensor | None = None

    def param_groups(self) -> list[dict]:
        tc = self.cfg
        return param_groups(self.model, tc.lr, tc.weight_decay, tc.gate_lr_scale)

    def on_start(self) -> None:
        # a frozen image encoder gives every scene the same features at every step: compute
        # them once (inside the clock and the time budget)
        if self.run_cfg.model.freeze_image:
            cache = self.data.image_features(self.model)  # None where a style has no features
            self.image_cache = None if cache is None else cache.to(self.rt.device)

    def loss(self, batch: list[TaskBatch], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        total = torch.zeros((), device=self.rt.device)
        for sub in batch:
            present = modality_dropout(sub.present, self.cfg.modality_dropout)
            sub = sub.to(self.rt.device)
            with self.rt.autocast():
                out = _forward(self.net, sub, present.to(self.rt.device), self.image_cache)
            out = {k: v.float() if torch.is_tensor(v) else v for k, v in out.items()}
            total = total + task_loss(out, sub)
        return total / self.cfg.batch_size, {}

    def export(self, out: Path) -> None:
        save_fusion(self.model, self.run_cfg, self.tokenizer, out)


def train_fusion(
    cfg: FusionRunConfig,
    train_tasks: WorldTasks,
    *,
    out: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    tokenizer: Tokenizer | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
) -> FusionTrainResult:
    """Train `cfg` on `train_tasks` for `train.steps` steps or `train.max_minutes`, whichever
    ends first. With `out`, checkpoint there every `train.ckpt_every` steps and at the end
    (state.pt, model.safetensors, config.json, tokenizer.json, metrics.jsonl)."""
    tc = cfg.train
    if resume:
        if out is None:
            raise PolysenseError("resume needs an output directory")
        load_state(out)  # a missing or foreign state.pt fails here, before any work
        # the run's context length: text_init's when the text tower comes from a checkpoint
        tokenizer = Tokenizer.from_file(
            out / "tokenizer.json", context_length=with_text_init(cfg.model).context_length
        )
    if tokenizer is None:
        tokenizer = build_tokenizer(train_tasks, cfg)
    model_cfg = dataclasses.replace(
        with_text_init(cfg.model),
        vocab_size=tokenizer.vocab_size,
        pad_id=tokenizer.pad_id,
        eot_id=tokenizer.eot_id,
        n_answers=len(ANSWERS),
    )
    cfg = dataclasses.replace(cfg, model=model_cfg)
    torch.manual_seed(tc.seed)
    model = build_fusion(model_cfg)
    data = TaskData(
        tasks=train_tasks, tokenizer=tokenizer, mean=model_cfg.image_mean, std=model_cfg.image_std
    )
    batches = TaskBatches(data=data, batch_size=tc.batch_size, mix=tc.task_mix, seed=tc.seed)
    if out is not None and not resume:
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save(out / "tokenizer.json")
    task = FusionTask(cfg=cfg, model=model, data=data, tokenizer=tokenizer)
    result = fit(task, tc, data=batches, out=out, resume=resume, progress=progress, on_log=log)
    return FusionTrainResult(
        model=model,
        tokenizer=tokenizer,
        cfg=cfg,
        steps=result.steps,
        seconds=result.seconds,
        train_samples_per_s=result.train_samples_per_s,
        final_loss=result.final_loss,
    )


def run_preset(
    cfg: FusionRunConfig,
    *,
    data: Path,
    out: Path,
    resume: bool = False,
    eval_splits: tuple[str, ...] = ("test", "test_novel"),
) -> dict[str, Any]:
    """The `polysense train fusion-*` runner: train on a world's train split, evaluate every task
    on `eval_splits`, write OUT/metrics.json and return it."""
    from polysense.data.tasks import load_tasks

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_tasks = load_tasks(
        data, split="train", image_size=cfg.model.image_size, rejects_path=out / "rejects.jsonl"
    )
    res = train_fusion(cfg, train_tasks, out=out, resume=resume)
    metrics: dict[str, Any] = {
        "config": dataclasses.asdict(res.cfg),
        "params": count_params(res.model),
        "train_samples_per_s": res.train_samples_per_s,
        "train_seconds": res.seconds,
        "steps": res.steps,
    }
    for split in eval_splits:
        tasks = load_tasks(data, split=split, image_size=cfg.model.image_size)
        split_data = TaskData(
            tasks=tasks,
            tokenizer=res.tokenizer,
            mean=res.cfg.model.image_mean,
            std=res.cfg.model.image_std,
        )
        figures = evaluate(res.model, split_data, limit=cfg.train.eval_limit)
        suffix = "" if split == "test" else f"_{split}"
        metrics.update({f"{k}{suffix}": v for k, v in figures.items()})
        metrics[f"n_samples{suffix}"] = split_data.sizes
    atomic_write_json(out / "metrics.json", metrics)
    _print_metrics(metrics, eval_splits, cfg.name or cfg.model.style)
    return metrics


def _print_metrics(metrics: dict[str, Any], splits: tuple[str, ...], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{title}: accuracy")
    for col in ("split", "vqa", "itm", "attr swap", "rel swap", "sound"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split in splits:
        sfx = "" if split == "test" else f"_{split}"
        keys = ("vqa_accuracy", "itm_accuracy", "itm_attr_pairwise", "itm_rel_pairwise")
        vals = [metrics.get(k + sfx) for k in (*keys, "sound_accuracy")]
        table.add_row(split, *("-" if v is None else f"{v:.3f}" for v in vals))
    Console().print(table)
