"""Embedding index over faiss with a SQLite metadata store (see docs/retrieval.md).

    from polysense.index import build_index, EmbeddingIndex
    index = build_index("runs/quickstart/ckpt", "runs/world", "runs/index", split="test")
    hits = index.search_text(["a red circle"], k=5)[0]      # list[Hit], best first
    index = EmbeddingIndex.open("runs/index")               # later, from disk

faiss and torch are imported when these names are first used, so `import polysense` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MAX_K", "EmbeddingIndex", "Hit", "build_index"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from polysense.index import store

        return getattr(store, name)
    raise AttributeError(f"module 'polysense.index' has no attribute {name!r}")
