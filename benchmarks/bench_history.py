"""Benchmark of the test history with a long history.

Writes ``--commits`` result files, each with a JUnit file of ``--tests``
records (1,000 x 1,000 = 1,000,000 test records by default; two branches,
a few tests failing now and then, some flaky, 2% quarantined for the
second half of the history, durations spread), starts the real
``dispatcher.py`` on them (its history writer builds the store from the
files, the rebuild a missing store gets) and the real ``dashboard.py``
beside it, then measures:

* the time the dispatcher takes to build the store (off its dispatch
  path: it answers ``status`` meanwhile) and the store's size;
* the dispatcher's resident memory after the build (VmRSS) and its peak
  (VmHWM);
* sequential requests over HTTP, median and p90 of ``--samples`` each
  after a warm-up: one test's page ``/test?id=``, ``/api/test?id=``, the
  tests page ``/tests`` and ``/api/tests``, and the queries of its flakiest
  and quarantined lists alone;
* the result path with the store on and off, in the same run: the
  dispatcher restarted on the same files, alternately with and without
  ``--no-test-history`` (``--burst-rounds`` times each), takes a burst of
  ``--burst`` commits from ``--burst-runners`` fake runners
  (``fake_runners.py``), each result carrying ``--burst-records``
  per-test records and their JUnit XML as a real runner's does.  Per
  mode: the latency of every ``results`` (from sending it until the
  ``ok stored`` reply; median, p95, max), the burst's wall time (dispatch
  to the last reply), the dispatcher's CPU per result and its history
  writer process's (until the store holds the burst); then the
  ratios on/off.  With the store on, each round starts once the writer
  has caught up with the results already there.

usage:  python benchmarks/bench_history.py [--commits N] [--tests N] [--samples N]
            [--burst N] [--burst-runners N] [--burst-records N] [--burst-rounds N]
            [--strict] [--keep]
Exit status: 3 with --strict when a target is missed, else 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import queue
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from bench_dashboard import timed_get  # noqa: E402
from support.procs import children_of, stat_fields, status_mb, stop_process  # noqa: E402
from ci import junit_xml
import helpers  # noqa: E402
from ci import results  # noqa: E402
from ci.history import store  # noqa: E402
from ci.history.queries import HistoryReader, Unavailable  # noqa: E402
from ci.wire import DEFAULT_CONNECT_TIMEOUT, encode_fields  # noqa: E402

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
            flaky = t % 89 == 3 and (i * 7 + t) % 4 == 0
            # Quarantined for the second half of the history: long
            # quarantines, the worst case of the "quarantined since" walk.
            held = t % 50 == 5 and i >= commits // 2
            failing = failing or (held and i % 3 == 0)
            outcome = results.FAILED if failing else results.FLAKY if flaky else results.PASSED
            records.append(results.TestRecord(
                f"tests.test_mod_{t % 50}.TestCase{t}", f"test_case_{t}", outcome,
                round(0.001 * (t % 300) + 0.0001 * (i % 17), 4),
                message="AssertionError: 2 != 3" if outcome != results.PASSED else "",
                quarantined=held))
        counts = results.count_records(records)
        verdict = "failed" if counts["failures"] else "passed"
        header = {"commit": commit, "verdict": verdict, **counts,
                  "runner": f"10.0.0.{i % 4 + 1}:8900", "duration": "12.000",
                  "branch": "main" if i % 5 else "feature/x"}
        with open(os.path.join(folder, commit + ".xml"), "wb") as handle:
            handle.write(junit_xml.format_junit(records, name=commit))
        path = os.path.join(folder, commit)
        with open(path, "wb") as handle:
            handle.write(encode_fields(header) + b"\nRan tests\n")
        os.utime(path, (base + 60 * i, base + 60 * i))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(tmp: str, name: str, args: list[str], log_name: str = "") -> subprocess.Popen:
    log = open(os.path.join(tmp, (log_name or name) + ".log"), "wb")
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
        writers = children_of(procs[0].pid)
        w_rss = sum(status_mb(p, "VmRSS") for p in writers)
        w_hwm = sum(status_mb(p, "VmHWM") for p in writers)
        rows = [("store build from the files", "–", f"{built:.1f} s", True),
                ("dispatcher RSS after the build", f"< {TARGETS['rss']:.0f} MB",
                 f"{rss:.0f} MB (peak {hwm:.0f} MB)", hwm < TARGETS["rss"]),
                ("history writer process RSS after the build (its own process)", "–",
                 f"{w_rss:.0f} MB (peak {w_hwm:.0f} MB)", True)]
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
        rows += time_lists(HistoryReader(path), args.samples)
        return rows
    finally:
        for proc in procs:
            stop_process(proc)


def time_lists(reader: HistoryReader, samples: int) -> list[tuple]:
    """The tests page's flakiest and quarantined lists' queries alone, in
    this process over a read-only connection (the pages' times above
    include them)."""
    rows = []
    for name, query in (("flakiest tests query", reader.flakiest),
                        ("quarantined tests query (with state and since)", reader.quarantined)):
        for _ in range(3):
            listed = query()
        times = []
        for _ in range(samples):
            started = time.perf_counter()
            query()
            times.append((time.perf_counter() - started) * 1000)
        median = statistics.median(times)
        rows.append((f"{name}, median (n={samples}; {len(listed)} listed)",
                     f"< {TARGETS['page']:.0f} ms", f"{median:.1f} ms",
                     median < TARGETS["page"]))
        print(f"  {name}: median {median:.1f} ms, {len(listed)} listed", flush=True)
    reader.close()
    return rows

# --------------------------------------------------------------------------
# The result path with the store on and off.

COMMIT_NAME = re.compile(r"[0-9a-f]{40}")


class FakeFleet:
    """``fake_runners.py`` as a child: commands on its stdin, its JSON
    events read by a thread into a queue, so every wait is bounded."""

    def __init__(self, tmp: str, dispatcher: int, runners: int, records: int):
        self.proc = subprocess.Popen(
            [PY, os.path.join(HERE, "fake_runners.py"), "--dispatcher", f"127.0.0.1:{dispatcher}",
             "--count", str(runners), "--records", str(records), "--lifetime", "900"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(os.path.join(tmp, "fake-runners.log"), "ab"), start_new_session=True)
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                pass

    def expect(self, name: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if event.get("event") == name:
                return event
        raise SystemExit(f"the fake runners sent no {name!r} within {timeout:.0f}s")

    def ask(self, command: str, reply: str) -> dict:
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self.expect(reply)

    def close(self) -> None:
        try:
            self.ask("quit", "stats")
        except (OSError, SystemExit):
            pass
        stop_process(self.proc)


def cpu_seconds(pid: int) -> float:
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else 0.0


def children_cpu(pid: int) -> float:
    return sum(cpu_seconds(child) for child in children_of(pid))


def wait_answering(port: int, proc: subprocess.Popen, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while True:
        try:
            if helpers.call(("127.0.0.1", port), "status").command == "ok":
                return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the dispatcher did not answer")
        time.sleep(0.05)


def one_burst(tmp: str, history: bool, round_no: int, args) -> dict:
    """One dispatcher start on the benchmark's files and one burst through
    it; the figures of that burst."""
    folder = os.path.join(tmp, "test_results")
    state = os.path.join(tmp, "dispatcher_state")
    label = "on" if history else "off"
    port = free_port()
    proc = start(tmp, "dispatcher", [
        "--host", "127.0.0.1", "--port", str(port), "--results-dir", folder,
        "--state-dir", state, "--log-level", "INFO",
        *([] if history else ["--no-test-history"])], f"dispatcher-burst-{label}-{round_no}")
    fleet = None
    try:
        wait_answering(port, proc)
        if history:
            have = sum(1 for name in os.listdir(folder) if COMMIT_NAME.fullmatch(name))
            wait_built(HistoryReader(os.path.join(state, store.FILE_NAME)), have, proc)
        fleet = FakeFleet(tmp, port, args.burst_runners, args.burst_records)
        ready = fleet.expect("ready")
        if ready["registered"] != args.burst_runners:
            raise SystemExit(f"only {ready['registered']} fake runners registered")
        commits = [hashlib.sha1(f"burst-{label}-{round_no}-{i}".encode()).hexdigest()
                   for i in range(args.burst)]
        cpu, child_cpu = cpu_seconds(proc.pid), children_cpu(proc.pid)
        started = time.monotonic()
        for first in range(0, len(commits), 1000):
            chunk = commits[first:first + 1000]
            body = "".join(f"{c} - main\n" for c in chunk).encode()
            reply = helpers.call(("127.0.0.1", port), "dispatch", " ".join(chunk), body,
                                 timeout=(DEFAULT_CONNECT_TIMEOUT, 60))
            if reply.command != "ok":
                raise SystemExit(f"dispatch refused: {reply.argument}")
        deadline = started + max(120.0, args.burst / 5)
        while True:
            stats = fleet.ask("stats", "stats")
            done = stats["results_ok"] + stats["results_duplicate"] + stats["results_failed"]
            if done >= len(commits) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        wall = time.monotonic() - started
        cpu = cpu_seconds(proc.pid) - cpu
        if history:     # the writer's catch-up after the burst counts too
            wait_built(HistoryReader(os.path.join(state, store.FILE_NAME)), have + len(commits),
                       proc, limit=120)
        child_cpu = children_cpu(proc.pid) - child_cpu
        latencies = fleet.ask("latencies", "latencies")["ms"]
        missing = sum(1 for c in commits if not os.path.exists(os.path.join(folder, c)))
        figures = {"history": history, "wall": wall, "ms": sorted(latencies),
                   "cpu_ms": 1000 * cpu / len(commits), "missing": missing,
                   "writer_cpu_ms": 1000 * child_cpu / len(commits),
                   "failed": stats["results_failed"], "load": os.getloadavg()[0]}
        print(f"  burst, history {label} (round {round_no + 1}): {len(commits)} results in "
              f"{wall:.2f}s, results latency {summary(figures['ms'])}, dispatcher CPU "
              f"{figures['cpu_ms']:.2f} ms/result (writer process {figures['writer_cpu_ms']:.2f}), load average {figures['load']:.1f}"
              + (f", {missing} MISSING" if missing else ""), flush=True)
        return figures
    finally:
        if fleet is not None:
            fleet.close()
        stop_process(proc)


def quantiles(ms: list[float]) -> tuple[float, float, float]:
    """(median, p95, max) of sorted samples."""
    if not ms:
        return (float("nan"),) * 3
    return statistics.median(ms), ms[max(0, math.ceil(len(ms) * 0.95) - 1)], ms[-1]


def summary(ms: list[float]) -> str:
    median, p95, top = quantiles(ms)
    return f"median {median:.2f} / p95 {p95:.2f} / max {top:.2f} ms (n={len(ms)})"


def bursts(tmp: str, args) -> list[tuple]:
    """The rounds, on and off alternately (so drifting load from elsewhere
    hits both alike), and one row per figure, pooled per mode."""
    print(f"\n  result path: {args.burst_rounds} round(s) each with the store on and off, "
          f"{args.burst} commits, {args.burst_runners} fake runners, {args.burst_records} "
          "records per result", flush=True)
    runs = [one_burst(tmp, history, n, args)
            for n in range(args.burst_rounds) for history in (True, False)]
    rows, pooled = [], {}
    for history in (True, False):
        mine = [r for r in runs if r["history"] == history]
        ms = sorted(x for r in mine for x in r["ms"])
        walls = [r["wall"] for r in mine]
        pooled[history] = (quantiles(ms), statistics.median(walls))
        label = "on" if history else "off (`--no-test-history`)"
        rows.append((f"`results` latency, store {label}: median / p95 / max "
                     f"(n={len(ms)})", "–", "%.2f / %.2f / %.2f ms" % quantiles(ms), True))
        rows.append((f"burst wall time, store {label}, per round", "–",
                     ", ".join(f"{w:.2f}" for w in walls) + " s", True))
        rows.append((f"dispatcher CPU per result, store {label}", "–",
                     ", ".join(f"{r['cpu_ms']:.2f}" for r in mine) + " ms", True))
        if history:
            rows.append(("history writer process CPU per result (its own process)", "–",
                         ", ".join(f"{r['writer_cpu_ms']:.2f}" for r in mine) + " ms", True))
        lost = sum(r["missing"] + r["failed"] for r in mine)
        rows.append((f"burst results not stored, store {label}", "0", str(lost), not lost))
    (on_q, on_wall), (off_q, off_wall) = pooled[True], pooled[False]
    rows.append(("ratio on/off: latency median / p95 / max", "≈ 1 (within the spread)",
                 " / ".join(f"{a / b:.2f}" if b else "–" for a, b in zip(on_q, off_q)), True))
    rows.append(("ratio on/off: burst wall time (medians)", "≈ 1 (within the spread)",
                 f"{on_wall / off_wall:.2f}" if off_wall else "–", True))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the test history.")
    parser.add_argument("--commits", type=int, default=1000,
                        help="result files to generate (default: %(default)s)")
    parser.add_argument("--tests", type=int, default=1000,
                        help="test records per result (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=50,
                        help="timed requests per page (default: %(default)s)")
    parser.add_argument("--burst", type=int, default=400,
                        help="commits in each burst through the result path, with the store "
                             "on and off (default: %(default)s; 0: no burst)")
    parser.add_argument("--burst-runners", type=int, default=20,
                        help="fake runners taking the burst (default: %(default)s)")
    parser.add_argument("--burst-records", type=int, default=200,
                        help="per-test records (and JUnit XML) in each burst result "
                             "(default: %(default)s)")
    parser.add_argument("--burst-rounds", type=int, default=2,
                        help="bursts with each setting, alternated (default: %(default)s)")
    parser.add_argument("--strict", action="store_true", help="exit 3 when a target is missed")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    if min(args.commits, args.tests, args.samples) < 1 or args.tests < 8:
        parser.error("--commits and --samples must be at least 1, --tests at least 8")
    if args.burst < 0 or not 1 <= args.burst_runners <= 60 or args.burst_rounds < 1 \
            or not 0 <= args.burst_records <= 100_000:
        parser.error("--burst must be at least 0, --burst-runners 1-60 (under the fake "
                     "runners' 64 requests in flight, so none waits for a slot), "
                     "--burst-rounds at least 1, --burst-records 0-100000")
    tmp = tempfile.mkdtemp(prefix="bench-history-")
    print(f"test history benchmark on {CORES} core(s), Python {sys.version.split()[0]}",
          flush=True)
    try:
        rows = run(tmp, args)
        if args.burst:
            rows += bursts(tmp, args)
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
