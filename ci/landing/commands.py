"""The land queue's commands on the observer's listener: ``land:<branch>``,
``unland:<branch>`` (operators: ci/auth.py) and ``queue`` (the snapshot
as JSON).  A refusal is an ``error`` reply with its reason, and changes
nothing; without ``--merge-into`` rules every one says the queue is off.
"""

from __future__ import annotations

import json
import logging

from ci.git import GitError
from ci.landing.engine import Engine, Refused
from ci.wire import Message, ascii_line

log = logging.getLogger(__name__)

OFF = "the land queue is off: the observer has no --merge-into rule"


def asker(peer) -> str:
    """Who asked, as the queue shows it: the key's role and name, or the
    role and address."""
    role = getattr(peer, "role", "admin")
    name = getattr(peer, "name", None)
    return f"{role}:{name}" if name else f"{role}@{peer}"


class QueueCommands:
    def __init__(self, engine: Engine | None):
        self.engine = engine
        self.commands = {"land": self.do_land, "unland": self.do_unland,
                         "queue": self.do_queue}

    def do_land(self, message: Message, peer) -> Message:
        return self._ask("ask", message, peer)

    def do_unland(self, message: Message, peer) -> Message:
        return self._ask("cancel", message, peer)

    def do_queue(self, message: Message, peer) -> Message:
        if self.engine is None:
            return Message("error", OFF)
        return Message("ok", "", json.dumps(self.engine.snapshot(), sort_keys=True).encode())

    def _ask(self, what: str, message: Message, peer) -> Message:
        if self.engine is None:
            return Message("error", OFF)
        branch = message.argument.strip()
        try:
            entry = getattr(self.engine, what)(branch, asker(peer))
        except Refused as exc:
            return Message("error", ascii_line(str(exc)))
        except GitError as exc:
            log.warning("queue: %s %s: %s", message.command, branch, exc)
            return Message("error", ascii_line(f"git failed, nothing changed: {exc.stderr}"))
        return Message("ok", ascii_line(f"entry {entry.id}: {entry.branch} at "
                                        f"{entry.head[:12]} into {entry.target}"))
