"""Every field of every config dataclass is read somewhere in src/polysense.

An ast scan: a config is a `@dataclass` class whose name ends in `Config`; a field counts as read
when some module of the package loads an attribute of its name (`x.field`) outside the bodies of
the config classes themselves (their `__post_init__` range checks do not count as a use). A
field nothing reads is dead: remove it, with a migration for old checkpoints' config.json.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "polysense"


def _is_dataclass(node: ast.ClassDef) -> bool:
    for d in node.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if getattr(target, "id", None) == "dataclass" or getattr(target, "attr", None) == (
            "dataclass"
        ):
            return True
    return False


def unread_fields(root: Path) -> dict[str, list[str]]:
    """{"module.py:ClassName": [unread field, ...]} for the config dataclasses under `root`."""
    fields: dict[str, list[str]] = {}
    reads: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        spans = []
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ClassDef)
                and node.name.endswith("Config")
                and _is_dataclass(node)
            ):
                fields[f"{path.relative_to(root)}:{node.name}"] = [
                    s.target.id
                    for s in node.body
                    if isinstance(s, ast.AnnAssign)
                    and isinstance(s.target, ast.Name)
                    and "ClassVar" not in ast.unparse(s.annotation)  # not a field
                ]
                spans.append((node.lineno, node.end_lineno))
        for node in ast.walk(tree):
            loaded = isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load)
            if loaded and not any(a <= node.lineno <= b for a, b in spans):
                reads.add(node.attr)
    dead = {name: [f for f in names if f not in reads] for name, names in fields.items()}
    return {name: names for name, names in dead.items() if names}


def test_every_config_field_is_read():
    assert unread_fields(SRC) == {}


def test_the_scan_finds_an_unread_field(tmp_path):
    (tmp_path / "config.py").write_text(
        "from dataclasses import dataclass\n\n"
        "@dataclass(frozen=True)\n"
        "class ToyConfig:\n"
        "    used: int = 1\n"
        "    checked_only: int = 2\n"
        "    never: int = 3\n\n"
        "    def __post_init__(self):\n"
        "        assert self.checked_only > 0\n"
    )
    (tmp_path / "model.py").write_text("def width(cfg):\n    return cfg.used * 2\n")
    assert unread_fields(tmp_path) == {"config.py:ToyConfig": ["checked_only", "never"]}
