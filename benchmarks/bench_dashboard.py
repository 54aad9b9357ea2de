"""Benchmark of the web dashboard with a long history.

Writes N generated result files (10,000 by default: three branches, each
commit naming its predecessor, about one in eight red, a few KB of output
each) into a temporary folder, starts the real ``dashboard.py`` on a free
loopback port against them and a stand-in dispatcher that answers
``state`` (so every overview also costs the live-state path), then times
sequential requests over HTTP:

* the overview page ``/`` and ``/api/commits``: median and p90 of
  ``--samples`` requests each, after a warm-up;
* the time to the first answer after start (the index being built);
* the dashboard's resident memory afterwards (VmRSS) and its peak (VmHWM).

usage:  python benchmarks/bench_dashboard.py [--results N] [--samples N] [--strict] [--keep]
Exit status: 3 with --strict when a target is missed, else 0.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import helpers  # noqa: E402
from support.procs import status_mb, stop_process  # noqa: E402
from ci.security import Security
from ci.wire import Message, encode_fields

PY = sys.executable
CORES = os.cpu_count() or 1
TARGETS = {"overview": 50.0, "api": 20.0, "rss": 100.0}   # ms, ms, MB
BRANCHES = ("main", "release/1.x", "feature/dashboard")
OUTPUT_OK = ("." * 60 + "\n" + "-" * 70 + "\nRan 120 tests in 3.2s\n\nOK\n")
OUTPUT_FAIL = ("F" + "." * 59 + "\n" + "=" * 70 + "\nFAIL: test_mean (tests.test_calc.TestCalc"
               ".test_mean)\n" + "-" * 70 + "\nTraceback (most recent call last):\n"
               + "  File \"tests/test_calc.py\", line 9, in test_mean\n" * 20
               + "AssertionError: 2 != 3\n\nRan 120 tests in 3.1s\n\nFAILED (failures=1)\n")


def generate(folder: str, count: int) -> None:
    previous = {branch: None for branch in BRANCHES}
    base = time.time() - count * 60
    for i in range(count):
        commit = hashlib.sha1(f"bench-{i}".encode()).hexdigest()
        branch = BRANCHES[i % 7 % len(BRANCHES)]
        red = i % 8 == 5
        fields = {"commit": commit, "verdict": "failed" if red else "passed", "tests": "120",
                  "failures": "1" if red else "0", "errors": "0", "skipped": "2",
                  "runner": f"10.0.0.{i % 4 + 1}:8900", "started": "2026-11-23T10:00:00Z",
                  "duration": f"{3 + i % 5 * 0.37:.3f}", "exit_code": "1" if red else "0",
                  "branch": branch, "subject": f"Change number {i}: adjust the calculator",
                  "author": f"Dev {i % 13} <dev{i % 13}@example.invalid>",
                  "committed": "2026-11-23T09:59:00Z"}
        if previous[branch]:
            fields["previous"] = previous[branch]
        previous[branch] = commit
        path = os.path.join(folder, commit)
        with open(path, "wb") as handle:
            handle.write(encode_fields(fields) + b"\n" +
                         (OUTPUT_FAIL if red else OUTPUT_OK).encode())
        os.utime(path, (base + 60 * i, base + 60 * i))


def stand_in_dispatcher():
    state = {"queue": [{"commit": "a" * 40, "branch": "main", "position": 1}],
             "running": [{"commit": "b" * 40, "branch": "main", "runner": "r1",
                          "elapsed": 2.0, "job": "1"}],
             "runners": [{"name": f"r{i}", "address": f"10.0.0.{i}:8900",
                          "state": "busy" if i == 1 else "idle",
                          "commit": "b" * 40 if i == 1 else None} for i in range(1, 5)],
             "counts": {"queued": "1", "running": "1"}}
    body = json.dumps(state).encode()
    server = helpers.MessageServer(
        ("127.0.0.1", 0), {"state": lambda m, p: Message("ok", "", body)},
        Security())
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                     daemon=True).start()
    return server


def timed_get(port: int, path: str) -> tuple[float, int, int]:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        body = reply.read()
    finally:
        conn.close()
    return (time.perf_counter() - started) * 1000, reply.status, len(body)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the web dashboard.")
    parser.add_argument("--results", type=int, default=10_000,
                        help="result files to generate (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=100,
                        help="timed requests per page (default: %(default)s)")
    parser.add_argument("--strict", action="store_true", help="exit 3 when a target is missed")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench-dashboard-")
    folder = os.path.join(tmp, "test_results")
    os.makedirs(folder)
    print(f"dashboard benchmark on {CORES} core(s), Python {sys.version.split()[0]}",
          flush=True)
    started = time.monotonic()
    generate(folder, args.results)
    print(f"  generated {args.results} result files in {time.monotonic() - started:.1f}s",
          flush=True)
    dispatcher = stand_in_dispatcher()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(os.path.join(tmp, "dashboard.log"), "wb")
    proc = subprocess.Popen([PY, os.path.join(ROOT, "dashboard.py"), "--host", "127.0.0.1",
                             "--port", str(port), "--results-dir", folder,
                             "--dispatcher-server", f"127.0.0.1:{dispatcher.server_address[1]}",
                             "--log-level", "WARNING"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    rows = []
    try:
        launched = time.monotonic()
        deadline = launched + 120
        while True:
            try:
                _, status, _ = timed_get(port, "/api/commits?limit=1")
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the dashboard did not answer; see " + log.name)
            time.sleep(0.05)
        first = time.monotonic() - launched
        print(f"  first answer {first:.2f}s after start (index of {args.results} headers)",
              flush=True)
        for name, path, target in (("overview page /", "/", TARGETS["overview"]),
                                   ("/api/commits (50 newest)", "/api/commits",
                                    TARGETS["api"])):
            for _ in range(10):
                timed_get(port, path)
            samples = []
            for _ in range(args.samples):
                ms, status, size = timed_get(port, path)
                if status != 200:
                    raise SystemExit(f"{path} answered {status}")
                samples.append(ms)
            samples.sort()
            median = statistics.median(samples)
            p90 = samples[int(len(samples) * 0.9) - 1]
            rows.append((f"{name}, median (n={args.samples})", f"< {target:.0f} ms",
                         f"{median:.1f} ms", median < target))
            rows.append((f"{name}, p90", "–", f"{p90:.1f} ms", True))
            print(f"  {path}: median {median:.1f} ms, p90 {p90:.1f} ms, {size} bytes",
                  flush=True)
        rss = status_mb(proc.pid, "VmRSS")
        hwm = status_mb(proc.pid, "VmHWM")
        rows.append(("dashboard RSS after the requests", f"< {TARGETS['rss']:.0f} MB",
                     f"{rss:.0f} MB (peak {hwm:.0f} MB)", hwm < TARGETS["rss"]))
    finally:
        stop_process(proc)
        log.close()
        dispatcher.shutdown()
        dispatcher.server_close()
        if args.keep:
            print(f"  kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n| figure ({CORES} cores, {args.results} results) | target | measured |")
    print("| --- | --- | --- |")
    for figure, target, measured, ok in rows:
        print(f"| {figure} | {target} | {measured}{'' if ok else ' (MISSED)'} |")
    missed = [row for row in rows if not row[3]]
    return 3 if missed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
