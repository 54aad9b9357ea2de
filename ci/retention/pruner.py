"""The dispatcher's pruning thread (``--keep-results``): every
``--prune-interval`` seconds it lists the results folder, decides what the
policy lets go (ci/retention/policy.py) and removes it in small batches.

Off the result path: headers are read and plans made without the
dispatcher's lock; tombstones are appended and fsynced without it; the
lock is taken once per batch, only to check again that each commit is
still finished and not pending (a retest may have queued it meanwhile)
and to mark it pruned and being unlinked; the unlinks themselves are done
without it (a retest of a commit being unlinked waits for its batch), so
a result never waits behind an unlink.  Each step (a header read, a
commit's unlinks, an fsync, a batch's hold of the lock) first waits while a
``results`` handler is storing a result (ci/retention/gate.py), so a result
shares the disk's journal with at most the step under way.  Unlinks follow
the folder's own order.  After a batch during which a result arrived or was written, the
thread rests for as long as the batch took (``REST``, at least
``pause``): a pass over 100,000 files then takes its time from the disk's
pace and never crowds out the handlers; while no result comes, it only
pauses briefly between batches.  A tombstone
group (one fsync) covers several batches.

Order per commit: the tombstone (durable), then ``<commit>.xml``, then
``<commit>`` (the result file is the proof of a result, so it goes last),
then the test history's rows (the history writer's own thread drops
them, in order with the results it writes).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import threading
import time

from ci import matrix, results
from ci.retention import policy as keep
from ci.retention.tombstones import Tombstone, TombstoneFile
from ci.wire import valid_full_commit

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 300.0
# Tombstones written (one fsync) per group of commits to prune.
GROUP = 500
# Commits removed per hold of the dispatcher's lock (two unlinks each).
BATCH = 25
# Seconds between batches, and after every READ_STEP headers read: the
# thread's own pace, leaving the interpreter to the handlers meanwhile;
# QUIET_PAUSE when no result came since the last pause (any wait lets a
# handler that is ready take the interpreter).
PAUSE = 0.005
QUIET_PAUSE = 0.001
READ_STEP = 200
# After each batch the thread rests this many times as long as the batch
# took (and at least PAUSE).
REST = 1.0
# The first pass waits this long (or the interval, if shorter) after the
# start, when recovery and the history's catch-up are busy.
FIRST_DELAY = 10.0
# A header is short: this much of a result file holds it.
HEADER_READ = 16 * 1024
# Threads unlinking one batch's files.  An unlink frees the inode's blocks
# after the folder's lock is let go, so a second and third unlink overlap
# that part (measured alone on ext4, 100,000 unlinks: 94 us each with one
# thread, 68 with two, 51 with four); more would crowd the result path.
UNLINKERS = 3


@dataclasses.dataclass
class PassReport:
    """What one pass did (logged; returned for tests and the benchmark)."""
    results: int = 0
    pruned: int = 0
    seconds: float = 0.0
    scanning: float = 0.0    # listing the folder and reading new headers
    removing: float = 0.0    # the batches: marks under the lock, the unlinks
    resting: float = 0.0     # the pauses after each batch

    def describe(self) -> str:
        return (f"pruned {self.pruned} of {self.results} result(s) in {self.seconds:.1f}s "
                f"(scan {self.scanning:.1f}s, removing {self.removing:.1f}s, "
                f"resting {self.resting:.1f}s)")


class Pruner:
    """One thread; its caches (``headers``, ``verdicts``) are its own."""

    def __init__(self, state, tombstones: TombstoneFile, rules: keep.KeepPolicy,
                 interval: float = DEFAULT_INTERVAL, forget=None):
        self.state = state
        self.results_dir = state.results_dir
        self.tombstones = tombstones
        self.rules = rules
        self.interval = interval
        # Called with the pruned commits (the history writer's ``forget``).
        self.forget = forget or (lambda commits: None)
        self.pause = PAUSE
        # commit -> ((mtime_ns, size, inode), Entry | None)
        self.headers: dict[str, tuple] = {}
        # Verdicts of pruned commits: a later commit's broke/fixed needs them.
        self.verdicts = {c: t.verdict for c, t in tombstones.load().items()}
        self.stop_event = threading.Event()
        # Every step waits while a result is being stored (gate.py).
        self.gate = state.result_gate
        self.unlinkers: concurrent.futures.ThreadPoolExecutor | None = None
        self.thread = threading.Thread(target=self._run, name="pruner", daemon=True)
        self.passes = 0
        self.last: PassReport | None = None

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(timeout)
        if self.unlinkers is not None:
            self.unlinkers.shutdown(wait=False)

    def _run(self) -> None:
        self.stop_event.wait(min(self.interval, FIRST_DELAY))
        while not self.stop_event.is_set():
            try:
                self.last = self.run_once()
            except Exception:
                log.exception("pruning pass failed; trying again in %.0fs", self.interval)
            self.passes += 1
            self.stop_event.wait(self.interval)

    def run_once(self) -> PassReport:
        """One pass: plan, then prune batch by batch."""
        started = time.monotonic()
        report = PassReport()
        self._report = report
        entries, position = self._scan()
        report.scanning = time.monotonic() - started
        doomed = keep.plan(entries, self.rules, time.time(), self.verdicts,
                           self.state.pending_commits())
        # In the folder's own order (ext4 lists a large folder in hash
        # order): consecutive unlinks then touch the same directory blocks
        # (measured alone over 100,000 pairs: 147 against 238 us per unlink
        # oldest first; within a whole pass lost in the machine's noise).
        # What is pruned is the plan's whatever the order.
        doomed.sort(key=position.__getitem__)
        del position
        report.results = len(entries)
        for start in range(0, len(doomed), GROUP):
            if self.stop_event.is_set():
                break
            report.pruned += self._prune_group([entries[c] for c in doomed[start:start + GROUP]])
        report.seconds = time.monotonic() - started
        if report.pruned:
            log.info("%s (keeping %s)", report.describe(), self.rules.describe())
        return report

    def _prune_group(self, group: list[keep.Entry]) -> int:
        """Tombstones for the group (one fsync), then its files, a small
        batch per hold of the dispatcher's lock, pausing between."""
        now = time.time()
        self._give_way()
        dropped = self.tombstones.append([Tombstone(e.commit, e.verdict, e.finished, now,
                                                    e.previous, e.branch or None)
                                          for e in group])
        for entry in group:
            self.verdicts[entry.commit] = entry.verdict
        removed = 0
        cells = {e.commit: e.cells for e in group}
        for start in range(0, len(group), BATCH):
            self._give_way()
            began = time.monotonic()
            seen = self.gate.seen()
            gone = self.state.remove_pruned([e.commit for e in group[start:start + BATCH]],
                                            lambda commits: self._unlink_all(commits, cells),
                                            self.forget)
            for commit in gone:
                self.headers.pop(commit, None)
            removed += len(gone)
            busy = time.monotonic() - began
            self._report.removing += busy
            rested = time.monotonic()
            self._rest(busy, self.gate.seen() != seen)
            self._report.resting += time.monotonic() - rested
        if dropped:      # after the group: a trim may drop some of its own
            self._forget_tombstones(dropped)
        return removed

    def _rest(self, busy: float, competed: bool) -> None:
        """Pause after a batch that competed with a result for as long as
        it took (times ``REST``), else only ``pause``: under results the
        pass's pace follows the disk's, so a slow moment (unlinks queued
        behind every result's fsync) is not made worse by the next batch;
        with none arriving, nothing is waited for."""
        self.stop_event.wait(max(self.pause, busy * REST) if competed else
                             min(self.pause, QUIET_PAUSE))

    def _give_way(self) -> None:
        """Wait (bounded) while a result is being stored: the step that
        follows would share the disk's journal or the interpreter with it."""
        self.gate.wait_clear(self.stop_event)

    def _forget_tombstones(self, commits: list[str]) -> None:
        """A trim dropped these tombstones: the dispatcher and this cache
        let them go too, so memory stays as bounded as the file."""
        for commit in commits:
            self.verdicts.pop(commit, None)
        self.state.forget_pruned(commits)

    def _unlink_all(self, commits: list[str], cells: dict) -> list[OSError | None]:
        """Each commit's files removed (``_unlink``), several commits at
        once; per commit, None or the error that stopped it."""
        def one(commit):
            self._give_way()
            try:
                self._unlink(commit, cells.get(commit, ()))
            except OSError as exc:
                return exc
            return None
        errors = list(self._workers().map(one, commits))
        self._sync_folder()
        return errors

    def _sync_folder(self) -> None:
        """Commit the batch's unlinks to the file system's journal now, in
        the pruner's own time: left pending, they ride on the next result's
        fsync and make that result wait (quiet machine, 20 results a second
        while a pass ran: median 5.3 ms without this, 3.9 with it)."""
        self._give_way()
        try:
            fd = os.open(self.results_dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _workers(self) -> concurrent.futures.ThreadPoolExecutor:
        if self.unlinkers is None:
            self.unlinkers = concurrent.futures.ThreadPoolExecutor(UNLINKERS, "unlink")
        return self.unlinkers

    def _unlink(self, commit: str, cells: tuple[str, ...]) -> None:
        """A matrix commit's cell files, the JUnit XML, then the result
        file (the proof goes last)."""
        paths = [os.path.join(self.results_dir, results.result_name(commit, cell))
                 for cell in cells]
        paths += [results.junit_path(self.results_dir, commit, cell) for cell in cells]
        for path in [*paths, results.junit_path(self.results_dir, commit)]:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        os.unlink(os.path.join(self.results_dir, commit))

    def _scan(self) -> tuple[dict[str, keep.Entry], dict[str, int]]:
        """Every complete result in the folder, reading only new or
        changed headers, and each one's place in the listing.  (Read in
        one thread: with the headers in the page cache, as after the
        dispatcher's own start, three threads took longer, 1.2 s against
        0.9 s for 30,000, and slowed the handlers beside them.)"""
        names: dict[str, int] = {}
        todo: list[tuple[str, tuple, float]] = []
        with os.scandir(self.results_dir) as listing:
            for item in listing:
                if not valid_full_commit(item.name):
                    continue
                try:
                    st = item.stat(follow_symlinks=False)
                except OSError:
                    continue
                names[item.name] = len(names)
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
                cached = self.headers.get(item.name)
                if cached is None or cached[0] != stamp:
                    todo.append((item.name, stamp, st.st_mtime))
        seen_results = self.gate.seen()
        for start in range(0, len(todo), READ_STEP):
            step = todo[start:start + READ_STEP]
            for name, stamp, mtime in step:
                self._give_way()
                self.headers[name] = (stamp, self._entry(name, mtime))
            now_seen = self.gate.seen()
            self.stop_event.wait(self.pause if now_seen != seen_results else
                                 min(self.pause, QUIET_PAUSE))
            seen_results = now_seen
        for gone in [c for c in self.headers if c not in names]:
            del self.headers[gone]
        return ({name: self.headers[name][1] for name in names
                 if self.headers[name][1] is not None}, names)

    def _entry(self, commit: str, mtime: float) -> keep.Entry | None:
        fields = results.read_header(os.path.join(self.results_dir, commit), HEADER_READ)
        if not fields or not fields.get("verdict"):
            return None
        cells = tuple(name for name in (part.partition("=")[0]
                                        for part in fields.get("cells", "").split())
                      if name and matrix.is_cell_name(name))
        return keep.Entry(commit, keep.branch_of(fields), fields.get("previous") or None,
                          fields["verdict"], mtime, cells)
