"""The land queue's journal: ``<state-dir>/queue.journal``, one JSON
record a line, replayed at start to rebuild the queue after a crash.

Records (``r`` is the kind; every record names the entry ``id``)::

    ask        branch target head by asked      an entry asked for (fsynced before the reply)
    built      tested base verdict reason       its merge was made (tested null: conflict)
    verdict    tested verdict reason            a final verdict of its tested commit
    intent     old new                          a lease push is about to be made (fsynced first)
    unpushed   reason                           that push did not happen (stale lease, failure)
    landed     old new                          the target is at ``new``: landed
    rejected   reason                           judged red or conflicting, or refused
    cancelled  by                               ``unland``
    sent       event                            the queue-event was acknowledged
    entry      (every field)                    compaction's whole entry
    next                                        compaction: ids up to this one were given

A torn last line (a crash mid-write) or any line that does not parse is
skipped.  Only what changes no git state is ever re-done after a crash:
a push intent without its outcome is settled by reading the target's real
head (``QueueJournal.recover`` in the engine), never guessed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

from ci.appendlog import AppendLog
from ci.files import whole_lines

log = logging.getLogger(__name__)

# Finished entries kept (the snapshot's "recent" shows 50).
KEEP_DONE = 50
# Compact when the file holds this many more records than the queue needs.
COMPACT_SLACK = 500


@dataclasses.dataclass
class QueueEntry:
    id: int
    branch: str
    target: str
    head: str
    by: str = ""
    asked: float = 0.0
    updated: float = 0.0
    tested: str | None = None
    base: str | None = None
    verdict: str | None = None
    reason: str = ""
    done: str | None = None            # landed | rejected | cancelled
    intent: list | None = None         # [old, new] of a push under way
    landed: list | None = None         # [old, new]
    sent: list = dataclasses.field(default_factory=list)   # events acknowledged
    state: str = "waiting"             # what the last plan said (not journalled)

    @property
    def active(self) -> bool:
        return self.done is None

    def pending_event(self) -> str | None:
        """The queue-event still to be acknowledged, if any."""
        if self.done in ("landed", "rejected") and self.done not in self.sent:
            return self.done
        return None

    def to_record(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("state")
        return {"r": "entry", **data}


@dataclasses.dataclass
class Replayed:
    entries: dict = dataclasses.field(default_factory=dict)   # id -> QueueEntry
    next_id: int = 1
    records: int = 0


FIELDS = {f.name for f in dataclasses.fields(QueueEntry)} - {"state"}


def apply(replayed: Replayed, record: dict) -> None:
    """Apply one record (a journal line, or one just appended)."""
    kind, id = record.get("r"), record.get("id")
    if not isinstance(id, int):
        raise ValueError("record without an id")
    when = record.get("t", 0.0)
    if kind == "next":
        pass
    elif kind == "entry":
        entry = QueueEntry(**{k: v for k, v in record.items() if k in FIELDS})
        replayed.entries[id] = entry
    elif kind == "ask":
        entry = QueueEntry(id, record["branch"], record["target"], record["head"],
                           record.get("by", ""), when, when)
        replayed.entries[id] = entry
    else:
        entry = replayed.entries[id]
        entry.updated = when
        if kind == "built":
            entry.tested, entry.base = record["tested"], record["base"]
            entry.verdict, entry.reason = record.get("verdict"), record.get("reason", "")
        elif kind == "verdict":
            if record["tested"] == entry.tested:
                entry.verdict, entry.reason = record["verdict"], record.get("reason", "")
        elif kind == "intent":
            entry.intent = [record["old"], record["new"]]
        elif kind == "unpushed":
            entry.intent = None
            entry.reason = record.get("reason", "")
        elif kind == "landed":
            entry.intent = None
            entry.landed = [record["old"], record["new"]]
            entry.done = "landed"
        elif kind == "rejected":
            entry.done, entry.reason = "rejected", record.get("reason", "")
        elif kind == "cancelled":
            entry.done = "cancelled"
            entry.reason = f"cancelled by {record.get('by') or 'someone'}"
        elif kind == "sent":
            if record["event"] not in entry.sent:
                entry.sent.append(record["event"])
        else:
            raise ValueError(f"unknown record {kind!r}")
    replayed.next_id = max(replayed.next_id, id + 1)


def replay(data: bytes) -> Replayed:
    replayed = Replayed()
    for number, line in enumerate(whole_lines(data), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
            apply(replayed, record)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("queue journal line %d skipped (%s)", number, exc)
            continue
        replayed.records += 1
    return replayed


class QueueJournal:
    """The journal file; ``entries`` is the queue it describes, kept up to
    date by ``write`` (so the file and the memory never disagree)."""

    def __init__(self, path: str):
        self._log = AppendLog(path)
        self._log.open()    # a torn last line is cut off
        replayed = replay(self._log.read())
        self.entries: dict[int, QueueEntry] = replayed.entries
        self.next_id = replayed.next_id
        self._log.records = replayed.records

    def write(self, kind: str, id: int, sync: bool = True, **fields) -> QueueEntry:
        """Append one record (fsynced unless ``sync`` is false), then
        apply it; the entry it touched."""
        record = {"r": kind, "id": id, "t": round(time.time(), 3), **fields}
        replayed = Replayed(self.entries, self.next_id)
        apply(replayed, record)   # a bad record raises before anything is written
        self._log.append((json.dumps(record, sort_keys=True) + "\n").encode(), 1, sync)
        self.next_id = replayed.next_id
        self.maybe_compact()
        return self.entries[id]

    def ask(self, branch: str, target: str, head: str, by: str) -> QueueEntry:
        return self.write("ask", self.next_id, branch=branch, target=target, head=head, by=by)

    def maybe_compact(self) -> None:
        keep = self._kept()
        if self._log.records > len(keep) + COMPACT_SLACK:
            self.compact()

    def _kept(self) -> list[QueueEntry]:
        """Every active entry, every finished one whose event is unsent, and
        the newest finished ones (the snapshot's "recent")."""
        done = sorted((e for e in self.entries.values() if not e.active),
                      key=lambda e: (e.updated, e.id))
        recent = {e.id for e in done[-KEEP_DONE:]}
        return [e for e in sorted(self.entries.values(), key=lambda e: e.id)
                if e.active or e.pending_event() or e.id in recent]

    def compact(self) -> None:
        keep = self._kept()
        # The highest id ever given stays, so ids are never reused.
        top = self.next_id - 1
        records = [e.to_record() for e in keep]
        if top:
            records.append({"r": "next", "id": top})
        data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
        self._log.rewrite(data, len(records))
        self.entries = {e.id: e for e in keep}
        log.info("queue journal compacted to %d record(s)", len(records))

    def close(self) -> None:
        self._log.close()


def settle_intent(old: str, new: str, real_head: str | None) -> str:
    """What became of a push whose intent was journalled without an
    outcome (a crash between the two), from the target's real head read
    from the upstream: ``landed`` (it is at ``new``), ``unpushed`` (still
    at ``old``: plan again) or ``moved`` (someone else moved it: the
    queue rebuilds on the new head).  Never a guess: only ``new`` proves
    the push happened."""
    if real_head == new:
        return "landed"
    if real_head == old:
        return "unpushed"
    return "moved"
