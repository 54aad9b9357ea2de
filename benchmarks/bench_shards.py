"""Benchmark of sharding one commit over idle runners, against the real
daemons on loopback (processes started here, ended by PID).

1. speed-up  a suite of 8 test files of 1 s each.  Commit-to-result wall
             time (``dispatch`` sent right after the commit, until the result
             file appears) on 4 runners with ``--max-shards 4``, against the
             same kind of commit on one runner unsharded.  The two clusters
             take turns, commit by commit, so both see the same machine; the
             first commit of each is a warm-up (first fetch, and the
             durations the dispatcher learns).  Target: ratio <= 0.35 (ideal
             0.25; the rest is checkout, start-up and the merge).
2. burst     ``bench.py``'s 40-commit burst, without and then with
             ``--max-shards 4``: a queue longer than the free runners goes
             whole, so it must stay within 1.15 x ideal as without sharding,
             and no burst commit is split (counted in the dispatcher's log).

usage:  python benchmarks/bench_shards.py [--runs N] [--skip-burst] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench  # noqa: E402
from bench import Bench, Upstream  # noqa: E402
import helpers  # noqa: E402
from ci.results import parse_result  # noqa: E402

FILES = 8
FILE_SECONDS = 1.0
RUNNERS = 4
RATIO_TARGET = 0.35

TEST_FILE = bench.SLEEPING_MODULE


def suite(salt: int) -> dict[str, str]:
    files = {f"tests/test_part{n}.py": TEST_FILE.format(n=n, sleep=FILE_SECONDS)
             for n in range(FILES)}
    files["change.txt"] = f"{salt}\n"
    return files


def one_commit(b: Bench, up: Upstream, dispatcher: str, results: str, salt: int) -> float:
    """Commit, dispatch, wait for the result: seconds from commit to result."""
    started = time.monotonic()
    commit = up.commit({"change.txt": f"{salt}\n"})
    host, port = dispatcher.split(":")
    reply = helpers.call((host, int(port)), "dispatch", commit, security=b.security)
    assert reply.command == "ok", reply
    done = b.wait_result(results, commit, 120)
    if done is None:
        raise RuntimeError(f"no result for {commit}")
    with open(os.path.join(results, commit), "rb") as handle:
        fields = parse_result(handle.read())[0]
    if fields["verdict"] != "passed" or fields["tests"] != str(FILES):
        raise RuntimeError(f"unexpected result {fields}")
    return done - started, fields.get("shards", "-")


def speedup(b: Bench, runs: int) -> None:
    print(f"\n== speed-up: {FILES} test files of {FILE_SECONDS:g} s; {RUNNERS} runners "
          f"--max-shards {RUNNERS} vs 1 runner unsharded; {runs} runs each", flush=True)
    up = Upstream(b.path("shards", "upstream"))
    up.commit(suite(0))
    b.args.max_shards = None
    _, whole_d, whole_r = b.start_dispatcher("whole")
    b.start_runner("whole", whole_d, up.clone(b.path("shards", "whole-runner")))
    b.args.max_shards = RUNNERS
    _, shard_d, shard_r = b.start_dispatcher("sharded")
    for i in range(RUNNERS):
        b.start_runner("sharded", shard_d, up.clone(b.path("shards", f"runner{i}")))
    b.args.max_shards = None
    time.sleep(1.5)  # every runner registered (heartbeat): all four are free
    salt = 1
    for target in ((whole_d, whole_r), (shard_d, shard_r)):  # warm-up
        one_commit(b, up, *target, salt)
        salt += 1
    whole, sharded, ratios = [], [], []
    for _ in range(runs):
        w, _ = one_commit(b, up, whole_d, whole_r, salt)
        s, shards = one_commit(b, up, shard_d, shard_r, salt + 1)
        salt += 2
        whole.append(w)
        sharded.append(s)
        ratios.append(s / w)
        print(f"  unsharded {w:.2f}s  sharded ({shards} shards) {s:.2f}s  ratio {s / w:.3f}",
              flush=True)
    ratio = statistics.median(sharded) / statistics.median(whole)
    b.row("one commit, 8 x 1 s files: unsharded (1 runner)", "-",
          f"median {statistics.median(whole):.2f} s", None)
    b.row("same, --max-shards 4 on 4 runners", "-",
          f"median {statistics.median(sharded):.2f} s", None)
    b.row("sharded / unsharded wall time", f"<= {RATIO_TARGET}",
          f"{ratio:.3f} (runs {min(ratios):.3f}-{max(ratios):.3f})", ratio <= RATIO_TARGET)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark of sharding one commit.")
    parser.add_argument("--runs", type=int, default=5, help="timed commits per cluster")
    parser.add_argument("--skip-burst", action="store_true",
                        help="only the speed-up, not the 40-commit burst")
    parser.add_argument("--keep", action="store_true", help="keep the logs' folder")
    args = parser.parse_args(argv)
    b = Bench(argparse.Namespace(quick=False, code=None, max_shards=None, verbose=False))
    print(f"sharding benchmark on {bench.CORES} core(s); work folder {b.tmp}", flush=True)
    try:
        speedup(b, args.runs)
        b.procs.stop_all()
        if not args.skip_burst:
            # The same burst without sharding first: on a shared machine the
            # ideal is hard to reach, and the comparison is what sharding costs.
            b.row("(the next rows: the burst without --max-shards)", "", "", None)
            b.throughput()
            b.procs.stop_all()
            # bench.py's burst uses fixed folder and log names: start afresh.
            os.rename(b.path("burst"), b.path("burst-unsharded"))
            logs = b.path("burst-sharded-logs")
            os.makedirs(logs)
            b.procs = bench.Processes(logs, b.env)
            b.args.max_shards = RUNNERS
            b.row("(the next rows: the burst with --max-shards 4)", "", "", None)
            b.throughput()
            log_path = next(path for name, _, path in b.procs.procs
                            if name == "burst-dispatcher")
            with open(log_path, encoding="utf-8", errors="replace") as handle:
                splits = handle.read().count(" split into ")
            # The warm-up commit, alone with four free runners, is split.
            b.row("burst commits split (after the warm-up commit)", "0",
                  str(max(splits - 1, 0)), splits <= 1)
    finally:
        b.procs.stop_all()
        if not args.keep:
            shutil.rmtree(b.tmp, ignore_errors=True)
    b.report()
    return 1 if b.lost else 0


if __name__ == "__main__":
    sys.exit(main())
