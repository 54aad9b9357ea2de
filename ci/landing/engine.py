"""The land queue's engine: takes asks (``land:``/``unland:`` and pushed
``land/<branch>`` refs), and on each observer poll settles any push left
in doubt, reads verdicts, plans (``plan.py``) and acts: build and
dispatch merges, reject, land by a lease push; then tells the dispatcher
the queue's snapshot and its landed/rejected events.

Everything it decides is journalled (``journal.py``) before it is told or
done: an ask before its reply, a push intent before the push, so a crash
at any point loses no entry, lands nothing twice and guesses nothing.

Asks arrive on the listener's threads, the poll runs on the observer's
thread: ``lock`` guards the journal and the entries, and is never held
across a git push or a call to the dispatcher.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from ci import mergeinfo
from ci.git import GitError
from ci.landing import plan as planner
from ci.landing.journal import QueueEntry, QueueJournal, settle_intent
from ci.landing.ports import Dispatcher, Git
from ci.merging.rules import MergeRule, target_of, valid_branch_name
from ci.wire import one_line

log = logging.getLogger(__name__)

DEFAULT_DEPTH = 3
LAND_PREFIX = "land/"
MAX_REASON = 300
RECENT = 50


class Refused(Exception):
    """An ask that changes nothing, with the reason the asker reads."""


class Engine:
    def __init__(self, journal: QueueJournal, git: Git, dispatcher: Dispatcher,
                 rules: list[MergeRule], depth: int = DEFAULT_DEPTH, wake=None):
        self.journal = journal
        self.git = git
        self.dispatcher = dispatcher
        self.rules = list(rules)
        self.depth = depth
        self.wake = wake or (lambda: None)
        self.lock = threading.RLock()
        self.heads: dict[str, str] = {}         # target -> head the last plan used
        self._undispatched: set[int] = set()    # built, dispatch not yet accepted
        # The dispatch line's matrix field of each tested merge not yet
        # accepted: read from git once, not at every poll's retry.
        self._plans: dict[str, str] = {}
        self._sent_state: str | None = None
        self._authors: dict[str, str] = {}

    # ----------------------------------------------------------------------
    # Asks (listener threads).

    def ask(self, branch: str, by: str, head: str | None = None) -> QueueEntry:
        """Queue ``branch`` (at ``head``, else its head now) for landing, or
        Refused with the reason (nothing changes)."""
        if not valid_branch_name(branch):
            raise Refused(f"invalid branch name {branch!r}")
        if not self.rules:
            raise Refused("the land queue is off: the observer has no --merge-into rule")
        target = target_of(self.rules, branch)
        if target is None:
            raise Refused(f"branch {branch} matches no --merge-into rule: it may not land")
        # One fetch for both heads (the branch's only when not given).
        fresh = self.git.fresh_heads(*([target] if head else [branch, target]))
        head = head or fresh[branch]
        if head is None:
            raise Refused(f"unknown branch {branch}")
        target_head = fresh[target]
        if target_head is None:
            raise Refused(f"target branch {target} does not exist")
        self._check_not_queued(branch)
        if self.git.is_ancestor(head, target_head):
            raise Refused(f"{branch} at {head[:12]} is already merged into {target}")
        paths = self.git.conflicts(target_head, head)
        if paths:
            raise Refused(one_line(f"{branch} conflicts with {target} at {target_head[:12]}: "
                                   + " ".join(paths), MAX_REASON))
        with self.lock:
            self._check_not_queued(branch)
            entry = self.journal.ask(branch, target, head, by)
            entry.state = "waiting"
        log.info("queue: entry %d asked by %s: land %s at %s into %s", entry.id, by, branch,
                 head[:12], target)
        self.wake()
        return entry

    def _check_not_queued(self, branch: str) -> None:
        with self.lock:
            for entry in self.journal.entries.values():
                if entry.active and entry.branch == branch:
                    raise Refused(f"{branch} is already queued as entry {entry.id} "
                                  f"({entry.state})")

    def cancel(self, branch: str, by: str) -> QueueEntry:
        with self.lock:
            found = [e for e in self.journal.entries.values()
                     if e.active and e.branch == branch]
            if not found:
                raise Refused(f"{branch} is not queued")
            entry = found[0]
            if entry.intent:
                raise Refused(f"entry {entry.id} ({branch}) is being landed now")
            self.journal.write("cancelled", entry.id, by=by)
            self._undispatched.discard(entry.id)
        log.info("queue: entry %d (%s) cancelled by %s", entry.id, branch, by)
        self.wake()
        return entry

    # ----------------------------------------------------------------------
    # The poll (observer thread).

    def busy(self) -> bool:
        """Entries are queued, or something is still to be told."""
        with self.lock:
            return any(e.active or e.pending_event() for e in self.journal.entries.values())

    def step(self, heads: dict[str, str]) -> None:
        """One round with the branch heads just fetched."""
        with self.lock:
            for rule in self.rules:
                self.heads[rule.target] = heads.get(rule.target)
        self._take_land_refs(heads)
        self._reject_untargeted()
        self._settle_intents()
        self._read_verdicts()
        for target in sorted({e.target for e in self._active()}):
            try:
                self._drive(target, heads.get(target))
            except (GitError, OSError) as exc:
                log.warning("queue for %s: %s; trying again next poll", target, exc)
        self._send_events()
        self._send_state()
        try:
            self.git.retire({e.id for e in self._active()})
        except OSError as exc:
            log.warning("queue: cannot hand finished entries' merges to deletion: %s", exc)

    def _active(self, target: str | None = None) -> list[QueueEntry]:
        with self.lock:
            return sorted((e for e in self.journal.entries.values()
                           if e.active and (target is None or e.target == target)),
                          key=lambda e: e.id)

    def _take_land_refs(self, heads: dict[str, str]) -> None:
        """A pushed ``land/<branch>`` asks to land ``<branch>`` at the ref's
        commit; the ref is deleted once the ask (or its refusal, as a
        rejected entry) is journalled."""
        for name, commit in sorted(heads.items()):
            if not name.startswith(LAND_PREFIX):
                continue
            branch = name[len(LAND_PREFIX):]
            with self.lock:
                # An active entry took it already; a finished one (rejected by
                # a flaky test, say) does not: pushed again, it asks again.
                known = any(e.branch == branch and e.head == commit and e.active
                            for e in self.journal.entries.values())
            if not known:
                try:
                    self.ask(branch, "push", commit)
                except Refused as exc:
                    self._refuse_pushed(branch, commit, str(exc))
                except GitError as exc:
                    log.warning("queue: %s: %s; trying again next poll", name, exc)
                    continue
            try:
                self.git.delete_branch(name, commit)
            except GitError as exc:
                log.warning("queue: could not delete %s: %s", name, exc)

    def _reject_untargeted(self) -> None:
        """An active entry with no target: a refused push's rejection is
        two records (its ask, then ``rejected``), and a crash between them
        left it queued for ever, the queue never idle."""
        with self.lock:
            for entry in [e for e in self._active() if e.target == "-"]:
                self.journal.write("rejected", entry.id,
                                   reason="matches no --merge-into rule")

    def _refuse_pushed(self, branch: str, commit: str, reason: str) -> None:
        """A refused push-ask has no one to answer: it becomes a rejected
        entry (shown, notified), also when the branch is queued already at
        another head (the new push was dropped without a word)."""
        log.warning("queue: land/%s refused: %s", branch, reason)
        if not valid_branch_name(branch):
            return
        target = target_of(self.rules, branch) or "-"
        with self.lock:
            entry = self.journal.ask(branch, target, commit, "push")
            self.journal.write("rejected", entry.id, reason=one_line(reason, MAX_REASON))

    def _settle_intents(self) -> None:
        """A push intent without its outcome (a crash, or a push whose
        result was lost): the target's real head says what happened."""
        for entry in self._active():
            if not entry.intent:
                continue
            old, new = entry.intent
            try:
                real = self.git.real_head(entry.target)
            except GitError as exc:
                log.warning("queue: cannot read %s to settle entry %d's push: %s",
                            entry.target, entry.id, exc)
                continue
            outcome = settle_intent(old, new, real)
            if outcome == "moved" and real and self._holds(new, entry.target):
                outcome = "landed"      # ours landed, and someone pushed on top
            with self.lock:
                if outcome == "landed":
                    self.journal.write("landed", entry.id, old=old, new=new)
                    self.heads[entry.target] = real or new
                else:
                    self.journal.write("unpushed", entry.id, reason=(
                        "push not made" if outcome == "unpushed" else
                        f"{entry.target} moved to {(real or 'nothing')[:12]}"))
            log.info("queue: entry %d's push in doubt settled: %s", entry.id, outcome)

    def _holds(self, new: str, target: str) -> bool:
        """Whether the target, as the upstream has it now (fetched), has
        our merge ``new`` in its history: then it landed, whatever came
        after it."""
        try:
            head = self.git.fresh_head(target)
            return bool(head) and self.git.is_ancestor(new, head)
        except GitError:
            return False

    def _read_verdicts(self) -> None:
        waiting = {e.tested: e for e in self._active()
                   if e.tested and e.verdict not in planner.FINAL}
        if not waiting:
            return
        try:
            found = self.dispatcher.verdicts(sorted(waiting))
        except Exception as exc:
            log.warning("queue: verdicts unavailable: %s", exc)
            return
        for commit, entry in waiting.items():
            state, reason = found.get(commit, ("unknown", "-"))
            if state in planner.FINAL:
                with self.lock:
                    if entry.active and entry.tested == commit:
                        self.journal.write("verdict", entry.id, sync=False, tested=commit,
                                           verdict=state, reason=one_line(reason, MAX_REASON))
                log.info("queue: entry %d (%s) tested %s: %s", entry.id, entry.branch,
                         commit[:12], state)
            elif state == "unknown":
                self._undispatched.add(entry.id)
        self._dispatch_pending()

    def _dispatch_pending(self) -> None:
        for entry in self._active():
            if entry.id in self._undispatched and entry.tested:
                self._dispatch(entry)

    def _dispatch(self, entry: QueueEntry) -> None:
        info = mergeinfo.MergeInfo(entry.head, entry.base, entry.target)
        line = f"{entry.tested} - {entry.branch} {mergeinfo.encode_merge_field(info)}"
        try:
            # Its recipe's matrix and labels (a commit's recipe never changes).
            plan = self._plans.get(entry.tested)
            if plan is None:
                plan = self._plans[entry.tested] = self.git.plan(entry.tested)
            self.dispatcher.dispatch([f"{line} {plan}" if plan else line])
            self._undispatched.discard(entry.id)
            self._plans.pop(entry.tested, None)
        except Exception as exc:
            self._undispatched.add(entry.id)
            log.warning("queue: dispatch of entry %d failed (retried): %s", entry.id, exc)

    def _drive(self, target: str, head: str | None) -> None:
        """Plan and act for one target, from the head the poll's fetch saw
        (every step starts with a fetch, which sees our own earlier pushes
        too; ``step`` has noted it in ``heads``)."""
        if head is None:
            log.warning("queue: target %s does not exist; its entries wait", target)
            return
        for _ in range(4 * len(self._active(target)) + 8):
            entries = self._active(target)
            if any(e.intent for e in entries):
                return   # a push in doubt: settled first, never planned around
            actions = planner.plan([self._view(e) for e in entries], head, self.depth)
            by_id = {e.id: e for e in entries}
            with self.lock:
                for action in actions:
                    by_id[action.id].state = action.state
            work = [a for a in actions if not isinstance(a, planner.Mark)]
            if not work:
                return
            for action in work:
                entry = by_id[action.id]
                if isinstance(action, planner.Build):
                    self._build(entry, action.base, head)
                elif isinstance(action, planner.Reject):
                    self._reject(entry, action.reason)
                else:
                    head = self._land(entry, action.old, action.new)
                    if head is None:
                        return   # the push failed: retried next poll
                    with self.lock:
                        self.heads[target] = head

    @staticmethod
    def _view(entry: QueueEntry) -> planner.Entry:
        return planner.Entry(entry.id, entry.branch, entry.target, entry.head, entry.tested,
                             entry.base, entry.verdict, entry.reason)

    def _build(self, entry: QueueEntry, base: str, target_head: str) -> None:
        if base == target_head and self.git.is_ancestor(entry.head, base):
            self._reject(entry, f"already merged into {entry.target}")
            return
        commit, paths = self.git.merge(base, entry.head, entry.branch, entry.target)
        if commit is not None:
            self.git.publish(commit, entry.id)
        with self.lock:
            if not entry.active:
                return   # cancelled meanwhile
            if commit is None:
                self.journal.write("built", entry.id, sync=False, tested=None, base=base,
                                   verdict=planner.CONFLICT,
                                   reason=one_line(" ".join(paths) or "-", MAX_REASON))
            else:
                self.journal.write("built", entry.id, sync=False, tested=commit, base=base,
                                   verdict=None, reason="")
        if commit is None:
            log.info("queue: entry %d (%s) conflicts on %s", entry.id, entry.branch, base[:12])
            return
        log.info("queue: entry %d (%s) built %s on %s", entry.id, entry.branch, commit[:12],
                 base[:12])
        self._dispatch(entry)

    def _reject(self, entry: QueueEntry, reason: str) -> None:
        with self.lock:
            if entry.active:
                self.journal.write("rejected", entry.id, reason=one_line(reason, MAX_REASON))
        log.info("queue: entry %d (%s) rejected: %s", entry.id, entry.branch, reason)

    def _land(self, entry: QueueEntry, old: str, new: str) -> str | None:
        """Push; the target's head afterwards (None: the push failed)."""
        with self.lock:
            if not entry.active:
                return old
            self.journal.write("intent", entry.id, old=old, new=new)
        try:
            result = self.git.land(entry.target, old, new)
        except (GitError, OSError) as exc:
            log.warning("queue: push of entry %d in doubt (%s): reading %s", entry.id, exc,
                        entry.target)
            self._settle_intents()
            return None
        if result == "stale" and self._holds(new, entry.target):
            result = "landed"       # ours landed, and someone pushed on top at once
        with self.lock:
            if result == "landed":
                self.journal.write("landed", entry.id, old=old, new=new)
                log.info("queue: entry %d (%s) landed: %s %s..%s", entry.id, entry.branch,
                         entry.target, old[:12], new[:12])
                return new
            self.journal.write("unpushed", entry.id, reason=one_line(result, MAX_REASON))
        if result == "stale":
            log.info("queue: %s moved under entry %d; rebuilding", entry.target, entry.id)
            try:
                return self.git.fresh_head(entry.target)   # fetched: merged on next
            except GitError:
                return None
        log.warning("queue: push of entry %d failed: %s", entry.id, result)
        return None

    # ----------------------------------------------------------------------
    # Telling the dispatcher.

    def _send_events(self) -> None:
        with self.lock:
            pending = [e for e in self.journal.entries.values() if e.pending_event()]
        for entry in sorted(pending, key=lambda e: e.id):
            event = entry.pending_event()
            if entry.head not in self._authors:
                self._authors[entry.head] = self.git.author_of(entry.head)
            fields = {"event": event, "id": entry.id, "branch": entry.branch,
                      "target": entry.target, "head": entry.head,
                      "tested": entry.tested or "", "author": self._authors[entry.head],
                      "reason": entry.reason or "-"}
            try:
                self.dispatcher.send_event(fields)
            except Exception as exc:
                log.info("queue: event %s of entry %d not taken yet: %s", event, entry.id, exc)
                return
            with self.lock:
                self.journal.write("sent", entry.id, sync=False, event=event)
            # Asked again only if another event of the same head is pending.
            self._authors.pop(entry.head, None)

    def snapshot(self, now: float | None = None) -> dict:
        """The queue as ``queue-state`` carries it (docs/protocol.md)."""
        with self.lock:
            entries = list(self.journal.entries.values())
            heads = dict(self.heads)
        active = sorted((e for e in entries if e.active), key=lambda e: e.id)
        done = sorted((e for e in entries if not e.active and e.branch != "-"),
                      key=lambda e: (e.updated, e.id), reverse=True)[:RECENT]
        positions: dict[str, int] = {}
        shown = []
        for entry in active:
            positions[entry.target] = positions.get(entry.target, 0) + 1
            shown.append(self._shape(entry, positions[entry.target]))
        targets = {t: {"head": heads.get(t), "depth": self.depth}
                   for t in sorted({e.target for e in active} | {r.target for r in self.rules})}
        return {"updated": round(now if now is not None else time.time(), 3),
                "targets": targets, "entries": shown,
                "recent": [self._shape(e, None) for e in done]}

    @staticmethod
    def _shape(entry: QueueEntry, position: int | None) -> dict:
        state = entry.done or ("landing" if entry.intent else entry.state)
        return {"id": entry.id, "branch": entry.branch, "target": entry.target,
                "head": entry.head, "state": state, "tested": entry.tested,
                "base": entry.base, "position": position, "reason": entry.reason,
                "asked": entry.asked, "by": entry.by, "updated": entry.updated}

    def _send_state(self) -> None:
        snapshot = self.snapshot()
        key = json.dumps({**snapshot, "updated": 0}, sort_keys=True)
        if key == self._sent_state:
            return
        try:
            self.dispatcher.send_state(json.dumps(snapshot, sort_keys=True).encode())
            self._sent_state = key
        except Exception as exc:
            log.info("queue: snapshot not taken yet: %s", exc)

    def close(self) -> None:
        self.journal.close()
