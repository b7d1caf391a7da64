"""The files every `polysense bench NAME --out DIR` writes: NAME.json, NAME.md and NAME.png.

The JSON holds the results and the environment they were measured in (library versions, CPU
count, date), the Markdown a table of the rows, the PNG one matplotlib plot. Each file is written
atomically; matplotlib is imported only here, with the Agg backend (no display needed).
"""

from __future__ import annotations

import io
import os
import platform
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from polysense.fileio import atomic_open, atomic_write_json, atomic_write_text


def environment() -> dict[str, Any]:
    """Versions and machine facts that a benchmark number depends on."""
    versions = {}
    for package in ("polysense", "torch", "numpy", "faiss-cpu"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": cpus,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows of dicts -> a Markdown table; columns in order of first appearance."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_report(
    out: str | Path,
    name: str,
    results: dict[str, Any],
    table: list[dict[str, Any]],
    plot: Callable[[Any], None] | None = None,
    *,
    title: str | None = None,
    notes: str = "",
) -> dict[str, Path]:
    """Write `out/name.json` (results, table, environment), `out/name.md` (title, notes, table)
    and, given `plot(ax)` drawing on a matplotlib Axes, `out/name.png`. Returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    atomic_write_json(paths["json"], {"name": name, **results, "table": table, "environment": env})
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    header = (
        f"# {title or name}\n\n{notes.strip()}\n\n" if notes.strip() else f"# {title or name}\n\n"
    )
    footer = f"\n{env['cpu_count']} CPUs ({env['processor']}), {versions}; {env['date']}\n"
    atomic_write_text(paths["md"], header + markdown_table(table) + footer)
    if plot is not None:
        from matplotlib.figure import Figure  # no pyplot: no global state, no display

        fig = Figure(figsize=(7, 4.5), layout="constrained")
        plot(fig.add_subplot())
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        paths["png"] = out / f"{name}.png"
        with atomic_open(paths["png"], "wb") as fh:
            fh.write(buf.getvalue())
    for path in paths.values():
        os.chmod(path, 0o644)  # mkstemp's 0600 would hide reports from other users
    return paths
