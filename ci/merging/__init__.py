"""Merged results: the observer's merges of a branch into its target, and
its pushes (publishing them under ``refs/ci/merges/``, landing a tested
merge on the target with a lease).

The observer is the only daemon with push rights, and it makes every
merge in a private bare repository of its own (``merge.git`` in its state
folder) whose git cannot be steered by what a commit holds: no hooks, no
attributes, no configuration but its own (see ``isolation``).

- ``isolation``: that repository's making and the environment of its git.
- ``gitproc``: running one of its git processes, bounded in time, its
  group killed on timeout or stop, credentials redacted from any error.
- ``url``: the push URL (flag, file, or the clone's origin) and redaction.
- ``merge``: ``merge(target, head) -> Merged | Conflict``.
- ``push``: ``publish``, ``unpublish``, ``land -> Landed | Stale | Failed``.
- ``rules``: ``--merge-into PATTERN=TARGET``.
- ``repo``: ``MergeRepo``, the one object the observer holds.
"""

from ci.merging.merge import Conflict, Merged
from ci.merging.push import Failed, Landed, Stale
from ci.merging.repo import MergeRepo
from ci.merging.rules import MergeRule, parse_rule

__all__ = ["Conflict", "Failed", "Landed", "Merged", "MergeRepo", "MergeRule", "Stale",
           "parse_rule"]
