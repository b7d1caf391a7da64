"""The `polysense` command line: thin typer commands over library functions, printed with rich.

`app.py` holds the typer apps and consoles, `main.py` the core commands and the entry point, and
one module per larger area (fusion, vlm, curate, av, t2i, perf) attaches its commands.
"""

from polysense.cli.app import app
from polysense.cli.main import main

__all__ = ["app", "main"]
