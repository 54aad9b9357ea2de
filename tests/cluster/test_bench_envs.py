"""benchmarks/bench_envs.py still runs against the runner's current
``execute`` (a smoke run with the smallest counts, not a measurement)."""

import os
import subprocess

from support.cluster import PY, ROOT

BENCH = os.path.join(ROOT, "benchmarks", "bench_envs.py")


def test_bench_envs_runs():
    proc = subprocess.run([PY, BENCH, "--runs", "1", "--builds", "1"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "overhead of a reused environment" in proc.stdout
    assert "first build" in proc.stdout
