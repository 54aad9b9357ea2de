"""Benchmark of the land queue (issue 22), against the real daemons on
loopback: a dispatcher, 4 runners and an observer with
``--merge-into 'feature/*=main'`` (processes started here, ended by PID).

A bare upstream (a seed repository cloned ``--bare``) holds a small
package whose unittest suite takes about 1 s (one test sleeps); eight
branches ``feature/b1`` .. ``feature/b8`` each add a module and a test of
it.  The daemons start once the branches exist and the benchmark waits
until the observer's merged results of them are tested (a team asks to
land branches that were tested already), then asks for all eight to land,
in order, with the observer's ``land`` command.  The time runs from the
first ask until the last entry is decided (the last landing seen on the
upstream's ``main``, the rejection's time in the queue's snapshot).

A  eight good branches: ``--queue-depth 4`` against ``--queue-depth 1``
   (one after another: the serial time).  Target: depth 4 within
   0.4 x serial.
B  the third branch's test fails: the other seven land, the third is
   rejected; depth 4 against depth 1.  Target: within 0.6 x serial.

Each run starts from a fresh upstream and fresh daemons, so every run
starts equal; the depths take turns (serial first).  Each run checks its
end state, so a wrong result cannot look fast: main's first-parent line
holds exactly the landed merges, in the order asked, each with parents
(previous main, the branch's head) and a ``passed`` result filed under
it that says it was merged with main at its first parent; the bad branch
is rejected with its failing test as the reason and is not in main.

--quick: four branches and a 0.3 s suite, its ratios shown but not judged
(the targets are for eight branches and 1 s); --runs N: N runs of each
depth, taking turns, the medians compared; --strict: exit 3 when a target
is missed or a run failed (its end state wrong, or it timed out).

usage:  python benchmarks/bench_queue.py [--quick] [--only A|B] [--runs N] [--keep]
        [--strict]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench  # noqa: E402
from bench import Bench, Upstream, git, wait_for, wait_for_port  # noqa: E402
import helpers  # noqa: E402
from ci.results import read_header, split_result_name  # noqa: E402
from ci.wire import DEFAULT_CONNECT_TIMEOUT, decode_fields, parse_address  # noqa: E402

# (full, quick)
SIZES = {"branches": (8, 4), "suite": (1.0, 0.3)}
RUNNERS = 4
DEPTH = 4
BAD_POSITION = 3            # 1-based: the third branch asked for fails in B
POLL = 0.2
QUEUE_POLL = 0.2
TARGETS = {"A": 0.4, "B": 0.6}

SLOW_TEST = """import time
import unittest

import pkg


class TestBase(unittest.TestCase):
    def test_base(self):
        time.sleep({sleep})
        self.assertEqual(pkg.NAME, "pkg")
"""
MODULE = "VALUE = {n}\n"
MODULE_TEST = """import unittest

from pkg import mod{n}


class TestMod{n}(unittest.TestCase):
    def test_value(self):
        self.assertEqual(mod{n}.VALUE, {expected})
"""


class QueueBench(Bench):
    sizes = SIZES
    prefix = "ci-bench-queue-"

    # ---- one run: a fresh upstream, fresh daemons --------------------------
    def make_upstream(self, name: str, bad: int | None) -> tuple[str, list[str], str]:
        """The bare upstream with main and the branches: (its path, the
        branches' heads in asking order, main's head)."""
        seed = Upstream(self.path(name, "seed"))
        seed.commit({"pkg/__init__.py": 'NAME = "pkg"\n',
                     "tests/__init__.py": "",
                     "tests/test_base.py": SLOW_TEST.format(sleep=self.size("suite"))})
        heads = []
        for n in range(1, self.size("branches") + 1):
            git(seed.path, "checkout", "-q", "-b", f"feature/b{n}", "main")
            heads.append(seed.commit({
                f"pkg/mod{n}.py": MODULE.format(n=n),
                f"tests/test_mod{n}.py": MODULE_TEST.format(
                    n=n, expected=-1 if n == bad else n)}))
        git(seed.path, "checkout", "-q", "main")
        upstream = self.path(name, "upstream.git")
        git(self.tmp, "clone", "-q", "--bare", seed.path, upstream)
        return upstream, heads, git(upstream, "rev-parse", "main")

    def clone(self, upstream: str, dest: str) -> str:
        git(self.tmp, "clone", "-q", upstream, dest)
        return dest

    def start_cluster(self, name: str, upstream: str, depth: int):
        """The dispatcher, then the runners and the observer started at once
        (nothing is measured until all of them are up and idle); the
        dispatcher's address, its results folder and the observer's address."""
        _, dispatcher, results = self.start_dispatcher(name)
        waiting = []
        for n in range(RUNNERS):
            port = bench.free_port()
            waiting.append((port, self.procs.start(f"{name}-runner-{port}", [
                os.path.join(self.code, "test_runner.py"), "--host", "127.0.0.1",
                "--port", str(port), "--dispatcher-server", dispatcher,
                self.clone(upstream, self.path(name, f"runner{n}"))])))
        observer = bench.free_port()
        waiting.append((observer, self.procs.start(f"{name}-observer", [
            os.path.join(self.code, "repo_observer.py"), "--host", "127.0.0.1",
            "--port", str(observer), "--poll", str(POLL), "--queue-poll", str(QUEUE_POLL),
            "--queue-depth", str(depth), "--merge-into", "feature/*=main",
            "--state-dir", self.path(name, "observer-state"),
            "--dispatcher-server", dispatcher, self.clone(upstream, self.path(name, "observer"))])))
        for port, proc in waiting:
            wait_for_port(port, proc)
        return dispatcher, results, ("127.0.0.1", observer)

    def stop_cluster(self) -> None:
        """SIGTERM to every daemon of the run at once, then each is waited
        for (and killed if it lingers) by its PID."""
        for _, proc, _ in self.procs.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        self.procs.stop_all()

    def status(self, dispatcher: str) -> dict:
        reply = helpers.call(parse_address(dispatcher), "status", security=self.security)
        return decode_fields(reply.body)

    def snapshot(self, observer) -> dict:
        reply = helpers.call(observer, "queue", security=self.security,
                             timeout=(DEFAULT_CONNECT_TIMEOUT, 10))
        if reply.command != "ok":
            raise RuntimeError(f"queue refused: {reply.argument}")
        return json.loads(reply.body)

    def run_once(self, scenario: str, depth: int, index: int) -> dict:
        """One run; its figures (``seconds``) or raises with what was wrong."""
        name = f"{scenario}{index}-d{depth}"
        began = time.monotonic()
        count = self.size("branches")
        bad = BAD_POSITION if scenario == "B" else None
        upstream, heads, start = self.make_upstream(name, bad)
        dispatcher, results, observer = self.start_cluster(name, upstream, depth)
        # Warm: main and each branch's merged result tested, runners idle.
        expected = count + 1

        def settled():
            s = self.status(dispatcher)
            return (int(s["done"]) >= expected and s["queued"] == "0" and s["running"] == "0"
                    and int(s["runners"]) == RUNNERS and s)
        wait_for(settled, 120, 0.05, "the branches' merged results")
        ref = os.path.join(upstream, "refs", "heads", "main")
        landings: list[tuple[float, str]] = []   # (wall time, new main head)
        load = os.getloadavg()[0]
        setup = time.monotonic() - began
        started_wall = time.time()
        started = time.monotonic()
        for n in range(1, count + 1):
            reply = helpers.call(observer, "land", f"feature/b{n}", security=self.security,
                                 timeout=(DEFAULT_CONNECT_TIMEOUT, 30))
            if reply.command != "ok":
                raise RuntimeError(f"land feature/b{n} refused: {reply.argument}")
        asked = time.monotonic() - started
        good = count - (1 if bad else 0)
        head = start
        deadline = time.monotonic() + 60 + 10 * count * self.size("suite")
        while len(landings) < good:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(landings)} of {good} landed in time")
            try:
                with open(ref) as handle:
                    now = handle.read().strip()
            except FileNotFoundError:   # packed, or mid-rename
                now = git(upstream, "rev-parse", "main")
            if now != head:
                landings.append((time.time(), now))
                head = now
            else:
                time.sleep(0.005)
        snap = wait_for(lambda: (lambda s: not s["entries"] and s)(self.snapshot(observer)),
                        30, 0.05, "the queue to empty")
        finished = {e["branch"]: e for e in snap["recent"]}
        decided = [landings[-1][0]] + [e["updated"] for e in finished.values()
                                       if e["state"] == "rejected"]
        seconds = max(decided) - started_wall
        self.check(name, upstream, results, heads, start, bad, finished)
        # Test runs the queue asked for (the warm-up tested main and each branch).
        runs = sum(1 for f in os.listdir(results) if split_result_name(f)) - expected
        return {"seconds": seconds, "asked": asked, "load": load, "setup": setup,
                "landings": [t - started_wall for t, _ in landings],
                "runs": runs}

    def check(self, name: str, upstream: str, results: str, heads: list[str], start: str,
              bad: int | None, finished: dict) -> None:
        """The end state, or RuntimeError saying what is wrong."""
        good = [h for n, h in enumerate(heads, 1) if n != bad]
        line = git(upstream, "rev-list", "--first-parent", f"{start}..main").split()[::-1]
        if len(line) != len(good):
            raise RuntimeError(f"{name}: main has {len(line)} new first-parent commits, "
                               f"not {len(good)}")
        landed = [finished.get(f"feature/b{n}", {}).get("tested")
                  for n in range(1, len(heads) + 1) if n != bad]
        if landed != line:
            raise RuntimeError(f"{name}: main's new commits are not the landed entries' "
                               "tested commits, in the order asked")
        previous = start
        for commit, head in zip(line, good):
            parents = git(upstream, "rev-list", "--parents", "-n", "1", commit).split()[1:]
            if parents != [previous, head]:
                raise RuntimeError(f"{name}: {commit[:12]} has parents {parents}, not "
                                   f"[{previous[:12]}, {head[:12]}]")
            header = read_header(os.path.join(results, commit)) or {}
            if header.get("verdict") != "passed" or \
                    header.get("merged_into") != f"main {previous}":
                raise RuntimeError(f"{name}: {commit[:12]} on main has result "
                                   f"{header.get('verdict')} merged into "
                                   f"{header.get('merged_into')}")
            previous = commit
        for n, head in enumerate(heads, 1):
            entry = finished.get(f"feature/b{n}") or {}
            want = "rejected" if n == bad else "landed"
            if entry.get("state") != want or entry.get("head") != head:
                raise RuntimeError(f"{name}: feature/b{n} is {entry.get('state')}, not {want}")
        if bad:
            reason = finished[f"feature/b{bad}"]["reason"]
            if f"test_mod{bad}" not in reason:
                raise RuntimeError(f"{name}: the rejection's reason is {reason!r}")
            inside = subprocess.run(["git", "-C", upstream, "merge-base", "--is-ancestor",
                                     heads[bad - 1], "main"], stdin=subprocess.DEVNULL)
            if inside.returncode != 1:
                raise RuntimeError(f"{name}: the bad branch is in main (or git failed)")

    # ---- scenarios ---------------------------------------------------------
    def scenario(self, scenario: str) -> None:
        count = self.size("branches")
        what = (f"{count} good branches" if scenario == "A" else
                f"{count} branches, the {BAD_POSITION}rd failing")
        print(f"\n== {scenario}: {what}, {self.size('suite'):g} s suite, {RUNNERS} runners, "
              f"--queue-depth {DEPTH} vs 1; {self.args.runs} run(s) each", flush=True)
        times: dict[int, list[float]] = {1: [], DEPTH: []}
        for index in range(self.args.runs):
            for depth in (1, DEPTH):
                try:
                    figures = self.run_once(scenario, depth, index)
                finally:
                    self.stop_cluster()
                times[depth].append(figures["seconds"])
                marks = " ".join(f"{t:.1f}" for t in figures["landings"])
                print(f"  depth {depth}: {figures['seconds']:.2f} s (asks took "
                      f"{figures['asked']:.2f} s; landings at {marks} s; "
                      f"{figures['runs']} test runs; set up in {figures['setup']:.1f} s; "
                      f"load average {figures['load']:.1f})",
                      flush=True)
        serial, parallel = statistics.median(times[1]), statistics.median(times[DEPTH])
        ratio = parallel / serial
        target = TARGETS[scenario]
        runs = f" (median of {self.args.runs})" if self.args.runs > 1 else ""
        self.row(f"{scenario}: serial, --queue-depth 1{runs}", "(reference)",
                 f"{serial:.2f} s", None)
        # The targets are the issue's, for eight branches and a 1 s suite:
        # a --quick run's smaller counts are shown, not judged.
        self.row(f"{scenario}: --queue-depth {DEPTH}{runs}", f"<= {target} x serial",
                 f"{parallel:.2f} s = {ratio:.3f} x serial"
                 + (" (quick: not judged)" if self.quick else ""),
                 None if self.quick else ratio <= target)
        print(f"  load average now {os.getloadavg()[0]:.1f}", flush=True)

    def A(self) -> None:
        self.scenario("A")

    def B(self) -> None:
        self.scenario("B")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark of the land queue (issue 22).")
    parser.add_argument("--quick", action="store_true",
                        help=f"{SIZES['branches'][1]} branches and a "
                             f"{SIZES['suite'][1]:g} s suite (a smoke run: ratios not judged)")
    parser.add_argument("--only", action="append", choices=["A", "B"],
                        help="run only this scenario (repeatable)")
    parser.add_argument("--runs", type=int, default=1, metavar="N",
                        help="runs of each depth, taking turns; the median is the figure "
                             "(default: %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and logs")
    parser.add_argument("--strict", action="store_true", help="exit 3 when a target is missed or a run failed (a wrong "
                             "end state, a time-out)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    b = QueueBench(argparse.Namespace(quick=args.quick, code=None, max_shards=None,
                                      verbose=False, runs=args.runs))
    print(f"land queue benchmark on {bench.CORES} core(s), load average "
          f"{os.getloadavg()[0]:.1f}; work folder {b.tmp}", flush=True)
    return bench.run_scenarios(b, args.only or ["A", "B"], args)


if __name__ == "__main__":
    sys.exit(main())
