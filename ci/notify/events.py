"""Events: what a receiver is told of one decision, and its encodings for
each kind of receiver (a webhook's JSON body and signature, a command's
environment).  Pure.

An event is a plain dict so that the journal can hold it as it is and a
restart can send exactly the bytes a first try would have sent: every fact
is fixed when the event is made (``build_event``), never at delivery.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from typing import NamedTuple

from ci.notify import failing
from ci.notify.decider import Decision
from ci import results
from ci.wire import encode_fields, one_line, valid_full_commit

# The result header passed on stdin and stored with each event.
MAX_HEADER = 8 * 1024

# Environment variables never passed to a notify command: the cluster
# secret, our own namespace (so inherited values cannot pose as facts), and
# names that usually hold credentials.
SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIAL", "_KEY")


def _int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def commit_url(dashboard_url: str | None, commit: str) -> str:
    """``--dashboard-url`` with ``{commit}`` filled in ("" without one)."""
    if not dashboard_url:
        return ""
    return dashboard_url.replace("{commit}", commit)


# Each kind's line ({about}: the commit, subject and author; {counts}: the
# failures or the verdict's reason).
TEXTS = {
    "broken": "{branch} is broken by {about}: {counts}",
    "fixed": "{branch} is fixed by {about}: {tests} tests pass",
    "still-failing": "{branch} is still failing at {about}: {counts}",
    "passed": "{branch}: {about} passed, {tests} tests",
    "failed": "{branch}: {about} failed: {counts}",
    "first-failure": "{branch}: {about} is failing while its tests run: {counts}",
}


class EarlyFailure(NamedTuple):
    """A running commit's first failing test, as the dispatcher tells it:
    ``after`` seconds since its tests started."""
    commit: str
    branch: str | None
    test: str
    after: float


def early_event(failure: EarlyFailure, dashboard_url: str | None, targets: list[str],
                now: float | None = None) -> dict:
    """The ``first-failure`` event: a running commit's first failing test.
    Its id is derived from the branch, commit and test, so a run told
    again (after a dispatcher restart) carries the same id and a receiver
    can drop the repeat.  It is no verdict: ``verdict`` is ``running``."""
    commit, branch, after = failure.commit, failure.branch, failure.after
    test = one_line(failure.test, 500)
    text = "\n".join([branch or "", commit, "first-failure", test])
    event = {
        "id": hashlib.sha256(text.encode()).hexdigest()[:32],
        "event": "first-failure", "branch": branch or "", "commit": commit,
        "previous": "", "verdict": "running", "previous_verdict": "", "retest": False,
        "subject": "", "author": "", "tests": 0, "failures": 1, "errors": 0,
        "reason": one_line(f"first failing test {test} after {after:.1f}s", 700),
        "result_file": "", "url": commit_url(dashboard_url, commit),
        "created": time.time() if now is None else now,
    }
    event["text"] = TEXTS["first-failure"].format(
        branch=event["branch"], about=commit[:12], counts=event["reason"], tests=0) + \
        (f" {event['url']}" if event["url"] else "")
    event["header"] = ""
    event["targets"] = list(targets)
    return event


def event_text(event: dict) -> str:
    """One human line, as chat tools show it."""
    short = event["commit"][:12]
    who = ", ".join(part for part in (f'"{event["subject"]}"' if event["subject"] else "",
                                      event["author"]) if part)
    about = f"{short} ({who})" if who else short
    counts = (f"{event['failures']} failures, {event['errors']} errors of "
              f"{event['tests']} tests")
    if event["verdict"] in ("error", "timeout", "conflict"):
        # A conflict's reason names the files (no test ran: no counts).
        counts = f"verdict {event['verdict']}" + (f": {event['reason']}" if event["reason"]
                                                   else "")
    elif event["verdict"] == "failed":
        counts = f"verdict failed: {counts}"
    template = TEXTS.get(event["event"], TEXTS["failed"])
    text = template.format(branch=event["branch"], about=about, counts=counts,
                           tests=event["tests"])
    named = failing.summary(event)
    if named and event["event"] in ("broken", "still-failing", "failed"):
        text += f"; {one_line(named, 1000)}"
    for key, said in (("broken_cells", "broken"), ("fixed_cells", "fixed")):
        if event.get(key):
            text += f" (cells {said}: {', '.join(event[key])})"
    if event["retest"]:
        text = f"retest: {text} (was {event['previous_verdict']})"
    if event["url"]:
        text += f" {event['url']}"
    return text


def build_event(decision: Decision, results_dir: str, dashboard_url: str | None,
                targets: list[str], now: float | None = None) -> dict:
    """The event record: everything a receiver is given, plus what delivery
    needs (targets, creation time, the result header)."""
    result = decision.result
    fields = result.fields
    event = {
        "id": decision.event_id,
        "event": decision.kind,
        "branch": result.branch or "",
        "commit": result.commit,
        "previous": result.previous or "",
        "verdict": result.verdict,
        "previous_verdict": decision.previous_verdict or "",
        "retest": decision.retest,
        "subject": one_line(str(fields.get("subject", "")), 300),
        "author": one_line(str(fields.get("author", "")), 200),
        "tests": _int(fields.get("tests")),
        "failures": _int(fields.get("failures")),
        "errors": _int(fields.get("errors")),
        "reason": one_line(str(fields.get("reason", "")), 300),
        "result_file": os.path.join(results_dir, result.commit),
        "url": commit_url(dashboard_url, result.commit),
        "created": time.time() if now is None else now,
    }
    event.update(cell_changes(fields, _previous_cells(results_dir, result.previous)))
    if result.verdict == "failed":
        event.update(failing.failing_tests(results_dir, result.commit, result.previous))
    event["text"] = event_text(event)
    header = {"commit": result.commit}
    header.update((k, v) for k, v in fields.items() if k != "commit")
    event["header"] = encode_fields(header).decode("utf-8")[:MAX_HEADER]
    event["targets"] = list(targets)
    return event


def parse_cells(text: str) -> dict[str, str]:
    """A result header's ``cells`` field: ``<cell>=<verdict> ...``."""
    pairs = (part.partition("=") for part in str(text or "").split())
    return {name: verdict for name, sep, verdict in pairs if sep and name}


def _previous_cells(results_dir: str, previous: str | None) -> tuple[dict[str, str], str]:
    """The previous commit's cells and its own verdict ("passed" when
    there is no previous result to read)."""
    if not previous or not valid_full_commit(previous):
        return {}, "passed"
    header = results.read_header(os.path.join(results_dir, previous)) or {}
    return parse_cells(header.get("cells", "")), header.get("verdict") or "passed"


def cell_changes(fields: dict, before: tuple[dict[str, str], str]) -> dict:
    """For a matrix commit: its cells that fail where the previous commit's
    passed (or had no such cell) and those that pass where it failed; when
    the previous commit had no matrix at all, its verdict stands for every
    cell (a matrix added to a failing branch breaks nothing); nothing for a
    commit without cells."""
    now = parse_cells(fields.get("cells", ""))
    if not now:
        return {}
    cells, overall = before
    was = {n: cells.get(n, "passed") if cells else overall for n in now}
    broken = [n for n, v in now.items() if v != "passed" and was[n] == "passed"]
    fixed = [n for n, v in now.items() if v == "passed" and was[n] != "passed"]
    return {"cells": " ".join(f"{n}={v}" for n, v in now.items()),
            "broken_cells": broken, "fixed_cells": fixed}


# Sent only for a matrix commit (its result has cells).
CELL_KEYS = ("cells", "broken_cells", "fixed_cells")
PAYLOAD_KEYS = ("id", "event", "branch", "commit", "previous", "verdict", "previous_verdict",
                "retest", "subject", "author", "tests", "failures", "errors", "reason",
                "result_file", "url", "text")
# In the payload when the event has them (a failed commit with records;
# events journalled before they existed lack them).
OPTIONAL_KEYS = ("failing_tests", "failing_count")
# Sent only for a land queue event (ci/notify/queue_events.py).
QUEUE_KEYS = ("target", "head", "tested", "queue_id")
# What a journalled event must hold to be sent again after a restart.
EVENT_KEYS = frozenset(PAYLOAD_KEYS) | {"created", "header", "targets"}


def webhook_body(event: dict) -> bytes:
    """The JSON a webhook is POSTed: the payload keys, ``created`` in UTC."""
    payload = {key: event[key] for key in PAYLOAD_KEYS}
    payload.update((key, event[key]) for key in (*CELL_KEYS, *OPTIONAL_KEYS, *QUEUE_KEYS)
                   if key in event)
    payload["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(event["created"]))
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


def signature(secret: bytes, body: bytes) -> str:
    """The ``X-CI-Signature-256`` header value, GitHub's scheme."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def command_environment(event: dict, base: dict) -> dict:
    """The notify command's environment: ours without secrets, plus the facts."""
    env = {k: v for k, v in base.items()
           if not k.startswith("CI_") and not any(w in k.upper() for w in SECRET_WORDS)}
    facts = {"CI_EVENT": event["event"], "CI_EVENT_ID": event["id"],
             "CI_BRANCH": event["branch"], "CI_COMMIT": event["commit"],
             "CI_PREVIOUS": event["previous"], "CI_VERDICT": event["verdict"],
             "CI_PREVIOUS_VERDICT": event["previous_verdict"],
             "CI_RETEST": "1" if event["retest"] else "0",
             "CI_SUBJECT": event["subject"], "CI_AUTHOR": event["author"],
             "CI_TESTS": str(event["tests"]), "CI_FAILURES": str(event["failures"]),
             "CI_ERRORS": str(event["errors"]), "CI_REASON": event["reason"],
             "CI_RESULT_FILE": event["result_file"], "CI_TEXT": event["text"]}
    if event["url"]:
        facts["CI_URL"] = event["url"]
    if "queue_id" in event:
        facts.update(CI_TARGET=event["target"], CI_HEAD=event["head"],
                     CI_TESTED=event["tested"], CI_QUEUE_ID=str(event["queue_id"]))
    if "cells" in event:
        facts.update(CI_CELLS=event["cells"],
                     CI_BROKEN_CELLS=" ".join(event.get("broken_cells", ())),
                     CI_FIXED_CELLS=" ".join(event.get("fixed_cells", ())))
    env.update({k: one_line(v, 2000) for k, v in facts.items()})
    # One id per line (an id is one line), so not flattened; capped.
    env.update({k: v[:8000] for k, v in failing.environment(event).items()})
    return env


def short_id(event: dict) -> str:
    """The event id as logs show it."""
    return event["id"][:12]


def describe(event: dict) -> str:
    """The event as a log line names it: id, kind, branch and commit."""
    return (f"{short_id(event)} ({event['event']} {event['branch']} of "
            f"{event['commit'][:12]})")
