"""Check that no module imports one above it (DESIGN.md: data -> models -> losses/eval -> train ->
index/serve/bench -> cli).

Every module of src/polysense belongs to the layer of its area (the first name under the package:
`polysense.data.readers` is in `data`). An import edge from a lower layer to a higher one is a
violation. The edges come from `import_cycles.module_graph` (module- and function-level imports,
`TYPE_CHECKING` imports ignored).

The package itself, `polysense/__init__.py`, is the public facade (`polysense.load` over every
family and the preset names): it is in layer 5, beside index/serve/bench, which may use it.
`EXCEPTIONS` below lists the edges allowed anyway, each with its reason.

Prints each violation and exits 1 if any, else prints "0 upward imports".

Usage: python .ci/layers.py [SRC_ROOT] (default: src)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from import_cycles import module_graph

# area -> layer; areas not named (config, errors, fileio, precision, decoding, demo) are layer 0
LAYERS = {
    "data": 1,
    "models": 2,
    "losses": 3,
    "eval": 3,
    "presets": 4,
    "train": 4,
    "index": 5,
    "serve": 5,
    "bench": 5,
    "cli": 6,
}
EXCEPTIONS = {
    # the recaption stage of curation may run a VLM ("vlm:CKPT"): curation composes a model
    ("polysense.data.curate.captioners", "polysense.models.checkpoint"),
    ("polysense.data.curate.captioners", "polysense.eval.captioning"),
    # the embedding stages of curation (dedup, CLIP-score filter) load the model they embed with
    ("polysense.data.curate.embed", "polysense"),
}


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 5  # the facade


def upward_imports(root: Path, package: str = "polysense") -> list[tuple[str, str]]:
    graph = module_graph(Path(root), package)
    return sorted(
        (a, b)
        for a, targets in graph.items()
        for b in targets
        if layer(b) > layer(a) and (a, b) not in EXCEPTIONS
    )


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).parent.parent / "src"
    found = upward_imports(root)
    for a, b in found:
        print(f"upward import: {a} (layer {layer(a)}) imports {b} (layer {layer(b)})")
    print(f"{len(found)} upward imports")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
