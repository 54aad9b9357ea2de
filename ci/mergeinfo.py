"""What a dispatch line says of a merge commit, and how a conflict is
told: pure encoding and parsing shared by the observer (which makes the
merges) and the dispatcher (which queues them and writes their headers).

A commit tested "as merged" is the merge of a branch's own commit (the
head) into its target branch at some commit; its dispatch line carries
``merge=<head>:<target-commit>:<target-branch>`` (``:`` cannot occur in a
ref name, so the split is unambiguous).  When the merge could not be
made, the line names the conflict's own id (``conflict_id``) and adds
``conflict=<paths>``: the dispatcher writes the ``conflict`` verdict
without a run.  Not the head's id: a verdict filed under it would stand
for the head itself, which a plainly tested branch may still reach (and
which is then tested as itself), and a head already tested would swallow
the conflict.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import urllib.parse
from typing import NamedTuple

from ci.wire import valid_full_commit

MERGE_FIELD = "merge="
CONFLICT_FIELD = "conflict="
# A target branch as a dispatch line may name it (git's own rules are
# stricter; this only keeps the line and the header parseable).
TARGET_RE = re.compile(r"[^\s:\x00-\x1f\x7f~^?*\[\\]{1,255}")
# Conflicting paths kept per verdict (a huge conflict names the first ones).
MAX_PATHS = 200
MAX_PATH_CHARS = 4096


class MergeInfo(NamedTuple):
    head: str            # the branch's own commit
    target_commit: str   # the target branch's head it was merged into
    target_branch: str

    def describe(self) -> str:
        """How a page or a log says it: "merged with main at 0123abcd4567"."""
        return f"merged with {self.target_branch} at {self.target_commit[:12]}"


def conflict_id(info: MergeInfo) -> str:
    """The id a conflict's verdict is filed under: a digest of what could
    not be merged, as long as the head's id (a full commit id to every
    consumer) and no commit's.  The same head and target commit give the
    same id, so a conflict dispatched again is not judged twice."""
    digest = hashlib.sha1 if len(info.head) == 40 else hashlib.sha256
    text = f"ci conflict\0{info.head}\0{info.target_commit}\0{info.target_branch}"
    return digest(text.encode("utf-8", "surrogateescape")).hexdigest()


def encode_merge_field(info: MergeInfo) -> str:
    if not (valid_full_commit(info.head) and valid_full_commit(info.target_commit)
            and TARGET_RE.fullmatch(info.target_branch)):
        raise ValueError(f"not a valid merge description: {info!r}")
    return f"{MERGE_FIELD}{info.head}:{info.target_commit}:{info.target_branch}"


def parse_merge_field(field: str) -> MergeInfo | None:
    """The inverse of ``encode_merge_field``; None if it does not parse."""
    if not field.startswith(MERGE_FIELD):
        return None
    parts = field[len(MERGE_FIELD):].split(":")
    if len(parts) != 3:
        return None
    head, target_commit, target_branch = parts
    if not (valid_full_commit(head) and valid_full_commit(target_commit)
            and TARGET_RE.fullmatch(target_branch)):
        return None
    return MergeInfo(head, target_commit, target_branch)


def clean_paths(paths) -> tuple[str, ...]:
    """Conflicting paths as a verdict keeps them: printable, bounded."""
    kept = []
    for path in paths:
        if isinstance(path, str) and path and path.isprintable() \
                and len(path) <= MAX_PATH_CHARS:
            kept.append(path)
        if len(kept) >= MAX_PATHS:
            break
    return tuple(kept)


def encode_conflicts(paths) -> str:
    """``conflict=<base64url of the paths joined by newlines>``."""
    data = "\n".join(clean_paths(paths)).encode("utf-8", "surrogateescape")
    return CONFLICT_FIELD + base64.urlsafe_b64encode(data).decode().rstrip("=")


def parse_conflicts(field: str) -> tuple[str, ...] | None:
    """The inverse of ``encode_conflicts``; None if it does not parse."""
    if not field.startswith(CONFLICT_FIELD):
        return None
    raw = field[len(CONFLICT_FIELD):]
    try:
        data = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        text = data.decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    return clean_paths(text.split("\n")) if text else ()


def format_paths(paths) -> str:
    """The header's ``conflicts`` value: each path %-quoted, space-separated."""
    return " ".join(urllib.parse.quote(p, safe="/") for p in clean_paths(paths))


def parse_paths(value: str) -> tuple[str, ...]:
    return clean_paths(urllib.parse.unquote(p) for p in value.split())


def format_merged_into(info: MergeInfo) -> str:
    """The header's ``merged_into`` value: ``<target-branch> <target-commit>``."""
    return f"{info.target_branch} {info.target_commit}"


def parse_merged_into(value: str) -> tuple[str, str] | None:
    branch, _, commit = value.partition(" ")
    if not (TARGET_RE.fullmatch(branch) and valid_full_commit(commit)):
        return None
    return branch, commit


# A result header's value is one line of at most this many characters
# (ci/wire.encode_fields): the ``conflicts`` field names as many whole
# paths as fit; the output names them all.
HEADER_VALUE_LIMIT = 1000


def format_paths_within(paths, limit: int = HEADER_VALUE_LIMIT) -> str:
    """``format_paths`` of the longest prefix of ``paths`` that fits in
    ``limit`` characters (never a path cut in two)."""
    kept, size = [], 0
    for quoted in format_paths(paths).split():
        size += len(quoted) + (1 if kept else 0)
        if size > limit:
            break
        kept.append(quoted)
    return " ".join(kept)


def parse_extra_fields(fields) -> tuple[MergeInfo | None, tuple[str, ...] | None]:
    """(merge info, conflicting paths) of a dispatch line's (or a journal
    ``M`` record's) ``key=value`` fields after the positional ones, in any
    order; unknown keys are skipped (forward compatible), the first of a
    repeated key counts.  A malformed ``merge=`` is no merge info; a
    ``conflict=`` counts only beside a merge (without one it is ignored),
    and one whose paths do not decode is still a conflict, naming none:
    the commit it names is the branch head, never the merge, so it must
    not be run as if it were."""
    merge = conflicts = None
    seen = set()
    for field in fields:
        key = field.partition("=")[0]
        if key in seen:
            continue
        seen.add(key)
        if field.startswith(MERGE_FIELD):
            merge = parse_merge_field(field)
        elif field.startswith(CONFLICT_FIELD):
            conflicts = parse_conflicts(field)
            if conflicts is None:
                conflicts = ()
    if merge is None:
        return None, None
    return merge, conflicts
