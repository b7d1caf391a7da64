"""The CI gate for import circles: `.ci/import_cycles.py` finds none in src/polysense, and it does
find the circles of a small synthetic package (so the gate can fail)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "import_cycles.py"


def _run(src: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(src)], capture_output=True, text=True, timeout=120
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
