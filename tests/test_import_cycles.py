"""The CI gates on imports: `.ci/import_cycles.py` finds no circle in src/polysense and
`.ci/layers.py` no module importing a layer above it (DESIGN.md); each does find the circles or
upward imports of a small synthetic package (so the gates can fail)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "import_cycles.py"


def _run(src: Path, script: Path = SCRIPT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), str(src)], capture_output=True, text=True, timeout=120
    )


def test_polysense_has_no_import_circle():
    res = _run(ROOT / "src")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1] == "0 import circles"


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "polysense" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checker_finds_known_circles_and_ignores_type_checking(tmp_path):
    src = _package(
        tmp_path,
        {
            "__init__.py": "",
            # a <-> b: one module-level import, one function-level relative import
            "a.py": "import polysense.b\n",
            "b.py": "def f():\n    from . import a\n    return a\n",
            # c -> a under TYPE_CHECKING only: never runs, so no circle with a
            "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import polysense.a\n",
            "sub/__init__.py": "from polysense.sub.d import x\n",  # a package and its module
            "sub/d.py": "x = 1\n",
            "e.py": "from polysense.f import g\n",  # e <-> f through `from x import name`
            "f.py": "from polysense.e import h\ng = 1\n",
        },
    )
    res = _run(src)
    assert res.returncode == 1
    assert res.stdout.splitlines() == [
        "import circle: polysense.a <-> polysense.b",
        "import circle: polysense.e <-> polysense.f",
        "2 import circles",
    ]
    (src / "polysense" / "a.py").write_text("")  # break both circles: 0, exit 0
    (src / "polysense" / "f.py").write_text("g = 1\n")
    res = _run(src)
    assert (res.returncode, res.stdout.strip()) == (0, "0 import circles")


LAYERS_SCRIPT = ROOT / ".ci" / "layers.py"


def _layers(src: Path) -> subprocess.CompletedProcess:
    return _run(src, LAYERS_SCRIPT)


def test_no_module_imports_a_layer_above_it():
    res = _layers(ROOT / "src")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1] == "0 upward imports"


def test_the_layer_check_finds_upward_imports(tmp_path):
    src = _package(
        tmp_path,
        {
            "__init__.py": "import polysense.train.loop\n",  # the facade (layer 5): fine
            "cli.py": "import polysense.data.x\n",  # downward: fine
            "data/__init__.py": "",
            "data/x.py": "def f():\n    from polysense.train import loop\n",  # upward, in a function
            "train/__init__.py": "",
            "train/loop.py": "from polysense.models import m\n",  # downward: fine
            "models/__init__.py": "",
            "models/m.py": "from polysense.eval.e import score\n",  # models -> eval: upward
            "eval/__init__.py": "",
            "eval/e.py": "score = 1\n",
        },
    )
    res = _layers(src)
    assert res.returncode == 1
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == "2 upward imports"
    assert any("polysense.data.x (layer 1) imports polysense.train.loop" in x for x in lines)
    assert any("polysense.models.m (layer 2) imports polysense.eval.e" in x for x in lines)
