"""The land queue's snapshot, defined once:
the observer owns the queue and sends the dispatcher this JSON after every
change (``queue-state``); the dispatcher keeps it and serves it (``queue``)
to the dashboard, which reads it back through the same check.

    {"updated": <unix time>,
     "targets": {"main": {"head": "<commit>", "depth": 4}},
     "entries": [{"id", "branch", "target", "head", "state", "tested", "base",
                  "position", "reason", "asked", "by", "updated"}],
     "recent":  [same shape: the last landed/rejected/cancelled entries, newest first]}

Pure.  ``check_snapshot`` is strict about everything it knows (types,
states, full commit ids, bounded printable strings, unique ids): one bad
value refuses the whole snapshot, so a half-understood queue is never
kept or shown.  Keys it does not know are dropped rather than refused, so
an observer that sends more (a later version) is still understood; what
is kept and served is only what was checked.
"""

from __future__ import annotations

import json
import math

from ci import wire
# A branch name as the dispatcher's journal takes one: no whitespace or
# control characters (the dashboard escapes whatever else it holds).
from ci.dispatch.journal import BRANCH_RE

# Entry states, in the order an entry goes through them.
WAITING, MERGING, TESTING, PASSED, FAILING, BLOCKED, LANDING = (
    "waiting", "merging", "testing", "passed", "failing", "blocked", "landing")
LANDED, REJECTED, CANCELLED = "landed", "rejected", "cancelled"
LIVE_STATES = (WAITING, MERGING, TESTING, PASSED, FAILING, BLOCKED, LANDING)
FINAL_STATES = (LANDED, REJECTED, CANCELLED)
STATES = LIVE_STATES + FINAL_STATES

MAX_BYTES = 256 * 1024
MAX_TARGETS = 100
MAX_ENTRIES = 1000
MAX_RECENT = 50
MAX_DEPTH = 1000
MAX_REASON = 1000
MAX_BY = 200
# Unix times from 1970 to the year 5138: anything else is a bug upstream.
MAX_TIME = 1e11
MAX_ID = 2 ** 53

ENTRY_KEYS = ("id", "branch", "target", "head", "state", "tested", "base", "position",
              "reason", "asked", "by", "updated")


class SnapshotError(ValueError):
    """A snapshot that is not what docs/protocol.md says, with the first reason."""


def empty() -> dict:
    """What is served before the observer has told anything: ``updated``
    is null (a real snapshot always has a time)."""
    return {"updated": None, "targets": {}, "entries": [], "recent": []}


def parse_snapshot(data: bytes) -> dict:
    """The snapshot in ``data`` (UTF-8 JSON), checked; SnapshotError if not."""
    if not isinstance(data, (bytes, bytearray)):
        raise SnapshotError("the snapshot must be bytes")
    if len(data) > MAX_BYTES:
        raise SnapshotError(f"snapshot too large: {len(data)} bytes, at most {MAX_BYTES}")
    try:
        value = json.loads(bytes(data).decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise SnapshotError(f"not UTF-8 JSON: {wire.one_line(str(exc), 120)}") from None
    except RecursionError:      # json recurses: "[" * 100000 went past its depth
        raise SnapshotError("not UTF-8 JSON: nested too deep") from None
    return check_snapshot(value)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number")


def check_snapshot(value) -> dict:
    """The checked snapshot (known keys only, in a fixed shape)."""
    if not isinstance(value, dict):
        raise SnapshotError("the snapshot must be a JSON object")
    for key in ("updated", "targets", "entries", "recent"):
        if key not in value:
            raise SnapshotError(f"missing key {key!r}")
    targets = value["targets"]
    if not isinstance(targets, dict):
        raise SnapshotError("targets must be an object")
    if len(targets) > MAX_TARGETS:
        raise SnapshotError(f"more than {MAX_TARGETS} targets")
    checked_targets = {_branch(name, "a target's name"): _target(name, item)
                       for name, item in targets.items()}
    entries = _list(value["entries"], "entries", MAX_ENTRIES)
    recent = _list(value["recent"], "recent", MAX_RECENT)
    snapshot = {
        "updated": _time(value["updated"], "updated"),
        "targets": checked_targets,
        "entries": [check_entry(e, f"entries[{i}]") for i, e in enumerate(entries)],
        "recent": [check_entry(e, f"recent[{i}]", FINAL_STATES) for i, e in enumerate(recent)],
    }
    seen: set[int] = set()
    for entry in snapshot["entries"]:
        if entry["id"] in seen:
            raise SnapshotError(f"entry id {entry['id']} appears twice")
        seen.add(entry["id"])
    return snapshot


def check_entry(entry, where: str, states: tuple = STATES) -> dict:
    """One queue entry, checked: every key docs/protocol.md names, right types."""
    if not isinstance(entry, dict):
        raise SnapshotError(f"{where}: an entry must be an object")
    for key in ENTRY_KEYS:
        if key not in entry:
            raise SnapshotError(f"{where}: missing key {key!r}")
    state = entry["state"]
    if state not in states:
        raise SnapshotError(f"{where}: state {wire.one_line(str(state), 40)!r} is not one "
                            f"of {', '.join(states)}")
    position = entry["position"]
    if position is not None:
        position = _whole(position, f"{where}.position", MAX_ENTRIES + MAX_RECENT)
    return {
        "id": _whole(entry["id"], f"{where}.id", MAX_ID),
        "branch": _branch(entry["branch"], f"{where}.branch"),
        "target": _branch(entry["target"], f"{where}.target"),
        "head": _commit(entry["head"], f"{where}.head"),
        "state": state,
        "tested": _commit(entry["tested"], f"{where}.tested", optional=True),
        "base": _commit(entry["base"], f"{where}.base", optional=True),
        "position": position,
        "reason": _text(entry["reason"], f"{where}.reason", MAX_REASON),
        "asked": _time(entry["asked"], f"{where}.asked"),
        "by": _text(entry["by"], f"{where}.by", MAX_BY),
        "updated": _time(entry["updated"], f"{where}.updated"),
    }


def _target(name: str, item) -> dict:
    where = f"targets[{wire.one_line(str(name), 60)!r}]"
    if not isinstance(item, dict) or "head" not in item or "depth" not in item:
        raise SnapshotError(f"{where}: must be an object with head and depth")
    return {"head": _commit(item["head"], f"{where}.head"),
            "depth": _whole(item["depth"], f"{where}.depth", MAX_DEPTH)}


def _list(value, where: str, limit: int) -> list:
    if not isinstance(value, list):
        raise SnapshotError(f"{where} must be a list")
    if len(value) > limit:
        raise SnapshotError(f"{where}: more than {limit}")
    return value


def _whole(value, where: str, limit: int) -> int:
    # bool is an int to Python, never to the snapshot's reader.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise SnapshotError(f"{where} must be a whole number from 0 to {limit}")
    return value


def _time(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not 0 <= value < MAX_TIME:
        raise SnapshotError(f"{where} must be a unix time")
    return value


def _commit(value, where: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not wire.valid_full_commit(value):
        raise SnapshotError(f"{where} must be a full commit id" +
                            (" or null" if optional else ""))
    return value


def _branch(value, where: str) -> str:
    if not isinstance(value, str) or not BRANCH_RE.fullmatch(value):
        raise SnapshotError(f"{where} must be a branch name (1 to 255 characters, no "
                            "spaces or control characters)")
    return value


def _text(value, where: str, limit: int) -> str:
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise SnapshotError(f"{where} must be printable text of at most {limit} characters")
    return value


def encode(snapshot: dict) -> bytes:
    """The snapshot as stored and served: compact UTF-8 JSON."""
    return json.dumps(snapshot, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
