"""Benchmarks behind `polysense bench NAME --out DIR`."""
