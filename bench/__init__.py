"""Benchmark scripts (run from the repository root: `python -m bench.run_all`); results in bench/RESULTS.md."""
