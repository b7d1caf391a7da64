"""Which float format a run computes in: `"auto"` picks bf16 where the hardware multiplies bf16
natively (CUDA GPUs with bf16 support; CPUs with AMX-BF16 or AVX512-BF16), fp32 elsewhere.

On the project machine (Sapphire Rapids, AMX) a bf16 matmul runs at ~1 TFLOP/s against fp32's
~155 GFLOP/s; on a CPU without bf16 units, bf16 is emulated and slower than fp32, so "auto" keeps
fp32 there. The quickstart's zero-shot accuracy in bf16 is within 0.01 of fp32's
(docs/performance.md), which is what makes bf16 a safe default where it is fast.
"""

from __future__ import annotations

from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # ATen's kernels capped below AVX-512 (ATEN_CPU_CAPABILITY=avx2, as on an AVX2-only CPU
        # or when simulating one) cannot use the bf16 instructions even where the chip has them.
        if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
            return False
        caps = torch.cpu.get_capabilities()
        return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))
    return False


def resolve_precision(precision: str, device: torch.device | str) -> Literal["fp32", "bf16"]:
    """ "auto" -> "bf16" on a device with native bf16, else "fp32"; "fp32"/"bf16" unchanged."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision {precision!r}: use auto, fp32 or bf16")
    return precision  # type: ignore[return-value]
