"""Build matrices on the dispatcher's side: one unit of work per cell,
routed to a runner that has every label the cell needs; a cell no
registered runner can take waits with a reason and, after
``--unroutable-timeout``, gets an ``error`` verdict; and once every cell of
a commit has its file, the commit's own result (the worst cell's verdict,
``cells: py3.9=failed py3.12=passed``).

A commit without a matrix is one cell named "": its key is the commit,
its file ``test_results/<commit>``, exactly as before matrices.  A matrix
cell's key is ``<commit>:<cell>`` and its files
``test_results/<commit>.cell.<cell>`` (and ``.xml``); the commit's file is
written last, from the cells' files, so it is the proof that every cell is
done, as a commit's file always was.

``MatrixKeeper`` is a part of ``DispatcherState`` (ci/dispatch/state.py):
its locking rule holds here too (``_`` methods expect the lock held).
"""

from __future__ import annotations

import itertools
import logging
import os
import time

from ci import matrix, mergeinfo, results
from ci.matrix import Plan
from ci.dispatch.journal import cell_record, queue_record, split_key
from ci.dispatch.work import Meta, Work, work_key
from ci.outcome import Outcome
from ci.retention.tombstones import Tombstone
from ci.wire import ProtocolError, Reply, decode_fields, one_line, valid_full_commit

log = logging.getLogger(__name__)

DEFAULT_UNROUTABLE_TIMEOUT = 600.0
MAX_REASON = 300
def fits(traits, cell: matrix.Cell) -> bool:
    """Whether a runner with ``traits`` may take ``cell``: it has every
    label the cell needs, and, if exclusive, the cell asks for one of its
    labels (the interpreter a python axis implies does not count)."""
    if not cell.needs <= traits.labels:
        return False
    return not traits.exclusive or bool(cell.labels & traits.labels)


def meta_from_result(results_dir: str, commit: str) -> Meta | None:
    """A retest keeps the branch and predecessor the first run had."""
    try:
        with open(os.path.join(results_dir, commit), "rb") as handle:
            head = handle.read(16 * 1024).partition(b"\n\n")[0]
        fields = decode_fields(head)
    except (OSError, ProtocolError):
        return None
    if "branch" not in fields:
        return None
    previous = fields.get("previous")
    merge, conflicts = merge_from_header(fields)
    return Meta(fields["branch"], previous if valid_full_commit(previous or "") else None,
                merge, conflicts)


def merge_from_header(fields: dict) -> tuple:
    """(merge info, conflicting paths) a result header records, so that a
    retest of a merge commit is judged by its target's rules again (and a
    conflict stays one: its commit is the branch head, not a merge)."""
    into = mergeinfo.parse_merged_into(fields.get("merged_into", ""))
    head = fields.get("merge_head", "")
    if into is None or not valid_full_commit(head):
        return None, None
    merge = mergeinfo.MergeInfo(head, into[1], into[0])
    if fields.get("verdict") == results.CONFLICT:
        return merge, mergeinfo.parse_paths(fields.get("conflicts", ""))
    return merge, None


def cell_from_header(name: str, header: dict) -> matrix.Cell | None:
    """A cell as its result file describes it (for a retest)."""
    python = header.get("python") or None
    try:
        return matrix.Cell(name, python, matrix.parse_axes(header.get("axes", "")),
                           matrix.parse_labels(header.get("labels", "")))
    except matrix.MatrixError:
        return None


def cell_names(results_dir: str, commit: str) -> list[str]:
    """The cells a matrix commit's own result lists ([] for none)."""
    header = results.read_header(os.path.join(results_dir, commit)) or {}
    names = [part.partition("=")[0] for part in header.get("cells", "").split()]
    return [name for name in names if name and matrix.is_cell_name(name)]


def cells_from_results(results_dir: str, commit: str) -> dict[str, matrix.Cell] | None:
    """The cells of a tested commit, read from its files; None for a
    commit without a matrix (or without a result), and for one whose cell
    files are not all there to say what each cell is (a pass that moved
    them before the commit's own): guessed from its name alone, a cell
    would run on the runner's own Python, filed as the cell asked for."""
    cells = {}
    for name in cell_names(results_dir, commit):
        cell_header = results.read_header(os.path.join(
            results_dir, results.result_name(commit, name))) or {}
        cell = cell_from_header(name, cell_header) if cell_header else None
        if cell is None:
            return None
        cells[name] = cell
    return cells or None


def own_labels_field(labels: str) -> str:
    """A tombstone's cells field for a commit without a matrix whose
    recipe asked for runner labels (its header's ``labels``): one cell
    named "", as its dispatch line had it; "" for none (or unreadable)."""
    try:
        parsed = matrix.parse_labels(labels)
    except matrix.MatrixError:
        return ""
    return matrix.encode_plan(matrix.Plan((matrix.Cell("", labels=parsed),))) if parsed else ""


def pruned_labels(stone: Tombstone | None) -> matrix.Cell | None:
    """The one cell of a pruned commit without a matrix, with the labels
    its tombstone keeps (None: it kept none)."""
    if stone is None or not stone.cells:
        return None
    plan = matrix.decode_plan(stone.cells, matrix.MAX_CELLS_LIMIT)
    if plan.error is None and len(plan.cells) == 1 and not plan.cells[0].name:
        return plan.cells[0]
    return None


def pruned_cells(stone: Tombstone) -> dict[str, matrix.Cell] | None:
    """A pruned matrix commit's cells, as its tombstone keeps them."""
    if not stone.cells:
        return None
    plan = matrix.decode_plan(stone.cells, matrix.MAX_CELLS_LIMIT)
    named = {c.name: c for c in plan.cells if c.name}
    return named if plan.error is None and named else None


def summary(commit: str, cells: dict[str, matrix.Cell], headers: dict[str, dict]) -> Outcome:
    """The commit's own result from its cells' headers: the worst verdict,
    the counts added up (flaky and quarantined too), the failing
    quarantined tests of every cell named, and ``cells: <name>=<verdict> ...``."""
    verdicts = {name: headers[name].get("verdict", "error") for name in cells}
    header: dict = {"commit": commit, "verdict": results.worst_verdict(verdicts.values()),
                    "cells": " ".join(f"{n}={v}" for n, v in verdicts.items()),
                    "runner": "matrix", "started": min(
                        (h.get("started", "") for h in headers.values()), default="")}
    for count in ("tests", "failures", "errors", "skipped"):
        header[count] = sum(_int(h.get(count)) for h in headers.values())
    # Flaky and quarantined tests too (present only when not 0, as in a
    # cell's header), and every cell's failing quarantined tests named.
    for count in results.EXTRA_COUNTS:
        total = sum(_int(h.get(count)) for h in headers.values())
        if total:
            header[count] = total
    named = results.merge_named([headers[name].get("quarantined_failing") for name in cells])
    if named:
        header["quarantined_failing"] = named
    header["duration"] = f"{max((_float(h.get('duration')) for h in headers.values()), default=0):.3f}"
    for key in ("branch", "previous", "subject", "author", "committed", "merged_into",
                "merge_head"):
        value = next((h[key] for h in headers.values() if h.get(key)), None)
        if value:
            header[key] = value
    bad = [n for n, v in verdicts.items() if v != results.PASSED]
    if bad:
        header["reason"] = one_line("cells not passing: " + ", ".join(
            f"{n} ({verdicts[n]}{': ' + headers[n]['reason'] if headers[n].get('reason') else ''})"
            for n in bad), MAX_REASON)
    lines = [f"{name}: {verdicts[name]}  (test_results/{results.result_name(commit, name)})"
             for name in cells]
    return Outcome(header, ("\n".join(lines) + "\n").encode())


def _int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


class MatrixKeeper:
    """Cells, routing and the commit's own result; mixed into
    ``DispatcherState`` (which sets ``groups``, ``unroutable_timeout``)."""

    def _fitting(self, cell: matrix.Cell, free_only: bool):
        return [r for r in self.runners.values()
                if (r.free or not free_only) and fits(r.traits, cell)]

    def _waiting_reason(self, work: Work) -> str | None:
        """Why no registered runner can take a queued cell, if none can."""
        if any(fits(r.traits, work.cell) for r in self.runners.values()):
            return None
        needs = " ".join(sorted(work.cell.needs))
        return f"waiting for a runner with {needs}" if needs else "waiting for a runner"

    def _unroutable(self, limit: int = 500) -> list[tuple[Work, str]]:
        """Queued work (the first ``limit``) that no registered runner can
        take, with the reason; while no runner is registered, only cells
        that need labels (a commit without any waits as it always did)."""
        found = []
        for key in itertools.islice(self.queue, limit):
            work = self.work[key]
            if self.runners or work.cell.needs:
                reason = self._waiting_reason(work)
                if reason:
                    found.append((work, reason))
        return found

    def expire_unroutable(self, now: float | None = None) -> None:
        """Give the ``error`` verdict to queued cells that no registered
        runner could take for ``unroutable_timeout`` seconds.  While no
        runner at all is registered nothing expires (a restarting fleet
        is not a missing one, as before matrices)."""
        now = time.monotonic() if now is None else now
        with self.cond:
            for work in [self.work[k] for k in self.queue]:
                reason = self._waiting_reason(work) if self.runners else None
                if reason is None:
                    work.unroutable_since = None
                elif work.unroutable_since is None:
                    work.unroutable_since = now
                    log.warning("%s: %s", work.short, reason)
                elif now - work.unroutable_since >= self.unroutable_timeout:
                    self._write_error(work, f"no registered runner could take this cell "
                                            f"for {self.unroutable_timeout:g}s ({reason})")

    # ---- a commit's cells -------------------------------------------------
    def _plan_works(self, commit: str, plan: Plan) -> list[Work]:
        """New JOURNALLING records for a commit's cells."""
        if plan.error is not None:
            work = Work(work_key(commit), commit, error=plan.error)
            return [work]
        works = [Work(work_key(commit, c.name), commit, cell=c) for c in plan.cells]
        if any(c.name for c in plan.cells):
            self.groups[commit] = {c.name: c for c in plan.cells}
        return works

    def _retest_works(self, target: str, stone: Tombstone | None = None) -> list[Work]:
        """The cells a retest of ``target`` runs again (none pending);
        ``stone``: the tombstone of a commit whose result files were
        pruned (its branch, predecessor and cells)."""
        commit, cell = split_key(target) or (target, "")
        cells = self.groups.get(commit) or cells_from_results(self.results_dir, commit) \
            or (pruned_cells(stone) if stone is not None else None)
        if cell and (cells is None or cell not in cells):
            raise Reply(f"retest of {target[:60]}: {commit[:12]} has no cell {cell!r}")
        if cells is None and cell_names(self.results_dir, commit):
            # A pass cut short after moving some cell files (a restart no
            # longer counts the commit pruned: its own file is there), so
            # its tombstone is looked up here; rare, and read once.
            stone = self.tombstones.find(commit) if self.tombstones is not None else None
            cells = pruned_cells(stone) if stone is not None else None
            if cells is None:
                raise Reply(f"retest of {commit[:12]}: the files that say what its cells "
                            f"are are gone (pruned?), so it cannot be run as it was")
        meta = meta_from_result(self.results_dir, commit) or (
            Meta(stone.branch, stone.previous) if stone is not None and stone.branch else None)
        if cells is None:
            if work_key(commit) in self.work:
                return []
            return [Work(work_key(commit), commit, meta=meta,
                         cell=pruned_labels(stone) or self._own_labels(commit))]
        self.groups[commit] = dict(cells)
        names = [cell] if cell else list(cells)
        return [Work(work_key(commit, n), commit, meta=meta, cell=cells[n]) for n in names
                if work_key(commit, n) not in self.work]

    def _own_labels(self, commit: str) -> matrix.Cell:
        """A commit without a matrix, as its result says: the labels its
        recipe asked for, asked for again by a retest."""
        header = results.read_header(os.path.join(self.results_dir, commit)) or {}
        try:
            return matrix.Cell("", labels=matrix.parse_labels(header.get("labels", "")))
        except matrix.MatrixError:
            return matrix.SINGLE

    def _group_records(self, commits=None) -> list[str]:
        """For the journal's rewrite (and a retest of some cells of
        ``commits``): the cells of every commit not yet complete whose
        work is over (their files exist), so that a restart still knows
        every cell of the commit, and completes it from all of them."""
        lines = []
        for commit, cells in self.groups.items():
            if commits is not None and commit not in commits:
                continue
            for name, cell in cells.items():
                key = work_key(commit, name)
                if key not in self.work:
                    lines += [queue_record(key), cell_record(key, cell)]
        return lines

    def _complete_commit(self, commit: str) -> Outcome | None:
        """Once every cell of a matrix commit is done: write its own result
        (under the lock: one small file per commit) and return it."""
        cells = self.groups.get(commit)
        if not cells or any(work_key(commit, n) not in self.done for n in cells):
            return None
        headers = {n: results.read_header(os.path.join(
            self.results_dir, results.result_name(commit, n))) or {} for n in cells}
        outcome = summary(commit, cells, headers)
        try:
            self.write_result(commit, outcome)      # and its line in the result index
        except OSError:
            log.exception("cannot write the result of %s; its cells are done", commit[:12])
            return None
        del self.groups[commit]
        self.done.add(work_key(commit))
        log.info("result for %s: %s (%s)", commit[:12], outcome.verdict, outcome.header["cells"])
        return outcome

    def _recover_groups(self, got) -> list[tuple[str, Outcome]]:
        """After a restart: the cells of each incomplete matrix commit; a
        commit whose cells were all done before the crash is completed."""
        completed = []
        for key, cell in got.cells.items():
            if not cell.name:
                continue  # a commit without a matrix whose recipe asks for labels
            commit = split_key(key)[0]
            self.groups.setdefault(commit, {})[cell.name] = cell
        for commit in list(self.groups):
            outcome = self._complete_commit(commit)
            if outcome is not None:
                completed.append((commit, outcome))
        return completed
