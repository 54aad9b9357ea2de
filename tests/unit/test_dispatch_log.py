"""The dispatcher's log line for an assignment names the commit (short)
and, for a matrix cell, the cell: also for a SHA-256 repository's
64-digit commit ids."""

from __future__ import annotations

import logging
import types

import helpers
from ci.dispatch import server
from ci.dispatch.work import Job, work_key
from ci.wire import Message


def sent(monkeypatch, caplog, commit: str, cell: str) -> str:
    monkeypatch.setattr(helpers, "call", lambda *args, **kwargs: Message("ok"))
    fake = types.SimpleNamespace(ping_timeout=1.0, _security_for=lambda name: None)
    job = Job(commit, "a" * 32, "127.0.0.1:9", ("127.0.0.1", 9), 0.0,
              key=work_key(commit, cell))
    with caplog.at_level(logging.INFO, logger=server.log.name):
        server.Dispatcher._send_job(fake, job)
    return next(r.getMessage() for r in caplog.records if "-> runner" in r.getMessage())


def test_an_assignment_is_logged_as_short_commit_and_cell(monkeypatch, caplog):
    for commit in ("1" * 40, "2" * 64):
        caplog.clear()
        assert sent(monkeypatch, caplog, commit, "py3.9") == \
            f"commit {commit[:12]}:py3.9 -> runner 127.0.0.1:9"
        caplog.clear()
        assert sent(monkeypatch, caplog, commit, "") == \
            f"commit {commit[:12]} -> runner 127.0.0.1:9"
