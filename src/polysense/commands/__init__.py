"""Command-line commands of the larger areas, one module each, attached to `polysense.cli`'s apps.

Each module does `from polysense.cli import app, bench_app, data_app, console` and decorates its
commands; heavy imports (torch, models) stay inside the command functions so `--help` is fast.
"""
