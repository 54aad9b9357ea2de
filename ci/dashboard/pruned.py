"""What the dashboard knows of pruned results, and how it shows them: the
dispatcher's tombstone file (``pruned-results`` in its state folder,
ci/retention/tombstones.py), read-only and re-read only when it changed
(it is appended to; a trim rewrites it, which changes its inode).

A pruned commit's page says it was tested and its result pruned, rather
than "no result"; the branch cards and ``/api/status`` say how many of a
branch's results were pruned; the broke/fixed marks of the commits after
a pruned one are still judged against its verdict (``verdicts``).
"""

from __future__ import annotations

import logging
import os
import threading

from ci.dashboard import pages
from ci.retention import tombstones
from ci.retention.tombstones import Tombstone

log = logging.getLogger(__name__)


class PrunedIndex:
    """Tombstones by commit; one lock guards every attribute."""

    def __init__(self, path: str | None):
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._offset = 0
        self._found: dict[str, Tombstone] = {}
        self._per_branch: dict[str, int] = {}
        # branch -> the commits its pruned results name as ``previous``.
        self._named: dict[str, set[str]] = {}
        self.version = 0

    def refresh(self) -> bool:
        """Read what was appended since; True when anything changed."""
        if not self.path:
            return False
        with self._lock:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            except OSError as exc:
                log.warning("cannot read %s: %s", self.path, exc)
                return False
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns) if st else None
            if stamp == self._stamp:
                return False
            if st is None or self._stamp is None or st.st_ino != self._stamp[0] \
                    or st.st_size < self._offset:
                self._found, self._per_branch, self._named, self._offset = {}, {}, {}, 0
            self._stamp = stamp
            if st is not None:
                self._read_from(self._offset)
            self.version += 1
            return True

    def _read_from(self, offset: int) -> None:
        with open(self.path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
        complete, newline, _torn = data.rpartition(b"\n")
        # A torn last line is read again, whole, next time.
        self._offset = offset + len(complete) + len(newline)
        for commit, found in tombstones.parse_lines(complete + newline).items():
            if commit not in self._found:
                key = found.branch or ""
                self._per_branch[key] = self._per_branch.get(key, 0) + 1
            if found.branch and found.previous:
                self._named.setdefault(found.branch, set()).add(found.previous)
            self._found[commit] = found

    def get(self, commit: str) -> Tombstone | None:
        self.refresh()
        with self._lock:
            return self._found.get(commit)

    def fields_of(self, commit: str) -> dict | None:
        """The header fields a mark needs of a pruned commit (no refresh:
        called while the result index derives its marks)."""
        with self._lock:
            found = self._found.get(commit)
        return None if found is None else {"verdict": found.verdict,
                                           "branch": found.branch or ""}

    def named(self) -> dict[str, set[str]]:
        """branch -> the commits its pruned results name as ``previous``
        (no refresh, as ``fields_of``; read, never changed, by the caller)."""
        with self._lock:
            return self._named

    def per_branch(self, present=()) -> dict[str, int]:
        """branch ('' for none) -> how many of its results were pruned and
        are gone still: ``present`` (the commits with a result file now)
        are not counted, since a retest of a pruned commit, or a pass that
        a retest stopped after its tombstones, leaves a file beside a
        tombstone, and the file is the truth."""
        with self._lock:
            counts = dict(self._per_branch)
            for commit in self._found.keys() & present:
                key = self._found[commit].branch or ""
                counts[key] -= 1
                if not counts[key]:
                    del counts[key]
            return counts


# --------------------------------------------------------------------------
# How a pruned commit is shown.

def api_item(tombstone) -> dict:
    """A pruned commit as the API shows it: tested, its result pruned."""
    return {"commit": tombstone.commit, "status": "pruned", "verdict": tombstone.verdict,
            "branch": tombstone.branch, "previous": tombstone.previous,
            "finished": pages.stamp(tombstone.finished), "pruned": pages.stamp(tombstone.pruned),
            "url": f"/commit/{tombstone.commit}"}


def page_sections(tombstone) -> dict:
    """A pruned commit's page: its verdict, and that its files are gone."""
    item = {"commit": tombstone.commit, "verdict": tombstone.verdict,
            "branch": tombstone.branch, "previous": tombstone.previous}
    status = (f"finished {pages.when(tombstone.finished)} UTC; result pruned "
              f"{pages.when(tombstone.pruned)} UTC")
    return {"sec-summary": pages.fields_section(item, status),
            "sec-tests": pages.Safe(""),
            "sec-output": pages.render(
                '<p class="empty">This commit was tested; its result file, test records '
                'and output were pruned by the dispatcher\'s --keep-results.</p>')}
