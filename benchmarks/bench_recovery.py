"""Recovery benchmarks of the CI system (issue 10), run against the real
daemons on loopback with their DEFAULT flags (only addresses and folders
are given), a real temporary upstream git repository, and tests that
leave a marker file per run, so every run of every commit is counted.

1. recovery    2 runners; a commit whose test takes T = 2 s; the runner
               running it is SIGKILLed mid-test (its PID only, not its
               group).  Figure: time from the kill to the commit's result
               file, minus T (target < 2 s), median and max of n; and
               whether the killed runner's test process was gone within
               1 s (its watchdog kills the test's group).
2. duplicates  3 runners busy with 3 commits (~3 s tests, one failing on
               purpose); the dispatcher is SIGKILLed and restarted at once
               on the same port and state folder.  Figure: runs beyond the
               first per commit (target 0), and every verdict right.
3. chaos       a seeded soak: a stream of commits into the upstream (a
               quarter fail on purpose), an observer (notified after each
               commit, polling as a fallback), a dispatcher and 3 runners;
               random SIGKILLs of every kind of process, each restarted
               after a random 0-1 s.  Per fault kind: kills, results, wrong
               verdicts, result files rewritten, duplicate runs.  The
               schedule comes from ``random.Random(seed)``; the seed is
               printed, and ``--seed`` replays it.

Every process is started here and ended here by its PID.
usage:  python benchmarks/bench_recovery.py [--quick] [--only NAME] [--seed N] [--keep]
Exit status: 1 if a commit never got a result, 3 with --strict when a
target is missed, else 0.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import helpers  # noqa: E402
from bench import (CORES, PY, Scenarios, Upstream, run_scenarios, wait_for,  # noqa: E402
                   wait_for_port)
from ci.results import parse_result  # noqa: E402
from support.procs import cmdline, group_members, stat_fields  # noqa: E402
from ci.wire import Message, ProtocolError, decode_fields, valid_full_commit

free_port = helpers.free_port

# A test that marks its start and its end (file name: tag, pid, wall-clock
# ns, kind; content: its process group), sleeps, then passes or fails.
MARKED_TEST = """import os
import time
import unittest

MARKERS = {markers!r}
TAG = {tag!r}


def mark(kind):
    name = "%s.%d.%d.%s" % (TAG, os.getpid(), time.time_ns(), kind)
    path = os.path.join(MARKERS, name)
    with open(path + ".tmp", "w") as handle:   # renamed whole: never read half-written
        handle.write("%d %d\\n" % (os.getpgrp(), os.getppid()))
    os.rename(path + ".tmp", path)


class TestWork(unittest.TestCase):
    def test_work(self):
        mark("start")
        time.sleep({sleep!r})
        mark("end")
        self.assertTrue({passes!r})
"""

SIZES = {  # (full, quick)
    "recovery_runs": (5, 2),
    "duplicate_rounds": (3, 2),
    "chaos_commits": (60, 20),
}
RECOVERY_TEST_SECONDS = 2.0
RECOVERY_TARGET = 2.0
ORPHAN_LIMIT = 1.0
DUPLICATE_TEST_SECONDS = 3.0
# The last round's tests outlast the runners' default heartbeat (5 s), so
# they re-register mid-run and the restarted dispatcher must adopt them.
DUPLICATE_LONG_TEST_SECONDS = 8.0
# Chaos: a commit about every COMMIT_GAP s, a kill about every KILL_GAP s.
CHAOS_COMMIT_GAP = 1.0
CHAOS_KILL_GAP = 2.5
CHAOS_RESTART_MAX = 1.0
CHAOS_FAIL_SHARE = 0.25
RESULT_LINE = re.compile(r"result for ([0-9a-f]{12}): (\w+)")
DUPLICATE_LINE = re.compile(r"^(\S+ [0-9:]+),\d+ .*duplicate result for ([0-9a-f]{12})", re.M)


def log_time(stamp: str) -> float:
    """A logging asctime (local time) as a wall-clock timestamp."""
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S"))


# --------------------------------------------------------------------------
# Markers: one file per start and per end of a test run.

class Markers:
    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    def runs(self) -> dict[str, dict[str, list[tuple[int, int, int]]]]:
        """tag -> {"start": [(pid, ns, pgid, parent pid)], "end": [...]}"""
        found: dict = collections.defaultdict(lambda: {"start": [], "end": []})
        for name in os.listdir(self.folder):
            parts = name.split(".")
            if len(parts) != 4 or parts[3] not in ("start", "end"):
                continue
            try:
                with open(os.path.join(self.folder, name)) as handle:
                    pgid, parent = (int(x) for x in handle.read().split())
            except (OSError, ValueError):
                pgid = parent = 0   # being written
            found[parts[0]][parts[3]].append((int(parts[1]), int(parts[2]), pgid, parent))
        for kinds in found.values():
            for runs in kinds.values():
                runs.sort(key=lambda run: run[1])
        return found

    def started(self, tag: str) -> list[tuple[int, int, int]]:
        return self.runs().get(tag, {"start": []})["start"]


def marked_test(markers: str, tag: str, sleep: float, passes: bool) -> dict[str, str]:
    return {"tests/test_work.py": MARKED_TEST.format(markers=markers, tag=tag, sleep=sleep,
                                                     passes=passes)}


def describe(pid: int) -> str:
    args, fields = cmdline(pid), stat_fields(pid)
    if args is None or fields is None:
        return f"pid {pid} (gone)"
    cmd = args.replace(b"\0", b" ").decode("utf-8", "replace")
    return f"pid {pid} state {fields[0]} ppid {fields[1]}: {cmd[:160]}"


def read_verdict(path: str) -> str | None:
    try:
        with open(path, "rb") as handle:
            fields, _ = parse_result(handle.read())
    except (OSError, ValueError):
        return None
    return fields.get("verdict")


# --------------------------------------------------------------------------

class RecoveryBench(Scenarios):
    sizes = SIZES
    prefix = "ci-recovery-"

    def __init__(self, args):
        super().__init__(args)
        self.rng = random.Random(args.seed)

    # ---- daemons, default flags but addresses and folders ------------------
    def start_dispatcher(self, name: str, port: int) -> subprocess.Popen:
        proc = self.procs.start(f"{name}-dispatcher", [
            os.path.join(ROOT, "dispatcher.py"), "--host", "127.0.0.1", "--port", str(port),
            "--results-dir", self.path(name, "results"),
            "--state-dir", self.path(name, "state")])
        wait_for_port(port, proc)
        return proc

    def start_runner(self, name: str, dispatcher_port: int, port: int,
                     clone: str) -> subprocess.Popen:
        proc = self.procs.start(f"{name}-runner-{port}", [
            os.path.join(ROOT, "test_runner.py"), "--host", "127.0.0.1", "--port", str(port),
            "--dispatcher-server", f"127.0.0.1:{dispatcher_port}", clone])
        wait_for_port(port, proc)
        return proc

    def start_observer(self, name: str, dispatcher_port: int, port: int, clone: str,
                       poll: float) -> subprocess.Popen:
        proc = self.procs.start(f"{name}-observer", [
            os.path.join(ROOT, "repo_observer.py"), "--host", "127.0.0.1", "--port", str(port),
            "--poll", str(poll), "--dispatcher-server", f"127.0.0.1:{dispatcher_port}", clone])
        wait_for_port(port, proc)
        return proc

    def call(self, port: int, command: str, argument: str = "") -> Message:
        return helpers.call(("127.0.0.1", port), command, argument, security=self.security,
                            timeout=(5, 5))

    def status(self, port: int) -> dict:
        try:
            return decode_fields(self.call(port, "status").body)
        except (OSError, ProtocolError):
            return {}

    def dispatch(self, port: int, commits: list[str]) -> None:
        reply = self.call(port, "dispatch", " ".join(commits))
        if reply.command != "ok":
            raise RuntimeError(f"dispatch refused: {reply.command} {reply.argument}")

    def running_on(self, port: int, commit: str) -> str | None:
        """The runner key (host:port) the dispatcher says runs ``commit``."""
        try:
            data = json.loads(self.call(port, "state").body)
        except (OSError, ProtocolError, ValueError):
            return None
        return next((j["runner"] for j in data["running"] if j["commit"] == commit), None)

    # ---- 1. recovery after a runner SIGKILL ------------------------------
    def recovery(self) -> None:
        runs = self.size("recovery_runs")
        print(f"\n== recovery: SIGKILL of the runner running a {RECOVERY_TEST_SECONDS:g} s "
              f"test, {runs} times, 2 runners, default flags", flush=True)
        markers = Markers(self.path("rec", "markers"))
        up = Upstream(self.path("rec", "upstream"))
        first = up.commit(marked_test(markers.folder, "warmup", 0.0, True))
        dport = free_port()
        self.start_dispatcher("rec", dport)
        results = self.path("rec", "results")
        runners: dict[int, tuple[subprocess.Popen, str]] = {}
        for i in range(2):
            port = free_port()
            clone = up.clone(self.path("rec", f"runner{i}"))
            runners[port] = (self.start_runner("rec", dport, port, clone), clone)
        wait_for(lambda: self.status(dport).get("runners") == "2", 30, 0.05, "2 runners")
        self.dispatch(dport, [first])
        if self.wait_result(results, first, 60) is None:
            return
        recoveries, orphan_gone, extra = [], [], []
        for n in range(runs):
            tag = f"rec{n}"
            commit = up.commit(marked_test(markers.folder, tag, RECOVERY_TEST_SECONDS, True))
            self.dispatch(dport, [commit])
            started = wait_for(lambda: markers.started(tag), 30, 0.005, f"{tag} to start")
            pgid = started[0][2]
            key = wait_for(lambda: self.running_on(dport, commit), 10, 0.01,
                           f"runner of {tag}")
            port = int(key.rpartition(":")[2])
            # Somewhere in the middle of the test.
            time.sleep(self.rng.uniform(0.5, 1.5))
            victim = runners[port][0]
            os.kill(victim.pid, signal.SIGKILL)       # the runner alone, not its group
            killed = time.monotonic()
            gone = None
            while time.monotonic() - killed < ORPHAN_LIMIT + 1:
                if not group_members(pgid):
                    gone = time.monotonic() - killed
                    break
                time.sleep(0.01)
            if gone is None:
                for pid in group_members(pgid):
                    print(f"    still alive in group {pgid}: {describe(pid)}", flush=True)
            victim.wait(5)
            done = self.wait_result(results, commit, 60)
            if done is None:
                continue
            recovery = done - killed - RECOVERY_TEST_SECONDS
            recoveries.append(recovery)
            orphan_gone.append(gone)
            verdict = read_verdict(os.path.join(results, commit))
            extra.append(verdict)
            print(f"    run {n + 1}: killed runner :{port} {time.monotonic() - killed:.2f}s "
                  f"ago; result {done - killed:.2f}s after the kill ({verdict}); recovery "
                  f"{recovery:.2f}s; test group gone after "
                  f"{'%.3fs' % gone if gone is not None else 'NEVER (>2s)'}", flush=True)
            # A supervisor restarts it on the same port and clone.
            runners[port] = (self.start_runner("rec", dport, port, runners[port][1]),
                             runners[port][1])
            wait_for(lambda: self.status(dport).get("runners") == "2", 30, 0.05,
                     "the restarted runner")
        if not recoveries:
            return
        self.row(f"recovery after a runner SIGKILL, median (n={len(recoveries)})",
                 f"< {RECOVERY_TARGET:g} s", f"{statistics.median(recoveries):.2f} s",
                 statistics.median(recoveries) < RECOVERY_TARGET)
        self.row("recovery after a runner SIGKILL, max", f"< {RECOVERY_TARGET:g} s",
                 f"{max(recoveries):.2f} s", max(recoveries) < RECOVERY_TARGET)
        in_time = sum(g is not None and g <= ORPHAN_LIMIT for g in orphan_gone)
        worst = max((g for g in orphan_gone if g is not None), default=float("nan"))
        self.row("killed runner's test process gone within 1 s", f"{len(orphan_gone)}/"
                 f"{len(orphan_gone)}", f"{in_time}/{len(orphan_gone)} (worst {worst:.3f} s)",
                 in_time == len(orphan_gone))
        wrong = sum(v != "passed" for v in extra)
        self.row("recovery: wrong verdicts", "0", str(wrong), wrong == 0)

    # ---- 2. duplicate runs after a dispatcher restart --------------------
    def duplicates(self) -> None:
        rounds = self.size("duplicate_rounds")
        print(f"\n== duplicates: 3 runners busy with 3 commits ({DUPLICATE_TEST_SECONDS:g} s "
              f"tests; {DUPLICATE_LONG_TEST_SECONDS:g} s in the last round), dispatcher "
              f"SIGKILLed and restarted at once; {rounds} round(s)",
              flush=True)
        markers = Markers(self.path("dup", "markers"))
        up = Upstream(self.path("dup", "upstream"))
        first = up.commit(marked_test(markers.folder, "warmup", 0.0, True))
        dport = free_port()
        dispatcher = self.start_dispatcher("dup", dport)
        results = self.path("dup", "results")
        for i in range(3):
            self.start_runner("dup", dport, free_port(), up.clone(self.path("dup", f"r{i}")))
        wait_for(lambda: self.status(dport).get("runners") == "3", 30, 0.05, "3 runners")
        self.dispatch(dport, [first])
        if self.wait_result(results, first, 60) is None:
            return
        total_extra, wrong, after, adopted = 0, 0, [], 0
        for r in range(rounds):
            seconds = DUPLICATE_LONG_TEST_SECONDS if r == rounds - 1 else DUPLICATE_TEST_SECONDS
            expected, tags = {}, {}
            commits = []
            for i in range(3):
                tag = f"dup{r}x{i}"
                passes = i != 1                       # one fails on purpose
                commit = up.commit(marked_test(markers.folder, tag, seconds, passes))
                commits.append(commit)
                expected[commit] = "passed" if passes else "failed"
                tags[commit] = tag
            wait_for(lambda: self.status(dport).get("idle_runners") == "3", 30, 0.05,
                     "3 idle runners")
            self.dispatch(dport, commits)
            wait_for(lambda: all(markers.started(t) for t in tags.values()), 30, 0.01,
                     "3 tests to start")
            time.sleep(self.rng.uniform(0.2, 1.5))
            os.kill(dispatcher.pid, signal.SIGKILL)
            dispatcher.wait(5)
            restarted = time.monotonic()
            dispatcher = self.start_dispatcher("dup", dport)
            up_again = time.monotonic() - restarted
            done = [self.wait_result(results, c, 60) for c in commits]
            if None in done:
                continue
            after.append(max(done) - restarted)
            time.sleep(0.5)  # room for a late second run to show
            runs = markers.runs()
            extra = sum(max(0, len(runs[tags[c]]["start"]) - 1) for c in commits)
            bad = [c for c in commits
                   if read_verdict(os.path.join(results, c)) != expected[c]]
            with open(dispatcher.log_path, "rb") as handle:
                text = handle.read().decode("utf-8", "replace")
            adopted_now = text.count("; adopted")
            adopted += adopted_now
            total_extra += extra
            wrong += len(bad)
            print(f"    round {r + 1} ({seconds:g} s tests): dispatcher back in {up_again:.2f}s; all 3 results "
                  f"{after[-1]:.2f}s after the restart; runs per commit "
                  f"{[len(runs[tags[c]]['start']) for c in commits]}; adopted {adopted_now}; "
                  f"wrong verdicts {len(bad)}", flush=True)
        if not after:
            return
        self.row(f"duplicate runs after a dispatcher restart ({rounds}x3 busy)", "0",
                 str(total_extra), total_extra == 0)
        # The others finished before their runner's next heartbeat: their
        # result (with its token) ended the hold instead.
        self.row("runs adopted by the restarted dispatcher", "-",
                 f"{adopted} of {3 * rounds}", None)
        self.row("duplicates: wrong verdicts", "0", str(wrong), wrong == 0)
        self.row("duplicates: restart to last result, max", "-", f"{max(after):.2f} s", None)

    # ---- 3. chaos soak -------------------------------------------------------
    def chaos(self) -> None:
        Chaos(self).run()

class Chaos:
    """The soak: its own schedule, processes and tallies."""

    KINDS = ("dispatcher", "runner", "observer")

    def __init__(self, bench: RecoveryBench):
        self.b = bench
        self.rng = random.Random(bench.args.seed)
        self.count = bench.size("chaos_commits")
        self.markers = Markers(bench.path("chaos", "markers"))
        self.results = bench.path("chaos", "results")
        self.up = Upstream(bench.path("chaos", "upstream"))
        self.dport = free_port()
        self.oport = free_port()
        self.procs: dict[tuple[str, int], subprocess.Popen | None] = {}
        self.runner_ports = [free_port() for _ in range(3)]
        self.clones: dict[tuple[str, int], str] = {}
        self.kills: list[tuple[float, str, int]] = []   # (wall-clock time, kind, pid)
        self.dispatcher_logs: list[str] = []
        self.seen: dict[str, tuple[int, int]] = {}   # result file -> (inode, mtime_ns)
        self.rewrites: list[tuple[float, str]] = []
        self.notifiers: list[subprocess.Popen] = []
        self.stop_watch = threading.Event()

    # ---- the schedule: all random choices up front, from the seed --------
    def schedule(self) -> tuple[list, list]:
        commits = []
        for i in range(self.count):
            commits.append({"tag": f"c{i}", "at": i * CHAOS_COMMIT_GAP,
                            "sleep": round(self.rng.uniform(0.2, 1.2), 2),
                            "passes": self.rng.random() >= CHAOS_FAIL_SHARE})
        faults, t = [], 0.0
        end = self.count * CHAOS_COMMIT_GAP
        while True:
            t += self.rng.expovariate(1 / self.b.args.kill_every)
            if t >= end:
                break
            kind = self.rng.choice(self.KINDS)
            index = self.rng.randrange(3) if kind == "runner" else 0
            faults.append({"at": t, "kind": kind, "index": index,
                           "delay": self.rng.uniform(0, CHAOS_RESTART_MAX)})
        return commits, faults

    # ---- processes ---------------------------------------------------------
    def start(self, kind: str, index: int) -> None:
        b = self.b
        for attempt in range(20):
            try:
                if kind == "dispatcher":
                    proc = b.start_dispatcher("chaos", self.dport)
                    self.dispatcher_logs.append(proc.log_path)
                elif kind == "runner":
                    proc = b.start_runner("chaos", self.dport, self.runner_ports[index],
                                          self.clones[kind, index])
                else:
                    proc = b.start_observer("chaos", self.dport, self.oport,
                                            self.clones[kind, index], 1.0)
                self.procs[kind, index] = proc
                return
            except (RuntimeError, TimeoutError) as exc:
                print(f"    restart of {kind} {index} failed ({exc}); again", flush=True)
                time.sleep(0.2)
        raise RuntimeError(f"cannot restart {kind} {index}")

    def kill(self, kind: str, index: int) -> bool:
        proc = self.procs.get((kind, index))
        if proc is None or proc.poll() is not None:
            return False
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        self.procs[kind, index] = None
        self.kills.append((time.time(), kind, proc.pid))
        return True

    def notify(self) -> None:
        self.notifiers = [p for p in self.notifiers if p.poll() is None]
        self.notifiers.append(subprocess.Popen(
            [PY, "-S", os.path.join(ROOT, "repo_observer.py"), "notify", "--observer",
             f"127.0.0.1:{self.oport}", "--timeout", "2"], env=self.b.env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def watch(self) -> None:
        """Result files by inode and mtime: a change is a rewrite."""
        while not self.stop_watch.wait(0.05):
            self.scan()

    def scan(self) -> None:
        try:
            names = os.listdir(self.results)
        except OSError:
            return
        for name in names:
            if not valid_full_commit(name):
                continue
            try:
                st = os.stat(os.path.join(self.results, name))
            except OSError:
                continue
            key = (st.st_ino, st.st_mtime_ns)
            old = self.seen.setdefault(name, key)
            if old != key:
                self.seen[name] = key
                self.rewrites.append((time.time(), name))

    def cause(self, when: float) -> str:
        """The kind of the last kill before ``when`` (wall clock)."""
        kind = "none"
        for at, k, _ in self.kills:
            if at <= when:
                kind = k
        return kind

    def cause_of_rerun(self, previous: tuple, started: float) -> str:
        """Why a commit whose test had run to its end ran again: its runner
        (the test's parent) was SIGKILLed after that end and before the
        rerun began, so the result died with it (by design: counted as
        "runner"); otherwise the last kill of any kind before the rerun."""
        ended, parent = previous[1] / 1e9, previous[3]
        if any(pid == parent and ended <= at <= started for at, _, pid in self.kills):
            return "runner"
        return self.cause(started)

    # ---- the soak ----------------------------------------------------------
    def run(self) -> None:
        b = self.b
        commits, faults = self.schedule()
        print(f"\n== chaos: {self.count} commits, {len(faults)} scheduled SIGKILLs (about one "
              f"every {b.args.kill_every:g} s) "
              f"(dispatcher, runners, observer; restart after 0-{CHAOS_RESTART_MAX:g} s), "
              f"3 runners, default flags; seed {b.args.seed}", flush=True)
        first = self.up.commit(marked_test(self.markers.folder, "base", 0.1, True))
        expected = {first: "passed"}
        tags = {first: "base"}
        for index in range(3):
            self.clones["runner", index] = self.up.clone(b.path("chaos", f"runner{index}"))
        self.clones["observer", 0] = self.up.clone(b.path("chaos", "observer"))
        os.makedirs(self.results, exist_ok=True)
        self.start("dispatcher", 0)
        for index in range(3):
            self.start("runner", index)
        self.start("observer", 0)
        # The observer's first start dispatches only the branch head: let it
        # see the base commit alone before the stream begins.
        wait_for(lambda: os.path.exists(os.path.join(self.results, first)), 60, 0.05,
                 "the base commit's result")
        watcher = threading.Thread(target=self.watch, daemon=True)
        watcher.start()
        events = [(c["at"], 0, "commit", c) for c in commits]
        events += [(f["at"], 1, "kill", f) for f in faults]
        events.sort(key=lambda e: (e[0], e[1]))
        t0 = time.monotonic()
        restarts: list[tuple[float, str, int]] = []
        skipped = collections.Counter()
        try:
            while events or restarts:
                now = time.monotonic() - t0
                restarts.sort()
                if restarts and restarts[0][0] <= now:
                    _, kind, index = restarts.pop(0)
                    self.start(kind, index)
                    continue
                if events and events[0][0] <= now:
                    _, _, what, item = events.pop(0)
                    if what == "commit":
                        commit = self.up.commit(marked_test(
                            self.markers.folder, item["tag"], item["sleep"], item["passes"]))
                        expected[commit] = "passed" if item["passes"] else "failed"
                        tags[commit] = item["tag"]
                        self.notify()
                    elif self.kill(item["kind"], item["index"]):
                        restarts.append((now + item["delay"], item["kind"], item["index"]))
                    else:
                        skipped[item["kind"]] += 1   # already down, waiting to restart
                    continue
                nexts = [e[0] for e in events[:1]] + [r[0] for r in restarts[:1]]
                time.sleep(max(0.0, min(min(nexts) - now, 0.05)))
            stream_end = time.monotonic()
            self.notify()
            pending = set(expected)
            deadline = time.monotonic() + 120
            while pending and time.monotonic() < deadline:
                pending = {c for c in pending
                           if not os.path.exists(os.path.join(self.results, c))}
                time.sleep(0.05)
            drained = time.monotonic() - stream_end
            time.sleep(2.0)          # late results and rewrites would show now
            self.scan()
        finally:
            self.stop_watch.set()
            watcher.join(5)
            for proc in self.notifiers:
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        b.lost.extend(pending)
        for commit in pending:
            print(f"  LOST: no result for {commit} ({tags[commit]})", flush=True)
        self.tally(expected, tags, pending, faults, skipped, drained)

    def tally(self, expected, tags, pending, faults, skipped, drained) -> None:
        kinds = ("none", *self.KINDS)
        table = {k: collections.Counter() for k in kinds}
        for _, kind, _ in self.kills:
            table[kind]["kills"] += 1
        wrong_list = []
        for commit, want in expected.items():
            path = os.path.join(self.results, commit)
            if commit in pending:
                continue
            when = os.stat(path).st_mtime
            kind = self.cause(when)
            table[kind]["results"] += 1
            got = read_verdict(path)
            if got != want:
                table[kind]["wrong"] += 1
                wrong_list.append((tags[commit], commit[:12], want, got))
        for when, name in self.rewrites:
            table[self.cause(when)]["rewritten"] += 1
        # The dispatcher's own word: each stored result logs one line, each
        # dropped duplicate result another.
        stored = collections.Counter()
        prefix = {c[:12]: c for c in expected}
        for log_path in self.dispatcher_logs:
            with open(log_path, "rb") as handle:
                text = handle.read().decode("utf-8", "replace")
            stored.update(m.group(1) for m in RESULT_LINE.finditer(text))
            for m in DUPLICATE_LINE.finditer(text):
                if m.group(2) in prefix:
                    table[self.cause(log_time(m.group(1)))]["dup results"] += 1
        for short, n in stored.items():
            if n > 1 and short in prefix:
                path = os.path.join(self.results, prefix[short])
                table[self.cause(os.stat(path).st_mtime)]["stored 2x"] += n - 1
        runs = self.markers.runs()
        interrupted = 0
        duplicate_list = []
        for commit, tag in tags.items():
            starts, ends = runs[tag]["start"], runs[tag]["end"]
            interrupted += max(0, len(starts) - len(ends))
            if len(ends) > 1:
                for previous, extra in zip(ends, ends[1:]):
                    start = next((r for r in starts if r[0] == extra[0]), extra)
                    table[self.cause_of_rerun(previous, start[1] / 1e9)]["dup runs"] += 1
                duplicate_list.append((tag, commit[:12], len(ends)))
        leftovers = sorted({pg for r in runs.values() for _, _, pg, _ in r["start"]
                            if pg > 1 and group_members(pg)})
        columns = ("kills", "results", "wrong", "rewritten", "stored 2x", "dup results",
                   "dup runs")
        print(f"  all results {drained:.1f}s after the last commit; skipped kills (target "
              f"already down): {dict(skipped) or 0}; interrupted runs (start marker without "
              f"end): {interrupted}; test process groups still alive at the end: "
              f"{len(leftovers)}", flush=True)
        print("  per kind of the last kill before each event: wrong = wrong verdicts; "
              "rewritten = result file's inode or mtime changed; stored 2x = the "
              "dispatcher logged a second store; dup results = duplicate results it "
              "dropped; dup runs = complete test runs beyond the first (markers), put down to "
              "'runner' when the first run's runner was killed after its test ended")
        print(f"  {'last kill':<12}" + "".join(f"{c:>12}" for c in columns))
        for kind in kinds:
            print(f"  {kind:<12}" + "".join(f"{table[kind][c]:>12}" for c in columns))
        for tag, short, want, got in wrong_list:
            print(f"  WRONG: {tag} {short}: expected {want}, got {got}", flush=True)
        for tag, short, n in duplicate_list:
            print(f"  DUPLICATE: {tag} {short}: {n} complete runs", flush=True)
        total = {c: sum(table[k][c] for k in kinds) for c in columns}
        self.b.row(f"chaos: results ({self.count + 1} commits, {total['kills']} kills)",
                   f"{self.count + 1}", str(total["results"]),
                   total["results"] == self.count + 1)
        self.b.row("chaos: wrong verdicts", "0", str(total["wrong"]), total["wrong"] == 0)
        self.b.row("chaos: result files rewritten", "0",
                   f"{total['rewritten']} (log: {total['stored 2x']})",
                   total["rewritten"] == 0 and total["stored 2x"] == 0)
        by_kind = ", ".join(f"{k} {table[k]['dup runs']}" for k in kinds
                            if table[k]["dup runs"])
        dup_dispatcher = table["dispatcher"]["dup runs"]
        self.b.row("chaos: duplicate complete runs", "-",
                   f"{total['dup runs']}" + (f" ({by_kind})" if by_kind else ""), None)
        self.b.row("chaos: duplicate results dropped by the dispatcher", "-",
                   str(total["dup results"]), None)
        self.b.row("chaos: duplicate runs after dispatcher kills", "0", str(dup_dispatcher),
                   dup_dispatcher == 0)
        self.b.row("chaos: test groups left running", "0", str(len(leftovers)),
                   not leftovers)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Recovery benchmarks and a seeded chaos soak of the CI system, against "
                    "its real daemons (default flags) on loopback.")
    parser.add_argument("--quick", action="store_true",
                        help="smaller counts: 2 recoveries, 2 restart rounds, 20 chaos commits")
    parser.add_argument("--only", action="append",
                        choices=["recovery", "duplicates", "chaos"],
                        help="run only this part (repeatable)")
    parser.add_argument("--seed", type=int,
                        help="seed of every random choice (kill points, chaos schedule); "
                             "default: a new one, printed")
    parser.add_argument("--kill-every", type=float, default=CHAOS_KILL_GAP, metavar="SECONDS",
                        help="chaos: mean seconds between SIGKILLs (default: %(default)s)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary folder with the daemons' logs and markers")
    parser.add_argument("--strict", action="store_true", help="exit 3 when a target is missed")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 10**6)
    bench = RecoveryBench(args)
    print(f"CI recovery benchmarks on {CORES} core(s), Python {sys.version.split()[0]}"
          f"{' (quick)' if args.quick else ''}; seed {args.seed} (replay: --seed "
          f"{args.seed}); work folder {bench.tmp}", flush=True)
    return run_scenarios(bench, args.only or ["recovery", "duplicates", "chaos"], args,
                         trailer=f"seed {args.seed}; ")

if __name__ == "__main__":
    sys.exit(main())
