"""`python -m bench.tracing_micro` runs whole (in its own process: it installs a tracer provider)."""

from __future__ import annotations

import subprocess
import sys

from tests.harness import REPO_ROOT


def test_the_tracing_micro_benchmark_prints_every_row() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.tracing_micro", "--calls", "50"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if " us  " in line]
    assert len(rows) == 6, done.stdout
    assert all(float(row.split()[0]) > 0 for row in rows)
