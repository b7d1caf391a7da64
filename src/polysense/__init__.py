"""polysense: multimodal learning that trains on a laptop CPU and scales to GPUs.

    import polysense
    model = polysense.load("runs/quickstart/ckpt")   # a checkpoint dir, or a preset name
    img = model.encode_image(images)                  # [B, D], L2-normalised
    txt = model.encode_text(["a red circle"])         # [B, D]

Importing this package pulls in neither the server nor the plotting extras.
"""

from __future__ import annotations

from typing import Any

from polysense.presets import available_presets

__version__ = "0.1.0"
__all__ = ["__version__", "available_presets", "load"]


def load(name_or_path: str, *, device: str = "cpu") -> Any:
    """Load a checkpoint directory, or build a randomly initialised model from a preset name."""
    from polysense.models.clip import load_model

    return load_model(name_or_path, device=device)
