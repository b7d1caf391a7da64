"""The curation run config: frozen dataclasses, one per stage, read from a Python file.

A config file is plain Python that defines ``config = CurateConfig(...)``; ``--set a.b=c`` changes
single fields (`polysense.config.apply_overrides`).
"""

from __future__ import annotations

import runpy
from dataclasses import dataclass, field
from pathlib import Path

from polysense.errors import PolysenseError

STAGES = ("dedup", "filter", "safety", "recaption", "contamination", "shard")


@dataclass(frozen=True)
class DedupConfig:
    exact: bool = True  # same pixels and same normalised text
    phash_radius: int = 10  # pHash Hamming radius (of 64 bits) of a perceptual candidate; -1 off
    # Thumbnail (16 x 16 RGB) correlation a perceptual or embedding candidate must reach; 0 = off.
    verify_corr: float = 0.95
    embedding_threshold: float = 0.0  # cosine of image embeddings (needs `ckpt`); 0 = off


@dataclass(frozen=True)
class FilterConfig:
    min_similarity: float | None = None  # image-caption cosine (needs `ckpt`); None = off
    top_fraction: float = 0.0  # keep the best-scoring fraction instead (0 = off)
    max_captions: int = 3  # a sample's score: mean cosine over its first max_captions captions
    min_words: int = 2
    max_words: int = 64
    min_alpha: float = 0.6  # letters / non-space characters: a crude "is this language" check
    min_image_side: int = 8
    max_aspect: float = 3.0


@dataclass(frozen=True)
class SafetyConfig:
    blocklist: str = ""  # a words file, one per line ('#' comments); "" = the bundled one
    probe: str = ""  # an embedding probe (.npz from `train_probe`), needs `ckpt`
    classifier: str = ""  # "module:function" hook: fn(images, embeddings) -> scores in [0, 1]
    threshold: float = 0.5  # flag an image whose probe/classifier score is >= this


@dataclass(frozen=True)
class RecaptionConfig:
    # "template" (from the scene's objects), "vlm:CKPT_DIR" (a polysense.models.vlm captioner)
    # or "module:function" (fn(images, metas) -> list of captions or None).
    captioner: str = "template"
    # the instruction a vlm:CKPT captioner is given in its chat template; "" = the VLM's own
    # caption instruction (what `polysense caption` and `polysense eval caption` ask)
    prompt: str = ""
    # Fraction of samples whose training captions become the synthetic one (applied when the
    # shards are written: the loader draws captions from what the shard holds).
    mix_ratio: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class ContaminationConfig:
    eval_source: str = ""  # any readable source: a world, tars, JSONL ...
    eval_splits: tuple[str, ...] = ("test",)  # splits of a world / split folders; () = none
    phash_radius: int = 10
    verify_corr: float = 0.95
    embedding_threshold: float = 0.0  # needs `ckpt`; 0 = off
    remove: bool = True  # False: report the leaks (contamination.jsonl) but keep them


@dataclass(frozen=True)
class ShardConfig:
    shard_size: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class CurateConfig:
    name: str = ""
    source: str = ""
    out: str = ""
    split: str | None = None  # split of a world / tar folder to read (world default: train)
    stages: tuple[str, ...] = STAGES
    ckpt: str = ""  # polysense checkpoint for embeddings (similarity, embedding dedup, probe)
    device: str = "cpu"  # where that checkpoint embeds: cpu, cuda, cuda:1, mps
    embed_batch: int = 256  # images per forward pass (captions: twice as many)
    shard_size: int = 1000  # samples per working shard: the unit of work, of resume and of RAM
    workers: int = 1
    engine: str = "local"  # "local" (process pool of `workers`) or "ray" (Ray Data)
    limit: int | None = None
    dedup: DedupConfig = field(default_factory=DedupConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    recaption: RecaptionConfig = field(default_factory=RecaptionConfig)
    contamination: ContaminationConfig = field(default_factory=ContaminationConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)


def check_config(cfg: CurateConfig) -> None:
    """Raise a PolysenseError naming the field and the fix for settings that cannot run."""
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown or not cfg.stages:
        raise PolysenseError(f"stages={cfg.stages!r}: choose from {', '.join(STAGES)}")
    if "shard" in cfg.stages and cfg.stages[-1] != "shard":
        raise PolysenseError("stages: 'shard' (shuffle and final shards) must be the last stage")
    if not cfg.source or not cfg.out:
        raise PolysenseError("config: set source (data to read) and out (output directory)")
    if cfg.ckpt:
        from polysense.devices import resolve_device

        resolve_device(cfg.device, flag="device")
    if cfg.embed_batch < 1:
        raise PolysenseError(f"embed_batch={cfg.embed_batch}: must be >= 1 (e.g. 256)")
    if cfg.shard_size < 1 or cfg.shard.shard_size < 1:
        raise PolysenseError("shard_size and shard.shard_size must be >= 1 (e.g. 1000)")
    needs_ckpt = {
        "dedup.embedding_threshold": "dedup" in cfg.stages and cfg.dedup.embedding_threshold > 0,
        "filter.min_similarity / filter.top_fraction": "filter" in cfg.stages
        and (cfg.filter.min_similarity is not None or cfg.filter.top_fraction > 0),
        "safety.probe": "safety" in cfg.stages and bool(cfg.safety.probe),
        "contamination.embedding_threshold": "contamination" in cfg.stages
        and cfg.contamination.embedding_threshold > 0,
    }
    for name, needed in needs_ckpt.items():
        if needed and not cfg.ckpt:
            raise PolysenseError(
                f"{name} needs image/text embeddings: set ckpt to a polysense checkpoint "
                "(e.g. --set ckpt=runs/quickstart/ckpt) or turn it off"
            )
    if "contamination" in cfg.stages and not cfg.contamination.eval_source:
        raise PolysenseError(
            "contamination.eval_source is empty: name the evaluation data to check against "
            "(e.g. --set contamination.eval_source=runs/world)"
        )
    if not 0 <= cfg.recaption.mix_ratio <= 1:
        raise PolysenseError(f"recaption.mix_ratio={cfg.recaption.mix_ratio}: must be in [0, 1]")
    if not 0 <= cfg.filter.top_fraction <= 1:
        raise PolysenseError(f"filter.top_fraction={cfg.filter.top_fraction}: must be in [0, 1]")


def load_config(path: str | Path) -> CurateConfig:
    """Run a Python config file and return its ``config`` (a CurateConfig)."""
    path = Path(path)
    if not path.is_file():
        raise PolysenseError(f"{path}: config file not found; see docs/curation.md for one")
    try:
        namespace = runpy.run_path(str(path))
    except Exception as exc:
        raise PolysenseError(f"{path}: the config file failed to run: {exc}") from exc
    cfg = namespace.get("config")
    if not isinstance(cfg, CurateConfig):
        raise PolysenseError(
            f"{path}: defines no `config = CurateConfig(...)` "
            "(from polysense.data.curate import CurateConfig)"
        )
    return cfg
