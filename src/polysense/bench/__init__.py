"""Benchmarks behind `polysense bench NAME --out DIR`; each writes NAME.json, NAME.md, NAME.png
through `polysense.bench.report.write_report`."""
