"""Notifications: tell people when a branch breaks and when it is fixed,
exactly once each, in the branch's commit order, without losing any when a
process dies.

Three parts, each usable alone:

* ``Decider`` (pure): turns results, in whatever order they arrive, into
  decisions in each branch's commit order.  A commit is compared with the
  commit dispatched before it on its branch (``previous``); its decision
  waits until that commit has been decided.
* ``EventStore``: an append-only journal in the dispatcher's state folder.
  Every decision is recorded (an event to send is fsynced before anyone
  tries to send it); a delivery is marked after a 2xx answer or exit
  status 0.  Replayed at start: undelivered events are sent again, and
  results written while nothing decided them (a crash in between) are
  decided then.
* ``Notifier``: a decision thread fed by the dispatcher's non-blocking
  ``result_written`` call, and one delivery thread per target
  (``--notify-command``, each ``--webhook``), each sending its events in
  order with exponential backoff, so a slow or dead receiver only ever
  delays its own messages, never dispatching or result writing.

Event ids are derived from the branch, commit, kind, verdict and how many
times the commit was decided, so the same decision made again after a
crash carries the same id and a receiver can drop the repeat.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import queue
import shlex
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Iterable

import helpers
from ci import procgroup
from ci import results as result_files  # (the module; "results" names lists here)

log = logging.getLogger(__name__)

KINDS = ("broken", "fixed", "still-failing", "passed", "failed")
NOTIFY_ON = {
    "change": frozenset({"broken", "fixed"}),
    "failure": frozenset({"broken", "fixed", "still-failing", "failed"}),
    "all": frozenset(KINDS),
}
DEFAULT_NOTIFY_ON = "change"
# A command or receiver that has not answered by then is treated as failed.
DEFAULT_TIMEOUT = 30.0
# Receivers are retried this long after an event was made (a chat service's
# outage or a mail server's maintenance window usually ends well within it).
DEFAULT_RETRY_FOR = 4 * 3600.0
# The longest wait between two tries of one receiver.
DEFAULT_RETRY_MAX = 300.0
# The journal is rewritten once it holds this many more records than needed.
COMPACT_SLACK = 1000
# The result header passed on stdin and stored with each event.
MAX_HEADER = 8 * 1024
# Command output kept for the log.
MAX_LOGGED_OUTPUT = 2000
JOURNAL_NAME = "notifications.journal"

# Environment variables never passed to a notify command: the cluster
# secret, our own namespace (so inherited values cannot pose as facts), and
# names that usually hold credentials.
SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIAL", "_KEY")


def is_failing(verdict: str) -> bool:
    """``failed``, ``error`` and ``timeout`` all mean the branch is not green."""
    return verdict != "passed"


def classify(previous_verdict: str | None, verdict: str) -> str:
    """The event kind for ``verdict`` after ``previous_verdict``.

    Without an earlier verdict there is no change to report: the kind is
    ``passed`` or ``failed`` (a branch's first commit, or one whose
    predecessor's result is unknown), never ``broken``, since we cannot say
    this commit broke anything."""
    if previous_verdict is None:
        return "failed" if is_failing(verdict) else "passed"
    if is_failing(verdict):
        return "still-failing" if is_failing(previous_verdict) else "broken"
    return "fixed" if is_failing(previous_verdict) else "passed"


# --------------------------------------------------------------------------
# The decision: pure, no I/O (lookups are a function the caller supplies).

@dataclasses.dataclass(frozen=True)
class Result:
    commit: str
    branch: str | None
    previous: str | None
    verdict: str
    fields: dict = dataclasses.field(default_factory=dict, compare=False)


@dataclasses.dataclass(frozen=True)
class Decision:
    result: Result
    kind: str
    previous_verdict: str | None
    # How many times this commit has been decided (a retest adds one).
    n: int
    retest: bool
    announce: bool

    @property
    def event_id(self) -> str:
        r = self.result
        text = "\n".join([r.branch or "", r.commit, self.kind, r.verdict, str(self.n)])
        return hashlib.sha256(text.encode()).hexdigest()[:32]


# What a lookup of a commit the decider has not seen may answer.
PENDING = "pending"    # queued or running: its result will come
UNKNOWN = "unknown"    # no result and none expected: judge the next one alone


class Decider:
    """Branch state: which commits were decided (with their verdict) and
    which results wait for their predecessor.

    Rules:
    * a result whose ``previous`` is absent, itself, or unknown (no result
      and not pending) is judged alone: ``passed`` / ``failed``;
    * a result whose ``previous`` is decided is compared with it;
    * otherwise it waits; when the predecessor is decided, the waiters are
      decided in turn, so decisions come out in commit order;
    * a previous commit with a result the decider has not been given yet is
      taken from the lookup and decided first;
    * a new verdict for a decided commit (a retest) is compared with that
      commit's own earlier verdict: failed -> passed is ``fixed``, passed ->
      failed is ``broken``; the same verdict again decides nothing;
    * a result without a branch is never announced (its verdict still
      serves as the predecessor of a commit that has one).

    Not thread-safe: one thread (the notifier's) owns it."""

    def __init__(self, kinds: Iterable[str] = NOTIFY_ON[DEFAULT_NOTIFY_ON]):
        self.kinds = frozenset(kinds)
        self.judged: dict[str, tuple[str, int]] = {}
        self.pool: dict[str, Result] = {}
        # commit -> pooled commits waiting for it to be decided
        self.waiters: dict[str, list[str]] = collections.defaultdict(list)
        # pooled commit -> the commit it waits for
        self.blocked_on: dict[str, str] = {}

    def add(self, results: Iterable[Result],
            lookup: Callable[[str], object] = lambda commit: UNKNOWN) -> list[Decision]:
        """Take new results; return every decision they make possible, in
        order.  ``lookup(commit)`` answers for a predecessor the decider has
        not seen: PENDING, UNKNOWN, or its Result."""
        out: list[Decision] = []
        ready: collections.deque = collections.deque()
        fresh: list[str] = []
        for result in results:
            if not result.branch:
                # Never announced, but it may be the predecessor someone waits for.
                for waiter in self.waiters.pop(result.commit, []):
                    self.blocked_on.pop(waiter, None)
                    ready.append((waiter, result.verdict))
                continue
            old = self.judged.get(result.commit)
            if old is not None:
                if old[0] != result.verdict:
                    out.append(self._decide(result, old[0], retest=True))
                continue
            if result.commit not in self.pool:
                fresh.append(result.commit)
            # A newer verdict for a waiting commit simply replaces the old.
            self.pool[result.commit] = result
        for commit in fresh:
            self._examine(commit, lookup, ready)
        while ready:
            commit, previous_verdict = ready.popleft()
            result = self.pool.pop(commit)
            out.append(self._decide(result, previous_verdict, retest=False))
            for waiter in self.waiters.pop(commit, []):
                self.blocked_on.pop(waiter, None)
                self._examine(waiter, lookup, ready)
        return out

    def waiting(self) -> dict[str, str]:
        """Pooled commit -> the commit it waits for (for logs and tests)."""
        return dict(self.blocked_on)

    def _examine(self, start: str, lookup, ready) -> None:
        todo = [start]
        while todo:
            commit = todo.pop()
            previous = self.pool[commit].previous
            if previous is None or previous == commit:
                ready.append((commit, None))
            elif previous in self.judged:
                ready.append((commit, self.judged[previous][0]))
            elif previous in self.pool:
                if self._leads_to(previous, commit):
                    ready.append((commit, None))  # a cycle (bad metadata): break it here
                else:
                    self._wait(commit, previous)
            else:
                found = lookup(previous)
                if found == PENDING:
                    self._wait(commit, previous)
                elif not isinstance(found, Result) or found.commit != previous:
                    ready.append((commit, None))
                elif not found.branch:
                    ready.append((commit, found.verdict))
                else:
                    # Its own result_written is still on the way (or was lost in a
                    # crash): decide it first, whatever order the calls come in.
                    self.pool[previous] = found
                    self._wait(commit, previous)
                    todo.append(previous)

    def _wait(self, commit: str, previous: str) -> None:
        self.blocked_on[commit] = previous
        self.waiters[previous].append(commit)

    def _leads_to(self, start: str, target: str) -> bool:
        """Does following the wait links from ``start`` reach ``target``?"""
        current = start
        for _ in range(len(self.pool) + 1):
            if current == target:
                return True
            if current not in self.blocked_on:
                return False
            current = self.blocked_on[current]
        return True

    def _decide(self, result: Result, previous_verdict: str | None, retest: bool) -> Decision:
        n = self.judged.get(result.commit, ("", 0))[1] + 1
        kind = classify(previous_verdict, result.verdict)
        self.judged[result.commit] = (result.verdict, n)
        return Decision(result, kind, previous_verdict, n, retest, kind in self.kinds)


# --------------------------------------------------------------------------
# Events: what a receiver is told.  Pure.

def _int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def commit_url(dashboard_url: str | None, commit: str) -> str:
    if not dashboard_url:
        return ""
    return dashboard_url.replace("{commit}", commit)


def event_text(event: dict) -> str:
    """One human line, as chat tools show it."""
    short = event["commit"][:12]
    who = ", ".join(part for part in (f'"{event["subject"]}"' if event["subject"] else "",
                                      event["author"]) if part)
    about = f"{short} ({who})" if who else short
    counts = (f"{event['failures']} failures, {event['errors']} errors of "
              f"{event['tests']} tests")
    if event["verdict"] in ("error", "timeout"):
        counts = f"verdict {event['verdict']}" + (f": {event['reason']}" if event["reason"]
                                                   else "")
    elif event["verdict"] == "failed":
        counts = f"verdict failed: {counts}"
    branch = event["branch"]
    kind = event["event"]
    if kind == "broken":
        text = f"{branch} is broken by {about}: {counts}"
    elif kind == "fixed":
        text = f"{branch} is fixed by {about}: {event['tests']} tests pass"
    elif kind == "still-failing":
        text = f"{branch} is still failing at {about}: {counts}"
    elif kind == "passed":
        text = f"{branch}: {about} passed, {event['tests']} tests"
    else:
        text = f"{branch}: {about} failed: {counts}"
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
        "subject": helpers.one_line(str(fields.get("subject", "")), 300),
        "author": helpers.one_line(str(fields.get("author", "")), 200),
        "tests": _int(fields.get("tests")),
        "failures": _int(fields.get("failures")),
        "errors": _int(fields.get("errors")),
        "reason": helpers.one_line(str(fields.get("reason", "")), 300),
        "result_file": os.path.join(results_dir, result.commit),
        "url": commit_url(dashboard_url, result.commit),
        "created": time.time() if now is None else now,
    }
    event["text"] = event_text(event)
    header = {"commit": result.commit}
    header.update((k, v) for k, v in fields.items() if k != "commit")
    event["header"] = helpers.encode_fields(header).decode("utf-8")[:MAX_HEADER]
    event["targets"] = list(targets)
    return event


PAYLOAD_KEYS = ("id", "event", "branch", "commit", "previous", "verdict", "previous_verdict",
                "retest", "subject", "author", "tests", "failures", "errors", "reason",
                "result_file", "url", "text")
# What a journalled event must hold to be sent again after a restart.
EVENT_KEYS = frozenset(PAYLOAD_KEYS) | {"created", "header", "targets"}


def webhook_body(event: dict) -> bytes:
    payload = {key: event[key] for key in PAYLOAD_KEYS}
    payload["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(event["created"]))
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


def signature(secret: bytes, body: bytes) -> str:
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
    env.update({k: helpers.one_line(v, 2000) for k, v in facts.items()})
    return env


# --------------------------------------------------------------------------
# Result files as the notifier reads them.

def read_result(results_dir: str, commit: str) -> Result | None:
    """The result file's header as a Result, or None if it is missing or
    unreadable."""
    if not helpers.valid_full_commit(commit):
        return None
    fields = result_files.read_header(os.path.join(results_dir, commit))
    return None if fields is None else result_from_fields(commit, fields)


def result_from_fields(commit: str, fields: dict) -> Result | None:
    verdict = str(fields.get("verdict", ""))
    if verdict not in helpers.VERDICTS:
        return None
    branch = str(fields.get("branch") or "") or None
    previous = str(fields.get("previous") or "")
    previous = previous if helpers.valid_full_commit(previous) else None
    return Result(commit, branch, previous, verdict,
                  {k: str(v) for k, v in fields.items()})


# --------------------------------------------------------------------------
# The durable store.

class EventStore:
    """The notification journal: JSON lines, append-only.

    ``{"j": commit, "v": verdict, "n": n, "k": kind, "e": event|null}``
    records a decision; ``{"ok": id, "t": target}`` a delivery and
    ``{"gave_up": id, "t": target}`` a target given up on.  A torn last
    line is skipped.  ``records`` counts lines so the owner knows when to
    compact.  ``judged`` is the decider's map (commit -> (verdict, n)).

    The lock guards the file handle and the pending maps: delivery threads
    mark events while the decision thread appends and compacts."""

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()
        self.judged: dict[str, tuple[str, int]] = {}
        self.events: dict[str, dict] = {}       # id -> undelivered event, in order
        self.remaining: dict[str, set[str]] = {}  # id -> targets still to deliver to
        self.records = 0
        self._handle = None

    def load(self) -> bool:
        """Replay the journal; False if there was none."""
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return False
        for raw in data.split(b"\n"):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                log.warning("skipped an unreadable journal line")
                continue
            if not isinstance(record, dict):
                continue
            self.records += 1
            self._apply(record)
        return True

    def _apply(self, record: dict) -> None:
        if "j" in record:
            commit = record["j"]
            try:
                self.judged[commit] = (str(record.get("v", "")), int(record.get("n", 0)))
            except (TypeError, ValueError):
                return
            event = record.get("e")
            if isinstance(event, dict) and EVENT_KEYS <= event.keys() and isinstance(
                    event["targets"], list) and isinstance(event["created"], (int, float)):
                self.events[event["id"]] = event
                self.remaining[event["id"]] = set(event.get("targets", []))
                self._settle(event["id"])
        elif "ok" in record or "gave_up" in record:
            event_id = record.get("ok") or record.get("gave_up")
            if event_id in self.remaining:
                self.remaining[event_id].discard(record.get("t"))
                self._settle(event_id)

    def _settle(self, event_id: str) -> None:
        if not self.remaining.get(event_id):
            self.remaining.pop(event_id, None)
            self.events.pop(event_id, None)

    def open(self) -> None:
        with self.lock:
            if self._handle is None:
                self._handle = open(self.path, "ab")

    def append(self, records: list[dict], sync: bool) -> None:
        """Write records (and apply them); with ``sync`` they are on disk
        when this returns."""
        if not records:
            return
        data = b"".join(json.dumps(r, ensure_ascii=True).encode() + b"\n" for r in records)
        with self.lock:
            if self._handle is None:
                raise OSError("the notification journal is closed")
            for record in records:
                self._apply(record)
            self._handle.write(data)
            self._handle.flush()
            if sync:
                os.fsync(self._handle.fileno())
            self.records += len(records)

    def mark(self, event_id: str, target: str, outcome: str = "ok") -> None:
        self.append([{outcome: event_id, "t": target}], sync=True)

    def pending(self) -> list[dict]:
        with self.lock:
            return [dict(e, targets=sorted(self.remaining[i])) for i, e in self.events.items()]

    def should_compact(self) -> bool:
        with self.lock:
            return self.records > 2 * (len(self.judged) + len(self.events)) + COMPACT_SLACK

    def compact(self, keep: Callable[[str], bool] = lambda commit: True) -> None:
        """Atomically rewrite the journal with what is still needed: the
        last decision per commit (dropping commits ``keep`` refuses, e.g.
        whose result file is gone) and the undelivered events."""
        with self.lock:
            for commit in [c for c in self.judged if not keep(c)]:
                del self.judged[commit]
            # Undelivered events first (they outlive their result file's
            # removal), then the last decision per commit, which wins on replay.
            lines = [{"j": e["commit"], "v": e["verdict"], "n": 0,
                      "e": dict(e, targets=sorted(self.remaining[i]))}
                     for i, e in self.events.items()]
            lines.extend({"j": commit, "v": verdict, "n": n}
                         for commit, (verdict, n) in self.judged.items())
            data = b"".join(json.dumps(r).encode() + b"\n" for r in lines)
            helpers.atomic_write(self.path, data)
            if self._handle:
                self._handle.close()
            self._handle = open(self.path, "ab")
            self.records = len(lines)

    def close(self) -> None:
        with self.lock:
            if self._handle:
                try:
                    self._handle.flush()
                    os.fsync(self._handle.fileno())
                except OSError:
                    log.exception("cannot flush the journal")
                self._handle.close()
                self._handle = None


# --------------------------------------------------------------------------
# Targets: how one event reaches one receiver.

class DeliveryError(Exception):
    """The receiver did not confirm: try again later."""


class CommandTarget:
    """Runs ``--notify-command`` (split like a shell would, never run by one)
    with the facts in the environment and the result header on stdin."""

    def __init__(self, argv: list[str], timeout: float):
        self.argv = argv
        self.timeout = timeout
        self.key = "command"
        self.label = f"command {argv[0]}"
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def deliver(self, event: dict) -> None:
        try:
            proc = procgroup.start(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT,
                                   env=command_environment(event, os.environ))
        except OSError as exc:
            raise DeliveryError(f"cannot start: {exc}") from None
        with self._lock:
            self._proc = proc
        try:
            output, _ = proc.communicate(event["header"].encode("utf-8"), timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            raise DeliveryError(f"timed out after {self.timeout:g}s") from None
        finally:
            with self._lock:
                self._proc = None
        text = output.decode("utf-8", "replace").strip()[-MAX_LOGGED_OUTPUT:]
        if text:
            log.info("notify command output for %s: %s", event["id"][:12], text)
        if proc.returncode != 0:
            raise DeliveryError(f"exited {proc.returncode}")

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        procgroup.kill_group(proc.pid)
        try:
            proc.communicate(timeout=5)
        except (subprocess.TimeoutExpired, OSError, ValueError):
            pass

    def abort(self) -> None:
        """Stopping: end a command in progress (it is retried next start)."""
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            procgroup.kill_group(proc.pid)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect would turn the POST into a GET without the body: refuse it,
    so it counts as a failure the operator sees."""

    def redirect_request(self, *args, **kwargs):
        return None


class WebhookTarget:
    """POSTs the event as JSON; signed when a secret is given."""

    def __init__(self, url: str, secret: bytes | None, timeout: float):
        self.url = url
        self.secret = secret
        self.timeout = timeout
        # The URL often holds a token (chat incoming webhooks): logs and the
        # journal name it by host and a digest only.
        self.key = "webhook:" + hashlib.sha256(url.encode()).hexdigest()[:16]
        self.label = f"webhook {urllib.parse.urlsplit(url).hostname} ({self.key[8:16]})"
        self._opener = urllib.request.build_opener(_NoRedirect)

    def deliver(self, event: dict) -> None:
        body = webhook_body(event)
        headers = {"Content-Type": "application/json", "User-Agent": "ci-dispatcher-notify/1",
                   "X-CI-Event": event["event"], "X-CI-Event-Id": event["id"]}
        if self.secret:
            headers["X-CI-Signature-256"] = signature(self.secret, body)
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                response.read(64 * 1024)
                status = response.status
        except urllib.error.HTTPError as exc:
            raise DeliveryError(f"HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise DeliveryError(str(getattr(exc, "reason", exc))) from None
        except Exception as exc:  # http.client's protocol errors
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from None
        if not 200 <= status < 300:
            raise DeliveryError(f"HTTP {status}")

    def abort(self) -> None:
        pass


class TargetWorker:
    """One thread per target: its events in order, each retried with
    exponential backoff until delivered or older than ``retry_for``."""

    def __init__(self, target, store: EventStore, retry_for: float, retry_max: float,
                 stop_event: threading.Event):
        self.target = target
        self.store = store
        self.retry_for = retry_for
        self.backoff = helpers.Backoff(first=min(1.0, retry_max), cap=retry_max)
        self.stop_event = stop_event
        self.cond = threading.Condition()
        self.queue: collections.deque[dict] = collections.deque()  # guarded by cond
        self.thread = threading.Thread(target=self._run, name=f"notify-{target.key[:20]}",
                                       daemon=True)

    def submit(self, event: dict) -> None:
        with self.cond:
            self.queue.append(event)
            self.cond.notify()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def _next(self) -> dict | None:
        with self.cond:
            while not self.queue and not self.stop_event.is_set():
                self.cond.wait(1.0)
            return None if self.stop_event.is_set() else self.queue[0]

    def _run(self) -> None:
        tries = 0
        while True:
            event = self._next()
            if event is None:
                return
            tries += 1
            try:
                self.target.deliver(event)
            except Exception as exc:
                if not isinstance(exc, DeliveryError):
                    log.exception("notification %s to %s: unexpected failure",
                                  event["id"][:12], self.target.label)
                age = time.time() - event["created"]
                # Every event is tried at least once in this process, so one
                # that outlived a long outage still gets its chance.
                if age > self.retry_for:
                    log.error("notification %s (%s %s of %s) to %s: giving up after %d "
                              "tries over %.0fs: %s", event["id"][:12], event["event"],
                              event["branch"], event["commit"][:12], self.target.label,
                              tries, age, exc)
                    self._done(event, "gave_up")
                    # The next event starts from the first short delay, not
                    # from where this one's retries left off.
                    self.backoff.reset()
                    tries = 0
                    continue
                delay = self.backoff.next()
                log.warning("notification %s to %s failed (try %d): %s; again in %.1fs",
                            event["id"][:12], self.target.label, tries, exc, delay)
                self.stop_event.wait(delay)
                continue
            log.info("notification %s (%s %s of %s) delivered to %s", event["id"][:12],
                     event["event"], event["branch"], event["commit"][:12], self.target.label)
            self._done(event, "ok")
            self.backoff.reset()
            tries = 0

    def _done(self, event: dict, outcome: str) -> None:
        try:
            self.store.mark(event["id"], self.target.key, outcome)
        except (OSError, ValueError):
            # Not marked: it is sent again after a restart, with the same id.
            log.exception("cannot journal the %s mark of %s", outcome,
                          event["id"][:12])
        with self.cond:
            if self.queue and self.queue[0] is event:
                self.queue.popleft()


# --------------------------------------------------------------------------
# The notifier: what the dispatcher holds.

class Notifier:
    """Owns the decider, the store and the delivery workers.

    The dispatcher calls ``result_written`` (it only queues) after each
    result file is on disk; everything else runs on the notifier's own
    threads."""

    def __init__(self, state_dir: str, results_dir: str, targets: list,
                 kinds: Iterable[str] = NOTIFY_ON[DEFAULT_NOTIFY_ON],
                 dashboard_url: str | None = None, retry_for: float = DEFAULT_RETRY_FOR,
                 retry_max: float = DEFAULT_RETRY_MAX):
        self.results_dir = results_dir
        self.dashboard_url = dashboard_url
        self.store = EventStore(os.path.join(state_dir, JOURNAL_NAME))
        self.decider = Decider(kinds)
        self.decider.judged = self.store.judged
        self.targets = targets
        self.stop_event = threading.Event()
        self.workers = {t.key: TargetWorker(t, self.store, retry_for, retry_max,
                                            self.stop_event) for t in targets}
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.is_pending: Callable[[str], bool] = lambda commit: False
        # Result files present when a first journal is made (see _recover).
        self.baseline: set[str] | None = None
        self.thread = threading.Thread(target=self._run, name="notify-decide", daemon=True)

    # ---- called by the dispatcher ---------------------------------------
    def start(self, is_pending: Callable[[str], bool] | None = None) -> None:
        """``is_pending(commit)``: is that commit queued or running (so its
        result will come)?  Without it, a missing result counts as unknown."""
        if is_pending is not None:
            self.is_pending = is_pending
        if not os.path.exists(self.store.path):
            # Listed now, before the dispatcher can write a result, so that a
            # result written while the list is read is never taken for an old one.
            self.baseline = set(self._result_names())
        for worker in self.workers.values():
            worker.thread.start()
        self.thread.start()

    def result_written(self, commit: str, fields: dict) -> None:
        """Never blocks: the decision is made on the notifier's thread.

        Only the result file's header fields, in its order: the per-test
        ``records`` the dispatcher holds beside them are not header values
        (their text would fill the header a command reads on stdin), and an
        event made now must equal the one a restart makes from the file."""
        self.inbox.put((commit, result_files.header_fields(fields)))

    def stop(self, timeout: float = 3.0) -> None:
        self.stop_event.set()
        self.inbox.put(None)
        for worker in self.workers.values():
            worker.wake()
        # A delivery in progress may finish (and be marked) within the
        # timeout; one that does not is ended and sent again next start.
        deadline = time.monotonic() + timeout
        self.thread.join(max(0.1, deadline - time.monotonic()))
        for worker in self.workers.values():
            worker.thread.join(max(0.1, deadline - time.monotonic()))
            if worker.thread.is_alive():
                worker.target.abort()
                worker.thread.join(0.5)
        self.store.close()

    # ---- the decision thread ---------------------------------------------
    def _run(self) -> None:
        try:
            self._recover()
        except Exception:
            log.exception("start-up replay failed; deciding new results only")
            try:
                self.store.open()
            except OSError:
                log.exception("cannot open the journal")
        while not self.stop_event.is_set():
            item = self.inbox.get()
            batch = []
            while item is not None:
                batch.append(item)
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    break
            if self.stop_event.is_set():
                return
            results = [r for r in (result_from_fields(c, f) for c, f in batch) if r]
            try:
                self._process(results)
            except Exception:
                log.exception("deciding %d result(s) failed", len(results))

    def _recover(self) -> None:
        """Rebuild the decision state: the journal says which verdict of
        which commit was decided (and which events are undelivered); the
        result files say what exists.  A result file whose verdict the
        journal does not hold was written but never decided (a crash in
        between, or a retest): it is decided now.  A commit whose result
        waited for its predecessor was never journalled, so it is found the
        same way and waits again."""
        existed = self.store.load()
        if not existed:
            # First start with notifications: results from before it count as
            # announced, or every old result would be sent at once.
            for name in self.baseline or ():
                result = read_result(self.results_dir, name)
                if result:
                    self.store.judged[name] = (result.verdict, 0)
            self.store.compact()
            log.info("new notification journal; %d existing result(s) taken as announced",
                     len(self.store.judged))
        else:
            self.store.open()
        pending = self.store.pending()
        for event in pending:
            for key in event["targets"]:
                if key in self.workers:
                    self.workers[key].submit(event)
                else:
                    # That receiver was removed from the flags: nobody to send to.
                    log.warning("notification %s: target %s is no longer configured; "
                                "dropped", event["id"][:12], key)
                    self.store.mark(event["id"], key, "gave_up")
        unseen = []
        for name in self._result_names():
            known = self.store.judged.get(name)
            result = read_result(self.results_dir, name)
            if result and result.branch and (known is None or known[0] != result.verdict):
                unseen.append(result)
        log.info("%d undelivered event(s) to retry, %d result(s) to decide",
                 len(pending), len(unseen))
        # Oldest first, so results of one branch enter in roughly their order
        # (the decider orders them exactly anyway).
        unseen.sort(key=lambda r: self._mtime(r.commit))
        self._process(unseen)

    def _result_names(self) -> list[str]:
        try:
            return [n for n in os.listdir(self.results_dir) if helpers.valid_full_commit(n)]
        except OSError:
            log.exception("cannot list %s", self.results_dir)
            return []

    def _mtime(self, commit: str) -> float:
        try:
            return os.stat(os.path.join(self.results_dir, commit)).st_mtime
        except OSError:
            return 0.0

    def _lookup(self, commit: str):
        # Pending first: a commit finishing right now is written before it
        # stops being pending, so "not pending" means its file is final.
        if self.is_pending(commit):
            return PENDING
        return read_result(self.results_dir, commit) or UNKNOWN

    def _process(self, results: list[Result]) -> None:
        if not results:
            return
        decisions = self.decider.add(results, self._lookup)
        keys = list(self.workers)
        records, events = [], []
        for decision in decisions:
            event = None
            if decision.announce:
                event = build_event(decision, self.results_dir, self.dashboard_url, keys)
                events.append(event)
            records.append({"j": decision.result.commit, "v": decision.result.verdict,
                            "n": decision.n, "k": decision.kind, "e": event})
            log.info("%s on %s is %s%s%s", decision.result.commit[:12],
                     decision.result.branch, decision.kind, " (retest)" if decision.retest
                     else "", f", event {event['id'][:12]}" if event else " (not announced)")
        if self.decider.waiting():
            log.debug("waiting for earlier commits: %s",
                      {c[:12]: p[:12] for c, p in self.decider.waiting().items()})
        try:
            # Durable before any receiver is tried.
            self.store.append(records, sync=bool(events))
        except (OSError, ValueError):
            # Sent anyway; after a crash the same decisions are made again
            # from the result files, with the same ids.
            log.exception("cannot journal %d decision(s)", len(records))
        for event in events:
            for worker in self.workers.values():
                worker.submit(event)
        if self.store.should_compact():
            try:
                self.store.compact(lambda c: os.path.exists(os.path.join(self.results_dir, c)))
            except OSError:
                log.exception("cannot compact the journal")


# --------------------------------------------------------------------------
# Flags.

def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "notifications", "tell people when a branch breaks or is fixed (off unless "
        "--notify-command or --webhook is given)")
    group.add_argument("--notify-command", metavar="COMMAND",
                       help="run for each notification, split like a shell would (never run "
                            "by one), with the facts in CI_* environment variables and the "
                            "result header on stdin")
    group.add_argument("--webhook", action="append", default=[], metavar="URL",
                       help="POST each notification as JSON to this http(s) URL; repeat for "
                            "several")
    group.add_argument("--webhook-secret-file", metavar="PATH",
                       help="sign webhook bodies with HMAC-SHA256 using this file's content "
                            "(header X-CI-Signature-256: sha256=<hex>)")
    group.add_argument("--notify-on", choices=sorted(NOTIFY_ON), default=DEFAULT_NOTIFY_ON,
                       help="change: broken and fixed only; failure: also every still-failing "
                            "or failing commit; all: every result (default: %(default)s)")
    group.add_argument("--notify-timeout", type=float, default=DEFAULT_TIMEOUT,
                       metavar="SECONDS",
                       help="a command or webhook that takes longer has failed and is retried "
                            "(default: %(default)s)")
    group.add_argument("--notify-retry-for", type=float, default=DEFAULT_RETRY_FOR,
                       metavar="SECONDS",
                       help="keep retrying an undelivered notification this long after it was "
                            "made, across restarts (default: %(default)s)")
    group.add_argument("--notify-retry-max", type=float, default=DEFAULT_RETRY_MAX,
                       metavar="SECONDS",
                       help="longest wait between two tries of one receiver; the wait doubles "
                            "from 1 s up to it (default: %(default)s)")
    group.add_argument("--dashboard-url", metavar="URL",
                       help="link given with each notification (CI_URL, 'url'); '{commit}' in "
                            "it is replaced by the commit id")


def _check_http_url(flag: str, url: str) -> str:
    parts = urllib.parse.urlsplit(url) if url.isprintable() and " " not in url else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise helpers.ConfigError(
            f"{flag} {helpers.one_line(url, 200)!r}: only http:// or https:// URLs with a "
            "host are allowed")
    return url


def from_args(args: argparse.Namespace, state_dir: str, results_dir: str) -> Notifier | None:
    """The notifier the flags ask for, or None; ConfigError for bad flags."""
    for name in ("notify_timeout", "notify_retry_for", "notify_retry_max"):
        if getattr(args, name) <= 0:
            raise helpers.ConfigError(f"--{name.replace('_', '-')} must be positive")
    webhooks = [_check_http_url("--webhook", url) for url in args.webhook]
    if args.dashboard_url:
        _check_http_url("--dashboard-url", args.dashboard_url)
    secret = None
    if args.webhook_secret_file:
        if not webhooks:
            raise helpers.ConfigError("--webhook-secret-file needs at least one --webhook")
        try:
            secret = helpers.read_secret_file(args.webhook_secret_file,
                                              "--webhook-secret-file")
        except ValueError as exc:
            raise helpers.ConfigError(str(exc)) from None
    targets: list = []
    if args.notify_command is not None:
        try:
            argv = shlex.split(args.notify_command)
        except ValueError as exc:
            raise helpers.ConfigError(f"invalid --notify-command: {exc}") from None
        if not argv:
            raise helpers.ConfigError("--notify-command is empty")
        if shutil.which(argv[0]) is None:
            raise helpers.ConfigError(f"--notify-command: cannot find program {argv[0]!r}")
        targets.append(CommandTarget(argv, args.notify_timeout))
    targets.extend(WebhookTarget(url, secret, args.notify_timeout)
                   for url in dict.fromkeys(webhooks))
    if not targets:
        return None
    return Notifier(state_dir, results_dir, targets, NOTIFY_ON[args.notify_on],
                    args.dashboard_url, args.notify_retry_for, args.notify_retry_max)
