"""Start a complete local CI system with one command.

With no argument it builds a git repository from ``sample_project/``,
starts the dispatcher, two runners, the observer and the web dashboard on
free loopback ports, makes a few commits and shows each verdict as it
lands in the results folder, then every later one until Ctrl-C.  With a
repository path it watches that repository instead.  Ctrl-C (or SIGTERM)
stops every process it started.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import helpers
from ci.results import read_header
from ci.history import store as history_store
from ci.retention import tombstones
from ci.config import ArgumentParser, ConfigError, positive
from ci.wire import one_line, valid_full_commit

log = logging.getLogger("run_local")

ROOT = os.path.dirname(os.path.abspath(__file__))
SAMPLE = os.path.join(ROOT, "sample_project")
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "CI Quickstart", "GIT_AUTHOR_EMAIL": "quickstart@localhost",
                "GIT_COMMITTER_NAME": "CI Quickstart",
                "GIT_COMMITTER_EMAIL": "quickstart@localhost"}
FIXED_MEAN = "        self.assertEqual(calc.mean([1, 2, 3]), 2)\n"
# How long the demo waits for one verdict before reporting it missing.
VERDICT_WAIT = 120.0


free_port = helpers.free_port


def git(repo: str, *args: str) -> str:
    env = dict(os.environ, **GIT_IDENTITY)
    proc = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise ConfigError(f"git {' '.join(args)} failed in {repo}: "
                                  f"{proc.stderr.strip()}")
    return proc.stdout.strip()


def make_sample_upstream(path: str) -> None:
    """A fresh repository from sample_project/, with its first commit."""
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(SAMPLE, path, ignore=shutil.ignore_patterns("__pycache__"))
    git(path, "init", "-q", "-b", "main")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "Sample project: one passing, one failing test")


def install_notify_hook(upstream: str, observer_port: int) -> None:
    """A post-commit hook that wakes the observer at once (polling stays as
    the fallback).  The same line works as a post-receive hook on a server."""
    hook = os.path.join(upstream, ".git", "hooks", "post-commit")
    with open(hook, "w") as handle:
        handle.write("#!/bin/sh\n"
                     f"exec '{sys.executable}' -S '{os.path.join(ROOT, 'hook_client.py')}' "
                     f"--observer 127.0.0.1:{observer_port} --log-level ERROR 2>/dev/null "
                     "|| true\n")
    os.chmod(hook, 0o755)


class Processes:
    """Every daemon the launcher started, ended by PID on the way out."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, script: str, args: list[str]) -> subprocess.Popen:
        out = open(os.path.join(self.log_dir, f"{name}.log"), "ab")
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        out.close()
        self.procs.append((name, proc))
        log.info("started %-10s pid %d, log %s", name, proc.pid,
                 os.path.relpath(out.name))
        return proc

    def dead(self) -> list[str]:
        return [name for name, proc in self.procs if proc.poll() is not None]

    def stop_all(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for name, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing pid %d", name, proc.pid)
                proc.kill()
                proc.wait()
        log.info("all processes stopped")


def wait_for_port(port: int, procs: Processes, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if procs.dead():
            raise ConfigError(f"{', '.join(procs.dead())} exited at start; "
                                      f"see the logs in {procs.log_dir}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise ConfigError(f"nothing listens on port {port} after {timeout:.0f}s")


def wait_for_result(results: str, commit: str, stop: threading.Event) -> dict | None:
    path = os.path.join(results, commit)
    deadline = time.monotonic() + VERDICT_WAIT
    while not os.path.exists(path):
        if stop.wait(0.1) or time.monotonic() > deadline:
            return None
    return read_header(path)


def show_verdict(results: str, commit: str, what: str, expected: str,
                 stop: threading.Event) -> bool:
    fields = wait_for_result(results, commit, stop)
    if fields is None:
        log.error("no verdict for %s (%s)", commit[:12], what)
        return False
    log.info("%-32s %s -> %-7s tests=%s failures=%s  (%s)", what, commit[:12],
             fields.get("verdict"), fields.get("tests"), fields.get("failures"),
             os.path.relpath(os.path.join(results, commit)))
    return fields.get("verdict") == expected


class VerdictFeed:
    """Finds result files that are new (or replaced by a retest) since it
    last looked, so each verdict is shown once, as it lands."""

    def __init__(self, results: str):
        self.results = results
        self.seen = self._stamps()  # results from before this run are not news

    def _stamps(self) -> dict[str, tuple[int, int]]:
        stamps = {}
        try:
            with os.scandir(self.results) as entries:
                for entry in entries:
                    if valid_full_commit(entry.name):
                        try:
                            st = entry.stat()
                        except OSError:
                            continue
                        stamps[entry.name] = (st.st_mtime_ns, st.st_size)
        except OSError as exc:
            log.warning("cannot list %s: %s", self.results, exc)
        return stamps

    def mark_seen(self, commits) -> None:
        now = self._stamps()
        for commit in commits:
            if commit in now:
                self.seen[commit] = now[commit]

    def new(self) -> list[tuple[str, dict]]:
        found = []
        for commit, stamp in self._stamps().items():
            if self.seen.get(commit) == stamp:
                continue
            fields = read_header(os.path.join(self.results, commit))
            if fields is None:
                continue  # not complete yet: next time
            self.seen[commit] = stamp
            found.append((commit, fields))
        return found


def show_new_verdicts(feed: VerdictFeed) -> None:
    for commit, fields in feed.new():
        subject = one_line(fields.get("subject", ""), 60)
        log.info("new result %s -> %-7s tests=%s failures=%s %s%s", commit[:12],
                 fields.get("verdict"), fields.get("tests"), fields.get("failures"),
                 f"[{one_line(fields['branch'], 40)}] " if fields.get("branch") else "",
                 subject)


def demo_commits(upstream: str, results: str, stop: threading.Event) -> tuple[bool, list]:
    """Show the first verdict, then fix the failing test and add a change
    in quick succession: both commits are tested, not only the newest."""
    # The observer's first poll dispatches the head only: wait for it
    # before committing more, so the initial commit is surely seen.
    first = git(upstream, "rev-parse", "HEAD")
    ok = show_verdict(results, first, "initial commit (one test fails)", "failed", stop)
    test_file = os.path.join(upstream, "tests", "test_calc.py")
    with open(test_file) as handle:
        lines = handle.readlines()
    lines = [FIXED_MEAN if "calc.mean([1, 2, 3]), 3)" in line else line for line in lines]
    with open(test_file, "w") as handle:
        handle.writelines(lines)
    git(upstream, "commit", "-q", "-am", "Fix the expected mean")
    steps = [(git(upstream, "rev-parse", "HEAD"), "fix commit", "passed")]
    with open(os.path.join(upstream, "NOTES.txt"), "w") as handle:
        handle.write("A second change, to show that every commit is tested.\n")
    git(upstream, "add", "-A")
    git(upstream, "commit", "-q", "-m", "Add notes")
    steps.append((git(upstream, "rev-parse", "HEAD"), "notes commit", "passed"))
    for commit, what, expected in steps:
        ok &= show_verdict(results, commit, what, expected, stop)
    return ok, [first] + [commit for commit, _, _ in steps]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Run the whole CI system locally: dispatcher, runners and observer.")
    parser.add_argument("repo", nargs="?", metavar="REPO",
                        help="repository to watch (default: a fresh copy of sample_project/ "
                             "with demo commits)")
    parser.add_argument("--work-dir", default=".ci_local",
                        help="folder for clones, state and logs (default: %(default)s)")
    parser.add_argument("--results-dir", default="test_results",
                        help="where result files land (default: %(default)s)")
    parser.add_argument("--runners", type=positive(int), default=2,
                        help="number of test runners (default: %(default)s)")
    parser.add_argument("--poll", type=float, default=2.0,
                        help="observer poll interval in seconds (default: %(default)s)")
    parser.add_argument("--demo-only", action="store_true",
                        help="exit once the demo commits have their verdicts "
                             "(exit 1 if a verdict is wrong)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level of the daemons (default: %(default)s)")
    return parser


@dataclasses.dataclass
class Launched:
    """What ``start_all`` started: where, and on which ports."""
    upstream: str
    dispatcher: str
    observer_port: int
    dashboard_port: int
    feed: "VerdictFeed"   # made before any daemon started: every later verdict is new


def prepare_folders(args, work: str, results: str) -> tuple[str, "VerdictFeed"]:
    """Fresh logs and clones folders, the results folder, and the upstream
    (the user's repository, or the sample one made here)."""
    if args.repo and not os.path.isdir(os.path.join(args.repo, ".git")) \
            and not os.path.isfile(os.path.join(args.repo, "HEAD")):
        raise ConfigError(f"{args.repo} is not a git repository")
    for sub in ("logs", "clones"):
        shutil.rmtree(os.path.join(work, sub), ignore_errors=True)
        os.makedirs(os.path.join(work, sub))
    os.makedirs(results, exist_ok=True)
    feed = VerdictFeed(results)
    upstream = os.path.abspath(args.repo) if args.repo else os.path.join(work, "upstream")
    if not args.repo:
        make_sample_upstream(upstream)
    for name in ["observer"] + [f"runner{i}" for i in range(1, args.runners + 1)]:
        git(work, "clone", "-q", upstream, os.path.join(work, "clones", name))
    return upstream, feed


def start_all(args, procs: Processes, work: str, results: str) -> Launched:
    """The dispatcher, the dashboard, the runners and the observer, each
    waited for until it listens."""
    upstream, feed = prepare_folders(args, work, results)
    clones = os.path.join(work, "clones")
    dport, oport, hport = free_port(), free_port(), free_port()
    dispatcher = f"127.0.0.1:{dport}"
    common = ["--log-level", args.log_level]
    state = os.path.join(work, "dispatcher_state")
    procs.start("dispatcher", "dispatcher.py",
                ["--host", "127.0.0.1", "--port", str(dport), "--results-dir", results,
                 "--state-dir", state, *common])
    wait_for_port(dport, procs)
    # The dashboard looks for the dispatcher's state folder beside the
    # results folder unless told: here it is in the work folder.
    procs.start("dashboard", "dashboard.py",
                ["--host", "127.0.0.1", "--port", str(hport), "--results-dir", results,
                 "--history", os.path.join(state, history_store.FILE_NAME),
                 "--pruned", os.path.join(state, tombstones.FILE_NAME),
                 "--dispatcher-server", dispatcher, *common])
    for i in range(1, args.runners + 1):
        procs.start(f"runner{i}", "test_runner.py",
                    ["--host", "127.0.0.1", "--port", str(free_port()),
                     "--name", f"runner{i}", "--dispatcher-server", dispatcher, *common,
                     os.path.join(clones, f"runner{i}")])
    procs.start("observer", "repo_observer.py",
                ["--host", "127.0.0.1", "--port", str(oport), "--poll", str(args.poll),
                 "--dispatcher-server", dispatcher, *common, os.path.join(clones, "observer")])
    wait_for_port(oport, procs)
    wait_for_port(hport, procs)
    if not args.repo:
        install_notify_hook(upstream, oport)
    return Launched(upstream, dispatcher, oport, hport, feed)


def watch(args, procs: Processes, launched: Launched, results: str,
          stop: threading.Event) -> int:
    """The demo commits (sample repository), then each new verdict as it
    lands, until Ctrl-C or a daemon dies; the exit status."""
    feed = launched.feed
    status = 0
    if not args.repo:
        ok, shown = demo_commits(launched.upstream, results, stop)
        feed.mark_seen(shown)
        if not ok:
            log.error("a demo verdict was missing or wrong; see %s", procs.log_dir)
            status = 1
        if args.demo_only or stop.is_set():
            return status
        log.info("try it: commit to %s and watch the dashboard or %s "
                 "(Ctrl-C stops everything)", os.path.relpath(launched.upstream),
                 os.path.relpath(results))
    else:
        log.info("commit to %s and watch %s (Ctrl-C stops everything)", launched.upstream,
                 os.path.relpath(results))
    while not stop.wait(0.5):
        show_new_verdicts(feed)
        if procs.dead():
            log.error("%s exited; stopping (see %s)", ", ".join(procs.dead()), procs.log_dir)
            return 1
    return status


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    work = os.path.abspath(args.work_dir)
    results = os.path.abspath(args.results_dir)
    procs = Processes(os.path.join(work, "logs"))
    try:
        launched = start_all(args, procs, work, results)
    except (ConfigError, OSError) as exc:
        print(f"run_local: error: {exc}", file=sys.stderr)
        procs.stop_all()
        return 2
    log.info("CI is up: dispatcher %s, %d runner(s), observer watching %s",
             launched.dispatcher, args.runners, launched.upstream)
    log.info("results land in %s/<commit>", os.path.relpath(results))
    log.info("dashboard: http://127.0.0.1:%d/", launched.dashboard_port)
    try:
        return watch(args, procs, launched, results, stop)
    finally:
        procs.stop_all()

if __name__ == "__main__":
    sys.exit(main())
