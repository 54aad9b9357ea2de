"""One record per unit of work, in exactly one state.

A unit of work is one cell of a commit (ci/matrix.py): one round of
testing it, whole or split into shards.  A commit without a matrix has
one cell, named "", and its record is keyed by the commit id alone, as
before matrices; a matrix cell's key is ``<commit>:<cell>``.  The
dispatcher asks a record what state it is in instead of which of a dozen
containers holds it (a merge-queue entry could make a key of its own).
Which state may follow which is the table ``TRANSITIONS``; ``Work.move``
refuses any other step, so a slip in the dispatcher's bookkeeping fails
loudly where it happens.  A record recovered after a crash is made in
the state it recovers to (QUEUED, or HELD for its runner to claim).

The live job (``Job``: a runner's address, start time, ``runtest`` body)
is not the journal's ``AssignmentRecord`` (token, runner, key name: what
proves the assignment after a restart).
"""

from __future__ import annotations

import dataclasses
import enum
import secrets
from typing import NamedTuple, NewType

from ci import matrix, mergeinfo
from ci.dispatch.journal import AssignmentRecord, make_key
from ci.outcome import Outcome

WorkKey = NewType("WorkKey", str)


def work_key(commit: str, cell: str = "") -> WorkKey:
    """The key of a commit's work: the commit id for its only cell,
    ``<commit>:<cell>`` for a matrix cell."""
    return WorkKey(make_key(commit, cell))


def new_token() -> str:
    """An assignment's token: unguessable, so only its runner can prove it."""
    return secrets.token_hex(16)


class WorkState(enum.Enum):
    JOURNALLING = "journalling"  # being queued: its records are being fsynced
    QUEUED = "queued"            # waiting for a free runner, in queue order
    HELD = "held"                # running at a crash: kept for its runner to claim
    RUNNING = "running"          # one whole job on one runner (``Work.job``)
    SHARDED = "sharded"          # split over runners (``Work.shards``)
    WRITING = "writing"          # a result claimed it; its file is being written
    DONE = "done"                # its result file is on disk


S = WorkState
# Which states may follow which; the only place a state changes (``move``).
# A record leaves the dispatcher's table once DONE (its key is kept in the
# done set) or when its JOURNALLING fails (it was never queued).
TRANSITIONS: dict[WorkState, frozenset[WorkState]] = {
    S.JOURNALLING: frozenset({S.QUEUED}),
    # A late result of a requeued commit claims it from the queue.
    S.QUEUED: frozenset({S.RUNNING, S.SHARDED, S.WRITING}),
    S.HELD: frozenset({S.QUEUED, S.RUNNING, S.WRITING}),
    # Lost (to the queue's head), finished, or given up (poison: WRITING).
    S.RUNNING: frozenset({S.QUEUED, S.WRITING}),
    # The last shard's report, an earlier round's whole result, or poison.
    S.SHARDED: frozenset({S.WRITING}),
    # Written; or the write failed: back to whoever still runs it, the
    # shards, or the queue's head.
    S.WRITING: frozenset({S.DONE, S.RUNNING, S.SHARDED, S.QUEUED}),
    # A retest makes a new record; a DONE one is never reused.
    S.DONE: frozenset(),
}


class TransitionError(RuntimeError):
    """A state change the table does not allow: a bookkeeping bug."""


class Meta(NamedTuple):
    """What the observer said of a queued commit.  ``merge``: the commit
    is the merge of a branch's head into its target (ci/mergeinfo.py);
    ``conflicts`` (only with ``merge``): that merge could not be made,
    the commit is the head itself, and its verdict is ``conflict``, with
    no run."""
    branch: str
    previous: str | None
    merge: mergeinfo.MergeInfo | None = None
    conflicts: tuple[str, ...] | None = None


@dataclasses.dataclass
class Job:
    """A live job: one ``runtest`` on one runner (a whole commit or one
    shard of it), current until its result, loss or reassignment."""
    commit: str
    token: str
    runner: str                 # the runner's key (host:port)
    address: tuple[str, int]
    started: float
    name: str | None = None     # the runner's issued-key name
    shard: int = 0              # 1..shards for one shard of a sharded commit
    shards: int = 0             # 0: the whole commit
    request: bytes = b""        # the ``runtest`` body: branch, trust, a shard's spec
    key: WorkKey | None = None  # its work's (set from commit when not given)

    def __post_init__(self) -> None:
        if self.key is None:
            self.key = work_key(self.commit)


@dataclasses.dataclass
class ShardSet:
    """A commit split over runners: each shard is an assignment with its own
    token; the result is written once every shard has reported."""
    total: int
    # What every shard gets: the durations table as of the split, encoded
    # once (``sharding.encode_table``; up to 2,000 lines), not per shard.
    table: bytes
    tokens: dict = dataclasses.field(default_factory=dict)    # token -> shard
    running: dict = dataclasses.field(default_factory=dict)   # shard -> Job
    reports: dict = dataclasses.field(default_factory=dict)   # shard -> Outcome
    journalled: bool = False                # its ``S`` record is in the journal
    first: tuple[str, ...] = ()             # the tests to run first (in shard 1)


class ShardReport(enum.Enum):
    """What one shard's result did (``_record_shard``), unless it was the
    last: then the merged result is returned."""
    DUPLICATE = "duplicate"     # that shard had reported already
    STORED = "stored"           # kept; other shards are still missing


@dataclasses.dataclass
class Merged:
    """Every shard has reported: the commit is claimed (WRITING) and this
    is its merged outcome (``shard_set``: restored if the write fails)."""
    outcome: Outcome
    shard_set: ShardSet


@dataclasses.dataclass
class Work:
    """One unit of work, in one state (``state``; changed only by ``move``).

    ``job`` is the live whole-commit job while RUNNING (and, while WRITING,
    the job it was claimed from, to give back if the write fails);
    ``shards`` the split while SHARDED (kept while WRITING when a whole
    result or the poison cap ended a split round).  ``assignments`` are
    this round's real ``runtest``s by token: a result must carry one."""
    key: WorkKey
    commit: str
    state: WorkState = WorkState.JOURNALLING
    meta: Meta | None = None
    retest: bool = False            # test again although a result exists
    losses: int = 0                 # runs that lost their runner (poison cap)
    assignments: dict[str, AssignmentRecord] = dataclasses.field(default_factory=dict)
    job: Job | None = None
    shards: ShardSet | None = None
    # WRITING the merged result of this many shards (journalled as still
    # sharded: see Recovery._pending_records).
    merging: int | None = None
    tail: bytearray = dataclasses.field(default_factory=bytearray)   # live output
    # The first test a running job told of failing (``failing``): its id
    # and seconds after the tests started; None until one fails.
    failing: tuple[str, float] | None = None
    held_by: str | None = None      # HELD: the runner key that ran it at the crash
    held_until: float = 0.0         # HELD: when it is queued without its runner
    cell: matrix.Cell = matrix.SINGLE   # which cell of its commit
    # Why it cannot run: the observer could not read its matrix (its
    # ``error`` verdict is written instead of a run).
    error: str | None = None
    # QUEUED with no registered runner that could take it: since when.
    unroutable_since: float | None = None

    def move(self, to: WorkState) -> None:
        """Change state; TransitionError for a step the table forbids."""
        if to not in TRANSITIONS[self.state]:
            raise TransitionError(f"{self.commit[:12]}: {self.state.value} -> {to.value} "
                                  "is not a transition")
        self.state = to

    @property
    def short(self) -> str:
        """How logs name it: the short commit id, and its cell if any."""
        return f"{self.commit[:12]}:{self.cell.name}" if self.cell.name else self.commit[:12]

    @property
    def branch(self) -> str | None:
        return self.meta.branch if self.meta else None

    def current_job(self, token: str) -> Job | None:
        """The live job (whole, or one shard) ``token`` belongs to."""
        if self.state is WorkState.RUNNING and self.job and self.job.token == token:
            return self.job
        if self.shards:
            job = self.shards.running.get(self.shards.tokens.get(token, 0))
            if job and job.token == token:
                return job
        return None
