"""Data curation: dedup, similarity/heuristic filter, safety, recaption, contamination check and
shuffled shards, as per-shard functions over webdataset shards (docs/curation.md).

    from polysense.data.curate import CurateConfig, run_curate
    report = run_curate(CurateConfig(source="runs/world", out="runs/curated", stages=("dedup",)))
"""

from polysense.data.curate.config import (
    STAGES,
    ContaminationConfig,
    CurateConfig,
    DedupConfig,
    FilterConfig,
    RecaptionConfig,
    SafetyConfig,
    ShardConfig,
    check_config,
    load_config,
)
from polysense.data.curate.pipeline import check_counts, run_curate
from polysense.data.curate.probe import EmbeddingProbe, train_probe
from polysense.data.curate.shuffle import verify_manifest
from polysense.data.curate.signatures import compute_signatures, cosine_pairs, hamming_pairs

__all__ = [
    "STAGES",
    "ContaminationConfig",
    "CurateConfig",
    "DedupConfig",
    "EmbeddingProbe",
    "FilterConfig",
    "RecaptionConfig",
    "SafetyConfig",
    "ShardConfig",
    "check_config",
    "check_counts",
    "compute_signatures",
    "cosine_pairs",
    "hamming_pairs",
    "load_config",
    "run_curate",
    "train_probe",
    "verify_manifest",
]
