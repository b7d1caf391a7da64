"""`polysense bench fusion`: early, late and cross-attention fusion against the contrastive dual
encoder, each trained for the same wall-clock seconds on the same world tasks.

Per style: VQA accuracy (with the per-type breakdown), ITM accuracy (overall, per negative
group, and pairwise on attribute / relation swaps), the sound task, all on test and test_novel;
accuracy with each modality removed (missing token) or replaced by noise, for a model trained
without and one trained with modality dropout; parameters, training samples/s, batch-1 latency,
the RSS growth of one training step, and the cost of scoring 1 text query against 10k images.

The dual encoder (`models.clip.CLIP`) spends 60 % of its seconds on contrastive training
(`train.loop.train`) and 40 % on a VQA head over its frozen embeddings (`DualVQAHead`); ITM is
its cosine similarity against a threshold chosen on val; it has no audio tower (sound: None).
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from polysense.bench.report import write_report
from polysense.data.loader import PairData, normalize
from polysense.data.tasks import (
    ANSWERS,
    SOUND_QUESTION,
    TASKS,
    WorldTasks,
    load_tasks,
    majority_baseline,
)
from polysense.models.fusion import (
    MODALITIES,
    STYLES,
    DualVQAHead,
    FusionConfig,
    FusionRunConfig,
    FusionTrainConfig,
    count_params,
)
from polysense.train.fusion import (
    TASK_MODALITIES,
    TaskData,
    build_tokenizer,
    evaluate,
    itm_metrics,
    task_loss,
    train_fusion,
    vqa_metrics,
)

DEFAULT_SECONDS = 75.0
DEFAULT_DROPOUT = 0.3
N_CANDIDATES = 10_000
DUAL_CONTRASTIVE_SHARE = 0.6


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            import os

            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def peak_rss_growth_mb(fn: Any) -> float:
    """Run `fn()` while a thread samples the process RSS every 2 ms; the peak minus the start."""
    start = _rss_mb()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(0.0, max(peak[0], _rss_mb()) - start)


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


def _fusion_costs(model: nn.Module, data: TaskData, batch_size: int) -> dict[str, Any]:
    """Latency of one VQA sample, RSS growth of one training step, 1 query x 10k images."""
    one = data.batch("vqa", torch.arange(1))
    with torch.no_grad():
        model.eval()
        latency = _median_ms(lambda: model(one.images, one.ids, one.audio, one.present))
    model.train()
    batch = data.batch("vqa", torch.arange(batch_size))

    def step() -> None:
        out = model(batch.images, batch.ids, batch.audio, batch.present)
        task_loss(out, batch).backward()

    peak = peak_rss_growth_mb(step)
    model.zero_grad(set_to_none=True)
    model.eval()
    # 1 text query against N_CANDIDATES images: every pair needs a full forward pass.
    itm = data.batch("itm", torch.arange(min(500, data.sizes["itm"])))
    ids = itm.ids[:1].expand(len(itm.ids), -1)
    t = time.perf_counter()
    with torch.no_grad():
        for _ in range(0, N_CANDIDATES, len(itm.ids)):
            model(itm.images, ids, itm.audio, itm.present)
    query = (
        (time.perf_counter() - t)
        * 1000
        * N_CANDIDATES
        / (len(itm.ids) * -(-N_CANDIDATES // len(itm.ids)))
    )
    return {"latency_ms": latency, "peak_mem_mb": peak, "query_10k_ms": query}


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
        vecs = torch.stack([cached, txt, aud], dim=1)
        if model.cfg.combine == "concat":
            fused = model.combine(vecs.flatten(1))
        elif model.cfg.combine == "sum":
            fused = vecs.sum(dim=1)
        else:
            fused = (torch.sigmoid(model.gate(vecs.flatten(1)))[..., None] * vecs).sum(dim=1)
        model.heads(fused)
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
    """Train one fusion style twice (without / with modality dropout) for `seconds` each."""
    row: dict[str, Any] = {}
    for rate in (0.0, dropout):
        cfg = FusionRunConfig(
            name=f"fusion-{style}",
            model=FusionConfig(style=style, **model_overrides),  # type: ignore[arg-type]
            train=FusionTrainConfig(
                batch_size=batch_size,
                steps=100_000,
                max_seconds=seconds,
                modality_dropout=rate,
                warmup_steps=50,
            ),
        )
        # A step count the run cannot reach in its seconds: the schedule follows the clock.
        steps = _steps_for(seconds, style)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
        res = train_fusion(cfg, train, tokenizer=tokenizer, progress=progress)
        mc = res.cfg.model
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
                **_fusion_costs(res.model, test_data, batch_size),
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
    work: Path,
    eval_limit: int,
    progress: bool,
) -> dict[str, Any]:
    """Contrastive training (60 % of the seconds), then a VQA head on frozen embeddings."""
    from polysense.config import apply_overrides
    from polysense.presets import get_preset
    from polysense.train.loop import train as train_contrastive

    cfg = apply_overrides(
        get_preset("clip-tiny"),
        [
            f"model.vision.width={width}",
            f"model.vision.layers={layers}",
            f"model.text.width={width}",
            f"model.text.layers={layers}",
            f"train.batch_size={batch_size}",
            f"train.max_minutes={seconds * DUAL_CONTRASTIVE_SHARE / 60}",
            "train.steps=100000",
            "train.ckpt_every=0",
            "train.log_every=50",
        ],
    )
    pairs = PairData(keys=train.keys, images=train.images, captions=train.captions)
    t0 = time.perf_counter()
    result = train_contrastive(
        cfg, data=str(work), out=work / "dual", pairs=pairs, progress=progress
    )
    from polysense.models.clip import load_model

    clip = load_model(work / "dual").eval()
    contrastive_s = time.perf_counter() - t0
    # VQA head: image embeddings of the train scenes and the (few hundred) distinct questions are
    # computed once, inside the budget; then the head trains until the seconds are spent.
    head_budget = seconds - contrastive_s
    t1 = time.perf_counter()
    img_emb = _dual_embed_images(clip, train.images, cfg)
    q_emb, q_list = _dual_embed_texts(clip, train.vqa_text)
    q_index = {q: i for i, q in enumerate(q_list)}
    q_of = torch.tensor([q_index[q] for q in train.vqa_text])
    torch.manual_seed(0)
    head = DualVQAHead(embed_dim=clip.cfg.embed_dim, width=width, n_answers=len(ANSWERS))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    steps = 0
    while time.perf_counter() - t1 < head_budget:
        idx = torch.randint(len(q_of), (256,), generator=gen)
        logits = head(img_emb[train.vqa_scene[idx]], q_emb[q_of[idx]])
        loss = F.cross_entropy(logits, train.vqa_answer[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    head.eval()
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
    n_samples = result.train_samples_per_s * (result.seconds or 1)
    one_img = normalize(test.images[:1], cfg.model.vision.image_mean, cfg.model.vision.image_std)
    with torch.no_grad():
        latency = _median_ms(
            lambda: head(clip.encode_image(one_img), clip.encode_text([test.vqa_text[0]]))
        )
        cand = F.normalize(torch.randn(N_CANDIDATES, clip.cfg.embed_dim), dim=-1)
        query = _median_ms(lambda: clip.encode_text([test.itm_text[0]]) @ cand.T)
    imgs = normalize(
        train.images[:batch_size], cfg.model.vision.image_mean, cfg.model.vision.image_std
    )
    ids = clip.tokenize([c[0] for c in train.captions[:batch_size]])

    def step() -> None:
        clip.train()
        out = clip(imgs, ids)
        sims = out["image_embeds"] @ out["text_embeds"].T * out["logit_scale"]
        F.cross_entropy(sims, torch.arange(len(ids))).backward()

    peak = peak_rss_growth_mb(step)
    clip.zero_grad(set_to_none=True)
    clip.eval()
    row.update(
        params=count_params(clip) + count_params(head),
        train_seconds=total_s,
        contrastive_seconds=contrastive_s,
        head_steps=steps,
        itm_threshold=threshold,
        train_samples_per_s=n_samples / max(contrastive_s, 1e-9),
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
    eval_limit: int = 2000,
    train_limit: int | None = None,
    styles: tuple[str, ...] = (*STYLES, "dual"),
    progress: bool = True,
) -> dict[str, Any]:
    """Train and measure every style; write fusion.json / .md / .png into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    train = load_tasks(data, split="train", limit=train_limit, rejects_path=out / "rejects.jsonl")
    val = load_tasks(data, split="val", limit=1000)
    test = load_tasks(data, split="test")
    novel = load_tasks(data, split="test_novel")
    load_s = time.perf_counter() - t_start
    overrides = {"width": width, "layers": layers, "heads": max(1, width // 32)}
    base = FusionRunConfig(model=FusionConfig(**overrides))  # type: ignore[arg-type]
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
                work=out,
                eval_limit=eval_limit,
                progress=progress,
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
