"""``--merge-into PATTERN=TARGET``: which branches are tested as merged
into which target.  Pure parsing and matching.

PATTERN is a glob over branch names (``fnmatch``, as ``--branch``),
TARGET a branch name.  A branch matching several patterns takes the
first rule's target; a branch is never merged into itself (with
``'*=main'``, main is tested as it is)."""

from __future__ import annotations

import fnmatch
from typing import NamedTuple

from ci.mergeinfo import TARGET_RE


class MergeRule(NamedTuple):
    pattern: str
    target: str


def valid_branch_name(name: str) -> bool:
    """What git's check-ref-format accepts for a branch (and the dispatch
    line can carry): no glob characters, no ``..``, ``@{``, ``//``, no
    component starting with ``.`` or ending with ``.lock``."""
    if not TARGET_RE.fullmatch(name) or name.startswith(("-", "/")) or name.endswith(("/", ".")):
        return False
    if ".." in name or "@{" in name or "//" in name or name == "@" or " " in name:
        return False
    return all(part and not part.startswith(".") and not part.endswith(".lock")
               for part in name.split("/"))


def valid_pattern(pattern: str) -> bool:
    return (0 < len(pattern) <= 255 and pattern.isprintable() and " " not in pattern
            and "=" not in pattern and not pattern.startswith("-"))


def parse_rule(text: str) -> MergeRule:
    """``PATTERN=TARGET``; ValueError with the reason."""
    pattern, sep, target = text.partition("=")
    if not sep:
        raise ValueError(f"--merge-into {text!r}: expected PATTERN=TARGET, "
                         "e.g. 'feature/*=main'")
    if not valid_pattern(pattern):
        raise ValueError(f"--merge-into {text!r}: invalid branch pattern {pattern!r}")
    if not valid_branch_name(target):
        raise ValueError(f"--merge-into {text!r}: invalid target branch {target!r} "
                         "(a branch name, not a pattern)")
    return MergeRule(pattern, target)


def check_rules(rules: list[MergeRule]) -> None:
    """One target per pattern: the same pattern given twice with two
    targets is a mistake, not a choice."""
    seen: dict[str, str] = {}
    for rule in rules:
        if seen.setdefault(rule.pattern, rule.target) != rule.target:
            raise ValueError(f"--merge-into: {rule.pattern!r} has two targets, "
                             f"{seen[rule.pattern]!r} and {rule.target!r}")


def target_of(rules: list[MergeRule], branch: str) -> str | None:
    """The target ``branch`` is merged into, None if it is tested as it is."""
    rule = rule_of(rules, branch)
    return rule.target if rule else None


def rule_of(rules: list[MergeRule], branch: str) -> MergeRule | None:
    """The first rule ``branch`` matches (the land queue's "is this branch
    allowed, and into what"); None if none, or if it names the branch itself."""
    for rule in rules:
        if fnmatch.fnmatchcase(branch, rule.pattern):
            return rule if rule.target != branch else None
    return None


