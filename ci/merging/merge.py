"""Making one merge: ``git merge-tree --write-tree`` (git >= 2.38) writes
the merged tree without an index or a work tree, and ``git commit-tree``
makes the commit with exactly the two parents (target first, so the
target's first-parent line stays the target's) and a fixed identity.

Pure parsing (``parse_merge_tree``, ``parse_identity``) is kept apart
from the two git calls, which ``MergeRepo.merge`` makes."""

from __future__ import annotations

import dataclasses
import re

from ci.wire import valid_full_commit


@dataclasses.dataclass(frozen=True)
class Merged:
    commit: str      # the merge commit: parents (target commit, head)
    tree: str


@dataclasses.dataclass(frozen=True)
class Conflict:
    paths: tuple[str, ...]   # the conflicting files, each once, in git's order
    reason: str = ""         # when no path says it (unrelated histories)

    def describe(self) -> str:
        if self.reason:
            return self.reason
        shown = ", ".join(self.paths[:5])
        more = f" and {len(self.paths) - 5} more" if len(self.paths) > 5 else ""
        return f"conflict in {shown}{more}"


DEFAULT_IDENTITY = "CI merge queue <ci@localhost>"
IDENTITY_RE = re.compile(r"([^<>\n\x00]*?)\s*<([^<>\s\x00]+)>")


def parse_identity(text: str) -> tuple[str, str]:
    """``Name <email>`` -> (name, email); ValueError with the reason."""
    match = IDENTITY_RE.fullmatch(text.strip())
    if not match or not match.group(1).strip() or not text.isprintable():
        raise ValueError(f"--merge-identity {text!r}: expected 'Name <email>'")
    return match.group(1).strip(), match.group(2)


def parse_merge_tree(code: int, stdout: bytes) -> tuple[str, tuple[str, ...]]:
    """(tree, conflicting paths) of ``git merge-tree --write-tree
    --name-only --no-messages -z`` exiting ``code`` (0: clean, 1: conflicts):
    the tree id, then each conflicting path (NUL-terminated, a path with
    several conflicting stages listed once).  ValueError if it is not that."""
    if code not in (0, 1):
        raise ValueError(f"merge-tree exited {code}")
    fields = stdout.split(b"\0")
    if fields and fields[-1] == b"":
        fields.pop()
    if not fields:
        raise ValueError("merge-tree printed no tree")
    tree = fields[0].decode("ascii", "replace").strip()
    if not valid_full_commit(tree):   # the same shape: 40 or 64 hex digits
        raise ValueError(f"merge-tree printed {tree[:80]!r}, not a tree id")
    paths = tuple(dict.fromkeys(f.decode("utf-8", "surrogateescape") for f in fields[1:] if f))
    if code == 1 and not paths:
        raise ValueError("merge-tree reported a conflict but named no file")
    if code == 0 and paths:
        raise ValueError("merge-tree reported a clean merge but named files")
    return tree, paths


def merge_message(branch: str, target_branch: str) -> str:
    return f"Merge {branch} into {target_branch}"


def unrelated(stderr: str) -> bool:
    return "unrelated histories" in stderr
