"""The pruner's file worker (``python -m ci.retention.worker``): a child of
the dispatcher that reads the results folder's headers and removes what a
pass prunes.

Why a process: a pass over 100,000 results reads 100,000 headers and
makes 200,000 unlinks.  Done by threads of the dispatcher, their Python
work around each system call competed with the request handlers for the
interpreter (the GIL) and for the 2 cores: a result took 0.5 to 1 ms more
at the median while a pass ran.  Here the work runs in the idle scheduling
class (or at the lowest nice), so a handler that wakes takes a core at
once, and before every header read, every commit's unlinks and every
fsync it looks at the dispatcher's result gate (a shared page,
ci/retention/gate.py) and waits while a result is being stored: a result
shares the disk with at most one small step.  Its header cache (about
200 bytes a result) lives here too, not in the dispatcher; a new worker
fills it from the dispatcher's result index (ci/retention/index.py, read
once from its start) instead of reading every header: on a machine whose
page cache had let the old files go, a plan over 100,000 headers read
290 MB from the disk.

It plans the pass too (ci/retention/policy.py over every header, with the
pruned commits' verdicts from the tombstone file): a plan over 100,000
entries is a second of pure Python, which in the dispatcher held the
interpreter while every handler waited for it at each of its system calls
(results took 100 ms and more).  The dispatcher then takes the plan a
group at a time.  The plan gives way as the batches do (a gate.Pacer):
it looks at the gate before every name it lists, every header it reads
and every entry the policy weighs, and after every STEPS_PER_REST of
them it rests as long as they took (``--rest``, the dispatcher's
--prune-rest): any work beside the result path, even in the idle class,
cost a result about 0.1 to 0.2 ms while it ran on this 2-core machine,
so the less of the time it runs, and the sooner it stops when a result
comes, the less a result pays.

Protocol, one request at a time, on stdin and stdout:

* ``plan N`` and N lines, the commits queued or running (kept): the reply
  is ``planned D of R`` (D to prune of R complete results);
* ``take K``: the next K (at most) of the plan's commits, oldest first in
  the folder's own order, one JSON line each,
  ``[commit, branch, previous, verdict, mtime, [cells]]``, then ``end``;
* ``remove N`` and N lines, each one commit's file names separated by
  tabs (its result file last: the proof goes last): N lines back, ``ok``
  or ``error <text>``, once the moves are committed (the folder's fsync).
  Only result files and their XML can be named, and a commit only if
  its result file is the one the plan read (unchanged stamp).  The
  pruner names result files only (a matrix commit's cells' and its own):
  in the plan's order, the folder's, they leave a directory block at a
  time;
* ``leftovers K``: the next K (at most) of the JUnit XML files still in
  the folder of the commits whose result files ``remove`` moved since
  the plan, and of those the plan found without a result file, one line
  of tab-separated names per commit in the folder's own order, then
  ``end`` (the folder is listed again at the first ``leftovers`` after
  a ``remove``);
* ``drop N`` and N lines, each one commit's XML names: moved as by
  ``remove`` (only XML names are taken), N replies the same way.  So a
  pass moves its files in two sweeps of the folder's order, result files
  then XMLs: moved together, a commit's XML and result file lie in two
  blocks, and a pass's moves touched a block per name; a concurrent
  result's flush then met about 26 dirty blocks instead of one or two
  (``bench_frees.py --order``: +0.12 and +0.28 ms at random, −0.08 and
  −0.10 in the folder's order).

Removing is two steps: ``remove`` and ``drop`` move each file into the
results folder's ``.pruned`` subfolder (a rename: the commit is gone from
the folder, no block is freed), and the reaper (ci/retention/reaper.py)
frees them once the pass is over.

It exits when its stdin closes, so a dispatcher that dies, even by SIGKILL,
leaves none behind.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import os
import signal
import sys
import time

from ci import results
from ci.config import ArgumentParser, configure_logging, non_negative, positive
from ci.files import fsync_dir
from ci.retention import index as result_index
from ci.retention import policy as keep
from ci.retention.gate import LONGEST_WAIT, REST, STEPS_PER_REST, GateView, Pacer
from ci.retention.reaper import Reaper
from ci.retention.tombstones import VerdictFollower
from ci.wire import valid_full_commit

log = logging.getLogger(__name__)

# A header is short: this much of a result file holds it.
HEADER_READ = 16 * 1024
# The most lines one request may carry (a sanity bound: a plan names every
# queued commit).
MAX_BATCH = 10_000_000
# The subfolder of the results folder that pruned files wait in until the
# reaper unlinks them.
TRASH = ".pruned"


def lowest_priority() -> None:
    """Run only on what the dispatcher leaves of the cores."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return
    except (AttributeError, OSError):
        pass
    try:
        os.nice(19)
    except OSError as exc:
        log.warning("cannot lower the pruner's worker's priority: %s", exc)


class FileWorker:
    """The folder, the gate, the rules, the header cache
    (commit -> ((mtime_ns, size, inode), Entry or None)) and the plan
    being taken."""

    def __init__(self, folder: str, gate: GateView, rules: keep.KeepPolicy,
                 tombstones: str, rest: float = REST, index: str | None = None):
        self.folder = folder
        self.index = index
        self.index_lines = 0       # lines in the index file when last read or written
        self.read_since_save = 0   # headers read since
        self.gate = gate
        self.rest = rest
        self.rules = rules
        self.pruned = VerdictFollower(tombstones)
        self.headers: dict[str, tuple] = {}
        self.doomed: collections.deque[keep.Entry] = collections.deque()
        # Commits whose JUnit XML may still lie in the folder without their
        # result file: moved this pass, or found so by the plan (``leftovers``).
        self.leftover: set[str] = set()
        self.leftover_names: collections.deque[list[str]] = collections.deque()
        self.trash = os.path.join(folder, TRASH)
        self.reaper = Reaper(self.trash, gate)

    # ---- plan ---------------------------------------------------------------
    def plan(self, pending: set[str]) -> str:
        pacer = Pacer(self.gate, self.rest)
        if not self.headers and self.index:
            self.headers, self.index_lines = result_index.load(self.index, pacer)
        read_before = self.read_since_save
        listed = self.scan(pacer)
        log.info("plan over %d result(s): %d header(s) read, the rest known%s", len(listed),
                 self.read_since_save - read_before, " (result index)" if self.index else "")
        self.save_index(pacer)
        entries = {e.commit: e for e in listed}
        verdicts = self.pruned.verdicts()
        doomed = set(keep.plan(entries, self.rules, time.time(), verdicts, pending, pacer,
                               self.pruned.named))
        # In the folder's own order (ext4 lists a large folder in hash
        # order): consecutive unlinks then touch the same directory blocks
        # (measured alone over 100,000 pairs: 147 against 238 us per unlink
        # oldest first).  What is pruned is the plan's whatever the order.
        self.doomed = collections.deque(e for e in listed if e.commit in doomed)
        return f"planned {len(self.doomed)} of {len(entries)}"

    def take(self, count: int) -> list[keep.Entry]:
        return [self.doomed.popleft() for _ in range(min(count, len(self.doomed)))]

    # ---- scan ---------------------------------------------------------------
    def scan(self, pacer: Pacer) -> list[keep.Entry]:
        """Every complete result in the folder's order, reading only new or
        changed headers; every name listed and every header read is a step
        of ``pacer``."""
        names: list[tuple[str, tuple, float]] = []
        xml_of: set[str] = set()
        with os.scandir(self.folder) as listing:
            for item in listing:
                pacer.step()
                if not valid_full_commit(item.name):
                    commit = results.xml_commit(item.name)
                    if commit:
                        xml_of.add(commit)
                    continue
                try:
                    st = item.stat(follow_symlinks=False)
                except OSError:
                    continue
                names.append((item.name, result_index.stamp_of(st), st.st_mtime))
        found = []
        for name, stamp, mtime in names:
            cached = self.headers.get(name)
            if cached is None or cached[0] != stamp:
                pacer.step()
                cached = self.headers[name] = (stamp, self.entry(name, mtime))
                self.read_since_save += 1
            if cached[1] is not None:
                found.append(cached[1])
        listed = {name for name, _, _ in names}
        for gone in [c for c in self.headers if c not in listed]:
            del self.headers[gone]
        # An XML without its commit's result file: left by a pass that
        # ended between its two sweeps (a crash, a retest), or a result
        # being stored right now (the dispatcher drops only pruned ones).
        self.leftover = xml_of - listed
        self.leftover_names.clear()
        return found

    def entry(self, commit: str, mtime: float) -> keep.Entry | None:
        fields = results.read_header(os.path.join(self.folder, commit), HEADER_READ,
                                     keep_atime=True)
        return keep.entry_of(commit, fields, mtime)

    def save_index(self, pacer: Pacer) -> None:
        """The index rewritten from the header cache (the folder's complete
        results now) when most of its lines are of files gone or replaced,
        or when many headers had to be read (a folder written before the
        index was kept, or by a worker that does not load it again): the
        next worker then reads none of them."""
        if not self.index:
            return
        live = sum(1 for _, entry in self.headers.values() if entry is not None)
        stale = self.index_lines > 2 * live           # pruned or replaced files' lines
        missing = self.read_since_save > live // 10   # headers read, not found in it
        if not (stale or missing):
            return
        try:
            result_index.rewrite(self.index, self.headers, pacer)
        except OSError as exc:
            log.warning("cannot rewrite the result index %s: %s", self.index, exc)
            return
        self.index_lines, self.read_since_save = live, 0

    # ---- remove -------------------------------------------------------------
    def remove(self, batch: list[list[str]]) -> list[str]:
        """One thread moves them, commit after commit: moves are quick (a
        pass over 100,000 results took 26 s), and measured interleaved
        (bench_retention.py --interleave) three threads cost a result up to
        0.75 ms more at the median while they worked, one 0.17 to 0.51 ms."""
        return self._moves(batch, self.remove_commit)

    def drop(self, batch: list[list[str]]) -> list[str]:
        """The second sweep: each line one pruned commit's XML files
        (``leftovers`` named them), moved as ``remove`` moves."""
        return self._moves(batch, self.drop_commit)

    def _moves(self, batch: list[list[str]], move) -> list[str]:
        try:
            self.reaper.prepare()
        except OSError as exc:
            return [f"error cannot make {self.trash}: {exc}".replace("\n", " ")] * len(batch)
        replies = []
        for names in batch:
            self.gate.wait_clear()
            replies.append(move(names))
        self.gate.wait_clear()
        self.sync_folder()
        self.reaper.wake()
        return replies

    def remove_commit(self, names: list[str]) -> str:
        """Every file but the last may be missing already; the last (the
        result file) must go, and only as the plan saw it: a file replaced
        since carries a verdict the plan never weighed, so nothing of that
        commit is moved (the dispatcher ends a pass once a retest finishes;
        this is the worker's own check, whoever replaced the file).  Each
        goes into the trash (a name there from an earlier prune of the same
        commit is replaced, and so freed)."""
        if not names or not all(results.result_or_xml(n) for n in names):
            return "error not a result file's name"
        refused = self.unplanned(names[-1])
        if refused:
            return f"error {refused}"
        try:
            self.discard_present(names[:-1])
            self.discard(names[-1])
        except OSError as exc:
            return f"error {exc}".replace("\n", " ")
        self.headers.pop(names[-1], None)
        self.leftover.add(names[-1].partition(results.CELL_INFIX)[0])
        return "ok"

    def drop_commit(self, names: list[str]) -> str:
        """Only XML files: a result file goes by ``remove``, which checks
        it against the plan."""
        if not names or not all(results.xml_commit(n) for n in names):
            return "error not a JUnit XML file's name"
        try:
            self.discard_present(names)
        except OSError as exc:
            return f"error {exc}".replace("\n", " ")
        return "ok"

    def leftovers(self, count: int) -> list[list[str]]:
        """The next ``count`` (at most) of the XML files of the commits in
        ``leftover`` (and nothing of others), grouped by commit, in the
        folder's own order: listing the folder again is a few hundred
        milliseconds of ``getdents`` (no ``stat``), and moving in its order
        takes the XMLs out of a directory block at a time, where moving
        them with their result files touched a block per name
        (docs/performance.md#retention).  Handed out a batch at a time, as
        ``take`` hands out the plan: 100,000 lines parsed at once would
        hold the dispatcher's interpreter for a good part of a second."""
        if self.leftover:
            self.leftover_names = collections.deque(self._list_leftovers())
        return [self.leftover_names.popleft()
                for _ in range(min(count, len(self.leftover_names)))]

    def _list_leftovers(self) -> list[list[str]]:
        pacer = Pacer(self.gate, self.rest)
        found: dict[str, list[str]] = {}
        with os.scandir(self.folder) as listing:
            for item in listing:
                pacer.step()
                commit = results.xml_commit(item.name)
                if commit in self.leftover:
                    found.setdefault(commit, []).append(item.name)
        self.leftover = set()
        return list(found.values())

    def unplanned(self, name: str) -> str | None:
        """Why the result file ``name`` may not be removed now, if so: the
        plan did not list it, or it changed since (its stamp)."""
        planned = self.headers.get(name)
        if planned is None or planned[1] is None:
            return f"{name} is not in the plan"
        try:
            st = os.lstat(os.path.join(self.folder, name))
        except OSError as exc:
            return str(exc).replace("\n", " ")
        if result_index.stamp_of(st) != planned[0]:
            return f"{name} changed since the plan: kept"
        return None

    def discard_present(self, names: list[str]) -> None:
        """``discard`` each that is there (an earlier pass may have moved
        it before it ended)."""
        for name in names:
            try:
                self.discard(name)
            except FileNotFoundError:
                pass

    def discard(self, name: str) -> None:
        """Into the trash; unlinked at once when the disk is full (the
        trash's folder may need a block for the name, and a full disk is
        when pruning matters most)."""
        path = os.path.join(self.folder, name)
        try:
            os.rename(path, os.path.join(self.trash, name))
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            os.unlink(path)

    def sync_folder(self) -> None:
        """Commit the moves to disk now, in this process's time: left
        pending, they ride on the next result's fsync and make that result
        wait."""
        try:
            fsync_dir(self.folder)
        except OSError as exc:      # the unlinks stand; the next commit carries them
            log.debug("cannot fsync %s: %s", self.folder, exc)

    # ---- the loop -----------------------------------------------------------
    def serve(self, inp, out) -> None:
        """Requests until stdin closes (or one it cannot read)."""
        self.reaper.start()
        while True:
            self.reaper.idle()
            line = inp.readline()
            self.reaper.busy()
            if not line:
                return
            command, _, arg = line.decode("ascii", "replace").strip().partition(" ")
            if not arg.isdigit() or int(arg) > MAX_BATCH:
                log.error("not a request: %r", line[:80])
                return
            lines = [inp.readline().decode("utf-8", "replace").rstrip("\n")
                     for _ in range(int(arg) if command in ("plan", "remove", "drop") else 0)]
            if command == "plan":
                reply = self.plan(set(lines)) + "\n"
            elif command == "take":
                reply = "".join(encode_entry(e) + "\n" for e in self.take(int(arg))) + "end\n"
            elif command in ("remove", "drop"):
                move = self.remove if command == "remove" else self.drop
                reply = "".join(r + "\n" for r in move([n.split("\t") for n in lines]))
            elif command == "leftovers":
                reply = "".join("\t".join(names) + "\n"
                                for names in self.leftovers(int(arg))) + "end\n"
            else:
                log.error("not a request: %r", line[:80])
                return
            out.write(reply.encode())
            out.flush()


def encode_entry(entry: keep.Entry) -> str:
    return json.dumps([entry.commit, entry.branch, entry.previous, entry.verdict,
                       entry.finished, list(entry.cells), entry.labels], separators=(",", ":"))


def decode_entry(line: bytes) -> keep.Entry:
    """ValueError or TypeError for a line that is not encode_entry's."""
    commit, branch, previous, verdict, finished, cells, labels = json.loads(line)
    return keep.Entry(str(commit), str(branch), previous and str(previous), str(verdict),
                      float(finished), tuple(str(c) for c in cells), str(labels))


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        description="The pruner's file worker (started by dispatcher.py with --keep-results; "
                    "reads requests on stdin, exits when stdin closes).")
    parser.add_argument("--results-dir", required=True, help="the dispatcher's results folder")
    parser.add_argument("--keep-results", required=True, type=keep.keep_argument,
                        help="what to keep, as the dispatcher's --keep-results")
    parser.add_argument("--tombstones", required=True,
                        help="the tombstone file (the pruned commits' verdicts)")
    parser.add_argument("--index", default=None,
                        help="the dispatcher's result index (ci/retention/index.py): read "
                             "instead of the headers it describes, rewritten now and then; "
                             "default: none, every header is read")
    parser.add_argument("--gate-fd", type=int, default=-1,
                        help="file descriptor of the dispatcher's result gate page "
                             "(-1: none, never wait)")
    parser.add_argument("--gate-wait", type=positive(float), default=LONGEST_WAIT,
                        help="seconds a step waits for the gate at most "
                             "(default %(default)s)")
    parser.add_argument("--rest", type=non_negative(float), default=REST,
                        help="while planning, rest after every %d steps (names listed, "
                             "headers read, entries weighed) this many times as long as "
                             "they took, as the dispatcher's --prune-rest (default "
                             "%%(default)s)" % STEPS_PER_REST)
    parser.add_argument("--log-level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="log level")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    # The dispatcher ends this process (stdin closed); a Ctrl-C meant for
    # it must not cut a batch here first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lowest_priority()
    worker = FileWorker(os.path.abspath(args.results_dir), GateView(args.gate_fd, args.gate_wait),
                        args.keep_results, os.path.abspath(args.tombstones), args.rest,
                        args.index and os.path.abspath(args.index))
    worker.serve(sys.stdin.buffer, sys.stdout.buffer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
