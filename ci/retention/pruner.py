"""The dispatcher's pruning thread (``--keep-results``): every
``--prune-interval`` seconds it lists the results folder, decides what the
policy lets go (ci/retention/policy.py) and removes it in small batches.

Off the result path: headers are read and files removed by a worker
process at the idle priority (ci/retention/worker.py), which waits while a
``results`` handler is storing a result (ci/retention/gate.py); plans are
made without the dispatcher's lock; tombstones are appended and fsynced
without it; the lock is taken once per batch, only to check again that
each commit is still finished and not pending (a retest may have queued it
meanwhile) and to mark it pruned and being unlinked; the unlinks are done
without it (a retest of a commit being unlinked waits for its batch), so a
result never waits behind an unlink.  Unlinks follow the folder's own
order.  After every batch the thread rests for as long as the batch took
(``REST``, at least ``pause``, at most ``REST_CAP``): a pass over 100,000
files then takes its time from the disk's pace and holds the disk half
the time at most.  A tombstone group (one fsync) covers several batches.

Order per commit: the tombstone (durable), then ``<commit>`` (and a matrix
commit's cell results before it), then the test history's rows (the
history writer's own thread drops them, in order with the results it
writes); its ``<commit>.xml`` goes in a second sweep once every group is
done.  Each sweep follows the folder's order, so its moves leave one
directory block after another: moved with their result files, the XMLs
(which lie elsewhere in the folder) had each batch's fsync write a block
per name, and a result's own flush meet them.  An XML whose result file
is gone is only a leftover: the commit is pruned by its tombstone and
its result file, the proof, is gone; the next plan finds an XML left
by a pass that ended between the sweeps.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from ci import matrix, results
from ci.dispatch.cells import cells_from_results, own_labels_field
from ci.retention import policy as keep
from ci.retention.gate import PAUSE, REST, rest_after
from ci.retention.tombstones import Tombstone, TombstoneFile
from ci.retention.workerlink import WorkerLink

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 300.0
# Tombstones written (one fsync) per group of commits to prune.
GROUP = 500
# Commits removed per hold of the dispatcher's lock (two unlinks each).
BATCH = 25
# The first pass waits this long (or the interval, if shorter) after the
# start, when recovery and the history's catch-up are busy.
FIRST_DELAY = 10.0


@dataclasses.dataclass
class PassReport:
    """What one pass did (logged; returned for tests and the benchmark)."""
    results: int = 0
    pruned: int = 0
    seconds: float = 0.0
    scanning: float = 0.0    # the worker's plan: listing the folder, reading new headers
    removing: float = 0.0    # the batches: marks under the lock, the unlinks
    resting: float = 0.0     # the pauses after each batch

    def describe(self) -> str:
        return (f"pruned {self.pruned} of {self.results} result(s) in {self.seconds:.1f}s "
                f"(scan {self.scanning:.1f}s, removing {self.removing:.1f}s, "
                f"resting {self.resting:.1f}s)")


class Pruner:
    """One thread and its worker process (ci/retention/workerlink.py)."""

    def __init__(self, state, tombstones: TombstoneFile, rules: keep.KeepPolicy,
                 interval: float = DEFAULT_INTERVAL, forget=None, log_level: str = "INFO",
                 rest: float = REST):
        self.state = state
        self.rest = rest
        self.results_dir = state.results_dir
        self.tombstones = tombstones
        self.rules = rules
        self.interval = interval
        # Called with the pruned commits (the history writer's ``forget``).
        self.forget = forget or (lambda commits: None)
        self.pause = PAUSE
        self.stop_event = threading.Event()
        # Every step waits while a result is being stored (gate.py).
        self.gate = state.result_gate
        self.worker = WorkerLink(self.results_dir, self.gate, self.stop_event, rules,
                                 tombstones.path, log_level, rest,
                                 state.result_index)
        self.thread = threading.Thread(target=self._run, name="pruner", daemon=True)
        self.passes = 0
        self.last: PassReport | None = None
        # Retests finished before the pass's plan (``_plan_stale``).
        self._retests = 0

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        self.worker.stop()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _run(self) -> None:
        self.stop_event.wait(min(self.interval, FIRST_DELAY))
        while not self.stop_event.is_set():
            try:
                self.last = self.run_once()
            except Exception:
                if self.stop_event.is_set():      # stopping ends the worker mid-pass
                    break
                log.exception("pruning pass failed; trying again in %.0fs", self.interval)
            self.passes += 1
            self.stop_event.wait(self.interval)

    def run_once(self) -> PassReport:
        """One pass: plan, then prune batch by batch."""
        started = time.monotonic()
        report = PassReport()
        self._report = report
        # Taken before the plan reads anything: a retest that finishes
        # after it ends the pass (``remove_pruned``).
        self._retests = self.state.retests_so_far()
        doomed, report.results = self.worker.plan(self.state.pending_commits())
        report.scanning = time.monotonic() - started
        log.info("planned %d of %d result(s) to prune in %.1fs", doomed, report.results,
                 report.scanning)
        while doomed and not self.stop_event.is_set():
            group = self.worker.take(GROUP)
            if not group:
                break
            report.pruned += self._prune_group(group)
            if self._plan_stale():
                log.info("a retest finished during the pass: the rest of its plan is "
                         "dropped (the next pass weighs the new verdict)")
                break
        if not self.stop_event.is_set():
            self._drop_leftovers()
        report.seconds = time.monotonic() - started
        if report.pruned:
            log.info("%s (keeping %s)", report.describe(), self.rules.describe())
        return report

    def _prune_group(self, group: list[keep.Entry]) -> int:
        """Tombstones for the group (one fsync), then its files, a small
        batch per hold of the dispatcher's lock, pausing between.  Stops
        once the plan is stale (``_plan_stale``): the group's commits not
        removed keep their files, which outweigh their tombstones."""
        now = time.time()
        self._give_way()
        if self._plan_stale():
            return 0
        dropped = self.tombstones.append([Tombstone(e.commit, e.verdict, e.finished, now,
                                                    e.previous, e.branch or None,
                                                    self._cells_field(e))
                                          for e in group])
        cells = {e.commit: e.cells for e in group}

        def batch(commits: list[str]) -> int | None:
            gone = self.state.remove_pruned(commits,
                                            lambda picked: self._unlink_all(picked, cells),
                                            self.forget, self._retests)
            return None if gone is None else len(gone)      # None: the plan is stale
        commits = [e.commit for e in group]
        removed = self._in_batches((commits[i:i + BATCH] for i in range(0, len(commits), BATCH)),
                                   batch)
        if dropped:      # after the group: a trim may drop some of its own
            self._forget_tombstones(dropped)
        return removed

    def _cells_field(self, entry: keep.Entry) -> str:
        """A matrix commit's cells as its tombstone keeps them (read from
        its cell files, which the pass is about to remove): without them a
        retest ran one plain job, on the runner's own Python."""
        if not entry.cells:
            return own_labels_field(entry.labels)
        cells = cells_from_results(self.results_dir, entry.commit)
        if cells:
            return matrix.encode_plan(matrix.Plan(tuple(cells.values())))
        # Some cell files gone: a pass cut short after its tombstone kept them.
        stone = self.tombstones.find(entry.commit)
        return stone.cells if stone is not None else ""

    def _drop_leftovers(self) -> None:
        """The second sweep: the XMLs of the commits the first one pruned
        (and of earlier passes that ended before theirs), in the folder's
        order, a batch per hold of the lock like the first."""
        names: dict[str, list[str]] = {}

        def batches():      # the worker's listing looks at the gate itself
            while True:
                names.clear()
                names.update(self.worker.leftovers(BATCH))
                if not names:
                    return
                yield list(names)
        dropped = self._in_batches(batches(), lambda commits: self.state.remove_leftovers(
            commits, lambda picked: self.worker.drop([names[c] for c in picked])))
        if dropped:
            log.info("moved the JUnit XML of %d pruned commit(s) in the folder's order",
                     dropped)

    def _in_batches(self, batches, step) -> int:
        """``step`` over each batch of commits (it returns how many it
        removed, None to stop), waiting at the gate before each and
        resting after each as long as it took; the sum removed."""
        removed = 0
        for commits in batches:
            if self.stop_event.is_set():
                break
            self._give_way()
            began = time.monotonic()
            done = step(commits)
            if done is None:
                break
            removed += done
            busy = time.monotonic() - began
            self._report.removing += busy
            rested = time.monotonic()
            self.stop_event.wait(rest_after(busy, self.rest, self.pause))
            self._report.resting += time.monotonic() - rested
        return removed

    def _plan_stale(self) -> bool:
        """A retest finished since the plan: its new verdict may make it,
        or the commit after it, one that broke or fixed its branch, which
        the plan did not weigh (``remove_pruned`` checks the same under the
        dispatcher's lock)."""
        return self.state.retests_so_far() != self._retests

    def _give_way(self) -> None:
        """Wait (bounded) while a result is being stored: the step that
        follows would share the disk's journal or the interpreter with it."""
        self.gate.wait_clear(self.stop_event)

    def _forget_tombstones(self, commits: list[str]) -> None:
        """A trim dropped these tombstones: the dispatcher lets them go
        too, so memory stays as bounded as the file (the worker reads the
        new file at its next plan)."""
        self.state.forget_pruned(commits)

    def _unlink_all(self, commits: list[str], cells: dict) -> list[OSError | None]:
        """Each commit's result files removed by the worker (the first
        sweep): a matrix commit's cells', then its own (the proof goes
        last); per commit, None or the error that stopped it."""
        def names(commit: str) -> list[str]:
            return [*(results.result_name(commit, cell) for cell in cells.get(commit, ())),
                    commit]
        return self.worker.remove([names(commit) for commit in commits])
