"""Probe: image-tower inference of polysense eager, HF CLIPModel eager, and polysense's tower
through torch.compile in several inductor modes, interleaved in one process (the numbers in
docs/performance.md, "ViT-B/32 in fp32, SigLIP rows and torch.compile").

    python scripts/compile_probe.py --dims clip-vit-b32 --batch 16 --threads 2 \
        --modes compile,freeze,max-autotune

Run it under `flock /tmp/polysense-heavy.lock`, with the AVX2 cap for the AVX2-only case
(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2). fp32 throughout.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from polysense.bench.throughput import _hf_image, build_pair, interleaved

MODES = {
    "compile": {},
    "freeze": {"options": {"freezing": True}},
    "max-autotune": {"mode": "max-autotune"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="clip-vit-b32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    ap.add_argument(
        "--modes", default="compile,freeze", help=f"comma-separated: {', '.join(MODES)}"
    )
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pair = build_pair(args.dims, batch=args.batch, overrides=("train.precision=fp32",))
    x = pair.images
    ours = copy.deepcopy(pair.ours).eval()
    ours.inference_precision = "fp32"
    with torch.no_grad():
        ref = ours.encode_image(x)

    def eager() -> None:
        with torch.inference_mode():
            ours.encode_image(x)

    def hf() -> None:
        with torch.inference_mode():
            _hf_image(pair.hf, x)

    fns = {"polysense_eager": eager, "hf_eager": hf}
    for name in [m.strip() for m in args.modes.split(",") if m.strip()]:
        torch._dynamo.reset()
        model = copy.deepcopy(pair.ours).eval()
        tower = torch.compile(model.visual, **MODES[name])
        start = time.perf_counter()
        with torch.no_grad():
            out = torch.nn.functional.normalize(model.image_proj(tower(x)).float(), dim=-1)
        diff = (out - ref).abs().max().item()
        print(f"{name}: first call {time.perf_counter() - start:.1f} s, max |diff| {diff:.1e}")

        def run(tower=tower, proj=model.image_proj) -> None:
            with torch.no_grad():
                proj(tower(x))

        fns[name] = run
    times = interleaved(fns, repeats=7, seconds=args.seconds)
    rate = {k: args.batch / statistics.median(v) for k, v in times.items()}
    for name, r in rate.items():
        print(f"{name:16s} {r:8.1f} images/s  x{r / rate['hf_eager']:.2f} vs HF")


if __name__ == "__main__":
    main()
