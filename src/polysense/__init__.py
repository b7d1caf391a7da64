"""polysense: multimodal learning that trains on a laptop CPU and scales to GPUs.

    import polysense
    model = polysense.load("runs/quickstart/ckpt")   # a checkpoint dir, or a preset name
    img = model.encode_image(images)                  # [B, D], L2-normalised
    txt = model.encode_text(["a red circle"])         # [B, D]

Importing this package pulls in neither the server nor the plotting extras.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polysense.presets import available_presets

__version__ = "0.1.0"
__all__ = ["__version__", "available_presets", "load"]


def load(name_or_path: str | Path, *, device: str = "cpu", family: str | None = None) -> Any:
    """A checkpoint directory of any family -> its model in eval mode (CLIP/SigLIP/towers, fusion,
    LM, VLM, t2i, or a Hugging Face CLIP/SigLIP/LLaVA directory; `models.checkpoint`), or a
    contrastive preset name -> a randomly initialised model, seeded by the preset's `train.seed`,
    its BPE tokenizer trained on `bootstrap_captions()`.

    `family` ("clip" also takes SigLIP and tower models; "fusion", "lm", "vlm", "t2i"), when
    given, is the family the caller needs: anything else is a one-line error."""
    from polysense.errors import PolysenseError
    from polysense.models.checkpoint import load_checkpoint, model_family

    path = Path(name_or_path)
    if path.is_dir():
        have = model_family(path)
        _check_family(have, family, f"{path}")
        return load_checkpoint(path, device=device)
    name = str(name_or_path)
    if name not in available_presets():
        raise PolysenseError(
            f"{name!r} is neither a checkpoint directory nor a preset name; "
            f"presets: {', '.join(available_presets())}"
        )
    return _random_init(name, device=device, family=family)


def _check_family(have: str, want: str | None, what: str) -> None:
    from polysense.errors import PolysenseError

    if want is None or have == want or (want == "clip" and have == "siglip"):
        return
    raise PolysenseError(
        f"{what} holds a {have or 'unknown'} model, and a {want} model is needed here; pass a "
        f"{want} checkpoint directory"
    )


def _random_init(name: str, *, device: str, family: str | None) -> Any:
    """The randomly initialised model of contrastive preset `name`; other families build from
    data or init checkpoints, so a one-line error says to train them."""
    import torch

    from polysense.config import RunConfig
    from polysense.errors import PolysenseError
    from polysense.models.clip import build_model
    from polysense.presets import get_preset

    run = get_preset(name)
    if not isinstance(run, RunConfig):
        raise PolysenseError(
            f"preset {name!r} builds from training data or init checkpoints, so it has no "
            f"random-init model; train it (`polysense train {name} --data DIR --out DIR`) and "
            "load that directory"
        )
    _check_family(run.model.family, family, f"preset {name!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.train.seed)
        model = build_model(run)
    model.inference_precision = run.train.precision
    return model.to(device).eval()
