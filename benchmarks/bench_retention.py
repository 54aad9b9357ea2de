"""Retention benchmark (issue 21): a results folder of 100,000 result files
(each with its JUnit XML; 10 branches, each a chain of commits naming the
one before, a red run now and then), the real dispatcher, and one
stand-in runner in this process that reports a result for every commit it
is given.

1. baseline  the dispatcher without --keep-results (its test history
             caught up first): the latency of ``results`` (the result
             path: claim, file write, bookkeeping), median, p95 and max;
             with --reference, then interleaved halves (as --interleave
             compares them) with two stand-ins for the worker: one that
             sleeps (the comparison's noise) and a busy loop in the idle
             CPU class (what background CPU work costs here).
2. pruning   the same dispatcher restarted with --keep-results 100: the
             same latency measured before its first pass, while it runs and
             after it (``--samples`` results; with --windows also per
             window of the pass and of the time after it), how long the
             pass takes (from its start to its log line; target < 60 s),
             how many files it removed and how many history rows remain.

Every process is started here and ended here by its PID.
usage:  python benchmarks/bench_retention.py [--results N] [--keep N] [--rate R]
                                            [--windows S] [--interleave]
                                            [--reference S] [--skip-freeing] [--no-index] [--keep-folder]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import helpers  # noqa: E402
from interleave import Interleaver, describe_rise  # noqa: E402
from ci.results import TestRecord, format_result  # noqa: E402
from ci.junit_xml import format_junit
from ci.history import store  # noqa: E402
from ci.retention import index as result_index  # noqa: E402
from ci.retention import policy as retention_policy  # noqa: E402
from support.cluster import FakeRunner, wait_for_port  # noqa: E402
from support.procs import stop_process  # noqa: E402

PY = sys.executable
BRANCHES = 10
PLANNED_RE = re.compile(r"planned \d+ of \d+ result\(s\) to prune")
PRUNED_RE = re.compile(r"pruned (\d+) of (\d+) result\(s\) in ([0-9.]+)s( \([^)]*\))?")
# The worker's reaper, each sweep of the trash (a sweep cut short says so).
FREED_RE = re.compile(r"freed (\d+) pruned file\(s\) in ([0-9.]+)s( \(paused[^)]*\))?$", re.M)


def generate(folder: str, count: int, index_path: str | None) -> None:
    """``count`` result files and their XML, finished over the last 200
    days, oldest first; a red run of 3 commits every 50 on each branch;
    with ``index_path``, the result index's line for each, as the
    dispatcher writes it when it stores a result (ci/retention/index.py)."""
    start = time.time() - 200 * 86400
    lines = []
    previous: dict[str, str] = {}
    xml = {v: format_junit([TestRecord("tests.test_a.T", "test_one", v)], name="x")
           for v in ("passed", "failed")}
    for n in range(count):
        branch = f"branch{n % BRANCHES}"
        commit = f"{n + 1:040x}"
        verdict = "failed" if (n // BRANCHES) % 50 in (10, 11, 12) else "passed"
        header = {"commit": commit, "verdict": verdict, "tests": 1,
                  "failures": int(verdict == "failed"), "errors": 0, "skipped": 0,
                  "runner": "127.0.0.1:9", "branch": branch}
        if branch in previous:
            header["previous"] = previous[branch]
        previous[branch] = commit
        with open(os.path.join(folder, commit + ".xml"), "wb") as handle:
            handle.write(xml[verdict])
        path = os.path.join(folder, commit)
        with open(path, "wb") as handle:
            handle.write(format_result(header, b"ok\n"))
        stamp = start + n * (200 * 86400 / count)
        os.utime(path, (stamp, stamp))
        if index_path:
            st = os.stat(path)
            lines.append(result_index.format_line(
                result_index.stamp_of(st),
                retention_policy.entry_of(commit, header, st.st_mtime)))
    if index_path:
        os.makedirs(os.path.dirname(index_path), mode=0o700, exist_ok=True)
        with open(index_path, "w") as handle:
            handle.writelines(lines)


def start_dispatcher(tmp: str, port: int, extra: list[str], log_name: str) -> subprocess.Popen:
    log = open(os.path.join(tmp, log_name), "wb")
    proc = subprocess.Popen([PY, os.path.join(ROOT, "dispatcher.py"), "--host", "127.0.0.1",
                             "--port", str(port), "--results-dir", os.path.join(tmp, "results"),
                             "--state-dir", os.path.join(tmp, "state"), "--log-level", "INFO",
                             *extra], stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    wait_for_port(port, None, 60)
    return proc


def log_text(tmp: str, name: str) -> str:
    with open(os.path.join(tmp, name), "rb") as handle:
        return handle.read().decode("utf-8", "replace")


def wait_log(tmp: str, name: str, pattern: str, limit: float) -> re.Match:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        match = re.search(pattern, log_text(tmp, name))
        if match:
            return match
        time.sleep(0.2)
    raise SystemExit(f"{name}: no {pattern!r} within {limit:.0f}s")


class ResultPath:
    """Dispatch a fresh commit, wait for its runtest, time its ``results``."""

    def __init__(self, port: int, runner: FakeRunner, base: int, rate: float = 0.0):
        self.port, self.runner, self.next, self.rate = port, runner, base, rate
        self.base = base

    def sent(self) -> int:
        """Results sent so far (each is a run in the test history)."""
        return self.next - self.base

    def paced(self) -> float:
        """``one``, then a wait so that results come at ``rate`` a second
        (0: back to back, as fast as the dispatcher takes them)."""
        started = time.monotonic()
        took = self.one()
        if self.rate:
            time.sleep(max(0.0, 1.0 / self.rate - (time.monotonic() - started)))
        return took

    def one(self) -> float:
        self.next += 1
        commit = f"{self.next:040x}"
        body = f"{commit} - branch0\n".encode()
        reply = helpers.call(("127.0.0.1", self.port), "dispatch", commit, body)
        assert reply.command == "ok", reply
        deadline = time.monotonic() + 10
        while commit not in self.runner.tokens:
            if time.monotonic() > deadline:
                raise SystemExit(f"no runtest for {commit[:12]}")
            time.sleep(0.001)
        result = format_result({"verdict": "passed", "tests": 0, "failures": 0, "errors": 0,
                                "skipped": 0, "runner": self.runner.key}, b"ok\n")
        started = time.perf_counter()
        reply = helpers.call(("127.0.0.1", self.port), "results",
                             f"{commit} {self.runner.tokens[commit]}", result)
        took = time.perf_counter() - started
        assert reply.command == "ok", reply
        return took


# Stand-ins stopped and continued like the worker (--reference): a process
# that only sleeps (the same comparison with nothing to find: how far apart
# two halves are by chance) and one spinning in the idle CPU class (what any
# background CPU work costs the result path here, however low its priority).
REFERENCES = {
    "nothing (a process that sleeps)": "import time\nwhile True: time.sleep(1)",
    "a busy loop in the idle CPU class":
        "import os\nos.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
        "while True: pass",
}


def reference_halves(path: "ResultPath", seconds: float) -> None:
    """Each stand-in interleaved for ``seconds``: its halves printed as the
    pass's are, so the pass's figures can be read against them."""
    for what, code in REFERENCES.items():
        child = subprocess.Popen([PY, "-c", code])
        try:
            interleave = Interleaver(pid=child.pid)
            end = time.monotonic() + seconds
            timed = []
            while time.monotonic() < end:
                working = interleave.state()
                timed.append((time.monotonic(), path.paced(), working))
            interleave.release()
        finally:
            stop_process(child, 5)
        print_halves(what, timed)


def figures(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[int(len(ordered) * 0.95) - 1]
    return (f"n={len(ordered)} median {statistics.median(ordered) * 1000:.2f} ms, "
            f"p95 {p95 * 1000:.2f} ms, max {ordered[-1] * 1000:.2f} ms")


def sample_until(path: ResultPath, tmp: str, done, since: float,
                 interleave: Interleaver | None = None, limit: float = 900) -> tuple[list, object]:
    """(when each sample ended, its latency, the worker working or not:
    None without ``interleave``) until ``done`` finds what it looks for in
    the dispatcher's log (looked at twice a second, not per sample: the
    log grows); that find too."""
    timed, found, looked = [], None, 0.0
    while found is None:
        working = interleave.state() if interleave else None
        took = path.paced()
        timed.append((time.monotonic(), took, working))
        if time.monotonic() - looked > 0.5:
            looked = time.monotonic()
            found = done(log_text(tmp, "pruning.log"))
        if time.monotonic() - since > limit:
            raise SystemExit(f"not done within {limit:.0f} s")
    return timed, found


def print_halves(what: str, timed: list) -> None:
    """The interleaved halves' figures and the median's rise."""
    working = [took for _, took, state in timed if state is True]
    stopped = [took for _, took, state in timed if state is False]
    if len(working) > 5 and len(stopped) > 5:
        print(f"  {what}, running: {figures(working)}")
        print(f"  {what}, stopped: {figures(stopped)}  ({describe_rise(timed)})")


def freed_all(text: str) -> bool | None:
    """The reaper's last sweep got to the end of the trash."""
    sweeps = FREED_RE.findall(text)
    return True if sweeps and not sweeps[-1][2] else None


def print_windows(label: str, timed: list, began: float, step: int) -> None:
    for start in range(0, int(timed[-1][0] - began) + 1, step):
        part = [took for when, took, *_ in timed if began + start <= when < began + start + step]
        if len(part) > 5:
            print(f"  {label}{start:4d} s to {start + step:4d} s: {figures(part)}")


def history_runs(tmp: str) -> int:
    conn = sqlite3.connect(f"file:{os.path.join(tmp, 'state', store.FILE_NAME)}?mode=ro",
                           uri=True)
    try:
        return conn.execute("SELECT count(*) FROM runs").fetchone()[0]
    finally:
        conn.close()


def run(tmp: str, args) -> None:
    folder = os.path.join(tmp, "results")
    os.makedirs(folder)
    t0 = time.monotonic()
    generate(folder, args.results,
             None if args.no_index else os.path.join(tmp, "state", result_index.FILE_NAME))
    # The files stand for results written long ago: on disk, not dirty in
    # the page cache, whose writeback would otherwise land in the windows.
    os.sync()
    print(f"generated {args.results} result files (+XML) in {time.monotonic() - t0:.1f}s; "
          f"results sent {f'{args.rate:g} a second' if args.rate else 'back to back'}")
    port = helpers.free_port()
    runner = FakeRunner()
    proc = start_dispatcher(tmp, port, [], "baseline.log")
    try:
        wait_log(tmp, "baseline.log", r"test history: \d+ results read", 1800)
        runner.register(port)
        path = ResultPath(port, runner, 10 ** 9, args.rate)
        base = [path.paced() for _ in range(args.samples)]
        print(f"baseline: results latency {figures(base)}")
        if args.reference:
            print(f"reference: stand-ins stopped and continued every {Interleaver.PHASE:g} s "
                  f"for {args.reference:g} s each:")
            reference_halves(path, args.reference)
    finally:
        stop_process(proc, 20)
    proc = start_dispatcher(tmp, port, ["--keep-results", str(args.keep),
                                        "--prune-interval", "3600"],
                            "pruning.log")
    started = time.monotonic()
    interleave = Interleaver(parent=proc.pid) if args.interleave else None
    try:
        runner = FakeRunner()
        runner.register(port)
        path.runner = runner
        # Samples until the plan is made, then until the pass's log line.
        planning, _ = sample_until(path, tmp, lambda text: PLANNED_RE.search(text), started,
                                   interleave)
        removing, match = sample_until(path, tmp, lambda text: PRUNED_RE.search(text),
                                       started, interleave)
        timed = planning + removing
        seen = time.monotonic()
        # Then until the reaper has freed every pruned file.
        freeing = [] if args.skip_freeing else \
            sample_until(path, tmp, freed_all, seen, interleave, limit=1800)[0]
        freed_at = time.monotonic()
        if interleave:
            interleave.release()
        sweeps = FREED_RE.findall(log_text(tmp, "pruning.log"))
        after_timed = []
        for _ in range(args.samples):
            took = path.paced()
            after_timed.append((time.monotonic(), took))
        after = [took for _, took in after_timed]
        # The samples taken while the pass ran (it ended before ``seen``).
        began = seen - float(match.group(3))
        during = [took for when, took, _ in timed if when >= began]
        before = [took for when, took, _ in timed if when < began]
        if before:
            print(f"after the restart, before the pass: results latency {figures(before)}")
        print(f"while pruning: results latency {figures(during)}")
        if freeing:
            print(f"while freeing the pruned files: results latency "
                  f"{figures([took for _, took, _ in freeing])}")
        print(f"after it: results latency {figures(after)}")
        if interleave:
            print("interleaved (the worker stopped and continued every "
                  f"{Interleaver.PHASE:g} s):")
            print_halves("the plan", [t for t in planning if t[0] >= began])
            print_halves("moving the files", removing)
            print_halves("freeing them", freeing)
        if args.windows:
            print_windows("", timed, began, args.windows)
            if freeing:
                print_windows("freeing +", freeing, seen, args.windows)
            print_windows("after +", after_timed, freed_at, args.windows)
        print(f"pruning pass: {match.group(1)} of {match.group(2)} results pruned in "
              f"{match.group(3)} s{match.group(4) or ''} (target < 60 s); files left "
              f"{sum(1 for n in os.listdir(folder) if not n.endswith('.xml') and n[0] != '.')}")
        if args.skip_freeing:
            return
        print(f"pruned files freed {freed_at - seen:.1f} s after the pass "
              f"({sum(int(n) for n, _, _ in sweeps)} files, {len(sweeps)} sweep(s))")
        deadline = time.monotonic() + 300
        while history_runs(tmp) > args.results - int(match.group(1)) + path.sent() \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        print(f"history rows dropped by {time.monotonic() - started:.1f} s after the "
              f"restart; runs left {history_runs(tmp)}")
    finally:
        stop_process(proc, 20)
        runner.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=int, default=100_000, help="result files to make")
    parser.add_argument("--keep", type=int, default=100, help="--keep-results N to use")
    parser.add_argument("--samples", type=int, default=200, help="baseline latency samples")
    parser.add_argument("--rate", type=float, default=20.0,
                        help="results a second the stand-in runner sends while latency is "
                             "measured; 0: back to back, as fast as they are taken "
                             "(default: %(default)s)")
    parser.add_argument("--windows", type=int, default=0, metavar="SECONDS",
                        help="also print the latency in windows of this many seconds of "
                             "the pass (its phases: the worker's plan first, then the "
                             "removal)")
    parser.add_argument("--reference", type=float, default=0.0, metavar="SECONDS",
                        help="after the baseline, compare interleaved halves as "
                             "--interleave does for SECONDS each with two stand-ins for the "
                             "worker: a process that only sleeps (how far apart the halves "
                             "fall by chance) and a busy loop in the idle CPU class (what "
                             "background CPU work costs the result path on this machine)")
    parser.add_argument("--interleave", action="store_true",
                        help="stop and continue the pruner's worker every 1.5 s while it "
                             "plans, moves and frees, and compare the latency of the halves "
                             "(free of the drift between windows)")
    parser.add_argument("--skip-freeing", action="store_true",
                        help="after the pass, do not wait while the worker frees the pruned "
                             "files (5 to 6 minutes, 12 with --interleave) nor for the "
                             "history's drop")
    parser.add_argument("--no-index", action="store_true",
                        help="write no result index with the files (a folder written by a "
                             "version that kept none): the worker reads every header")
    parser.add_argument("--keep-folder", action="store_true", help="leave the folder")
    args = parser.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench-retention-")
    try:
        run(tmp, args)
    finally:
        if args.keep_folder:
            print(f"left {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
