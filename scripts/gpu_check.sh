#!/usr/bin/env bash
# The GPU check (issue 23): on a CUDA machine, every task family trains a few steps on the GPU and
# on the CPU at fp32 (losses compared), the contrastive preset under torchrun over every visible
# GPU, and ViT-B/16 against HF CLIPModel (samples/s, MFU). Without CUDA it runs on the CPU.
# Usage: scripts/gpu_check.sh [OUT_DIR]   (default runs/gpu-check; writes OUT_DIR/gpu.json/.md/.png)
set -euo pipefail
out=${1:-runs/gpu-check}
shift || true
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
exec python -m polysense.cli bench gpu --out "$out" "$@"
