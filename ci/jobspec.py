"""The ``runtest`` body: what a runner is told about one job beyond its
commit and token.  Pure functions, shared by the dispatcher (which
writes it) and the runner (which reads it).

The body is ``key: value`` lines (``wire.encode_fields``), then, for a
shard, a blank line and the durations table (see sharding.py)::

    shard: 2/3            one shard of a sharded commit (absent: the whole commit)
    branch: feature/x     the branch the commit was dispatched for
    trusted: no           yes: the dispatcher counts that branch as trusted
    cell: py3.12-django5.1   one cell of a build matrix (absent: the commit has none)
    python: 3.12          the cell's interpreter (absent: the runner's own)
    axes: django=5.1      the cell's other axes: CI_DJANGO=5.1 for setup and tests
    failing_first: 2         the first 2 lines after the blank line are test ids
                             to run first (they failed most recently on the branch)
    rules: <full commit id>  whose ``.ci.ini`` quarantine list judges the run: a
                             merge commit's target (issue 22), so a branch cannot
                             land red by quarantining its own failures

then, after the blank line, those test ids (one a line) and, for a shard,
the durations table.

Why the branch travels with the job: a setup command runs the commit's
own code, so an environment a branch's commit built may hold anything
that branch's author put there.  The runner keeps environments apart by
scope (environments.Scope): a trusted branch's are reused by any commit,
another branch's only by that branch's commits.  Which branches are
trusted is the dispatcher's decision (``--trusted-branch``), so that one
setting covers every runner.

Backward compatible with older dispatchers: an empty body (a whole
commit) and ``shard: i/n`` followed by the table mean what they meant, and
a job without a ``branch`` is never trusted (the runner gives it a scope
of its own).  A job without a ``cell`` is the commit's only cell, tested
as before matrices existed (ci/matrix.py); ``python`` and ``axes`` come
only with a cell.  Unknown keys are refused, not skipped: a field a runner
does not understand must not be silently dropped.
"""

from __future__ import annotations

import dataclasses
import fnmatch

from ci import matrix, sharding, wire
from ci.dispatch.journal import BRANCH_RE

# The repository's default branch, by either of the usual names.
DEFAULT_TRUSTED_BRANCHES = ("main", "master")
KNOWN_KEYS = ("shard", "branch", "trusted", "cell", "python", "axes", "failing_first",
              "rules")
# At most this many test ids to run first, each at most this long.
MAX_FAILING_FIRST = 50
MAX_TEST_ID = 500


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """One job beyond its commit and token: what the dispatcher ``encode``s
    into a ``runtest`` body and the runner ``parse``s out of it.  A field
    added here (and to ``KNOWN_KEYS``, ``encode`` and ``parse``) is the
    way a new kind of job travels; the defaults are what an older
    dispatcher's body means.  A shard's ``first`` is ``failing_first``
    (its files are pinned to shard 1)."""
    shard: sharding.ShardSpec | None = None   # None: the whole commit
    branch: str | None = None                  # None: not said (an older dispatcher)
    trusted: bool = False                      # never without a branch
    cell: str = ""                             # "": the commit's only cell
    python: str | None = None                  # None: the runner's own interpreter
    axes: tuple[tuple[str, str], ...] = ()     # the cell's other axes, in order
    failing_first: tuple[str, ...] = ()        # test ids to run before the rest
    rules: str | None = None                   # whose quarantine list (None: the commit's)

    @property
    def env(self) -> dict[str, str]:
        """CI_<AXIS>=<value> for each of the cell's other axes."""
        return matrix.axis_env(self.axes)


def trusted_branch(branch: str | None, patterns: tuple[str, ...]) -> bool:
    """Whether ``branch`` matches one of the ``--trusted-branch`` patterns
    (``fnmatch``, case-sensitive as git's branch names are)."""
    return branch is not None and any(fnmatch.fnmatchcase(branch, p) for p in patterns)


def usable_test_id(test_id: str) -> bool:
    """Whether a test id can travel as one line of a ``runtest`` body."""
    return 0 < len(test_id) <= MAX_TEST_ID and test_id.isprintable() \
        and test_id == test_id.strip()


def encode(spec: JobSpec) -> bytes:
    """The body for a job: empty for a whole commit of no known branch and
    no failing tests (as older dispatchers sent), else the fields, then
    the test ids to run first and, for a shard, its durations table.
    ValueError for what ``parse`` would refuse (unusable test ids are
    left out instead, and at most ``MAX_FAILING_FIRST`` are sent)."""
    first = [t for t in spec.failing_first if usable_test_id(t)][:MAX_FAILING_FIRST]
    fields = _cell_fields(spec)
    if spec.shard is not None:
        fields["shard"] = f"{spec.shard.index}/{spec.shard.total}"
    if spec.branch is not None:
        if not BRANCH_RE.fullmatch(spec.branch):
            raise ValueError(f"invalid branch name {spec.branch[:80]!r}")
        fields["branch"] = spec.branch
        fields["trusted"] = "yes" if spec.trusted else "no"
    elif spec.trusted:
        raise ValueError("a job without a branch cannot be trusted")
    if first:
        fields["failing_first"] = str(len(first))
    if spec.rules is not None:
        if not wire.valid_full_commit(spec.rules):
            raise ValueError(f"rules must be a full commit id, not {spec.rules[:80]!r}")
        fields["rules"] = spec.rules
    if not fields:
        return b""
    after = "".join(f"{test_id}\n" for test_id in first).encode()
    if spec.shard is not None:
        after += spec.shard.table if spec.shard.table is not None else \
            sharding.encode_table(spec.shard.durations)
    return wire.encode_fields(fields) + (b"\n" + after if after or spec.shard is not None
                                         else b"")


def _cell_fields(spec: JobSpec) -> dict[str, str]:
    if not spec.cell:
        if spec.python is not None or spec.axes:
            raise ValueError("python or axes without a cell")
        return {}
    if not matrix.is_cell_name(spec.cell):
        raise ValueError(f"invalid cell name {spec.cell[:80]!r}")
    fields = {"cell": spec.cell}
    if spec.python:
        fields["python"] = spec.python
    if spec.axes:
        fields["axes"] = matrix.format_axes(spec.axes)
    return fields


def _parse_cell(fields: dict[str, str]) -> tuple[str, str | None, tuple]:
    """(cell, python, axes) of a job; ValueError if malformed."""
    cell, python = fields.get("cell", ""), fields.get("python")
    if not matrix.is_cell_name(cell):
        raise ValueError(f"runtest body: invalid cell name {cell[:80]!r}")
    if not cell and (python is not None or "axes" in fields):
        raise ValueError("runtest body: python or axes without a cell")
    if python is not None and not matrix.PYTHON_RE.fullmatch(python):
        raise ValueError(f"runtest body: python {python[:20]!r} is not a version like 3.12")
    try:
        axes = matrix.parse_axes(fields.get("axes", ""), "runtest body: axes")
    except matrix.MatrixError as exc:
        raise ValueError(str(exc)) from None
    if matrix.PYTHON in dict(axes):
        raise ValueError("runtest body: the python axis travels as python, not in axes")
    return cell, python, axes


def parse(body: bytes) -> JobSpec:
    """The job a ``runtest`` body describes; ValueError naming what is
    malformed."""
    if not body:
        return JobSpec()
    head, _, table = body.partition(b"\n\n")
    try:
        fields = wire.decode_fields(head, max_fields=len(KNOWN_KEYS))
    except wire.ProtocolError as exc:
        raise ValueError(f"runtest body: {exc}") from None
    unknown = sorted(set(fields) - set(KNOWN_KEYS))
    if unknown:
        raise ValueError(f"runtest body: unknown field {unknown[0]!r} "
                         f"(known: {', '.join(KNOWN_KEYS)})")
    first, table = _failing_first(fields.get("failing_first"), table)
    shard = sharding.parse_shard(fields["shard"], table, first) if "shard" in fields else None
    if shard is None and table:
        raise ValueError("runtest body: a durations table without a shard")
    branch = fields.get("branch")
    if branch is not None and not BRANCH_RE.fullmatch(branch):
        raise ValueError(f"runtest body: invalid branch name {branch[:80]!r}")
    trusted = fields.get("trusted", "no")
    if trusted not in ("yes", "no"):
        raise ValueError(f"runtest body: trusted must be yes or no, not {trusted[:20]!r}")
    if branch is None and trusted == "yes":
        raise ValueError("runtest body: trusted without a branch")
    rules = fields.get("rules")
    if rules is not None and not wire.valid_full_commit(rules):
        raise ValueError(f"runtest body: rules must be a full commit id, not {rules[:80]!r}")
    return JobSpec(shard, branch, trusted == "yes", *_parse_cell(fields), failing_first=first,
                   rules=rules)


def _failing_first(count: str | None, rest: bytes) -> tuple[tuple[str, ...], bytes]:
    """(the test ids to run first, what follows them: the table)."""
    if count is None:
        return (), rest
    if not count.isdigit() or not 0 < int(count) <= MAX_FAILING_FIRST:
        raise ValueError(f"runtest body: failing_first must be 1 to {MAX_FAILING_FIRST}, "
                         f"not {count[:20]!r}")
    lines = rest.split(b"\n", int(count))
    if len(lines) <= int(count):
        raise ValueError(f"runtest body: failing_first says {count} test ids, "
                         f"the body has {len(lines) - 1}")
    try:
        ids = tuple(line.decode("utf-8") for line in lines[:-1])
    except UnicodeDecodeError:
        raise ValueError("runtest body: a failing_first test id is not UTF-8") from None
    bad = next((t for t in ids if not usable_test_id(t)), None)
    if bad is not None:
        raise ValueError(f"runtest body: unusable failing_first test id {bad[:80]!r}")
    return ids, lines[-1]
