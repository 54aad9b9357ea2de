"""The dispatcher's answer to ``verdicts`` (ci/verdicts.py): where each
asked commit stands.  A commit's result file decides (its header only);
else its pending work (``queued``, or ``running`` once any of it runs);
else a pruned commit's tombstone verdict; else ``unknown``.

``VerdictAnswers`` is a part of ``DispatcherState`` (ci/dispatch/state.py):
the lock is held only for the snapshot of pending work; result headers,
JUnit files and the tombstone file are read without it.
"""

from __future__ import annotations

import collections
import logging
import os
import threading

from ci import results, verdicts
from ci.dispatch.work import WorkState, work_key
from ci.files import read_inside
from ci import junit_xml

log = logging.getLogger(__name__)

# The failing tests of a red result are named only when its JUnit file is
# at most this large (else the reason gives the counts): an answer is
# made on a request thread, for up to 200 commits.
CHEAP_JUNIT_BYTES = 1024 * 1024
# Failing-test lists remembered, by (commit, the file's mtime and size).
CACHED = 512
RUNNING_STATES = (WorkState.RUNNING, WorkState.SHARDED, WorkState.WRITING, WorkState.HELD)


class VerdictAnswers:
    """Mixed into ``DispatcherState``."""

    # Made on first use (``DispatcherState.__init__`` knows nothing of them).
    _failing_cache: collections.OrderedDict | None = None
    _failing_lock: threading.Lock | None = None

    def verdicts(self, commits: list[str]) -> list[tuple[str, str, str]]:
        """``(commit, state, reason)`` for each commit, in order."""
        with self.cond:
            pending = {c: self._pending_state(c) for c in commits}
            pruned = {c for c in commits if work_key(c) in self.pruned}
        rows, stones_wanted = {}, []
        for commit in commits:
            header = results.read_header(os.path.join(self.results_dir, commit))
            if header is not None and header.get("verdict") in results.VERDICTS:
                rows[commit] = (header["verdict"], verdicts.reason_of(
                    header, self.failing_tests(commit, header)))
            elif pending[commit] is not None:
                rows[commit] = (pending[commit], "-")
            elif commit in pruned and self.tombstones is not None:
                stones_wanted.append(commit)
        stones = self.tombstones.find_many(stones_wanted) if stones_wanted else {}
        for commit, stone in stones.items():
            if stone.verdict in results.VERDICTS:
                rows[commit] = (stone.verdict, "result pruned")
        return [(c, *rows.get(c, (verdicts.UNKNOWN, "-"))) for c in commits]

    def _pending_state(self, commit: str) -> str | None:
        works = [w for w in (self.work.get(k) for k in self._keys_of(commit)) if w]
        if not works and commit not in self.groups:
            return None
        running = any(w.state in RUNNING_STATES or w.shards is not None for w in works)
        # A matrix commit with some cells done and none pending is being completed.
        return "running" if running or not works else "queued"

    def failing_tests(self, commit: str, header: dict) -> list[str] | None:
        """The failing, unquarantined tests of a red result, from its JUnit
        file when that is small enough; None otherwise."""
        if header.get("verdict") not in (results.FAILED, results.ERROR, "timeout"):
            return None
        path = results.junit_path(self.results_dir, commit)
        try:
            stat = os.stat(path)
        except OSError:
            return None
        if stat.st_size > CHEAP_JUNIT_BYTES:
            return None
        key = (commit, stat.st_mtime_ns, stat.st_size)
        if self._failing_lock is None:
            with self.cond:
                if self._failing_lock is None:
                    self._failing_lock = threading.Lock()
                    self._failing_cache = collections.OrderedDict()
        with self._failing_lock:
            cache = self._failing_cache
            if cache is not None and key in cache:
                return cache[key]
        try:
            records = junit_xml.parse_junit(read_inside(path, self.results_dir,
                                                        CHEAP_JUNIT_BYTES))
        except (OSError, ValueError, results.JunitError) as exc:
            log.debug("records of %s unreadable: %s", commit[:12], exc)
            return None
        failing = results.deciding_failures(records)
        with self._failing_lock:
            self._failing_cache[key] = failing
            while len(self._failing_cache) > CACHED:
                self._failing_cache.popitem(last=False)
        return failing
