"""The ``verdicts`` command: the observer's
land queue asks the dispatcher where each of its commits stands.

Request: ``verdicts:<commit> <commit> ...`` (1 to ``MAX_COMMITS`` full
ids).  Reply ``ok`` with one line per asked commit, in the order asked::

    <commit> <state> <reason>

``<state>``: a result verdict (``passed failed error timeout conflict``;
a pruned commit reports its tombstone's), or ``queued``, ``running``, or
``unknown`` (never dispatched, or pruned without a tombstone).
``<reason>``: one line of at most ``MAX_REASON`` characters, ``-`` when
there is nothing to say: the first failing tests, the failure counts,
the verdict's reason, or a conflict's paths.

Pure: the dispatcher formats (``format_reply``, ``reason_of``), the
observer parses (``parse_reply``); nothing here touches a socket.
"""

from __future__ import annotations

from ci import mergeinfo, results
from ci.wire import one_line, valid_full_commit

MAX_COMMITS = 200
MAX_REASON = 300
PENDING_STATES = ("queued", "running")
UNKNOWN = "unknown"
STATES = (*results.VERDICTS, *PENDING_STATES, UNKNOWN)
# Failing tests a reason names, at most.
MAX_NAMED = 5


class VerdictsError(ValueError):
    """A request or reply that is not well formed; the text says why."""


def format_request(commits) -> str:
    """The command's argument; VerdictsError for a bad list."""
    commits = list(commits)
    check_commits(commits)
    return " ".join(commits)


def parse_request(argument: str) -> list[str]:
    """The commits a ``verdicts`` argument asks about (repeats kept once,
    in order); VerdictsError naming what is wrong."""
    commits = argument.split()
    check_commits(commits)
    return list(dict.fromkeys(commits))


def check_commits(commits: list[str]) -> None:
    if not commits or len(commits) > MAX_COMMITS:
        raise VerdictsError(f"usage: verdicts:<commit> [<commit> ...] (1 to {MAX_COMMITS} "
                            "full ids)")
    bad = next((c for c in commits if not valid_full_commit(c)), None)
    if bad is not None:
        raise VerdictsError(f"invalid commit id {bad[:80]!r}: need a full 40- or 64-hex id")


def clean_reason(reason: str | None) -> str:
    """One line, at most MAX_REASON characters, ``-`` when empty."""
    text = one_line(reason or "", MAX_REASON).strip()
    return text or "-"


def format_line(commit: str, state: str, reason: str | None = None) -> str:
    if state not in STATES:
        raise VerdictsError(f"not a state: {state!r}")
    return f"{commit} {state} {clean_reason(reason)}"


def format_reply(rows) -> bytes:
    """The reply body of ``(commit, state, reason)`` rows."""
    return "".join(format_line(*row) + "\n" for row in rows).encode("utf-8")


def parse_reply(body: bytes) -> dict[str, tuple[str, str]]:
    """commit -> (state, reason) of a reply body; a line that does not
    parse (an unknown state: a newer dispatcher) is skipped, so the
    commit reads as not answered."""
    found = {}
    for line in body.decode("utf-8", "replace").split("\n"):
        commit, _, rest = line.partition(" ")
        state, _, reason = rest.partition(" ")
        if valid_full_commit(commit) and state in STATES:
            found[commit] = (state, reason.strip() or "-")
    return found


def reason_of(header: dict, failing: list[str] | None = None) -> str:
    """The reason of a finished commit from its result header and, for a
    red one, the ids of its failing tests (None: not read)."""
    verdict = header.get("verdict")
    if verdict == results.CONFLICT:
        paths = mergeinfo.parse_paths(header.get("conflicts", ""))
        return clean_reason(" ".join(paths) if paths else header.get("reason"))
    if verdict == results.PASSED:
        return "-"
    failures, errors = _int(header.get("failures")), _int(header.get("errors"))
    counts = ", ".join(part for part in (
        f"{failures} failures" if failures else "", f"{errors} errors" if errors else "")
        if part)
    if failing:
        named = ", ".join(failing[:MAX_NAMED])
        more = len(failing) - MAX_NAMED
        return clean_reason(f"{counts or f'{len(failing)} failures'}: {named}"
                            + (f" and {more} more" if more > 0 else ""))
    if verdict == results.FAILED and counts:
        return clean_reason(counts + (f": {header['reason']}" if header.get("reason") else ""))
    return clean_reason(header.get("reason") or counts)


def _int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
