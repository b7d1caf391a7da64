"""`polysense bench fusion`: early, late and cross-attention fusion against the contrastive dual
encoder, each trained for the same wall-clock seconds on the same world tasks.

Per style: VQA accuracy (with the per-type breakdown), ITM accuracy (overall, per negative
group, and pairwise on attribute / relation swaps), the sound task, all on test and test_novel;
accuracy with each modality removed (missing token) or replaced by noise, for a model trained
without and one trained with modality dropout; parameters, training samples/s, batch-1 latency,
the RSS growth of one training step, and the cost of scoring 1 text query against 10k images.

The dual encoder (`models.clip.CLIP`) spends 60 % of its seconds on contrastive training
(`losses.clip_loss` on the one loop, `train.fit`) and 40 % on a VQA head over its frozen
embeddings (`DualVQAHead`); ITM is its cosine similarity against a threshold chosen on val; it
has no audio tower (sound: None).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from polysense.bench.report import write_report
from polysense.config import LoopConfig
from polysense.data.loader import normalize
from polysense.data.tasks import (
    ANSWERS,
    SOUND_QUESTION,
    TASKS,
    WorldTasks,
    load_tasks,
    majority_baseline,
)
from polysense.errors import PolysenseError
from polysense.models.fusion import (
    MODALITIES,
    STYLES,
    DualVQAHead,
    FusionConfig,
    FusionRunConfig,
    FusionTrainConfig,
    count_params,
)
from polysense.train.fit import fit
from polysense.train.fusion import (
    TASK_MODALITIES,
    TaskData,
    build_tokenizer,
    evaluate,
    itm_metrics,
    train_fusion,
    vqa_metrics,
)
from polysense.train.task import Task

DEFAULT_SECONDS = 70.0  # per style and variant: the default bench stays under 15 min here
DEFAULT_INIT = "runs/quickstart/ckpt"
DEFAULT_DROPOUT = 0.3
N_CANDIDATES = 10_000
N_MEASURED = 1000  # pairs actually run for the early / xattn query cost (then scaled)
DUAL_CONTRASTIVE_SHARE = 0.6


def peak_step_mem_mb(style: str, width: int, layers: int, batch_size: int, threads: int) -> float:
    """Peak RSS growth (MB) of one training step (forward, backward, AdamW update) on a
    full-modality batch of `batch_size`, measured in a fresh process so that memory the bench
    already holds (or the allocator kept from earlier steps) does not hide it."""
    code = (
        "import json; from polysense.bench.fusion import _child_step_mem;"
        f"print(json.dumps(_child_step_mem({style!r}, {width}, {layers}, {batch_size}, {threads})))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise PolysenseError(f"peak-memory child for {style} failed: {res.stderr.strip()[-300:]}")
    return float(json.loads(res.stdout.strip().splitlines()[-1]))


def _child_step_mem(style: str, width: int, layers: int, batch_size: int, threads: int) -> float:
    import resource

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    b = batch_size
    if style == "dual":
        from polysense.config import apply_overrides
        from polysense.models.clip import build_model
        from polysense.presets import get_preset

        sets = [f"model.{t}.width={width}" for t in ("vision", "text")]
        sets += [f"model.{t}.layers={layers}" for t in ("vision", "text")]
        clip = build_model(apply_overrides(get_preset("clip-tiny"), sets))
        images = torch.randn(b, 3, 32, 32)
        ids = clip.tokenize(["a red circle left of a blue square"] * b)
        model: nn.Module = clip

        def loss() -> torch.Tensor:
            out = clip(images, ids)
            sims = out["image_embeds"] @ out["text_embeds"].T * out["logit_scale"]
            return F.cross_entropy(sims, torch.arange(b))
    else:
        from polysense.models.warmstart import build_fusion

        heads = max(1, width // 32)
        cfg = FusionConfig(style=style, width=width, layers=layers, heads=heads)  # type: ignore[arg-type]
        model = build_fusion(cfg)
        images = torch.randn(b, 3, cfg.image_size, cfg.image_size)
        ids = torch.randint(3, cfg.vocab_size, (b, cfg.context_length))
        audio = torch.randn(b, cfg.audio_samples) * 0.3
        present = torch.ones(b, 3, dtype=torch.bool)

        def loss() -> torch.Tensor:
            return model(images, ids, audio, present)["answer"].logsumexp(-1).mean()

    from polysense.train.fit import optimizer_step

    opt = torch.optim.AdamW(model.parameters())
    with open("/proc/self/statm") as fh:
        before = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    loss().backward()
    optimizer_step(model, opt, grad_clip=0.0)  # the loop's step (its norm is a few scalars)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return max(0.0, peak - before)


def _median_ms(fn: Any, repeat: int = 20) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# fusion styles


def _fusion_costs(model: nn.Module, data: TaskData) -> dict[str, Any]:
    """Latency of one VQA sample, and of 1 text query against 10k images."""
    one = data.batch("vqa", torch.arange(1))
    with torch.no_grad():
        model.eval()
        latency = _median_ms(lambda: model(one.images, one.ids, one.audio, one.present))
    # 1 text query against N_CANDIDATES images: every pair needs a full forward pass. Measured
    # on N_MEASURED pairs and scaled linearly (the cost is a sum of independent forwards).
    itm = data.batch("itm", torch.arange(min(N_MEASURED, data.sizes["itm"])))
    ids = itm.ids[:1].expand(len(itm.ids), -1)
    with torch.no_grad():
        t = time.perf_counter()
        for s in range(0, len(ids), 250):
            sl = slice(s, s + 250)
            model(itm.images[sl], ids[sl], itm.audio[sl], itm.present[sl])
        query = (time.perf_counter() - t) * 1000 * N_CANDIDATES / len(ids)
    return {"latency_ms": latency, "query_10k_ms": query}


def _late_query_ms(model: nn.Module, data: TaskData) -> float:
    """Late fusion caches the image vectors; a query costs one text encoding plus the
    combine + head over 10k cached vectors."""
    itm = data.batch("itm", torch.arange(min(500, data.sizes["itm"])))
    reps = -(-N_CANDIDATES // len(itm.ids))
    with torch.no_grad():
        cached = torch.cat([model.image(itm.images)] * reps)[:N_CANDIDATES]  # (N, W)
        t = time.perf_counter()
        txt = model.text(itm.ids[:1]).expand(N_CANDIDATES, -1)
        aud = model.missing[2].expand(N_CANDIDATES, -1)
        model.heads(model.combine_vectors(torch.stack([cached, txt, aud], dim=1)))
        return (time.perf_counter() - t) * 1000


def _conditions(model: nn.Module, data: TaskData, limit: int) -> dict[str, Any]:
    """{"all": metrics, "missing": {modality: {task: acc}}, "noise": {...}}."""
    result: dict[str, Any] = {"all": evaluate(model, data, limit=limit)}
    for kind in ("missing", "noise"):
        result[kind] = {}
        for m in MODALITIES:
            cond = f"{'no' if kind == 'missing' else 'noise'}_{m}"
            figures = evaluate(model, data, condition=cond, limit=limit)
            result[kind][m] = {
                task: figures.get(f"{task}_accuracy")
                for task in TASKS
                if m in TASK_MODALITIES[task]
            }
    return result


def _mean_drop(cond: dict[str, Any]) -> float:
    """Mean over (modality, task) of accuracy with all inputs minus accuracy with it missing."""
    drops = [
        cond["all"][f"{task}_accuracy"] - acc
        for m, tasks in cond["missing"].items()
        for task, acc in tasks.items()
        if acc is not None
    ]
    return sum(drops) / len(drops)


def bench_style(
    style: str,
    *,
    train: WorldTasks,
    test: WorldTasks,
    novel: WorldTasks,
    tokenizer: Any,
    seconds: float,
    dropout: float,
    batch_size: int,
    eval_limit: int,
    model_overrides: dict[str, Any],
    progress: bool,
) -> dict[str, Any]:
    """Train one fusion style twice (without / with modality dropout) for `seconds` each.
    `tokenizer` serves the styles that do not take a CLIP text tower (`text_init`), which bring
    their checkpoint's tokenizer."""
    row: dict[str, Any] = {}
    separate = style != "early"  # early fusion has no separate image or text encoder
    model_overrides = {
        **model_overrides,
        "style": style,
        "freeze_image": bool(model_overrides.get("freeze_image")) and separate,
        "text_init": model_overrides.get("text_init", "") if separate else "",
    }
    for rate in (0.0, dropout):
        cfg = FusionRunConfig(
            name=f"fusion-{style}",
            model=FusionConfig(**model_overrides),
            train=FusionTrainConfig(
                batch_size=batch_size,
                steps=100_000,
                max_minutes=seconds / 60,
                modality_dropout=rate,
                warmup_steps=50,
            ),
        )
        # A step count the run cannot reach in its seconds: the schedule follows the clock.
        steps = _steps_for(seconds, style)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
        own = None if cfg.model.text_init else tokenizer
        res = train_fusion(cfg, train, tokenizer=own, progress=progress)
        mc, tokenizer = res.cfg.model, res.tokenizer
        test_data = TaskData(tasks=test, tokenizer=tokenizer, mean=mc.image_mean, std=mc.image_std)
        cond = _conditions(res.model, test_data, eval_limit)
        if rate == 0.0:
            novel_data = TaskData(
                tasks=novel, tokenizer=tokenizer, mean=mc.image_mean, std=mc.image_std
            )
            row.update(cond["all"])
            row["novel"] = evaluate(res.model, novel_data, limit=eval_limit)
            row["missing"], row["noise"] = cond["missing"], cond["noise"]
            row["mean_drop_missing"] = _mean_drop(cond)
            row.update(
                params=count_params(res.model),
                train_seconds=res.seconds,
                train_steps=res.steps,
                train_samples_per_s=res.train_samples_per_s,
                **_fusion_costs(res.model, test_data),
                peak_mem_mb=peak_step_mem_mb(
                    style, mc.width, mc.layers, batch_size, torch.get_num_threads()
                ),
            )
            if style == "late":
                row["query_10k_ms"] = _late_query_ms(res.model, test_data)
                row["precomputable"] = "image/audio vectors yes; head per pair"
            else:
                row["precomputable"] = "no: full forward per pair"
        else:
            row["dropout"] = {
                "rate": rate,
                "train_seconds": res.seconds,
                "train_steps": res.steps,
                **{k: cond["all"].get(f"{k}_accuracy") for k in TASKS},
                "missing": cond["missing"],
                "noise": cond["noise"],
                "mean_drop_missing": _mean_drop(cond),
            }
    return row


def _steps_for(seconds: float, style: str) -> int:
    # The lr schedule ends at `steps` or when the seconds run out, whichever is first; set the
    # step count high enough that the clock decides (about 40 steps/s would be needed to hit it).
    return max(1000, int(seconds * 40))


# ---------------------------------------------------------------------------------------------
# the dual encoder


def _dual_embed_images(model: nn.Module, images: torch.Tensor, cfg: Any) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for s in range(0, len(images), 512):
            x = normalize(
                images[s : s + 512], cfg.model.vision.image_mean, cfg.model.vision.image_std
            )
            out.append(model.encode_image(x))
    return torch.cat(out)


def _dual_embed_texts(model: nn.Module, texts: list[str]) -> tuple[torch.Tensor, list[str]]:
    uniq = sorted(set(texts))
    with torch.no_grad():
        emb = torch.cat([model.encode_text(uniq[s : s + 512]) for s in range(0, len(uniq), 512)])
    return emb, uniq


class _DualPairs:
    """The dual encoder's contrastive batch of step s: `batch_size` train scenes and one of each
    scene's captions, drawn from a generator seeded by s."""

    def __init__(self, *, train: WorldTasks, batch_size: int, tokenize: Any, cfg: Any) -> None:
        self.train, self.batch_size, self.tokenize = train, batch_size, tokenize
        self.v = cfg.model.vision

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.train
        gen = torch.Generator().manual_seed(step)
        idx = torch.randperm(len(t.keys), generator=gen)[: self.batch_size]
        pick = torch.randint(0, 1_000_000, (len(idx),), generator=gen).tolist()
        caps = [
            t.captions[i][p % len(t.captions[i])] for i, p in zip(idx.tolist(), pick, strict=True)
        ]
        images = normalize(t.images[idx], self.v.image_mean, self.v.image_std)  # (B, 3, H, W)
        return images, self.tokenize(caps)


class _DualContrastiveTask(Task):
    """The dual encoder's contrastive step (`losses.clip_loss`, every parameter at one rate,
    constant) with the temperature clamp after each update."""

    def __init__(self, *, model: nn.Module, cfg: LoopConfig, max_logit_scale: float) -> None:
        self.model, self.cfg, self.max_logit_scale = model, cfg, max_logit_scale

    def param_groups(self) -> list[dict]:
        params = list(self.model.parameters())
        return [{"params": params, "weight_decay": self.cfg.weight_decay, "base_lr": self.cfg.lr}]

    def lr_factor(self, step: int, schedule_step: int) -> float:
        return 1.0

    def loss(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        from polysense.losses import clip_loss

        images, ids = (x.to(self.rt.device) for x in batch)
        out = self.net(images, ids)
        return clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"].log()), {}

    def after_step(self, step: int) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, self.max_logit_scale)


class _HeadRows:
    """The VQA head's batch of step s: 256 train questions drawn from a generator seeded by s."""

    def __init__(self, *, n: int) -> None:
        self.n = n

    def batch(self, step: int) -> torch.Tensor:
        return torch.randint(self.n, (256,), generator=torch.Generator().manual_seed(step))


class _DualHeadTask(Task):
    """The VQA head on the frozen dual encoder's embeddings: the train scenes' image embeddings
    and the distinct questions' text embeddings are computed once when the clock starts."""

    def __init__(
        self, *, head: nn.Module, clip: nn.Module, train: WorldTasks, cfg: LoopConfig, clip_cfg: Any
    ) -> None:
        self.model, self.clip, self.train, self.cfg, self.clip_cfg = (
            head,
            clip,
            train,
            cfg,
            clip_cfg,
        )

    def param_groups(self) -> list[dict]:
        params = list(self.model.parameters())
        return [{"params": params, "weight_decay": self.cfg.weight_decay, "base_lr": self.cfg.lr}]

    def lr_factor(self, step: int, schedule_step: int) -> float:
        return 1.0

    def on_start(self) -> None:
        t, device = self.train, self.rt.device
        self.img_emb = _dual_embed_images(self.clip, t.images, self.clip_cfg).to(device)  # (N, D)
        q_emb, q_list = _dual_embed_texts(self.clip, t.vqa_text)
        q_index = {q: i for i, q in enumerate(q_list)}
        self.q_emb = q_emb.to(device)  # (Q, D)
        self.q_of = torch.tensor([q_index[q] for q in t.vqa_text], device=device)
        self.scene, self.answer = t.vqa_scene.to(device), t.vqa_answer.to(device)

    def loss(self, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        idx = batch.to(self.rt.device)
        logits = self.net(self.img_emb[self.scene[idx]], self.q_emb[self.q_of[idx]])
        return F.cross_entropy(logits, self.answer[idx]), {}


def _budget_cfg(*, seconds: float, batch_size: int, lr: float, weight_decay: float) -> LoopConfig:
    """A loop config that trains until `seconds` are spent at a constant rate, with torch's
    AdamW defaults (betas 0.9/0.999, eps 1e-8), no clipping, no log and no checkpoint."""
    return LoopConfig(
        batch_size=batch_size,
        steps=10**12,  # never reached: the clock ends the run
        max_minutes=max(seconds, 1e-3) / 60,
        lr=lr,
        weight_decay=weight_decay,
        betas=(0.9, 0.999),
        eps=1e-8,
        warmup_steps=0,
        grad_clip=0.0,
        precision="fp32",
        log_every=10**12,
        ckpt_every=0,
    )


def bench_dual(
    *,
    train: WorldTasks,
    val: WorldTasks,
    test: WorldTasks,
    novel: WorldTasks,
    seconds: float,
    batch_size: int,
    width: int,
    layers: int,
    eval_limit: int,
    init: str,
) -> dict[str, Any]:
    """Contrastive training (60 % of the seconds), then a VQA head on frozen embeddings, both on
    the one loop (`train.fit`, time-budgeted). The CLIP starts from `init` (a checkpoint, as the
    fusion styles' image towers do) or, with init="", from a clip-tiny of the given width/layers
    with a BPE on the train captions."""
    from polysense.config import apply_overrides
    from polysense.models.checkpoint import load_model
    from polysense.models.clip import build_model
    from polysense.presets import get_preset

    sets = [f"model.{t}.width={width}" for t in ("vision", "text")]
    sets += [f"model.{t}.layers={layers}" for t in ("vision", "text")]
    cfg = apply_overrides(get_preset("clip-tiny"), sets)
    torch.manual_seed(0)
    if init:
        clip = load_model(init)
        cfg = dataclasses.replace(cfg, model=clip.cfg)
    else:
        clip = build_model(cfg, texts=[c for caps in train.captions for c in caps])
    t0 = time.perf_counter()
    lr = 5e-4 if init else 2e-3
    loop = _budget_cfg(
        seconds=seconds * DUAL_CONTRASTIVE_SHARE, batch_size=batch_size, lr=lr, weight_decay=0.1
    )
    task = _DualContrastiveTask(model=clip, cfg=loop, max_logit_scale=cfg.model.max_logit_scale)
    pairs = _DualPairs(train=train, batch_size=batch_size, tokenize=clip.tokenize, cfg=cfg)
    contrastive = fit(task, loop, data=pairs, out=None, progress=False)
    clip.cpu()  # the evaluation below runs on the CPU
    n_seen = contrastive.steps * batch_size
    contrastive_s = time.perf_counter() - t0
    # VQA head: the embeddings are computed once inside its budget (on_start); then the head
    # trains until the seconds are spent.
    torch.manual_seed(0)
    head = DualVQAHead(embed_dim=clip.cfg.embed_dim, width=width, n_answers=len(ANSWERS))
    loop = _budget_cfg(seconds=seconds - contrastive_s, batch_size=256, lr=1e-3, weight_decay=0.01)
    head_task = _DualHeadTask(head=head, clip=clip, train=train, cfg=loop, clip_cfg=cfg)
    heads = fit(head_task, loop, data=_HeadRows(n=len(train.vqa_text)), out=None, progress=False)
    head.cpu()
    steps = heads.steps
    total_s = time.perf_counter() - t0
    threshold = _dual_threshold(clip, val, cfg)

    def run(tasks: WorldTasks, condition: str = "all") -> dict[str, Any]:
        return _dual_eval(clip, head, tasks, cfg, threshold, condition, eval_limit)

    row: dict[str, Any] = run(test)
    row["novel"] = run(novel)
    row["missing"] = {
        m: {
            "vqa": run(test, f"no_{m}")["vqa_accuracy"],
            "itm": run(test, f"no_{m}")["itm_accuracy"],
        }
        for m in ("image", "text")
    }
    row["missing"]["audio"] = {"sound": None}
    row["noise"] = {
        m: {k: run(test, f"noise_{m}")[f"{k}_accuracy"] for k in ("vqa", "itm")}
        for m in ("image", "text")
    }
    # costs
    one_img = normalize(test.images[:1], cfg.model.vision.image_mean, cfg.model.vision.image_std)
    with torch.no_grad():
        latency = _median_ms(
            lambda: head(clip.encode_image(one_img), clip.encode_text([test.vqa_text[0]]))
        )
        cand = F.normalize(torch.randn(N_CANDIDATES, clip.cfg.embed_dim), dim=-1)
        query = _median_ms(lambda: clip.encode_text([test.itm_text[0]]) @ cand.T)
    peak = peak_step_mem_mb("dual", width, layers, batch_size, torch.get_num_threads())
    row.update(
        params=count_params(clip) + count_params(head),
        train_seconds=total_s,
        contrastive_seconds=contrastive_s,
        head_steps=steps,
        itm_threshold=threshold,
        train_samples_per_s=n_seen / max(contrastive_s, 1e-9),
        contrastive_samples=n_seen,
        latency_ms=latency,
        peak_mem_mb=peak,
        query_10k_ms=query,
        precomputable="yes: image embeddings indexed, 1 matrix product per query",
        sound_accuracy=None,
    )
    return row


def _dual_inputs(
    clip: nn.Module,
    tasks: WorldTasks,
    scenes: torch.Tensor,
    texts: list[str],
    cfg: Any,
    condition: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    v = cfg.model.vision
    images = normalize(tasks.images[scenes], v.image_mean, v.image_std)
    gen = torch.Generator().manual_seed(0)
    if condition == "no_image":
        images = torch.zeros_like(images)  # the mean image: a dual encoder has no missing token
    elif condition == "noise_image":
        images = torch.randn(images.shape, generator=gen)
    if condition == "no_text":
        texts = [""] * len(texts)
    elif condition == "noise_text":
        words = sorted({w for t in texts for w in t.split()})
        texts = [
            " ".join(
                words[int(i)] for i in torch.randint(len(words), (len(t.split()),), generator=gen)
            )
            for t in texts
        ]
    with torch.no_grad():
        return clip.encode_image(images), clip.encode_text(texts)


def _dual_eval(
    clip: nn.Module,
    head: nn.Module,
    tasks: WorldTasks,
    cfg: Any,
    threshold: float,
    condition: str,
    limit: int,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    nq = min(limit or len(tasks.vqa_text), len(tasks.vqa_text))
    preds = []
    for s in range(0, nq, 512):
        sl = slice(s, min(nq, s + 512))
        i, t = _dual_inputs(clip, tasks, tasks.vqa_scene[sl], tasks.vqa_text[sl], cfg, condition)
        with torch.no_grad():
            preds.append(head(i, t).argmax(dim=-1))
    out.update(vqa_metrics(torch.cat(preds), tasks, nq))
    ni = min(limit or len(tasks.itm_text), len(tasks.itm_text))
    scores = []
    for s in range(0, ni, 512):
        sl = slice(s, min(ni, s + 512))
        i, t = _dual_inputs(clip, tasks, tasks.itm_scene[sl], tasks.itm_text[sl], cfg, condition)
        scores.append((i * t).sum(dim=-1))
    out.update(itm_metrics(torch.cat(scores), tasks, ni, threshold=threshold))
    out["sound_accuracy"] = None
    return out


def _dual_threshold(clip: nn.Module, val: WorldTasks, cfg: Any) -> float:
    """The cosine similarity that best separates true from false captions on val."""
    i, t = _dual_inputs(clip, val, val.itm_scene, val.itm_text, cfg, "all")
    scores = (i * t).sum(dim=-1)
    best, best_acc = 0.0, -1.0
    for th in torch.quantile(scores, torch.linspace(0.02, 0.98, 97)).tolist():
        acc = float(((scores > th).long() == val.itm_label).float().mean())
        if acc > best_acc:
            best, best_acc = th, acc
    return best


# ---------------------------------------------------------------------------------------------
# the whole bench


def run_fusion_bench(
    out: str | Path,
    *,
    data: str | Path = "runs/world-all",
    seconds: float = DEFAULT_SECONDS,
    dropout: float = DEFAULT_DROPOUT,
    batch_size: int = 96,
    width: int = 128,
    layers: int = 4,
    eval_limit: int = 1000,
    train_limit: int | None = None,
    styles: tuple[str, ...] = (*STYLES, "dual"),
    threads: int = 1,
    image_init: str = DEFAULT_INIT,
    freeze_image: bool = True,
    text_init: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and measure every style; write fusion.json / .md / .png into `out`. `threads`:
    torch CPU threads (on a shared 2-core machine one thread ran 6x faster per step than two).
    `image_init`: a CLIP checkpoint every style starts from (its vision tower for the fusion
    styles, the whole model for the dual encoder); "" or a missing path = random init.
    `text_init`: late and xattn fusion also take its text tower and tokenizer."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        init = image_init if image_init and Path(image_init, "model.safetensors").is_file() else ""
        return _run(
            init,
            freeze_image,
            out,
            data,
            seconds,
            dropout,
            batch_size,
            width,
            layers,
            eval_limit,
            train_limit,
            styles,
            threads,
            progress,
            text_init,
        )
    finally:
        torch.set_num_threads(before)


def _run(
    init: str,
    freeze_image: bool,
    out: str | Path,
    data: str | Path,
    seconds: float,
    dropout: float,
    batch_size: int,
    width: int,
    layers: int,
    eval_limit: int,
    train_limit: int | None,
    styles: tuple[str, ...],
    threads: int,
    progress: bool,
    text_init: bool,
) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    train = load_tasks(data, split="train", limit=train_limit, rejects_path=out / "rejects.jsonl")
    val = load_tasks(data, split="val", limit=1000)
    test = load_tasks(data, split="test")
    novel = load_tasks(data, split="test_novel")
    load_s = time.perf_counter() - t_start
    overrides: dict[str, Any] = {"width": width, "layers": layers, "heads": max(1, width // 32)}
    overrides.update(
        image_init=init, freeze_image=freeze_image, text_init=init if text_init else ""
    )
    base = FusionRunConfig(model=FusionConfig(width=width))  # type: ignore[arg-type]
    tokenizer = build_tokenizer(train, base)
    rows: dict[str, dict[str, Any]] = {}
    for style in styles:
        if style == "dual":
            rows[style] = bench_dual(
                train=train,
                val=val,
                test=test,
                novel=novel,
                seconds=seconds,
                batch_size=batch_size,
                width=width,
                layers=layers,
                init=init,
                eval_limit=eval_limit,
            )
        else:
            rows[style] = bench_style(
                style,
                train=train,
                test=test,
                novel=novel,
                tokenizer=tokenizer,
                seconds=seconds,
                dropout=dropout,
                batch_size=batch_size,
                eval_limit=eval_limit,
                model_overrides=overrides,
                progress=progress,
            )
    baseline = majority_baseline(train, test)
    results = {
        "styles": rows,
        "majority_baseline": baseline,
        "train_seconds_per_style": seconds,
        "modality_dropout": dropout,
        "data": str(data),
        "n_items": {s.split: s.sizes() for s in (train, val, test, novel)},
        "eval_limit": eval_limit,
        "threads": threads,
        "image_init": init or None,
        "freeze_image": freeze_image,
        "text_init": (init or None) if text_init else None,
        "answers": list(ANSWERS),
        "sound_question": SOUND_QUESTION,
        "load_seconds": load_s,
        "total_seconds": time.perf_counter() - t_start,
    }
    table = [_table_row(name, row) for name, row in rows.items()]
    table.append(
        {
            "style": "majority",
            "vqa": baseline["vqa"],
            "vqa_novel": None,
            "itm": baseline["itm"],
            "attr_pair": 0.5,
            "rel_pair": 0.5,
            "sound": baseline["sound"],
        }
    )
    write_report(
        out,
        "fusion",
        results,
        table,
        _plot(rows, baseline),
        title="Fusion styles on the world: equal training time",
        notes=(
            f"Each style trained {seconds:.0f} s on this machine (fusion styles twice: without "
            f"and with modality dropout {dropout}); dual = CLIP, 60 % contrastive + 40 % VQA head "
            "on frozen embeddings, ITM by cosine threshold from val. attr_pair / rel_pair: share "
            "of swapped-caption pairs where the true caption scores higher. miss_*: mean accuracy "
            "drop with one modality missing (no dropout / with dropout)."
        ),
    )
    return results


def _table_row(name: str, row: dict[str, Any]) -> dict[str, Any]:
    drop = row.get("dropout") or {}
    return {
        "style": name,
        "vqa": row.get("vqa_accuracy"),
        "vqa_novel": (row.get("novel") or {}).get("vqa_accuracy"),
        "itm": row.get("itm_accuracy"),
        "attr_pair": row.get("itm_attr_pairwise"),
        "rel_pair": row.get("itm_rel_pairwise"),
        "sound": row.get("sound_accuracy"),
        "sound_novel": (row.get("novel") or {}).get("sound_accuracy"),
        "params": row.get("params"),
        "samples_s": row.get("train_samples_per_s"),
        "latency_ms": row.get("latency_ms"),
        "peak_mb": row.get("peak_mem_mb"),
        "query_10k_ms": row.get("query_10k_ms"),
        "miss_drop": row.get("mean_drop_missing"),
        "miss_drop_dropout": drop.get("mean_drop_missing"),
    }


def _plot(rows: dict[str, dict[str, Any]], baseline: dict[str, Any]) -> Any:
    metrics = [
        ("VQA", "vqa_accuracy"),
        ("ITM", "itm_accuracy"),
        ("attr swap", "itm_attr_pairwise"),
        ("rel swap", "itm_rel_pairwise"),
        ("sound", "sound_accuracy"),
    ]

    def plot(ax: Any) -> None:
        n = len(rows)
        w = 0.8 / max(n, 1)
        for k, (name, row) in enumerate(rows.items()):
            xs = [i + k * w for i in range(len(metrics))]
            ys = [row.get(key) or 0.0 for _, key in metrics]
            ax.bar(xs, ys, width=w, label=name)
        ax.axhline(baseline["vqa"], color="grey", linestyle="--", linewidth=1, label="VQA majority")
        ax.set_xticks([i + w * (n - 1) / 2 for i in range(len(metrics))], [m for m, _ in metrics])
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy (test)")
        ax.set_title("fusion styles, equal training time")
        ax.legend(fontsize=8, ncols=3)

    return plot
