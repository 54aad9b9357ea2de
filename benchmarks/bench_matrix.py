"""Benchmark of matrix builds, against the real daemons on loopback
(processes started here, ended by PID).

1. cells   20 commits x 3 cells (python 3.9, 3.12, 3.13 from pyenv) on 6
           real runners, two per interpreter, a suite of about 1 s.  The
           commits are dispatched at once, each with its cells as the
           observer sends them (``plan_fields``: every ``<commit>:.ci.ini``
           read by one ``git cat-file --batch``, each matrix expanded); wall time until every commit's own
           result is written, against the ideal ceil(60 / 6) x the bare
           suite (the slowest interpreter's, run by hand).  Target: at most
           1.15 x ideal.
2. labels  the dispatcher's jobs per second with 200 fake runners
           (``fake_runners.py``) that carry no labels, then 200 that carry 4
           random labels each of 16 (plus ``python3.12``), taking turns
           twice in the same run; 2,000 commits per round, each dispatched
           with its branch, and in a labelled round asking for one of the
           16 labels (``labels = l7``: routed to the quarter of the fleet
           that has it).  Target: the labelled rate within 10% of the
           plain one (best round of each).

usage:  python benchmarks/bench_matrix.py [--only cells|labels] [--keep]
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench  # noqa: E402
from bench import Bench, Upstream, git, wait_for  # noqa: E402
import helpers  # noqa: E402
from ci import matrix  # noqa: E402
from ci.observer.commits import dispatch_body, plan_fields  # noqa: E402
from ci.results import read_header  # noqa: E402
from ci.wire import DEFAULT_CONNECT_TIMEOUT, decode_fields, parse_address  # noqa: E402

VERSIONS = ("3.9", "3.12", "3.13")
PER_INTERPRETER = 2
COMMITS = 20
SUITE_SECONDS = 1.0
WALL_TARGET = 1.15
FAKE_RUNNERS = 200
LABELS = 4
LABEL_JOBS = 2000
LABEL_ROUNDS = 2
RATE_TARGET = 0.90

TEST_FILE = """import time
import unittest

class TestSlow(unittest.TestCase):
    def test_slow(self):
        time.sleep({sleep})
"""
RECIPE = "[ci]\nmatrix_python = " + " ".join(VERSIONS) + \
    "\ntest = python -m unittest discover -s tests\n"


def pyenv_pythons() -> dict[str, str]:
    """pyenv's python3.X for each version, as the tests find them."""
    root = os.environ.get("PYENV_ROOT")
    if not root and shutil.which("pyenv"):
        root = subprocess.run(["pyenv", "root"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    found = {}
    for version in VERSIONS:
        paths = sorted(glob.glob(os.path.join(root or "/nonexistent", "versions",
                                              f"{version}.*", "bin", f"python{version}")))
        if paths:
            found[version] = paths[-1]
    return found


def bare_suite(pythons: dict[str, str], clone: str) -> float:
    """The slowest interpreter's suite, by hand (median of 3 each)."""
    times = []
    for path in pythons.values():
        samples = []
        for _ in range(3):
            started = time.monotonic()
            subprocess.run([path, "-m", "unittest", "discover", "-s", "tests"], cwd=clone,
                           capture_output=True, check=True, timeout=60)
            samples.append(time.monotonic() - started)
        times.append(statistics.median(samples))
    return max(times)


def dispatch(b: Bench, dispatcher: str, up: Upstream, commits: list[str]) -> None:
    """As the observer does: each commit's cells from its own recipe."""
    plans = plan_fields(up.path, commits)
    reply = helpers.call(parse_address(dispatcher), "dispatch", " ".join(commits),
                         dispatch_body(commits, None, "main", plans), security=b.security,
                         timeout=(DEFAULT_CONNECT_TIMEOUT, 30))
    if reply.command != "ok":
        raise RuntimeError(f"dispatch refused: {reply.argument}")


def cells(b: Bench) -> None:
    jobs = COMMITS * len(VERSIONS)
    runners = PER_INTERPRETER * len(VERSIONS)
    print(f"\n== cells: {COMMITS} commits x {len(VERSIONS)} cells, {runners} runners "
          f"({PER_INTERPRETER} per interpreter), ~{SUITE_SECONDS:g} s suite", flush=True)
    pythons = pyenv_pythons()
    missing = [v for v in VERSIONS if v not in pythons]
    if missing:
        b.row("cells wall time", f"<= {WALL_TARGET} x ideal",
              f"skipped: no pyenv python {', '.join(missing)}", None)
        return
    up = Upstream(b.path("cells", "upstream"))
    up.commit({".ci.ini": RECIPE, "tests/test_slow.py": TEST_FILE.format(sleep=0)})
    clone = up.clone(b.path("cells", "bare"))
    startup = bare_suite(pythons, clone)
    warm = up.commit({"tests/test_slow.py":
                      TEST_FILE.format(sleep=max(0.0, SUITE_SECONDS - startup))})
    git(clone, "pull", "-q")
    git(clone, "clean", "-q", "-ffdx")
    suite = bare_suite(pythons, clone)
    print(f"  bare suite: {suite:.3f}s (slowest interpreter, median of 3 by hand)", flush=True)
    _, dispatcher, results = b.start_dispatcher("cells")
    for version, path in pythons.items():
        for i in range(PER_INTERPRETER):
            b.start_runner("cells", dispatcher, up.clone(b.path("cells", f"r{version}-{i}")),
                           "--python", f"{version}={path}")
    dispatch(b, dispatcher, up, [warm])   # each runner's first fetch, environments
    if b.wait_result(results, warm, 120) is None:
        return
    commits = [up.commit() for _ in range(COMMITS)]
    started = time.monotonic()
    dispatch(b, dispatcher, up, commits)
    ideal = math.ceil(jobs / runners) * suite
    pending = set(commits)
    deadline = time.monotonic() + max(60.0, 5 * ideal)
    while pending and time.monotonic() < deadline:
        pending -= set(os.listdir(results))
        if pending:
            time.sleep(0.01)
    wall = time.monotonic() - started
    b.lost.extend(sorted(pending))
    verdicts = [read_header(os.path.join(results, c)) or {} for c in commits
                if c not in pending]
    cells_seen = {h.get("cells", "") for h in verdicts}
    print(f"  ideal ceil({jobs}/{runners}) x {suite:.3f}s = {ideal:.2f}s; cells fields "
          f"{sorted(cells_seen)}; load average {os.getloadavg()[0]:.1f}", flush=True)
    ratio = wall / ideal
    b.row(f"matrix wall time, {COMMITS} x {len(VERSIONS)} cells / {runners} runners",
          f"<= {WALL_TARGET:.2f} x ideal", f"{wall:.2f} s = {ratio:.3f} x ideal",
          ratio <= WALL_TARGET and not pending)
    b.row("matrix commits without a result", "0", str(len(pending)), not pending)


def label_plan(labels: int) -> str:
    """The dispatch field of a commit whose recipe says ``labels = l<k>``
    (no matrix), k one of the 4 x ``labels`` names fake_runners.py draws
    each runner's labels from."""
    wanted = frozenset({f"l{random.randrange(4 * labels)}"})
    return matrix.encode_plan(matrix.Plan((matrix.Cell("", labels=wanted),)))


def label_round(b: Bench, name: str, labels: int) -> float:
    """One dispatcher, 200 fake runners (``labels`` each), 2,000 commits:
    jobs per second."""
    proc, dispatcher, results = b.start_dispatcher(name)
    fleet = b.procs.start(f"{name}-fleet", [
        os.path.join(HERE, "fake_runners.py"), "--dispatcher", dispatcher,
        "--count", str(FAKE_RUNNERS), "--labels", str(labels), "--lifetime", "300"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    events = bench.fleet_events(fleet)
    while events.get(timeout=60).get("event") != "ready":
        pass
    address = parse_address(dispatcher)

    def status() -> dict:
        return decode_fields(helpers.call(address, "status", security=b.security).body)
    wait_for(lambda: int(status()["runners"]) == FAKE_RUNNERS, 30, 0.1, "runners registered")
    commits = [secrets.token_hex(20) for _ in range(LABEL_JOBS)]
    plans = {c: label_plan(labels) for c in commits} if labels else {}
    started = time.monotonic()
    for first in range(0, LABEL_JOBS, 1000):
        chunk = commits[first:first + 1000]
        helpers.call(address, "dispatch", " ".join(chunk),
                     dispatch_body(chunk, None, "main", plans), security=b.security,
                     timeout=(DEFAULT_CONNECT_TIMEOUT, 60))
    wait_for(lambda: int(status()["completed"]) >= LABEL_JOBS, 120, 0.02, "jobs completed")
    rate = LABEL_JOBS / (time.monotonic() - started)
    b.lost.extend(c for c in commits if not os.path.exists(os.path.join(results, c)))
    fleet.stdin.write(b"quit\n")
    fleet.stdin.flush()
    b.procs.stop_all()
    print(f"  {name}: {rate:.0f} jobs/s", flush=True)
    return rate


def labels(b: Bench) -> None:
    print(f"\n== labels: {FAKE_RUNNERS} fake runners without labels, then with {LABELS} "
          f"random labels each, {LABEL_ROUNDS} rounds each, {LABEL_JOBS} commits a round",
          flush=True)
    plain, labelled = [], []
    for n in range(LABEL_ROUNDS):
        plain.append(label_round(b, f"plain{n}", 0))
        labelled.append(label_round(b, f"labelled{n}", LABELS))
    ratio = max(labelled) / max(plain)
    b.row(f"jobs/s, {FAKE_RUNNERS} runners without labels (best)", "(reference)",
          f"{max(plain):.0f} /s", None)
    b.row(f"jobs/s, {FAKE_RUNNERS} runners with {LABELS} labels (best)",
          f">= {RATE_TARGET:.2f} x plain", f"{max(labelled):.0f} /s = {ratio:.3f} x plain",
          ratio >= RATE_TARGET)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark of matrix builds.")
    parser.add_argument("--only", action="append", choices=["cells", "labels"],
                        help="run only this part (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the logs' folder")
    parser.add_argument("--strict", action="store_true", help="exit 3 when a target is missed")
    args = parser.parse_args(argv)
    b = Bench(argparse.Namespace(quick=False, code=None, max_shards=None, verbose=False))
    print(f"matrix benchmark on {bench.CORES} core(s); work folder {b.tmp}", flush=True)
    b.cells = lambda: cells(b)
    b.labels = lambda: labels(b)
    return bench.run_scenarios(b, args.only or ["cells", "labels"], args)


if __name__ == "__main__":
    sys.exit(main())
