"""Benchmark of failing tests first, against the real daemons on loopback
(processes started here, ended by PID).

A suite of 10 test modules of 0.5 s each; a test in the last module fails
on two commits in a row (dispatched with their branch, as the observer
does).  On the first, file order: the failure comes at the end of the
suite.  On the second, the dispatcher names that test in the job and the
runner runs it first: ``first_failure_after`` (seconds from the start of
the tests to the first failing test) must be at most 15% of the suite's
time.  Both runs' counts must be equal (nothing run twice or lost).

usage:  python benchmarks/bench_failfirst.py [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench  # noqa: E402
from bench import Bench, Upstream  # noqa: E402
import helpers  # noqa: E402
from ci.results import parse_result  # noqa: E402

MODULES = 10
MODULE_SECONDS = 0.5
TARGET = 0.15

MODULE = bench.SLEEPING_MODULE
BROKEN = """
    def test_broken(self):
        self.assertEqual({value}, 0)
"""


def suite(broken: int) -> dict[str, str]:
    files = {f"tests/test_part{n:02d}.py": MODULE.format(n=n, sleep=MODULE_SECONDS)
             for n in range(MODULES)}
    last = f"tests/test_part{MODULES - 1:02d}.py"
    if broken:
        files[last] += BROKEN.format(value=broken)
    return files


def run_commit(b: Bench, up: Upstream, dispatcher: str, results: str, files: dict,
               previous: str | None) -> tuple[str, dict]:
    """Commit, dispatch with its branch, wait: (commit, result header)."""
    commit = up.commit(files)
    host, port = dispatcher.split(":")
    body = f"{commit} {previous or '-'} main\n".encode()
    reply = helpers.call((host, int(port)), "dispatch", commit, body, security=b.security)
    assert reply.command == "ok", reply
    if b.wait_result(results, commit, 120) is None:
        raise RuntimeError(f"no result for {commit}")
    with open(os.path.join(results, commit), "rb") as handle:
        return commit, parse_result(handle.read())[0]


def failing_first(b: Bench) -> None:
    print(f"\n== failing first: {MODULES} modules of {MODULE_SECONDS:g} s, a test in the "
          "last one failing on two commits in a row", flush=True)
    up = Upstream(b.path("failfirst", "upstream"))
    base = up.commit(suite(0))
    _, dispatcher, results = b.start_dispatcher("failfirst")
    b.start_runner("failfirst", dispatcher, up.clone(b.path("failfirst", "runner")))
    previous, fields = run_commit(b, up, dispatcher, results, {"warm.txt": "1\n"}, base)
    red1, first = run_commit(b, up, dispatcher, results, suite(1), previous)
    _, second = run_commit(b, up, dispatcher, results, suite(2), red1)
    suite_seconds = MODULES * MODULE_SECONDS
    for name, got in (("first (file order)", first), ("second (failing first)", second)):
        print(f"  {name}: verdict {got['verdict']}, {got['tests']} tests, "
              f"{got['failures']} failures, first_failure_after "
              f"{got.get('first_failure_after', '-')} s, duration {got['duration']} s, "
              f"failing_first {got.get('failing_first', '-')!r}", flush=True)
    same = all(first[k] == second[k] for k in ("tests", "failures", "errors", "skipped"))
    after = float(second.get("first_failure_after", "inf"))
    b.row("first commit: first_failure_after (file order)", "-",
          f"{float(first.get('first_failure_after', 'nan')):.2f} s", None)
    b.row("second commit: first_failure_after / suite time", f"<= {TARGET}",
          f"{after:.2f} s / {suite_seconds:g} s = {after / suite_seconds:.3f}",
          after / suite_seconds <= TARGET)
    b.row("counts equal on both commits", "yes", "yes" if same else "no", same)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark of failing tests first.")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    b = Bench(argparse.Namespace(quick=False, code=None, max_shards=None, verbose=False))
    print(f"failing-first benchmark on {bench.CORES} core(s); work folder {b.tmp}", flush=True)
    try:
        failing_first(b)
    finally:
        b.procs.stop_all()
        if not args.keep:
            shutil.rmtree(b.tmp, ignore_errors=True)
    b.report()
    return 0 if all(ok is not False for *_, ok in b.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
