"""The dispatcher's ``state`` reply, defined once: ``DispatcherState.describe``
builds it from these records and the dashboard reads it back through them,
so the two sides cannot drift apart (the dashboard once read a ``job`` field
that was never sent and dropped the ``shard`` that was).

The JSON's keys are only ever added to, never renamed: a dashboard may talk
to an older dispatcher, so reading is lenient about what is missing (a key
an older dispatcher did not send takes its default) and strict about what
is there (each value checked, flattened to one line and capped, since it is
shown to people; a record without a usable commit is left out; keys it does
not know are ignored).

    {"queue":   [{"commit", "branch", "position", "cell", "waiting"}],
     "running": [{"commit", "branch", "runner", "elapsed", "shard", "cell", "failing"}],
     "held":    [{"commit", "branch", "runner", "cell"}],
     "runners": [{"name", "address", "state", "commit", "labels", "exclusive"}],
     "counts":  {name: value}}

``cell`` is a matrix cell's name (ci/matrix.py), absent or "" for a
commit without a matrix; ``waiting`` says why a queued cell has no runner
("waiting for a runner with python3.9"), absent while one could take it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, ClassVar

from ci import wire

# A runner's states, as ``dispatch_state`` sets them (see its docstring).
IDLE, RUNNING, OCCUPIED, SUSPECT = "idle", "running", "occupied", "suspect"
RUNNER_STATES = (IDLE, RUNNING, OCCUPIED, SUSPECT)

# The name a runner may give itself (``test_runner.py --name``).
RUNNER_NAME_RE = re.compile(wire.NAME_PATTERN)
# At most this many records of a kind are read from one reply.
MAX_RECORDS = 1000
MAX_COUNTS = 32
# A runner's labels (``register`` field ``labels``): as ci/matrix.py has them.
LABEL_RE = RUNNER_NAME_RE
MAX_LABELS = 64


def check_runner_name(name: str) -> str:
    """``name`` if a runner may call itself that, else ValueError saying
    what is allowed (it is shown on the dashboard and in logs)."""
    if not isinstance(name, str) or not RUNNER_NAME_RE.fullmatch(name):
        raise ValueError(f"invalid runner name {wire.one_line(str(name), 80)!r}: 1 to 64 "
                         "letters, digits, '.', '_' or '-'")
    return name


# ---- readers: a JSON value to what a record holds, or None ---------------

def _text(limit: int) -> Callable[[Any], str | None]:
    def read(value) -> str | None:
        return None if value is None else wire.one_line(str(value), limit)
    return read


def _commit(value) -> str | None:
    return value if wire.valid_full_commit(value) else None


def _number(value) -> float | None:
    """A finite float or None: a NaN or infinite time means nothing on a
    page (json.loads takes both), and int() of an infinity raises."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _whole(value) -> int | None:
    value = _number(value)
    return None if value is None else int(value)


def _flag(value) -> bool | None:
    return value if isinstance(value, bool) else None


def _labels(value) -> list[str] | None:
    """A runner's labels: the well-formed ones, at most MAX_LABELS."""
    if not isinstance(value, list):
        return None
    return [v for v in value[:MAX_LABELS] if isinstance(v, str) and LABEL_RE.fullmatch(v)]


def _count(value) -> int | str | None:
    """The dispatcher's counts are whole numbers; anything else is text."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return _text(64)(value)


class Record:
    """A JSON object of known keys: ``FIELDS`` maps each key to its reader;
    a record lacking one of ``REQUIRED`` is unusable (None)."""

    FIELDS: ClassVar[dict[str, Callable]] = {}
    REQUIRED: ClassVar[tuple[str, ...]] = ("commit",)
    # Keys added later (build matrices, a running job's first failing test),
    # left out while they say nothing (None):
    # a record of a commit without a matrix reads exactly as before.
    SPARSE: ClassVar[tuple[str, ...]] = ("cell", "waiting", "labels", "exclusive", "failing")

    def to_json(self) -> dict:
        return {key: value for key, value in dataclasses.asdict(self).items()
                if value is not None or key not in self.SPARSE}

    @classmethod
    def from_json(cls, data) -> Any:
        if not isinstance(data, dict):
            return None
        record = cls(**{key: read(data.get(key)) for key, read in cls.FIELDS.items()})
        return None if any(getattr(record, key) is None for key in cls.REQUIRED) else record

    @classmethod
    def list_from_json(cls, data) -> list:
        if not isinstance(data, list):
            return []
        records = (cls.from_json(item) for item in data[:MAX_RECORDS])
        return [r for r in records if r is not None]


@dataclasses.dataclass
class QueueEntry(Record):
    commit: str
    branch: str | None = None
    position: int | None = None     # 1: next to be assigned
    cell: str | None = None         # a matrix cell's name
    waiting: str | None = None      # why no runner can take it, if none can

    FIELDS = {"commit": _commit, "branch": _text(200), "position": _whole,
              "cell": _text(160), "waiting": _text(300)}


@dataclasses.dataclass
class RunningJob(Record):
    commit: str
    branch: str | None = None
    runner: str | None = None       # what the runner is called (RunnerInfo.name)
    elapsed: float | None = None    # seconds since it was assigned
    shard: str | None = None        # "2/3" for one shard of a sharded commit
    cell: str | None = None
    failing: str | None = None      # its first failing test, told while it runs

    FIELDS = {"commit": _commit, "branch": _text(200), "runner": _text(200),
              "elapsed": _number, "shard": _text(16), "cell": _text(160),
              "failing": _text(500)}


@dataclasses.dataclass
class HeldCommit(Record):
    """A commit kept, after a dispatcher restart, for the runner (its
    address) that was running it, until it re-registers or the hold ends."""
    commit: str
    branch: str | None = None
    runner: str | None = None
    cell: str | None = None

    FIELDS = {"commit": _commit, "branch": _text(200), "runner": _text(200),
              "cell": _text(160)}


@dataclasses.dataclass
class RunnerInfo(Record):
    # What to call it: the name it gave itself, else its key's, else its address.
    name: str | None
    address: str | None = None
    state: str | None = None        # one of RUNNER_STATES from this version
    commit: str | None = None       # what it runs, or is occupied with
    labels: list[str] | None = None  # what it offers (``--label``, python3.12...)
    exclusive: bool | None = None   # takes only jobs that ask for one of its labels

    FIELDS = {"name": _text(200), "address": _text(200), "state": _text(32), "commit": _commit,
              "labels": _labels, "exclusive": _flag}
    REQUIRED = ()


@dataclasses.dataclass
class State:
    queue: list[QueueEntry] = dataclasses.field(default_factory=list)
    running: list[RunningJob] = dataclasses.field(default_factory=list)
    held: list[HeldCommit] = dataclasses.field(default_factory=list)
    runners: list[RunnerInfo] = dataclasses.field(default_factory=list)
    counts: dict[str, int | str | None] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return {"queue": [r.to_json() for r in self.queue],
                "running": [r.to_json() for r in self.running],
                "held": [r.to_json() for r in self.held],
                "runners": [r.to_json() for r in self.runners],
                "counts": dict(self.counts)}

    @classmethod
    def from_json(cls, data) -> State:
        """ValueError if ``data`` is not a JSON object at all."""
        if not isinstance(data, dict):
            raise ValueError("state is not a JSON object")
        counts = data.get("counts") if isinstance(data.get("counts"), dict) else {}
        return cls(queue=QueueEntry.list_from_json(data.get("queue")),
                   running=RunningJob.list_from_json(data.get("running")),
                   held=HeldCommit.list_from_json(data.get("held")),
                   runners=RunnerInfo.list_from_json(data.get("runners")),
                   counts={_text(32)(k): _count(v)
                           for k, v in list(counts.items())[:MAX_COUNTS]})
