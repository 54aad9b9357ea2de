"""Land queue events (issue 22): the observer tells the dispatcher that an
entry ``landed`` on its target or was ``rejected`` (``queue-event``, body
``key: value`` fields), and the notifier sends them on like the
broke/fixed events, with the same keys so every receiver understands them.

Pure: parsing the body, the event's id and the event record.  The id is
derived from the queue entry's id and the event only, so the same event
told twice (the observer retries until it is acknowledged, across
restarts of either side) is recognised and sent once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time

from ci import queue_snapshot
from ci.notify.events import commit_url
from ci.wire import ProtocolError, decode_fields, encode_fields, one_line, valid_full_commit

LANDED, REJECTED = "landed", "rejected"
KINDS = (LANDED, REJECTED)
MAX_REASON = 1000
MAX_AUTHOR = 254
MAX_ENTRY_ID = queue_snapshot.MAX_ID


class QueueEventError(ValueError):
    """A ``queue-event`` body that is not what docs/protocol.md says."""


@dataclasses.dataclass(frozen=True)
class QueueEvent:
    event: str
    id: int
    branch: str
    target: str
    head: str
    tested: str          # "" when the entry was never tested (a conflict)
    author: str          # the head commit's author email, may be ""
    reason: str

    @property
    def key(self) -> str:
        """What makes it unique: the queue entry and what happened to it."""
        return f"{self.id}:{self.event}"

    @property
    def event_id(self) -> str:
        text = "\n".join(["queue", str(self.id), self.event])
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def to_fields(self) -> dict:
        return {"event": self.event, "id": self.id, "branch": self.branch,
                "target": self.target, "head": self.head, "tested": self.tested,
                "author": self.author, "reason": self.reason}


def parse_queue_event(body: bytes) -> QueueEvent:
    """The event a ``queue-event`` body describes; QueueEventError with the
    first thing wrong.  Fields it does not know are ignored."""
    try:
        fields = decode_fields(body, max_fields=32)
    except ProtocolError as exc:
        raise QueueEventError(str(exc)) from None
    event = fields.get("event", "")
    if event not in KINDS:
        raise QueueEventError(f"event must be {' or '.join(KINDS)}")
    raw_id = fields.get("id", "")
    if not raw_id.isascii() or not raw_id.isdigit() or len(raw_id) > 16 \
            or int(raw_id) > MAX_ENTRY_ID:
        raise QueueEventError("id must be the queue entry's number")
    names = {}
    for key in ("branch", "target"):
        value = fields.get(key, "")
        if not queue_snapshot.BRANCH_RE.fullmatch(value):
            raise QueueEventError(f"{key} must be a branch name")
        names[key] = value
    head = fields.get("head", "")
    if not valid_full_commit(head):
        raise QueueEventError("head must be a full commit id")
    tested = fields.get("tested", "")
    if tested and not valid_full_commit(tested):
        raise QueueEventError("tested must be a full commit id or empty")
    if event == LANDED and not tested:
        raise QueueEventError("a landed event needs the tested commit (what the target is now)")
    author = fields.get("author", "")
    if len(author) > MAX_AUTHOR or any(c.isspace() or not c.isprintable() for c in author):
        raise QueueEventError(f"author must be an email address (at most {MAX_AUTHOR} "
                              "characters, no spaces)")
    reason = fields.get("reason", "")
    if len(reason) > MAX_REASON or not reason.isprintable():
        raise QueueEventError(f"reason must be one printable line of at most {MAX_REASON} "
                              "characters")
    return QueueEvent(event, int(raw_id), names["branch"], names["target"], head, tested,
                      author, reason)


def event_text(event: QueueEvent, url: str = "") -> str:
    """The line people read."""
    if event.event == LANDED:
        text = f"{event.branch} landed on {event.target} as {event.tested}"
    else:
        text = f"{event.branch} was rejected from {event.target}: " \
               f"{event.reason or 'no reason given'}"
    return one_line(text + (f" {url}" if url else ""), 2000)


def build_queue_event(event: QueueEvent, dashboard_url: str | None, targets: list[str],
                      now: float | None = None) -> dict:
    """The event record, with every key a broke/fixed event has (so the
    journal, the webhook body and the command's environment take it as
    they are) and the queue's own: ``target``, ``head``, ``tested``,
    ``queue_id``.  ``commit`` is the tested commit (what landed, or what
    failed), else the head; ``verdict`` is the event itself."""
    commit = event.tested or event.head
    url = commit_url(dashboard_url, commit)
    record = {
        "id": event.event_id, "event": event.event, "branch": event.branch,
        "commit": commit, "previous": "", "verdict": event.event, "previous_verdict": "",
        "retest": False, "subject": "", "author": event.author, "tests": 0, "failures": 0,
        "errors": 0, "reason": event.reason, "result_file": "", "url": url,
        "text": event_text(event, url),
        "target": event.target, "head": event.head, "tested": event.tested,
        "queue_id": event.id,
        "created": time.time() if now is None else now,
        "header": encode_fields(event.to_fields()).decode("utf-8"),
        "targets": list(targets),
    }
    return record
