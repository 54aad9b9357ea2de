"""Benchmark of the test history with a long history.

Writes ``--commits`` result files, each with a JUnit file of ``--tests``
records (1,000 x 1,000 = 1,000,000 test records by default; two branches,
a few tests failing now and then, durations spread), starts the real
``dispatcher.py`` on them (its history writer builds the store from the
files, the rebuild a missing store gets) and the real ``dashboard.py``
beside it, then measures:

* the time the dispatcher takes to build the store (off its dispatch
  path: it answers ``status`` meanwhile) and the store's size;
* the dispatcher's resident memory after the build (VmRSS) and its peak
  (VmHWM);
* sequential requests over HTTP, median and p90 of ``--samples`` each
  after a warm-up: one test's page ``/test?id=``, ``/api/test?id=``, the
  tests page ``/tests`` and ``/api/tests``.

usage:  python benchmarks/bench_history.py [--commits N] [--tests N] [--samples N] [--strict] [--keep]
Exit status: 3 with --strict when a target is missed, else 0.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from bench_dashboard import timed_get  # noqa: E402
from support.procs import status_mb  # noqa: E402
from ci import results  # noqa: E402
from ci.history import store  # noqa: E402
from ci.history.queries import HistoryReader, Unavailable  # noqa: E402
from ci.wire import encode_fields  # noqa: E402

PY = sys.executable
CORES = os.cpu_count() or 1
TARGETS = {"page": 50.0, "rss": 150.0}   # ms, MB
FOLLOWED = "tests.test_mod_7.TestCase7.test_case_7"


def generate(folder: str, commits: int, tests: int) -> None:
    """Result and JUnit files as the dispatcher writes them, oldest first."""
    base = time.time() - commits * 60
    for i in range(commits):
        commit = hashlib.sha1(f"bench-history-{i}".encode()).hexdigest()
        records = []
        for t in range(tests):
            failing = t % 97 == 7 and (i * 31 + t) % 5 == 0
            records.append(results.TestRecord(
                f"tests.test_mod_{t % 50}.TestCase{t}", f"test_case_{t}",
                results.FAILED if failing else results.PASSED,
                round(0.001 * (t % 300) + 0.0001 * (i % 17), 4),
                message="AssertionError: 2 != 3" if failing else ""))
        counts = results.count_records(records)
        verdict = "failed" if counts["failures"] else "passed"
        header = {"commit": commit, "verdict": verdict, **counts,
                  "runner": f"10.0.0.{i % 4 + 1}:8900", "duration": "12.000",
                  "branch": "main" if i % 5 else "feature/x"}
        with open(os.path.join(folder, commit + ".xml"), "wb") as handle:
            handle.write(results.format_junit(records, name=commit))
        path = os.path.join(folder, commit)
        with open(path, "wb") as handle:
            handle.write(encode_fields(header) + b"\nRan tests\n")
        os.utime(path, (base + 60 * i, base + 60 * i))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(tmp: str, name: str, args: list[str]) -> subprocess.Popen:
    log = open(os.path.join(tmp, name + ".log"), "wb")
    env = dict(os.environ)
    env.pop("CI_SECRET", None)
    return subprocess.Popen([PY, os.path.join(ROOT, name + ".py"), *args], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, env=env)


def wait_built(reader: HistoryReader, commits: int, proc, limit: float = 3600) -> float:
    """Seconds until the store holds every commit's run."""
    started = time.monotonic()
    while True:
        try:
            if reader.overview(limit=1)["results"] >= commits:
                return time.monotonic() - started
        except Unavailable:
            pass
        if proc.poll() is not None or time.monotonic() - started > limit:
            raise SystemExit("the dispatcher did not build the history")
        time.sleep(0.2)


def measure(port: int, path: str, samples: int) -> tuple[float, float, int]:
    for _ in range(5):
        timed_get(port, path)
    times = []
    for _ in range(samples):
        ms, status, size = timed_get(port, path)
        if status != 200:
            raise SystemExit(f"{path} answered {status}")
        times.append(ms)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.9))], size


def run(tmp: str, args) -> list[tuple]:
    folder = os.path.join(tmp, "test_results")
    state = os.path.join(tmp, "dispatcher_state")
    os.makedirs(folder)
    started = time.monotonic()
    generate(folder, args.commits, args.tests)
    print(f"  generated {args.commits} results x {args.tests} tests in "
          f"{time.monotonic() - started:.1f}s", flush=True)
    procs = [start(tmp, "dispatcher", ["--host", "127.0.0.1", "--port", str(free_port()),
                                       "--results-dir", folder, "--state-dir", state,
                                       "--log-level", "INFO"])]
    try:
        path = os.path.join(state, store.FILE_NAME)
        built = wait_built(HistoryReader(path), args.commits, procs[0])
        size = sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s))
        records = args.commits * args.tests
        print(f"  the dispatcher built the store of {records} records in {built:.1f}s "
              f"({size / 2**20:.0f} MB)", flush=True)
        rss, hwm = status_mb(procs[0].pid, "VmRSS"), status_mb(procs[0].pid, "VmHWM")
        rows = [("store build from the files", "–", f"{built:.1f} s", True),
                ("dispatcher RSS after the build", f"< {TARGETS['rss']:.0f} MB",
                 f"{rss:.0f} MB (peak {hwm:.0f} MB)", hwm < TARGETS["rss"])]
        port = free_port()
        procs.append(start(tmp, "dashboard", [
            "--host", "127.0.0.1", "--port", str(port), "--results-dir", folder,
            "--dispatcher-server", f"127.0.0.1:{free_port()}", "--log-level", "WARNING"]))
        deadline = time.monotonic() + 60
        while True:
            try:
                if timed_get(port, "/api/tests")[1] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or procs[1].poll() is not None:
                raise SystemExit("the dashboard did not answer")
            time.sleep(0.05)
        query = urllib.parse.urlencode({"id": FOLLOWED})
        for name, url in (("test page /test?id=", "/test?" + query),
                          ("/api/test?id=", "/api/test?" + query),
                          ("tests page /tests", "/tests"), ("/api/tests", "/api/tests")):
            median, p90, size = measure(port, url, args.samples)
            rows.append((f"{name}, median (n={args.samples})", f"< {TARGETS['page']:.0f} ms",
                         f"{median:.1f} ms", median < TARGETS["page"]))
            rows.append((f"{name}, p90", "–", f"{p90:.1f} ms", True))
            print(f"  {url[:40]}: median {median:.1f} ms, p90 {p90:.1f} ms, {size} bytes",
                  flush=True)
        return rows
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the test history.")
    parser.add_argument("--commits", type=int, default=1000,
                        help="result files to generate (default: %(default)s)")
    parser.add_argument("--tests", type=int, default=1000,
                        help="test records per result (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=50,
                        help="timed requests per page (default: %(default)s)")
    parser.add_argument("--strict", action="store_true", help="exit 3 when a target is missed")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    if min(args.commits, args.tests, args.samples) < 1 or args.tests < 8:
        parser.error("--commits and --samples must be at least 1, --tests at least 8")
    tmp = tempfile.mkdtemp(prefix="bench-history-")
    print(f"test history benchmark on {CORES} core(s), Python {sys.version.split()[0]}",
          flush=True)
    try:
        rows = run(tmp, args)
    finally:
        if args.keep:
            print(f"  kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    records = args.commits * args.tests
    print(f"\n| figure ({CORES} cores, {records:,} test records) | target | measured |")
    print("| --- | --- | --- |")
    for figure, target, measured, ok in rows:
        print(f"| {figure} | {target} | {measured}{'' if ok else ' (MISSED)'} |")
    missed = [row for row in rows if not row[3]]
    return 3 if missed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
