"""benchmarks/bench_queue.py still runs against the current dispatcher,
runners and observer (a smoke run of scenario B with --quick: four
branches, the third failing; not a measurement).  ``--strict`` makes a
run whose end state is wrong (main not holding exactly the landed merges
with their passed results, the bad branch not rejected with its failing
test) exit non-zero; the quick ratios themselves are not judged."""

import os
import subprocess

from support.cluster import PY, ROOT

BENCH = os.path.join(ROOT, "benchmarks", "bench_queue.py")


def test_bench_queue_runs():
    proc = subprocess.run([PY, BENCH, "--quick", "--only", "B", "--strict"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| B: serial, --queue-depth 1 | (reference) |" in proc.stdout
    assert "x serial (quick: not judged) |" in proc.stdout
    assert "failed" not in proc.stdout
