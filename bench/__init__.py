"""Benchmarks of dmoe against hivemind's decentralized MoE and against the same experts called in-process.

`dmoe bench [NAME ...] [--quick] [--out DIR]` (or `python -m bench`) runs them: layer, latency, codec, dht,
faults, memory. Each prints a table and writes `OUT/NAME.json`; `bench.report.render_benchmarks_md` turns the
JSON files into BENCHMARKS.md with plots. The figures are never asserted in tests.
"""

from bench.cli import BENCHMARKS, add_bench_arguments, run_bench_command

__all__ = ["BENCHMARKS", "add_bench_arguments", "run_bench_command"]
