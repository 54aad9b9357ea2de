"""What removing files costs a concurrent result path, on the disk at hand
(why the pruner moves a pass's files and frees them later, a few at a time:
docs/performance.md#retention).

A child process removes --files files of 1.5 KB from a folder, in the
folder's order, in the way --how says; this process stands for the result
path: every 15 ms it writes 1.5 KB into a file made ahead of time, fsyncs
it, renames it into the same folder and fsyncs the folder.  The child is
stopped and continued (SIGSTOP/SIGCONT) every 1.5 s, so the latency while
it works and while it is stopped comes from interleaved halves of the same
run: drift in the disk's speed falls on both alike.

usage:  python benchmarks/bench_frees.py [--how unlink|move|empty] [--sync-every K]
                                         [--threads T] [--files N] [--seconds S]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time

from interleave import Interleaver, describe_rise

PAYLOAD = b"x" * 1500


def make_files(folder: str, count: int, size: int) -> list[str]:
    for _ in range(count):
        with open(os.path.join(folder, secrets.token_hex(20)), "wb") as handle:
            handle.write(PAYLOAD[:size])
    with os.scandir(folder) as listing:
        return [entry.name for entry in listing]


def remover(folder: str, trash: str, names: list[str], how: str, every: int,
            threads: int) -> None:
    """The child's work: each file unlinked (or moved), an fsync of the
    folder after every ``every`` of them."""
    fd = os.open(folder, os.O_RDONLY)

    def chunk(part: list[str]) -> None:
        for name in part:
            if how == "move":
                os.rename(os.path.join(folder, name), os.path.join(trash, name))
            else:
                os.unlink(os.path.join(folder, name))
        os.fsync(fd)
    parts = [names[i:i + every] for i in range(0, len(names), every)]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(chunk, parts))


def measure(args) -> list[tuple[float, float, bool]]:
    root = tempfile.mkdtemp(prefix="bench-frees-")
    try:
        folder, trash = os.path.join(root, "results"), os.path.join(root, "trash")
        os.mkdir(folder)
        os.mkdir(trash)
        started = time.monotonic()
        names = make_files(folder, args.files, 0 if args.how == "empty" else len(PAYLOAD))
        if args.order == "random":
            random.shuffle(names)
        spares = []
        for n in range(int(args.seconds * 70) + 10):
            spares.append(os.path.join(root, f"spare{n}"))
            open(spares[-1], "wb").close()
        os.sync()       # the files stand for results written long ago
        print(f"made {args.files} files in {time.monotonic() - started:.1f}s", flush=True)
        pid = os.fork()
        if pid == 0:                                    # the remover
            os.kill(os.getpid(), signal.SIGSTOP)
            try:
                remover(folder, trash, names, args.how, args.sync_every, args.threads)
            finally:
                os._exit(0)
        try:
            return sample(folder, spares, pid, args.seconds)
        finally:
            os.kill(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGCONT)
            os.waitpid(pid, 0)
            left = sum(1 for entry in os.scandir(folder) if not entry.name.startswith("."))
            print(f"the remover got through {args.files - left} of {args.files} files")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def sample(folder: str, spares: list[str], pid: int,
           seconds: float) -> list[tuple[float, float, bool]]:
    """Latency of the stand-in result path: (when, latency, whether the
    remover ran)."""
    fd = os.open(folder, os.O_RDONLY)
    timed = []
    interleave = Interleaver(pid=pid, working=False)       # it stopped itself
    end = time.monotonic() + seconds
    for n, spare in enumerate(spares):
        if time.monotonic() >= end:
            break
        working = interleave.state()
        began = time.perf_counter()
        out = os.open(spare, os.O_WRONLY)
        os.write(out, PAYLOAD)
        os.fsync(out)
        os.close(out)
        os.rename(spare, os.path.join(folder, f".result{n}"))
        os.fsync(fd)
        timed.append((time.monotonic(), time.perf_counter() - began, working))
        time.sleep(0.015)
    os.close(fd)
    return timed


def figures(samples: list[float]) -> str:
    ordered = sorted(samples)
    return (f"n={len(ordered)} median {statistics.median(ordered) * 1000:.3f} ms, "
            f"p95 {ordered[int(len(ordered) * 0.95) - 1] * 1000:.3f} ms")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--how", choices=("unlink", "move", "empty"), default="unlink",
                        help="unlink the files, move them into another folder (no block "
                             "freed), or unlink files without data (no block to free) "
                             "(default: %(default)s)")
    parser.add_argument("--sync-every", type=int, default=4, metavar="K",
                        help="the remover's fsync of the folder after every K files "
                             "(default: %(default)s)")
    parser.add_argument("--order", choices=("folder", "random"), default="folder",
                        help="remove in the folder's own order (consecutive names share "
                             "directory blocks) or in random order (each name in a block of "
                             "its own, as a commit's XML is beside its result file) "
                             "(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="threads removing (default 1)")
    parser.add_argument("--files", type=int, default=130_000,
                        help="files to make (enough that the remover does not run out; "
                             "default %(default)s)")
    parser.add_argument("--seconds", type=float, default=40.0,
                        help="how long the result path is timed (default %(default)s)")
    args = parser.parse_args(argv)
    if args.sync_every < 1 or args.threads < 1 or args.files < 1 or args.seconds <= 0:
        parser.error("--sync-every, --threads, --files and --seconds must be positive")
    timed = measure(args)
    latency = {state: [took for _, took, working in timed if working is state]
               for state in (False, True)}
    print(f"{args.how} in {args.order} order, fsync every {args.sync_every}, "
          f"{args.threads} thread(s)")
    print(f"  remover stopped: {figures(latency[False])}")
    print(f"  remover working: {figures(latency[True])}")
    print(f"  {describe_rise(timed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
