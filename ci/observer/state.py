"""The observer's memory: the last commit dispatched per branch, kept in a
JSON file written atomically and advanced only after the dispatcher
accepted the batch, so a crash dispatches a commit twice (the dispatcher
ignores it) but never skips one."""

from __future__ import annotations

import json
import logging
import threading
from ci.config import ConfigError
from ci.files import atomic_write
from ci.wire import valid_full_commit
from ci.observer.commits import RECENT_LIMIT

log = logging.getLogger(__name__)


class ObserverState:
    """Per branch, the last commit handled and the commit to name as the
    previous one; and the recently dispatched commits (to tell whether a
    new branch's fork point was tested).  Persisted atomically."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self.last: dict[str, str] = {}
        self.previous: dict[str, str] = {}
        self.recent: dict[str, None] = {}  # insertion-ordered, bounded
        # Merges published under refs/ci/merges/ (--merge-into): the newest
        # of each branch, and those waiting to be deleted upstream.
        self.published: dict[str, list[str]] = {}
        self.retired: list[str] = []
        self.initialized = False
        try:
            with open(path, "rb") as handle:
                data = json.loads(handle.read() or b"{}")
            self.last = {b: c for b, c in data.get("last_dispatched", {}).items()
                         if isinstance(b, str) and valid_full_commit(c)}
            # A state file from before "previous" was kept: the last
            # dispatched commit is the previous one.
            previous = data.get("previous", self.last)
            self.previous = {b: c for b, c in previous.items()
                             if b in self.last and valid_full_commit(c)}
            recent = [c for c in data.get("recent", []) if isinstance(c, str)]
            self.recent = dict.fromkeys(recent[-RECENT_LIMIT:] + list(self.previous.values()))
            self.published = {b: [c for c in cs if valid_full_commit(c)]
                              for b, cs in data.get("published", {}).items()
                              if isinstance(b, str) and isinstance(cs, list)}
            self.retired = [c for c in data.get("retired", []) if valid_full_commit(c)]
            self.initialized = True
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            raise ConfigError(f"cannot read observer state {path}: {exc}") from None

    def get(self, branch: str) -> str | None:
        with self._lock:
            return self.last.get(branch)

    def previous_of(self, branch: str) -> str | None:
        with self._lock:
            return self.previous.get(branch)

    def branches(self) -> list[str]:
        with self._lock:
            return sorted(self.last)

    def was_dispatched(self, commit: str) -> bool:
        with self._lock:
            return commit in self.recent

    def set(self, branch: str, commit: str, dispatched: list[str] = (),
            previous: str | None = None) -> None:
        """``commit`` handled on ``branch`` after dispatching ``dispatched``;
        ``previous`` is what the branch's next commit will name (default:
        ``commit``, which was dispatched)."""
        with self._lock:
            self.last[branch] = commit
            previous = commit if previous is None and dispatched else previous
            if previous:
                self.previous[branch] = previous
            else:
                self.previous.pop(branch, None)
            for done in dispatched:
                self.recent.pop(done, None)
                self.recent[done] = None
            while len(self.recent) > RECENT_LIMIT:
                del self.recent[next(iter(self.recent))]
            self._save()

    def forget(self, branch: str) -> None:
        with self._lock:
            self.last.pop(branch, None)
            self.previous.pop(branch, None)
            self.retired.extend(self.published.pop(branch, []))
            self._save()

    def add_published(self, branch: str, commit: str, keep: int) -> None:
        """``commit`` is published for ``branch``; the branch's merges
        beyond the newest ``keep`` are to be unpublished."""
        with self._lock:
            mine = [c for c in self.published.get(branch, []) if c != commit] + [commit]
            self.retired.extend(mine[:-keep])
            self.published[branch] = mine[-keep:]
            self._save()

    def published_of(self, branch: str) -> list[str]:
        with self._lock:
            return list(self.published.get(branch, []))

    def owners(self) -> list[str]:
        """Who has merges published: branches, and the land queue's entries."""
        with self._lock:
            return sorted(self.published)

    def retired_batch(self, limit: int) -> list[str]:
        with self._lock:
            return self.retired[:limit]

    def drop_retired(self, commits: list[str]) -> None:
        with self._lock:
            done = set(commits)
            self.retired = [c for c in self.retired if c not in done]
            self._save()

    def mark_initialized(self) -> None:
        with self._lock:
            if not self.initialized:
                self.initialized = True
                self._save()

    def _save(self) -> None:
        """Caller holds the lock."""
        data = json.dumps({"last_dispatched": self.last, "previous": self.previous,
                           "recent": list(self.recent), "published": self.published,
                           "retired": self.retired}, indent=1, sort_keys=True)
        atomic_write(self.path, data.encode())
