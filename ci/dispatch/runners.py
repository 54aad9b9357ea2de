"""The runner side of the dispatcher's state: who is registered, what each
runner is doing, adoption of work a runner proves it still runs, held
commits, pings and deadlines.

A runner is in exactly one state:

    idle      free for work
    running   running ``job`` (ours)
    occupied  busy with work we did not (or no longer) give it: a job that
              was reassigned or finished elsewhere, or a run from before a
              restart; it is offered nothing until it says it is idle
    suspect   a ``runtest`` could not be delivered; waits for a good ping

``RunnerRegistry`` is a part of ``DispatcherState`` (ci/dispatch/state.py),
which holds the lock and the work table these methods use; its locking
rule holds here too.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import NamedTuple

from ci.dispatch.journal import AssignmentRecord
from ci.dispatch.work import Job, ShardSet, Work, WorkState
from ci.wire import Reply, format_address

log = logging.getLogger(__name__)

IDLE, RUNNING, OCCUPIED, SUSPECT = "idle", "running", "occupied", "suspect"
# Beyond a runner's own limits: time to send its result.
REPORT_GRACE = 30.0


@dataclasses.dataclass(frozen=True)
class Traits:
    """What a runner says of itself on ``register`` beyond its address."""
    # The longest a job may take by the runner's own limits, if it said.
    limit: float | None = None
    # Its labels (``--label``, ``python3.12`` per interpreter): a cell goes
    # only to a runner that has every label it needs.
    labels: frozenset[str] = frozenset()
    # It takes only jobs that ask for one of its labels.
    exclusive: bool = False


@dataclasses.dataclass
class Runner:
    key: str
    address: tuple[str, int]
    instance: str
    name: str | None = None
    state: str = IDLE
    job: Job | None = None              # set exactly when state == RUNNING
    occupied_with: str | None = None    # what an occupied runner is busy with
    misses: int = 0
    traits: Traits = Traits()
    # The name it gave itself (``--name``; display only), not ``name``,
    # its issued key's, which proves who it is; nor one of its ``labels``.
    given_name: str | None = None

    @property
    def limit(self) -> float | None:
        return self.traits.limit

    @property
    def free(self) -> bool:
        return self.state == IDLE

    def set(self, state: str, job: Job | None = None, occupied_with: str | None = None):
        self.state, self.job, self.occupied_with = state, job, occupied_with


class PingReply(NamedTuple):
    """What one ping got: ``outcome`` (``ok``, ``busy``, ``refused``,
    ``timeout``, ``unauthentic``: a reply not signed with the key we
    called) and, from a runner that answered ``ok``, its instance and
    what it says it runs (commit and token)."""
    outcome: str
    instance: str = ""
    busy: str | None = None
    token: str | None = None


class RunnerRegistry:
    """Registration, pings and deadlines; mixed into ``DispatcherState``."""

    def register(self, address: tuple[str, int], instance: str, busy: str | None,
                 token: str | None = None, name: str | None = None,
                 traits: Traits = Traits(), proven: bool = False) -> str:
        """``known``, ``registered``, or ``unproven``: a runner of an
        issued key (``name``) is entered only once a ping signed with that
        key was answered at ``address`` by this ``instance`` (``proven``):
        the key's holder says where it is, and only the address can say
        that it is there.  Unproven, any key could name any address, and
        hold it with heartbeats while the pings there failed."""
        key = format_address(address)
        with self.cond:
            runner = self.runners.get(key)
            self._check_claim(key, name)
            if runner and runner.instance == instance and runner.name == name:
                # A heartbeat: what it says of its work, not of the address,
                # which only an answered ping vouches for (misses stay).
                runner.traits = traits
                self._believe(runner, busy, token)
                return "known"
            if name is not None and not proven:
                return "unproven"
            if runner and runner.name != name:
                # Proven here: the other key cannot be answering there now.
                log.warning("runner %s answers at %s, where runner %s was registered; that "
                            "entry dropped%s", name, key, runner.name or "(shared secret)",
                            f", {runner.job.commit[:12]} requeued" if runner.job else "")
                self._drop(runner, count=False)
            elif runner:
                # The runner restarted: whatever it was running is gone.
                log.warning("runner %s restarted%s", key, f" while running "
                            f"{runner.job.commit[:12]}; requeueing" if runner.job else "")
                self._drop(runner, count=True)
            runner = self.runners[key] = Runner(key, address, instance, name, traits=traits)
            if busy is not None:
                runner.set(OCCUPIED, occupied_with=busy)
                self._adopt(runner, busy, token)
            self._release_held_of(key)
            self.cond.notify_all()
            log.info("runner %s registered%s (%d runners)", key,
                     f" while busy with {busy[:12]}" if busy else "", len(self.runners))
            return "registered"

    def _check_claim(self, key: str, name: str | None) -> None:
        """Reply unless a runner with key ``name`` may register at ``key``.
        One address per runner key: a stolen key must not be able to take
        the runner's work to an address of the thief's.  A runner that
        really moved (restarted on another port) is accepted once its old
        address stops answering pings."""
        if name:
            for other in self.runners.values():
                if other.name == name and other.key != key:
                    raise Reply(f"runner {name} is registered at {other.key}; another "
                                "address is accepted once that one stops answering")

    def start_proof(self, name: str, now: float | None = None) -> bool:
        """Whether a ping proving an address of runner ``name`` may be sent
        now (it is then under way until ``proof_done``): one at a time per
        key, and after a failed one not for ``pause`` seconds, so a key's
        holder cannot make the dispatcher call host after host faster than
        it pings its runners."""
        now = time.monotonic() if now is None else now
        with self.cond:
            if self.proofs.get(name, 0.0) > now:
                return False
            self.proofs[name] = float("inf")
            return True

    def proof_done(self, name: str, proven: bool, pause: float) -> None:
        with self.cond:
            if proven:
                self.proofs.pop(name, None)
            else:
                self.proofs[name] = time.monotonic() + pause

    def name_runner(self, address: tuple[str, int], given_name: str | None) -> None:
        """The name a registered runner gave itself, shown for it by
        ``state`` instead of its address.  It proves nothing (unlike an
        issued key's name), so it is only ever shown."""
        with self.cond:
            runner = self.runners.get(format_address(address))
            if runner is not None:
                runner.given_name = given_name

    def _believe(self, runner: Runner, busy: str | None, token: str | None) -> None:
        """A live runner's own word on what it runs beats our guess: a
        ``runtest`` whose reply was lost may well have been taken."""
        if busy is None:
            if runner.state in (SUSPECT, OCCUPIED):
                runner.set(IDLE)
                self.cond.notify_all()
        elif runner.state in (SUSPECT, IDLE):
            runner.set(OCCUPIED, occupied_with=busy)
            self._adopt(runner, busy, token)

    def _adopt(self, runner: Runner, commit: str, token: str | None) -> None:
        """A runner that is still running a commit we would otherwise run
        again keeps it, if it proves the assignment with its token."""
        work = self._work(commit, token)
        a = work.assignments.get(token or "") if work else None
        if a is None or (a.name and a.name != runner.name):
            return
        if work.shards is not None and a.token in work.shards.tokens:
            self._adopt_shard(runner, work, a, work.shards)
            return
        if work.state is WorkState.QUEUED:
            self.queue.remove(work.key)
        elif work.state is not WorkState.HELD:
            return
        job = Job(commit, a.token, runner.key, runner.address, time.monotonic(), runner.name,
                  request=self._request(work), key=work.key)
        work.move(WorkState.RUNNING)
        work.job = job
        runner.set(RUNNING, job)
        log.info("runner %s is still running %s; adopted", runner.key, commit[:12])

    def _adopt_shard(self, runner: Runner, work: Work, a: AssignmentRecord,
                     shard_set: ShardSet) -> None:
        """The same for one shard waiting to run again (its ``runtest``
        reply was lost, but the runner took it)."""
        index = shard_set.tokens[a.token]
        if (work.key, index) not in self.shard_queue:
            return
        self.shard_queue.remove((work.key, index))
        job = Job(work.commit, a.token, runner.key, runner.address, time.monotonic(),
                  runner.name, index, shard_set.total, self._request(work, index), work.key)
        shard_set.running[index] = job
        runner.set(RUNNING, job)
        log.info("runner %s is still running shard %d/%d of %s; adopted", runner.key, index,
                 shard_set.total, work.commit[:12])

    def _held(self) -> list[Work]:
        return [w for w in self.work.values() if w.state is WorkState.HELD]

    def _release_held_of(self, key: str) -> None:
        """The runner that held these commits is back and not running them:
        no need to wait out the grace period."""
        for work in self._held():
            if work.held_by == key:
                self._to_queue(work, head=True)

    def release_held(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self.cond:
            for work in self._held():
                if now >= work.held_until:
                    log.info("runner %s did not come back for %s; requeueing", work.held_by,
                             work.commit[:12])
                    self._to_queue(work, head=True)

    def _drop(self, runner: Runner, count: bool) -> None:
        self.runners.pop(runner.key, None)
        if runner.job:
            self._lose(runner.job, count=count)
        runner.set(IDLE)

    # ---- health ---------------------------------------------------------
    def prefetch_targets(self, count: int) -> list[tuple[tuple[str, int], str | None]]:
        """(address, key name) of the first ``count`` idle runners, in the
        order next_assignment picks them."""
        with self.cond:
            idle = [r for r in self.runners.values() if r.free]
            return [(r.address, r.name) for r in idle[:max(count, 0)]]

    def runner_snapshot(self) -> list[Runner]:
        with self.cond:
            return [dataclasses.replace(r) for r in self.runners.values()]

    def ping_result(self, key: str, reply: PingReply, misses_allowed: int,
                    pinged: str | None = None) -> None:
        """What a ping of runner ``key`` (of its process ``pinged``) got:
        ``ok``, ``refused`` (nothing listens: the runner is gone, dropped at
        once), ``unauthentic`` (another key answers there: not this runner,
        dropped at once), ``timeout`` (slow or cut off: dropped after
        ``misses_allowed`` in a row) or ``busy`` (a signed reply, too loaded
        to say more: neither news nor a miss)."""
        outcome, instance, busy, token = reply
        with self.cond:
            runner = self.runners.get(key)
            if runner is None or outcome == "busy":
                return
            if pinged is not None and runner.instance != pinged:
                # The ping was for the process that had this address before
                # it re-registered: its answer says nothing of this one.
                return
            if outcome == "ok" and instance != runner.instance:
                outcome = "refused"  # a different process now answers on that port
            if outcome == "ok":
                runner.misses = 0
                self._believe(runner, busy, token)
                return
            if outcome not in ("refused", "unauthentic"):
                runner.misses += 1
                if runner.misses < misses_allowed:
                    return
            self.runners.pop(key, None)
            log.warning("runner %s %s; dropped (%d left)", key, {
                "refused": "refused the connection",
                "unauthentic": "answered a ping with another key"}.get(
                    outcome, f"missed {runner.misses} pings"), len(self.runners))
            if runner.job:
                # Another key's answer says nothing of the commit.
                self._lose(runner.job, count=outcome != "unauthentic")
            runner.set(IDLE)

    def expire_jobs(self, job_timeout: float) -> None:
        """The dispatcher's own deadline: a runner that answers pings but
        never reports loses its job to another runner.  A runner registered
        with a limit (its own limits allow longer) gets that long."""
        now = time.monotonic()
        with self.cond:
            for job in [j for j in self._live_jobs()
                        if now - j.started > self._deadline(j, job_timeout)]:
                log.warning("commit %s exceeded the job deadline on %s; reassigning",
                            job.commit[:12], job.runner)
                self._occupy_with(job)
                self._lose(job, count=True)

    def _occupy_with(self, job: Job | None) -> None:
        """The runner still running ``job`` is busy, but no longer with our
        work: it is offered nothing until it says it is idle."""
        runner = self.runners.get(job.runner) if job else None
        if runner and runner.job is job:
            runner.set(OCCUPIED, occupied_with=job.commit)

    def _deadline(self, job: Job, job_timeout: float) -> float:
        """--job-timeout, or longer if the job's runner may by its own
        limits take longer (plus a little to report)."""
        runner = self.runners.get(job.runner)
        if runner is None or runner.limit is None:
            return job_timeout
        return max(job_timeout, runner.limit + REPORT_GRACE)
