"""``--merge-into PATTERN=TARGET`` rules: which branches may land, and
where.  Pure parsing (the merging part of issue 22 reads the same flag;
at integration one parser serves both)."""

from __future__ import annotations

import fnmatch
from typing import NamedTuple


class MergeRule(NamedTuple):
    pattern: str   # a glob over branch names
    target: str    # a branch name


def valid_branch_name(name: str) -> bool:
    """Kept to what a ref name can be (git decides the rest): printable,
    no space, no ``:``, ``..``, leading ``-`` or wildcard."""
    return (0 < len(name) <= 255 and name.isprintable() and not any(
        c in name for c in " :~^?*[\\") and ".." not in name and not name.startswith(("-", "/"))
        and not name.endswith(("/", ".lock", ".")))


def parse_rule(text: str) -> MergeRule:
    """``PATTERN=TARGET``; ValueError with the reason."""
    pattern, sep, target = text.partition("=")
    if not sep or not pattern or not target:
        raise ValueError(f"invalid --merge-into {text!r}: expected PATTERN=TARGET")
    if " " in pattern or not pattern.isprintable() or pattern.startswith("-"):
        raise ValueError(f"invalid --merge-into pattern {pattern!r}")
    if not valid_branch_name(target):
        raise ValueError(f"invalid --merge-into target {target!r}")
    if fnmatch.fnmatchcase(target, pattern):
        raise ValueError(f"--merge-into {text!r}: the target matches its own pattern")
    return MergeRule(pattern, target)


def target_for(rules: list[MergeRule], branch: str) -> str | None:
    """The first matching rule's target, or None (landing not allowed)."""
    for rule in rules:
        if fnmatch.fnmatchcase(branch, rule.pattern):
            return rule.target
    return None
