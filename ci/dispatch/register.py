"""What a runner says of itself in its ``register`` fields (and, for
its job, in a ``ping`` reply), checked: its own time limit, the name it
gives itself, its labels and whether it is exclusive, and what it is busy
with.  Pure; a field it may not send is refused with the rule (``Reply``),
a field an older runner does not send has its old meaning."""

from __future__ import annotations

from ci import matrix, state_schema
from ci.dispatch.runners import Traits
from ci.wire import TOKEN_RE, Reply, one_line, valid_commit

# A runner's own limits (checkout, environment build, tests) may exceed
# the default job deadline; its jobs then get that long, up to this.
MAX_RUNNER_LIMIT = 7 * 24 * 3600.0


def job_limit(fields: dict) -> float | None:
    """The longest a job may take on a runner by its own limits (its
    ``register`` field ``limit``), None if it says none or nonsense."""
    try:
        seconds = float(fields.get("limit", ""))
    except ValueError:
        return None
    return seconds if 0 < seconds <= MAX_RUNNER_LIMIT else None


def runner_given_name(fields: dict) -> str | None:
    """The name a runner gives itself in its ``register`` field ``name``
    (``test_runner.py --name``), None if it gives none; a name it may not
    have is refused with the rule, not shortened into another one."""
    given = fields.get("name") or None
    if given is not None:
        try:
            state_schema.check_runner_name(given)
        except ValueError as exc:
            raise Reply(str(exc)) from None
    return given


def runner_traits(fields: dict, limit: float | None) -> Traits:
    """A runner's ``register`` fields ``labels`` (space-separated) and
    ``exclusive`` (yes or no); a runner without them (an older one) has no
    labels and takes any job.  Odd labels are refused with the rule."""
    exclusive = fields.get("exclusive", "no")
    if exclusive not in ("yes", "no"):
        raise Reply(f"exclusive must be yes or no, not {one_line(exclusive, 20)!r}")
    try:
        labels = matrix.parse_labels(fields.get("labels", ""), "register labels")
    except matrix.MatrixError as exc:
        raise Reply(str(exc)) from None
    if exclusive == "yes" and not labels:
        raise Reply("an exclusive runner needs labels: it takes only jobs that ask "
                    "for one of them")
    return Traits(limit, labels, exclusive == "yes")


def runner_says(fields: dict) -> tuple[str | None, str | None]:
    """(the commit a runner is busy with, its job's token) from its
    ``register`` or ``ping`` fields: ``unknown`` for a malformed commit,
    no token for a malformed one."""
    busy = fields.get("busy") or None
    if busy is not None and not valid_commit(busy):
        busy = "unknown"
    token = fields.get("job") or None
    return busy, token if token and TOKEN_RE.fullmatch(token) else None
