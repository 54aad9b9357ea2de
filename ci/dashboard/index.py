"""What the dashboard knows from disk: an in-memory index of result headers,
and the pure functions that read meaning out of them (broke/fixed marks,
branch states, failing test names, JUnit records).

The result files stay the source of truth.  The index only remembers each
file's header and its (mtime, size, inode), so a request never re-reads
every file: a refresh stats the folder, and lists it only when the folder
changed; it reads only the files that are new or changed.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time

from ci import junit_xml
from ci import results
from ci.dashboard.pruned import PrunedIndex
from ci.wire import one_line, valid_full_commit

log = logging.getLogger(__name__)

# A refresh lists the folder at most this often (seconds).
SCAN_INTERVAL = 0.5
# The folder's own mtime may not move for changes in the same clock tick:
# while it is this young (seconds), every refresh lists the folder anyway.
RECENT_DIR = 2.0
# A file rewritten in place (not renamed into the folder, as the dispatcher
# does) leaves the folder's mtime alone: list it anyway this often.
FULL_SCAN = 30.0
# Bigger output is shown as its tail; the whole file stays on disk.
MAX_OUTPUT_READ = 32 * 1024 * 1024
MAX_TEST_NAMES = 1000
RED = frozenset(results.RED_VERDICTS)   # a conflict too (issue 22)
# A matrix cell's name as the ``cells:`` field and the cell files carry it
# (the one pattern: ci/matrix.py's, kept by results.py).
CELL_NAME_RE = results.CELL_NAME_RE
MAX_CELLS = 256


# --------------------------------------------------------------------------
# Pure functions.

def compute_marks(entries: dict[str, dict], earlier=None) -> dict[str, str]:
    """``broke`` / ``fixed`` per commit, decided along each branch's
    ``previous`` chain rather than in the order results arrived.

    A commit is judged only when its ``previous`` (same branch) has a
    result: until then it gets no mark, and it is judged on the first call
    after the predecessor's result lands.  A commit without ``previous``
    (first on its branch) is never marked.  ``earlier``: the verdicts of
    pruned commits (tombstones): a function of a commit id, the fields of
    a predecessor whose file is gone (or None)."""
    earlier = earlier or (lambda commit: None)
    marks: dict[str, str] = {}
    for commit, fields in entries.items():
        previous = fields.get("previous")
        if not previous or previous == commit:
            continue
        before = entries.get(previous) or earlier(previous)
        if before is None:
            continue
        was_red = before.get("verdict") in RED
        is_red = fields.get("verdict") in RED
        if is_red and not was_red:
            marks[commit] = "broke"
        elif was_red and not is_red:
            marks[commit] = "fixed"
    return marks


def branch_states(entries: dict[str, dict], order: dict[str, float] | None = None,
                  pruned_named: dict[str, set[str]] | None = None) -> dict[str, dict]:
    """Per branch: its head (the newest commit with a result that no other
    result on the branch names as ``previous``, pruned ones too:
    ``pruned_named``, else a retest of an old commit whose successor was
    pruned passed for the head), ``passing``/``failing``, and for a red
    branch the first commit of the unbroken red run (``since``).
    ``order`` (commit -> finish time) breaks ties between several heads,
    e.g. after a force-push."""
    order = order or {}
    pruned_named = pruned_named or {}
    by_branch: dict[str, list[str]] = {}
    named_previous: dict[str, set[str]] = {}
    for commit, fields in entries.items():
        branch = fields.get("branch")
        if not branch:
            continue
        by_branch.setdefault(branch, []).append(commit)
        if fields.get("previous"):
            named_previous.setdefault(branch, set()).add(fields["previous"])
    states = {}
    for branch, commits in by_branch.items():
        referenced = named_previous.get(branch, set())
        gone = pruned_named.get(branch, set())
        heads = [c for c in commits if c not in referenced and c not in gone] or commits
        head = max(heads, key=lambda c: (order.get(c, 0.0), c))
        red = entries[head].get("verdict") in RED
        since = None
        if red:
            since, seen = head, {head}
            while True:
                prev = entries[since].get("previous")
                if not prev or prev in seen or prev not in entries \
                        or entries[prev].get("branch") != branch \
                        or entries[prev].get("verdict") not in RED:
                    break
                seen.add(prev)
                since = prev
        states[branch] = {"branch": branch, "state": "failing" if red else "passing",
                          "head": head, "since": since}
    return states


_UNITTEST_RE = re.compile(r"^(FAIL|ERROR): (\S.*?)\s*$")
_PYTEST_RE = re.compile(r"^(FAILED|ERROR) (\S+::\S+|\S+\.py)(?: - .*)?\s*$")


def failing_tests(output: str) -> list[dict]:
    """Failing and erroring tests named in unittest or pytest output, in
    the order they first appear, as ``{"name", "kind"}`` (kind is
    ``failure`` or ``error``)."""
    found: dict[str, str] = {}
    for line in output.splitlines():
        if not line.startswith(("FAIL", "ERROR")):
            continue
        match = _UNITTEST_RE.match(line) or _PYTEST_RE.match(line)
        if not match:
            continue
        name = one_line(match.group(2), 500)
        if name not in found:
            found[name] = "error" if match.group(1) == "ERROR" else "failure"
            if len(found) >= MAX_TEST_NAMES:
                break
    return [{"name": name, "kind": kind} for name, kind in found.items()]


# What the dashboard calls each outcome of junit_xml.parse_junit.
_JUNIT_STATUS = {results.FAILED: "failure", results.XPASS: "failure", results.ERROR: "error",
                 results.SKIPPED: "skipped"}


def junit_status(record: results.TestRecord) -> str:
    """What the dashboard calls a record: ``quarantined`` for a failing
    quarantined test (it decided nothing), ``flaky`` for one that failed
    and then passed, else its outcome's name above."""
    if record.quarantined and record.outcome in results.FAILING:
        return "quarantined"
    if record.outcome == results.FLAKY:
        return "flaky"
    return _JUNIT_STATUS.get(record.outcome, "passed")


# Failing tests as a commit page lists them; only the first two decide.
SHOWN_STATUSES = ("failure", "error", "flaky", "quarantined")


def junit_statuses(data: bytes) -> dict[str, str] | None:
    """JUnit XML -> {test id: passed|failure|error|skipped|flaky|quarantined}
    (see ``junit_status``), or None when
    the document is refused.  Parsed by ``junit_xml.parse_junit``, the one
    reader of untrusted JUnit (size cap, UTF-8 only, no DTD or entity,
    bounded elements): a second, weaker parser here let a UTF-16 document
    with an entity through."""
    try:
        records = junit_xml.parse_junit(data)
    except results.JunitError:
        return None
    return {record.id: junit_status(record) for record in records}


def parse_cells(value) -> list[tuple[str, str]]:
    """A ``cells:`` header field (``py3.9=failed py3.12=passed``) as
    [(name, verdict)], in the order written; malformed words are left out
    (the header is read, not trusted)."""
    found = []
    for word in str(value or "").split()[:MAX_CELLS]:
        name, sep, verdict = word.partition("=")
        if sep and CELL_NAME_RE.fullmatch(name) and verdict:
            found.append((name, verdict[:32]))
    return found


def result_name(commit: str, cell: str | None = None) -> str | None:
    """The result file of a commit (``<commit>``) or of one of its cells
    (``<commit>.cell.<name>``, docs/results.md); None if either is not one."""
    if not valid_full_commit(commit):
        return None
    if cell is None:
        return commit
    return f"{commit}.cell.{cell}" if CELL_NAME_RE.fullmatch(cell) else None


def strip_ansi(text: str) -> str:
    """Terminal colour and cursor codes removed; other control characters
    except newline and tab dropped."""
    return _CONTROL_RE.sub("", _ANSI_RE.sub("", text))


_ANSI_RE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-_]")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


# --------------------------------------------------------------------------
# The index.

class UnknownCursor(ValueError):
    """A page's ``before`` cursor names a commit with no result."""


class ResultIndex:
    """Headers of every result file, kept current from the folder.

    One lock guards every attribute below; methods take it, helpers whose
    name starts with ``_`` assume it is held.  Derived views (order, marks,
    branch states) are rebuilt only when ``version`` moved."""

    def __init__(self, folder: str, scan_interval: float = SCAN_INTERVAL,
                 pruned: PrunedIndex | None = None):
        self.folder = folder
        # Tombstones of pruned results (--keep-results on the dispatcher).
        self.pruned = pruned or PrunedIndex(None)
        self.scan_interval = scan_interval
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = {}      # commit -> header fields
        self._stamps: dict[str, tuple] = {}      # commit -> (mtime_ns, size, inode)
        self._dir_stamp: int | None = None
        self._last_scan = float("-inf")
        self._last_full = float("-inf")
        self.version = 0
        self._derived_version = -1
        self._ordered: list[str] = []
        self._position: dict[str, int] = {}
        self._marks: dict[str, str] = {}
        self._branches: dict[str, dict] = {}
        self._pruned: dict[str, int] = {}       # branch -> results pruned and still gone

    # ---- refreshing

    def refresh(self, force: bool = False) -> None:
        if self.pruned.refresh():
            with self._lock:
                self.version += 1
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last_scan < self.scan_interval:
                return
            self._last_scan = now
            try:
                dir_stat = os.stat(self.folder)
            except OSError as exc:
                log.warning("cannot read results folder %s: %s", self.folder, exc)
                return
            young = time.time() - dir_stat.st_mtime < RECENT_DIR
            if dir_stat.st_mtime_ns == self._dir_stamp and not young and not force \
                    and now - self._last_full < FULL_SCAN:
                return
            self._dir_stamp = dir_stat.st_mtime_ns
            self._last_full = now
            self._scan()

    def _scan(self) -> None:
        seen = set()
        changed = False
        try:
            listing = os.scandir(self.folder)
        except OSError as exc:
            log.warning("cannot list results folder %s: %s", self.folder, exc)
            return
        with listing:
            for entry in listing:
                name = entry.name
                if not valid_full_commit(name):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if not (st.st_mode & 0o170000) == 0o100000:  # regular files only
                    continue
                seen.add(name)
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
                if self._stamps.get(name) == stamp:
                    continue
                fields = self._read_header(name)
                if fields is None:
                    continue
                fields["commit"] = name
                self._entries[name] = fields
                self._stamps[name] = stamp
                changed = True
        for gone in set(self._entries) - seen:
            del self._entries[gone], self._stamps[gone]
            changed = True
        if changed:
            self.version += 1

    def _read_header(self, name: str) -> dict | None:
        fields = results.read_header(os.path.join(self.folder, name))
        return fields if fields and fields.get("verdict") else None

    def _finished(self, commit: str) -> float:
        """A result's finish time: its file's mtime, kept in the stamp."""
        return self._stamps[commit][0] / 1e9

    def _derive(self) -> None:
        if self._derived_version == self.version:
            return
        finished = {c: self._finished(c) for c in self._entries}
        self._ordered = sorted(self._entries, key=lambda c: (finished[c], c), reverse=True)
        self._position = {c: i for i, c in enumerate(self._ordered)}
        self._marks = compute_marks(self._entries, self.pruned.fields_of)
        self._branches = branch_states(self._entries, finished, self.pruned.named())
        self._pruned = self.pruned.per_branch(self._entries.keys())
        self._derived_version = self.version

    # ---- queries (each refreshes first, cheaply)

    def finished_of(self, commit: str) -> float | None:
        """When the commit's result was written, None without one (as of
        the last refresh)."""
        with self._lock:
            return self._finished(commit) if commit in self._entries else None

    def get(self, commit: str) -> dict | None:
        self.refresh()
        with self._lock:
            self._derive()
            return self._decorate(commit) if commit in self._entries else None

    def _decorate(self, commit: str) -> dict:
        item = dict(self._entries[commit])
        item["mark"] = self._marks.get(commit)
        item["finished"] = self._finished(commit)
        return item

    def query(self, branch: str | None = None, verdict: str | None = None,
              limit: int = 50, before: str | None = None) -> tuple[list[dict], str | None]:
        """Newest first; ``before`` is a cursor (the last commit of the
        previous page).  Returns (items, next cursor or None).  A cursor
        with no result raises UnknownCursor: an empty page would read as
        "no older results" when the link itself is wrong."""
        self.refresh()
        with self._lock:
            self._derive()
            start = 0
            if before:
                position = self._position.get(before)
                if position is None:
                    raise UnknownCursor(before)
                start = position + 1
            # One match past the page says whether there is a next one.
            matches: list[str] = []
            for commit in self._ordered[start:]:
                fields = self._entries[commit]
                if branch is not None and fields.get("branch") != branch:
                    continue
                if verdict is not None and fields.get("verdict") != verdict:
                    continue
                matches.append(commit)
                if len(matches) > limit:
                    break
            items = [self._decorate(commit) for commit in matches[:limit]]
            more = len(matches) > limit
            return items, (items[-1]["commit"] if more and items else None)

    def branches(self) -> list[dict]:
        """Each branch's state; with pruning, how many of its results
        were pruned and its oldest result kept."""
        self.refresh()
        with self._lock:
            self._derive()
            pruned = self._pruned
            out = []
            for branch, state in sorted(self._branches.items()):
                item = dict(state)
                if pruned.get(branch):
                    item["pruned"] = pruned[branch]
                    item["oldest_kept"] = self._oldest_kept(branch)
                out.append(item)
            return out

    def _oldest_kept(self, branch: str) -> str | None:
        """The branch's oldest result still on disk (newest-first order)."""
        for commit in reversed(self._ordered):
            if self._entries[commit].get("branch") == branch:
                return commit
        return None

    def count(self) -> int:
        with self._lock:
            return len(self._entries)

    def pruned_count(self) -> int:
        """Results pruned and still gone (see ``PrunedIndex.per_branch``)."""
        self.refresh()
        with self._lock:
            self._derive()
            return sum(self._pruned.values())

    # ---- whole files, for one commit's page

    def read_output(self, commit: str, limit: int = MAX_OUTPUT_READ,
                    cell: str | None = None) -> tuple[str, bool] | None:
        """The output of a result file (ANSI codes stripped), cut to its
        last ``limit`` bytes; (text, truncated) or None.  ``cell``: that
        matrix cell's file instead of the commit's."""
        name = result_name(commit, cell)
        if name is None:
            return None
        path = os.path.join(self.folder, name)
        try:
            with open(path, "rb") as handle:
                head = handle.read(results.HEADER_READ)
                cut = head.find(b"\n\n")
                if cut < 0:
                    return None
                size = os.fstat(handle.fileno()).st_size
                start = cut + 2
                truncated = size - start > limit
                handle.seek(max(start, size - limit))
                data = handle.read(limit)
        except OSError:
            return None
        return strip_ansi(data.decode("utf-8", "replace")), truncated

    def read_cell(self, commit: str, cell: str) -> dict | None:
        """The header of a matrix cell's own result, None if it has none."""
        name = result_name(commit, cell)
        return results.read_header(os.path.join(self.folder, name)) if name else None

    def read_junit(self, commit: str, cell: str | None = None) -> dict[str, str] | None:
        """``junit_statuses`` of the commit's ``<commit>.xml`` (a cell's:
        ``<commit>.cell.<name>.xml``), or None."""
        name = result_name(commit, cell)
        if name is None:
            return None
        path = os.path.join(self.folder, name + ".xml")
        try:
            with open(path, "rb") as handle:
                # One byte over the cap, so that a larger file is refused.
                data = handle.read(results.MAX_JUNIT_BYTES + 1)
        except OSError:
            return None
        return junit_statuses(data)

    def test_report(self, commit: str, with_source: bool = False,
                    cell: str | None = None) -> list[dict]:
        """Failing and erroring tests of a commit, each with ``new`` set when
        the branch's previous commit had a result in which it did not fail;
        ``with_source``: each also says where its name came from, ``source``
        ``junit`` (the test's id in the test history) or ``output``.

        Names are compared only when both commits' lists come from the same
        source: a JUnit id (``t.T.test_x``) never equals the output's name
        of the same test (``test_x (t.T.test_x)``), so across sources every
        failure would look new; then none is marked.  ``cell``: that
        matrix cell's tests, compared with the same cell's before."""
        source, tests = self._failing(commit, cell)
        if tests is None:
            return []
        item = self.get(commit) or {}
        previous = item.get("previous")
        before = None
        if previous and valid_full_commit(previous) and self.get(previous):
            before_source, before_tests = self._failing(previous, cell)
            if before_source == source:
                before = {t["name"] for t in before_tests or []
                          if t["kind"] in ("failure", "error")}
        for test in tests:
            test["new"] = before is not None and test["name"] not in before \
                and test["kind"] in ("failure", "error")
            if with_source:
                test["source"] = source
        return tests

    def _failing(self, commit: str,
                 cell: str | None = None) -> tuple[str | None, list[dict] | None]:
        """(source, failing tests): source ``junit`` or ``output``, the
        tests None (and source None) when neither can be read."""
        junit = self.read_junit(commit, cell)
        if junit is not None:
            return "junit", [{"name": name, "kind": status} for name, status in junit.items()
                             if status in SHOWN_STATUSES]
        output = self.read_output(commit, cell=cell)
        if output is None:
            return None, None
        return "output", failing_tests(output[0])
