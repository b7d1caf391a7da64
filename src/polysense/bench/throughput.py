"""`polysense bench throughput`: polysense vs Hugging Face `CLIPModel` / `SiglipModel`, and vs the
machine's peak.

For each dims (a CLIP preset: `clip-tiny`, `clip-small`, `clip-vit-b32`, ...; a SigLIP preset:
`siglip-tiny`, `siglip-b16-224`), in HF's architecture (patch stem; SigLIP's text pooled at the last
position without a padding mask), so that both sides have the same parameter count (asserted),
one process builds our model and the HF `CLIPModel` or `SiglipModel` holding the same weights
(checked: equal image embeddings), one batch of world captions (tokenised, padded to the context
length as the trainer does) and random images, then times:

- a training step (forward, contrastive loss: InfoNCE or SigLIP's sigmoid loss, backward,
  gradient clipping, AdamW step): polysense
  exactly as `polysense train` runs it by default (the preset's `train.precision`, "auto" = bf16
  on hardware with bf16 matrix units; `build_optimizer`, fused AdamW), HF in fp32 and in bf16
  autocast, taking its better mode;
- inference (`encode_image` vs `get_image_features`): polysense as a loaded checkpoint of that
  run embeds (`inference_precision` = `train.precision`), HF again at its better mode.

polysense in fp32 (`train.precision=fp32`) is timed beside, outside the ratios.

Variants run interleaved (A, B, C, A, B, C, ...) with the same threads and batch; each figure is
the median of the repeats, each ratio the one of medians. Model FLOPs per sample are counted with
`torch.utils.flop_counter.FlopCounterMode`; MFU is achieved FLOP/s over the matmul peak measured
in the same run (fp32 and bf16). `train_ceiling_vs_hf` / `infer_ceiling_vs_hf` are the ratios
polysense would reach if all its FLOPs ran at that peak (in its precision): the most any code
doing the same work could beat HF by on this machine. The in-memory loader (`PairBatches.batch`)
is timed alone too.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from polysense.bench.report import write_report
from polysense.config import RunConfig, apply_overrides
from polysense.errors import PolysenseError
from polysense.losses import ContrastiveLoss
from polysense.models.packed import packing_available
from polysense.precision import native_bf16, resolve_precision

DIMS = ("clip-tiny", "clip-small", "clip-vit-b32", "siglip-tiny")
# Batch per dims: clip-tiny's preset batch; clip-small's is 256, halved so a step stays ~seconds;
# 16 at ViT-B (full depth, 151 M parameters: a step takes seconds on 2 cores).
DEFAULT_BATCH = {
    "clip-tiny": 128,
    "clip-small": 128,
    "clip-vit-b32": 16,
    "clip-vit-b16": 16,
    "siglip-tiny": 128,
    "siglip-b16-224": 16,
}
# HF CLIPModel's architecture at a preset's widths: patch embedding, cls and eot pooling, both
# towers trained (clip-tiny's quickstart recipe departs from each; presets/__init__.py)
HF_ARCH = (
    "model.vision.stem=patch",
    "model.vision.pool=cls",
    "model.text.pool=eot",
    "train.lock_text=false",
)
# HF SiglipModel's: patch embedding with bias, text pooled at the last position and no padding
# mask (HF SigLIP attends to padding; presets/__init__.py siglip_tiny says why ours departs)
HF_ARCH_SIGLIP = (
    "model.vision.stem=patch",
    "model.text.pool=last",
    "model.text.mask_padding=false",
    "train.lock_text=false",
)
QUICK_OVERRIDES = (
    "model.vision.layers=1",
    "model.text.layers=1",
    "model.vision.width=32",
    "model.text.width=32",
    "model.embed_dim=32",
    "model.vision.heads=2",
    "model.text.heads=2",
)


# ----------------------------------------------------------------------------------------------
# the machine's peak


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA runs them asynchronously), so a clock read
    after it measures the work; a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    dtype: torch.dtype,
    *,
    sizes: tuple[int, ...] = (256, 512, 1024, 2048),
    seconds: float = 1.0,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """GFLOP/s of square matmuls in `dtype` on `device`: the best size's median over ~`seconds`
    each. In float32 on a CPU with MKL, MKL's packed-weight multiply (which polysense's fp32
    inference runs on, `models/packed.py`) is timed too and the better of the two counts, so
    that the peak bounds every kernel polysense uses."""
    device = torch.device(device)
    rates: dict[int, float] = {}
    packed_rates: dict[int, float] = {}
    pack = dtype == torch.float32 and device.type == "cpu" and packing_available()
    for n in sizes:
        a = torch.randn(n, n).to(device, dtype)
        b = torch.randn(n, n).to(device, dtype)
        rates[n] = 2 * n**3 / _seconds_per_call(lambda a=a, b=b: a @ b, device, seconds) / 1e9
        if pack:
            w = b.T.contiguous()  # (N, K): a @ b = linear(a, w)
            packed = torch.ops.mkl._mkl_reorder_linear_weight(w, n)

            def mm(a=a, w=w, packed=packed, n=n) -> torch.Tensor:
                return torch.ops.mkl._mkl_linear(a, packed, w, None, n)

            packed_rates[n] = 2 * n**3 / _seconds_per_call(mm, device, seconds) / 1e9
    best = max(rates, key=rates.get)
    out: dict[str, Any] = {"gflops": rates[best], "size": best, "by_size": rates}
    if packed_rates:
        best_packed = max(packed_rates, key=packed_rates.get)
        out["packed_by_size"] = packed_rates
        if packed_rates[best_packed] > rates[best]:
            out.update(gflops=packed_rates[best_packed], size=best_packed, kernel="mkl packed")
    return out


def _seconds_per_call(fn: Callable[[], Any], device: torch.device, seconds: float) -> float:
    """Median seconds of one call of `fn` over 5 timed groups taking ~`seconds` in all."""
    for _ in range(2):
        fn()  # warm-up: thread pool, oneDNN kernel selection
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    reps = max(3, min(200, int(seconds / 5 / one)))
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        samples.append((time.perf_counter() - t0) / reps)
    return statistics.median(samples)


# ----------------------------------------------------------------------------------------------
# the two models


def world_captions(n: int, *, seed: int = 0, size: int = 32) -> list[str]:
    """The first caption of `n` world scenes (metadata only, nothing rendered)."""
    from polysense.data.world import make_scene, scene_rng

    return [
        make_scene(scene_rng(seed, "train", i), split="train", index=i, size=size)["captions"][0]
        for i in range(n)
    ]


def hf_config(cfg: Any) -> Any:
    """An HF `CLIPConfig` with the architecture of a polysense CLIP `ModelConfig` (SDPA attention)."""
    import transformers

    from polysense.models.hf import hf_vision_fields
    from polysense.models.vit import mlp_dim

    v, t = cfg.vision, cfg.text
    hf = transformers.CLIPConfig(
        vision_config=hf_vision_fields(v),
        text_config={
            "vocab_size": t.vocab_size,
            "hidden_size": t.width,
            "intermediate_size": mlp_dim(t.width, t.mlp_ratio),
            "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads,
            "max_position_embeddings": t.context_length,
            "hidden_act": t.act,
            "layer_norm_eps": t.ln_eps,
            "pad_token_id": t.pad_id,
            "eos_token_id": t.eot_id,
        },
        projection_dim=cfg.embed_dim,
        logit_scale_init_value=cfg.init_logit_scale,
    )
    hf._attn_implementation = "sdpa"
    return hf


@dataclasses.dataclass
class Pair:
    """Our model and HF's with the same weights, plus the batch both are timed on."""

    run: RunConfig
    ours: nn.Module
    hf: nn.Module
    images: torch.Tensor  # (B, 3, H, W)
    ids: torch.Tensor  # (B, L)
    params: int

    @property
    def device(self) -> torch.device:
        return self.images.device


def build_pair(
    preset: str,
    *,
    batch: int,
    seed: int = 0,
    overrides: tuple[str, ...] = (),
    device: torch.device | str = "cpu",
) -> Pair:
    """Our model for `preset` in HF's architecture (`HF_ARCH` / `HF_ARCH_SIGLIP`), and an HF
    `CLIPModel` / `SiglipModel` holding the same weights, both on `device` with the batch."""
    import transformers

    from polysense.data.tokenizer import Tokenizer
    from polysense.models.clip import CLIP
    from polysense.models.hf import convert, key_pairs
    from polysense.models.text import quiet_transformers
    from polysense.presets import get_preset

    family = get_preset(preset).model.family
    if family not in ("clip", "siglip") or get_preset(preset).model.towers != ("image", "text"):
        raise PolysenseError(
            f"bench throughput compares CLIP and SigLIP presets (image + text); {preset} is neither"
        )
    arch = HF_ARCH if family == "clip" else HF_ARCH_SIGLIP
    run = apply_overrides(get_preset(preset), [*arch, *overrides])
    if run.model.text.layers == 0:  # clip-tiny's locked word embeddings: bench the CLIP text
        text = dataclasses.replace(run.model.text, layers=run.model.vision.layers)  # tower
        run = dataclasses.replace(run, model=dataclasses.replace(run.model, text=text))
    text = run.model.text
    captions = world_captions(max(2000, batch), seed=seed, size=run.model.vision.image_size)
    tokenizer = Tokenizer.train(
        captions, vocab_size=text.vocab_size, context_length=text.context_length
    )
    text = dataclasses.replace(text, vocab_size=tokenizer.vocab_size)
    run = dataclasses.replace(run, model=dataclasses.replace(run.model, text=text))
    torch.manual_seed(seed)
    ours = CLIP(cfg=run.model, tokenizer=tokenizer)
    if family == "siglip":
        hf = _siglip_twin(ours, run)
    else:
        with quiet_transformers():
            hf = transformers.CLIPModel(hf_config(ours.cfg))
        shapes = {k: x.shape for k, x in hf.state_dict().items()}
        hf.load_state_dict(convert(ours.state_dict(), shapes, key_pairs(ours.cfg), to_hf=True))
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    if n_ours != n_hf:
        raise PolysenseError(f"{preset}: polysense has {n_ours} parameters, HF {n_hf}")
    gen = torch.Generator().manual_seed(seed)
    v = run.model.vision
    images = torch.randn(batch, v.in_channels, v.image_size, v.image_size, generator=gen)
    ids = tokenizer(captions[:batch])
    device = torch.device(device)
    ours, hf, images, ids = ours.to(device), hf.to(device), images.to(device), ids.to(device)
    ours.eval()
    hf.eval()
    with torch.inference_mode():
        a = ours.encode_image(images[:8])
        b = nn.functional.normalize(_hf_image(hf, images[:8]), dim=-1)
    if not torch.allclose(a, b, atol=1e-4):
        raise PolysenseError(
            f"{preset}: HF and polysense image embeddings differ by "
            f"{(a - b).abs().max().item():.2e}; the models are not the same function"
        )
    return Pair(run=run, ours=ours, hf=hf, images=images, ids=ids, params=n_ours)


def _siglip_twin(ours: nn.Module, run: RunConfig) -> nn.Module:
    """An HF `SiglipModel` with `ours`' weights: our `export-hf` written to a temporary directory
    and read back by transformers (SDPA attention)."""
    import tempfile

    import transformers

    from polysense.models.hf import export_hf
    from polysense.models.text import quiet_transformers

    with tempfile.TemporaryDirectory(prefix="polysense-siglip-") as tmp:
        export_hf(ours, run, tmp)
        with quiet_transformers():
            return transformers.SiglipModel.from_pretrained(tmp, attn_implementation="sdpa")


def _hf_image(hf: nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = hf.get_image_features(pixel_values=images)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ----------------------------------------------------------------------------------------------
# the steps being timed


def ours_train_step(pair: Pair) -> Callable[[], None]:
    """One `polysense train` step as the training loop runs it (same precision, optimizer,
    loss and clipping), returned as a closure."""
    from polysense.train.fit import optimizer_step
    from polysense.train.loop import _embed
    from polysense.train.optim import build_optimizer

    tc, model = pair.run.train, pair.ours
    opt = build_optimizer(model, tc)
    loss_fn = ContrastiveLoss(family=pair.run.model.family, chunk=tc.loss_chunk)

    def step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        img, txt, o = _embed(model, pair.images, pair.ids, tc.precision)
        loss = loss_fn(img, txt, o["logit_scale"].log(), o["logit_bias"])
        loss.backward()
        optimizer_step(model, opt, grad_clip=tc.grad_clip)
        sync(pair.device)

    return step


def hf_train_step(pair: Pair, *, bf16: bool) -> Callable[[], None]:
    """The same step for HF's CLIPModel / SiglipModel (same loss, clipping and AdamW settings),
    with the fused AdamW kernel that HF's Trainer uses by default (`optim="adamw_torch_fused"`,
    torch >= 2.8). HF SigLIP's text tower takes no attention mask (it attends to padding)."""
    tc, model = pair.run.train, pair.hf
    family = pair.run.model.family
    loss_fn = ContrastiveLoss(family=family)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=tc.lr,
        betas=tc.betas,
        eps=tc.eps,
        weight_decay=tc.weight_decay,
        fused=True,
    )
    keep = (pair.ids != pair.run.model.text.pad_id).long()  # (B, L) HF CLIP's attention_mask
    mask = {"attention_mask": keep} if family == "clip" else {}

    def step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(pair.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=pair.ids, pixel_values=pair.images, **mask)
        img, txt = out.image_embeds.float(), out.text_embeds.float()
        loss = loss_fn(img, txt, model.logit_scale, getattr(model, "logit_bias", None))
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        sync(pair.device)

    return step


def ours_infer(pair: Pair, *, compiled: bool = False) -> Callable[[], None]:
    """`encode_image` as a checkpoint of `pair.run` loads (`load_model` sets the model's
    `inference_precision` to the run's `train.precision`), timed on its own copy of the model;
    `compiled`: with `inference_compile` on (torch.compile of the tower)."""
    model = copy.deepcopy(pair.ours)
    model.inference_precision = pair.run.train.precision
    model.inference_compile = compiled

    def run() -> None:
        model.eval()
        with torch.inference_mode():
            model.encode_image(pair.images)
        sync(pair.device)

    return run


def hf_infer(pair: Pair, *, bf16: bool) -> Callable[[], None]:
    def run() -> None:
        pair.hf.eval()
        with torch.inference_mode(), torch.autocast(pair.device.type, torch.bfloat16, enabled=bf16):
            _hf_image(pair.hf, pair.images)
        sync(pair.device)

    return run


def _cpu_flash_flops(q, k, v, *args, **kwargs) -> int:  # shapes, via FlopCounterMode
    return sdpa_flop_count(q, k, v)


def _cpu_flash_backward_flops(grad_out, q, k, v, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


def _mkl_linear_flops(x_shape, packed_shape, weight_shape, *args, **kwargs) -> int:
    """FLOPs of `mkl::_mkl_linear` (the packed-weight linear of `models/packed.py`): x (..., K)
    times the (N, K) weight, by shapes."""
    rows = 1
    for d in x_shape[:-1]:
        rows *= d
    return 2 * rows * weight_shape[0] * weight_shape[1]


# FlopCounterMode knows the CUDA attention kernels but not the CPU one (torch 2.13): without
# these two entries, attention would count zero FLOPs on CPU. Nor does it know MKL's packed
# linear, which polysense's float32 CPU inference runs on.
CPU_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flops,
}
if packing_available():
    CPU_FLOPS[torch.ops.mkl._mkl_linear] = _mkl_linear_flops


def count_flops(fn: Callable[[], None]) -> int:
    """FLOPs of one call of `fn` (matmuls, convolutions, attention), by FlopCounterMode."""
    with FlopCounterMode(display=False, custom_mapping=CPU_FLOPS) as counter:
        fn()
    return int(counter.get_total_flops())


def interleaved(
    fns: dict[str, Callable[[], None]], *, repeats: int, seconds: float = 0.0, min_repeats: int = 3
) -> dict[str, list[float]]:
    """Seconds per call of each fn, timed A, B, C, A, B, C, ... after one warm-up call each.

    Rounds go on until `repeats` are done or, with `seconds` > 0, until the rounds have taken
    `seconds` (at least `min_repeats` rounds, or `repeats` if fewer): each measurement is bounded
    by time, so a slow machine takes fewer repeats instead of longer."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for done in range(repeats):
        if seconds and done >= min(min_repeats, repeats) and time.perf_counter() - start > seconds:
            break
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def loader_rate(*, batch: int, image_size: int, steps: int = 20) -> float:
    """Samples/s of the trainer's in-memory loader (`PairBatches.batch`) alone."""
    from polysense.data.loader import PairBatches, PairData
    from polysense.data.tokenizer import Tokenizer

    n = max(4 * batch, 1000)
    captions = world_captions(n, size=image_size)
    gen = torch.Generator().manual_seed(0)
    data = PairData(
        keys=[str(i) for i in range(n)],
        images=torch.randint(
            0, 256, (n, image_size, image_size, 3), dtype=torch.uint8, generator=gen
        ),
        captions=[[c] for c in captions],
    )
    tok = Tokenizer.train(captions, vocab_size=512, context_length=32)
    batches = PairBatches(
        data=data, tokenizer=tok, batch_size=batch, seed=0, mean=(0.5,) * 3, std=(0.5,) * 3
    )
    batches.batch(0)
    t0 = time.perf_counter()
    for s in range(1, steps + 1):
        batches.batch(s)
    return steps * batch / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# the benchmark


def bench_dims(
    preset: str,
    *,
    batch: int,
    repeats: int,
    peaks: dict[str, float],
    overrides: tuple[str, ...] = (),
    extra: bool = True,
    seconds: float = 0.0,
    device: torch.device | str = "cpu",
    compiled: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train and inference throughput of one preset's dims: (results, table rows). The bf16
    variants run only when `peaks` has a bf16 peak (the CPU has bf16 units); `seconds` bounds
    each of the two interleaved measurements (see `interleaved`). On a CUDA `device` the peaks
    must be that device's. `compiled` adds polysense's inference with `inference_compile` on
    ("polysense_compiled"), its compile time measured on the first call."""
    pair = build_pair(preset, batch=batch, overrides=overrides, device=device)
    bf16 = "bf16" in peaks  # the CPU multiplies bf16 in hardware (else those variants are skipped)
    hf_modes = ("hf_fp32", "hf_bf16") if bf16 else ("hf_fp32",)
    train = {"polysense": ours_train_step(pair)}
    infer = {"polysense": ours_infer(pair)}
    for mode in hf_modes:
        train[mode] = hf_train_step(pair, bf16=mode == "hf_bf16")
        infer[mode] = hf_infer(pair, bf16=mode == "hf_bf16")
    auto_is_fp32 = resolve_precision(pair.run.train.precision, pair.device) == "fp32"
    if extra and not auto_is_fp32:  # polysense forced to fp32 beside its bf16 default
        fp32 = dataclasses.replace(pair, run=apply_overrides(pair.run, ["train.precision=fp32"]))
        train["polysense_fp32"] = ours_train_step(fp32)
        infer["polysense_fp32"] = ours_infer(fp32)
    compile_seconds = None
    if compiled:
        infer["polysense_compiled"] = ours_infer(pair, compiled=True)
        start = time.perf_counter()
        infer["polysense_compiled"]()  # compiles
        compile_seconds = time.perf_counter() - start
    flops = {
        k: count_flops(fn) / batch
        for k, fn in (("polysense", train["polysense"]), ("hf", train["hf_fp32"]))
    }
    flops_infer = {
        "polysense": count_flops(infer["polysense"]) / batch,
        "hf": count_flops(infer["hf_fp32"]) / batch,
    }
    t_train = interleaved(train, repeats=repeats, seconds=seconds)
    t_infer = interleaved(infer, repeats=repeats, seconds=seconds)
    rate = {k: batch / statistics.median(v) for k, v in t_train.items()}
    rate_inf = {k: batch / statistics.median(v) for k, v in t_infer.items()}
    hf_best = max(hf_modes, key=rate.get)
    hf_best_inf = max(hf_modes, key=rate_inf.get)
    # Fastest repeat of each: other jobs only ever slow a repeat down, so on a shared machine
    # the ratio of minima is the steadier estimate of the undisturbed ratio (reported beside).
    fastest = {k: batch / min(v) for k, v in t_train.items()}
    fastest_inf = {k: batch / min(v) for k, v in t_infer.items()}
    achieved = flops["polysense"] * rate["polysense"]  # FLOP/s
    # The ceiling: polysense's FLOPs run at the matmul peak of its precision, over HF's rate.
    # No code doing polysense's work in that format can beat HF by more on this machine.
    resolved = resolve_precision(pair.run.train.precision, pair.device)
    ceiling_peak = "bf16" if resolved == "bf16" and bf16 else "fp32"
    at_peak = peaks[ceiling_peak] * 1e9
    res = {
        "train_ratio_vs_hf": rate["polysense"] / rate[hf_best],
        "infer_ratio_vs_hf": rate_inf["polysense"] / rate_inf[hf_best_inf],
        "mfu": achieved / (peaks["fp32"] * 1e9),
        "mfu_bf16_peak": achieved / (peaks["bf16"] * 1e9) if bf16 else None,
        "mfu_fastest": flops["polysense"] * fastest["polysense"] / (peaks["fp32"] * 1e9),
        # our rate on HF's FLOP count: what HF would need to reach, as a fraction of the peak
        "mfu_hf_flops": flops["hf"] * rate["polysense"] / (peaks["fp32"] * 1e9),
        "hf_mfu": flops["hf"] * rate[hf_best] / (peaks["fp32"] * 1e9),
        "train_ratio_vs_hf_fastest": fastest["polysense"] / max(fastest[m] for m in hf_modes),
        "infer_ratio_vs_hf_fastest": fastest_inf["polysense"]
        / max(fastest_inf[m] for m in hf_modes),
        "train_ceiling_vs_hf": at_peak / flops["polysense"] / rate[hf_best],
        "infer_ceiling_vs_hf": at_peak / flops_infer["polysense"] / rate_inf[hf_best_inf],
        "ceiling_peak": ceiling_peak,
        "bf16": "measured" if bf16 else "skipped: no bf16 units",
        "infer_compiled_ratio_vs_hf": rate_inf["polysense_compiled"] / rate_inf[hf_best_inf]
        if compiled
        else None,
        "compile_seconds": compile_seconds,
        "train_samples_per_s": rate,
        "train_samples_per_s_fastest": fastest,
        "infer_images_per_s_fastest": fastest_inf,
        "infer_images_per_s": rate_inf,
        "hf_best_train_mode": hf_best,
        "hf_best_infer_mode": hf_best_inf,
        "train_flops_per_sample": flops,
        "infer_flops_per_sample": flops_infer,
        "params": pair.params,
        "batch": batch,
        "repeats": min(len(v) for v in t_train.values()),
        "precision": pair.run.train.precision,
        "precision_resolved": resolved,
        "device": str(pair.device),
        "seconds_train": t_train,
        "seconds_infer": t_infer,
    }
    rows = []
    for kind, rates, fast, fl in (
        ("train", rate, fastest, flops),
        ("infer", rate_inf, fastest_inf, flops_infer),
    ):
        for name, r in rates.items():
            f = fl["hf" if name.startswith("hf") else "polysense"]
            rows.append(
                {
                    "dims": preset,
                    "step": kind,
                    "variant": name,
                    "samples_per_s": r,
                    "fastest_samples_per_s": fast[name],
                    "gflop_per_sample": f / 1e9,
                    "pct_fp32_peak": 100 * f * r / (peaks["fp32"] * 1e9),
                    "pct_bf16_peak": 100 * f * r / (peaks["bf16"] * 1e9) if bf16 else None,
                }
            )
    return res, rows


def run_throughput_bench(
    out: str | Path,
    *,
    dims: tuple[str, ...] = DIMS,
    batch: dict[str, int] | None = None,
    repeats: int = 7,
    seconds: float = 30.0,
    quick: bool = False,
    extra: bool = True,
    threads: int | None = None,
    compiled: bool = False,
) -> dict[str, Any]:
    """Measure and write out/throughput.{json,md,png}; returns the results dict. `threads` sets
    torch's intra-op threads for the whole run (default: torch's own choice). Each measurement
    takes at most `repeats` interleaved rounds and stops after `seconds` (at least 3 rounds).
    Where the CPU has no bf16 matrix units (`native_bf16`), the bf16 variants and the bf16 peak
    are skipped and reported as "no bf16 units": there a bf16 matmul is emulated, 1000x slower."""
    if threads:
        torch.set_num_threads(threads)
    batch = dict(DEFAULT_BATCH, **(batch or {}))
    overrides = QUICK_OVERRIDES if quick else ()
    peak_seconds = 0.1 if quick else 1.0
    sizes = (128, 256) if quick else (256, 512, 1024, 2048)
    bf16 = native_bf16("cpu")
    peak_fp32 = matmul_peak(torch.float32, sizes=sizes, seconds=peak_seconds)
    peak_bf16 = matmul_peak(torch.bfloat16, sizes=sizes, seconds=peak_seconds) if bf16 else None
    peaks = {"fp32": peak_fp32["gflops"]}
    if peak_bf16 is not None:
        peaks["bf16"] = peak_bf16["gflops"]
    results: dict[str, Any] = {}
    table: list[dict[str, Any]] = []
    for preset in dims:
        res, rows = bench_dims(
            preset,
            batch=batch.get(preset, 128),
            repeats=repeats,
            peaks=peaks,
            overrides=overrides,
            extra=extra,
            seconds=0.0 if quick else seconds,
            compiled=compiled,
        )
        size = get_image_size(preset, overrides)
        res["loader_samples_per_s"] = loader_rate(batch=batch.get(preset, 128), image_size=size)
        results[preset] = res
        table += rows
    # the peaks again at the end: the machine's load may change while the models run
    end_fp32 = matmul_peak(torch.float32, sizes=sizes, seconds=peak_seconds)
    end_bf16 = matmul_peak(torch.bfloat16, sizes=sizes, seconds=peak_seconds) if bf16 else None
    # Other jobs only ever lower a measured peak: the machine's peak is the higher of the two,
    # and every utilisation figure is rescaled to it (so MFU errs low, never high).
    best = {"fp32": max(peaks["fp32"], end_fp32["gflops"])}
    if end_bf16 is not None:
        best["bf16"] = max(peaks["bf16"], end_bf16["gflops"])
    for preset in dims:
        res = results[preset]
        for key in ("mfu", "mfu_hf_flops", "hf_mfu", "mfu_fastest"):
            res[key] *= peaks["fp32"] / best["fp32"]
        if bf16:
            res["mfu_bf16_peak"] *= peaks["bf16"] / best["bf16"]
        for key in ("train_ceiling_vs_hf", "infer_ceiling_vs_hf"):  # proportional to the peak
            res[key] *= best[res["ceiling_peak"]] / peaks[res["ceiling_peak"]]
    for row in table:
        row["pct_fp32_peak"] *= peaks["fp32"] / best["fp32"]
        if bf16:
            row["pct_bf16_peak"] *= peaks["bf16"] / best["bf16"]
    peaks = best
    results["peak_gflops"] = {**peaks, **({} if bf16 else {"bf16": "no bf16 units"})}
    results["peak_detail"] = {
        "fp32": peak_fp32,
        "bf16": peak_bf16 if bf16 else "no bf16 units",
        "fp32_at_end": end_fp32,
        "bf16_at_end": end_bf16 if bf16 else "no bf16 units",
    }
    results["threads"] = torch.get_num_threads()
    results["quick"] = quick

    def plot(ax: Any) -> None:
        names = [r["dims"] + "\n" + r["step"] for r in table if r["variant"] == "polysense"]
        variants = sorted({r["variant"] for r in table})
        width = 0.8 / len(variants)
        for j, variant in enumerate(variants):
            vals = [
                next(
                    (
                        r["samples_per_s"]
                        for r in table
                        if r["variant"] == variant and r["dims"] + "\n" + r["step"] == n
                    ),
                    0.0,
                )
                for n in names
            ]
            ax.bar([i + j * width for i in range(len(names))], vals, width, label=variant)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
        ax.set_ylabel("samples / s (median)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.set_title(f"polysense vs HF CLIPModel / SiglipModel, {results['threads']} threads")

    bf16_peak = f"bf16 {peaks['bf16']:.0f} GFLOP/s" if bf16 else "bf16: no bf16 units (skipped)"
    notes = (
        f"Matmul peak measured in this run: fp32 {peaks['fp32']:.0f} GFLOP/s, {bf16_peak}. "
        + " ".join(
            f"{p}: train x{results[p]['train_ratio_vs_hf']:.2f} vs HF "
            f"({results[p]['hf_best_train_mode']}), infer x{results[p]['infer_ratio_vs_hf']:.2f}, "
            f"MFU {100 * results[p]['mfu']:.0f}% of fp32 peak, at most "
            f"x{results[p]['train_ceiling_vs_hf']:.2f} / x{results[p]['infer_ceiling_vs_hf']:.2f}"
            f" at the {results[p]['ceiling_peak']} peak"
            + (
                f", infer compiled x{results[p]['infer_compiled_ratio_vs_hf']:.2f} "
                f"(compile {results[p]['compile_seconds']:.0f} s)"
                if compiled
                else ""
            )
            + (f" ({100 * results[p]['mfu_bf16_peak']:.0f}% of bf16)." if bf16 else ".")
            for p in dims
        )
        + f" Interleaved, median of up to {repeats} rounds"
        + (f" or {seconds:g} s per measurement." if not quick else ".")
    )
    write_report(
        out,
        "throughput",
        results,
        table,
        plot,
        title="Training and inference throughput",
        notes=notes,
    )
    return results


def get_image_size(preset: str, overrides: tuple[str, ...]) -> int:
    from polysense.presets import get_preset

    return apply_overrides(get_preset(preset), list(overrides)).model.vision.image_size
