"""Benchmarks: each is ``python -m bench.NAME [--quick] --out FILE`` and writes JSON plus a PNG."""
