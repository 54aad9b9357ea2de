"""benchmarks/bench_history.py still runs against the current dispatcher,
history store, dashboard and fake runners (a smoke run with the smallest counts, not a
measurement)."""

import os
import subprocess

from support.cluster import PY, ROOT

BENCH = os.path.join(ROOT, "benchmarks", "bench_history.py")


def test_bench_history_runs():
    proc = subprocess.run([PY, BENCH, "--commits", "3", "--tests", "8", "--samples", "2",
                           "--burst", "6", "--burst-runners", "2", "--burst-records", "5",
                           "--burst-rounds", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the dispatcher built the store of 24 records" in proc.stdout
    assert "| /api/test?id=, median (n=2) |" in proc.stdout
    # The tests page's lists, timed alone (issue 20).
    assert "| flakiest tests query, median (n=2;" in proc.stdout
    assert "| quarantined tests query (with state and since), median (n=2;" in proc.stdout
    # The result path, store on and off: every burst result stored.
    assert "| burst results not stored, store on | 0 | 0 |" in proc.stdout
    assert "| burst results not stored, store off (`--no-test-history`) | 0 | 0 |" in proc.stdout
    assert "| ratio on/off: burst wall time (medians) |" in proc.stdout
