"""The runner daemon: registers with the dispatcher, takes one commit at a
time, runs it through the job pipeline and reports the verdict.

Reliability: a finished result goes to the on-disk outbox first and is
delivered (with backoff) whenever the dispatcher is reachable, so a
dispatcher restart loses nothing.  The runner re-registers by itself, on a
heartbeat, and so is noticed again by a dispatcher that forgot it.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import socket
import tempfile
import threading
import time

import helpers
from ci import procgroup
from ci.outcome import Outcome
from ci.backoff import Backoff
from ci.files import remove_tree
from ci.git import script_path
from ci.runner import interpreters, pipeline, startup
from ci.runner.jobs import PREFETCH, RunnerJob, RunnerState, parse_runtest
from ci.runner.outbox import MAX_REFUSALS, Outbox
from ci.runner.sandbox.cleanup import UserSandbox
from ci.runner.sandbox.private_git import PrivateRepository
from ci.runner.sandbox.user import TestUser
from ci.runner.slot import ProcessSlot, git_run_args
from ci.security import Security
from ci.wire import (DEFAULT_CONNECT_TIMEOUT, Message, PeerClosed, ProtocolError, ReadTimeout,
                     Reply, encode_fields, format_address, valid_full_commit)

log = logging.getLogger(__name__)

# Re-registering this often lets a restarted dispatcher find us quickly.
DEFAULT_HEARTBEAT = 5.0
# Cap on the delay between delivery attempts while the dispatcher is away.
DEFAULT_RETRY_MAX = 5.0
# Room left in a message for the fields around the output.
MESSAGE_OVERHEAD = 64 * 1024
# How often the running command's new output is sent, and the most sent
# at once (the dispatcher keeps a tail of 64 KiB anyway).
DEFAULT_PROGRESS_INTERVAL = 1.0
PROGRESS_CHUNK = 64 * 1024
# How long a stopping runner waits for each reply while it flushes its outbox
# (what it cannot deliver stays there for its next start).
STOP_FLUSH_TIMEOUT = 3.0


# <state-dir>/SCRATCH: each run's report and order folders (junit_capture,
# ordering), made fresh at every start.
SCRATCH = "scratch"


def fresh_scratch(path: str) -> str:
    """The scratch folder, emptied: a runner killed mid-run left its run's
    folders there (in the system's temp folder, each killed run left two,
    for good).  Mode 711: with --test-user, the test user writes its
    report into a folder of its own in it."""
    try:
        remove_tree(path)
    except FileNotFoundError:
        pass
    os.mkdir(path, 0o711)
    os.chmod(path, 0o711)       # whatever the umask
    return path


class TestRunner:
    """The daemon: answers the dispatcher's ``ping``, ``runtest`` and
    ``fetch``; a worker thread runs the jobs, a link thread registers and
    delivers results, a progress thread sends the running job's output."""

    def __init__(self, args, security: Security, dispatcher: tuple[str, int],
                 state_dir: str, user: TestUser | None = None):
        self.args = args
        self.repo = os.path.abspath(args.repo)
        self.security = security
        self.dispatcher = dispatcher
        self.instance = secrets.token_hex(8)
        self.state = RunnerState()
        self.user = user   # --test-user, checked by main
        self.watchdog = procgroup.Watchdog()
        sandbox = UserSandbox(self.user.name, self.user.uid, self.user.gid,
                                           state_dir, keep=(self.repo,)) if self.user else None
        self.slot = ProcessSlot(os.path.join(state_dir, "running.pid"), self.watchdog,
                                self.user, sandbox)
        # With a test user, the repository is the runner's (see private_git).
        self.private = PrivateRepository(self.repo, state_dir, self.user.uid,
                                                     self.user.gid) if self.user else None
        self.slot.reap_leftovers()
        self.outbox = Outbox(os.path.join(state_dir, "outbox"))
        self.test_command = shlex.split(args.test_command) if args.test_command else None
        # The Pythons matrix cells may ask for, resolved once, and the labels
        # register advertises (ConfigError: the runner does not start).
        self.interpreters = interpreters.from_flags(args.python)
        self.labels = interpreters.advertised(args.label, self.interpreters)
        self.preparer = startup.make_preparer(args, self.test_command, state_dir)
        # The longest a job may take here, told the dispatcher on register.
        self.longest_job = startup.longest_job(args, self.preparer)
        self.settings = pipeline.Settings(
            self.repo, self.slot, self.preparer,
            max(security.max_message - MESSAGE_OVERHEAD, 4096),
            args.checkout_timeout, args.junit_xml, self.private,
            fresh_scratch(os.path.join(state_dir, SCRATCH)))
        self.wake_link = threading.Event()
        self.stop_event = threading.Event()
        self.address: tuple[str, int] | None = None  # what we listen on
        self.advertised: str | None = args.advertise
        self.last_contact = time.monotonic()
        self.gave_up = False
        self.threads = [threading.Thread(target=self._work_loop, name="work", daemon=True),
                        threading.Thread(target=self._link_loop, name="link", daemon=True),
                        threading.Thread(target=self._progress_loop, name="progress",
                                         daemon=True)]
        self.commands = {"ping": self.do_ping, "runtest": self.do_runtest,
                         "fetch": self.do_fetch}

    # ---- handlers -------------------------------------------------------
    def do_ping(self, message: Message, peer: str) -> Message:
        job = self.state.current_job()
        return Message("ok", "pong", encode_fields(
            {"instance": self.instance, "busy": job.commit if job else "",
             "job": job.token if job else ""}))

    def do_runtest(self, message: Message, peer: str) -> Message:
        job = parse_runtest(message)
        python = job.spec.python
        if python is not None and python not in self.interpreters:
            # The dispatcher routes by labels and should never send this:
            # an error reply, not an ``error`` verdict for the cell.
            raise Reply(f"this runner has no python{python} (it has: "
                        f"{' '.join(i.label for i in self.interpreters.values())})")
        if self.state.offer(job):
            shard = job.spec.shard
            log.info("accepted %s%s, environment scope %s", job.commit[:12],
                     f" (shard {shard.index}/{shard.total})" if shard else "", job.scope.name)
            return Message("ok")
        return Message("busy", self.state.busy_with() or "stopping")

    def do_fetch(self, message: Message, peer: str) -> Message:
        """The dispatcher's hint that a push just happened (see
        ``dispatcher.py --prefetch-runners``)."""
        return Message("ok", "fetching" if self.state.want_fetch() else "busy")

    # ---- work -----------------------------------------------------------
    def _work_loop(self) -> None:
        while True:
            job = self.state.take()
            if job is None:
                return
            if job == PREFETCH:
                try:
                    self._prefetch()
                except Exception:
                    # Only a head start (the checkout fetches anyway).  Raised
                    # (a fork refused, no file descriptor left), it ended this
                    # thread: the runner still took jobs and never ran them.
                    log.exception("prefetch failed")
                continue
            outcome = self._run(job)
            if self.slot.cancelled:
                return  # stopping: the job is handed back, not reported
            if not self._report(job, outcome):
                return  # stopping: stop() hands the job back
            self.state.finish()
            self.wake_link.set()

    def _run(self, job: RunnerJob) -> Outcome:
        """The job's outcome; a failure of the runner itself is one too."""
        try:
            return pipeline.execute(self.settings, job.commit, job.spec, self._cell(job))
        except Exception as exc:
            log.exception("running %s failed", job.commit[:12])
            return Outcome({"verdict": "error", "reason": f"runner failure: {exc}"},
                           f"runner failure: {exc!r}\n".encode())
        finally:
            self.slot.end_run()

    def _cell(self, job: RunnerJob) -> interpreters.JobCell:
        """The job's cell with its interpreter (checked at ``runtest``)."""
        spec = job.spec
        if spec.python is None:
            return interpreters.JobCell(spec.cell, interpreters.own(), spec.env)
        return interpreters.JobCell(spec.cell, self.interpreters[spec.python], spec.env)

    def _report(self, job: RunnerJob, outcome: Outcome) -> bool:
        """Into the outbox (the link thread delivers it); False if the
        runner stops before it could be stored."""
        outcome = outcome.with_header(runner=self.advertised or "?")
        if not valid_full_commit(job.commit):
            log.error("cannot report %s: not a full commit id", job.commit)
            return True
        log.info("finished %s: %s", job.commit[:12], outcome.verdict)
        body = outcome.to_body()
        return self.outbox.store(job.commit, job.token, body, self.stop_event,
                                 self.args.retry_max)

    def _prefetch(self) -> None:
        """Fetch the upstream as update_repo.sh does for the observer, in
        the slot (so a stop kills it; with --test-user, in the runner's own
        repository as for a checkout); a failure only means the checkout
        fetches instead."""
        started = time.monotonic()
        with tempfile.TemporaryFile() as out:
            code, timed_out = self.slot.run(
                ["bash", script_path("update_repo.sh"), self.repo], self.repo,
                self.args.checkout_timeout, out, **git_run_args(self.private, live=False))
            if code and not self.slot.cancelled:
                out.seek(0)
                log.info("prefetch failed (%s): %s",
                         "timed out" if timed_out else f"exit {code}",
                         out.read(2000).decode(errors="replace").strip())
            if code:
                return
        log.debug("prefetched in %.3fs", time.monotonic() - started)

    # ---- the link to the dispatcher ---------------------------------------
    def _link_loop(self) -> None:
        """Register, heartbeat and deliver results, backing off while the
        dispatcher is unreachable."""
        backoff = Backoff(0.1, self.args.retry_max)
        next_heartbeat = 0.0
        while not self.stop_event.is_set():
            try:
                # Results before registering: registering offers us for work,
                # and a restarted dispatcher would hand us again the very
                # commit whose result is still waiting in the outbox.
                self._deliver()
                if time.monotonic() >= next_heartbeat:
                    self._register()
                    next_heartbeat = time.monotonic() + self.args.heartbeat
                self.last_contact = time.monotonic()
                backoff.reset()
                delay = max(0.0, next_heartbeat - time.monotonic())
            except (OSError, ProtocolError) as exc:
                delay = backoff.next()
                # A refusal (wrong secret, clock skew, busy) is not an outage:
                # say which, so a configuration mistake is not mistaken for one.
                what = ("unreachable" if isinstance(exc, (OSError, ReadTimeout,
                                                          PeerClosed))
                        else "refused or garbled")
                log.warning("dispatcher %s %s (%s); retrying in %.1fs",
                            format_address(self.dispatcher), what, exc, delay)
                next_heartbeat = 0.0
                limit = self.args.dispatcher_timeout
                if limit is not None and time.monotonic() - self.last_contact > limit:
                    log.error("no dispatcher for %.0fs (--dispatcher-timeout); exiting", limit)
                    self.gave_up = True
                    self.stop_event.set()
                    return
            self.wake_link.wait(delay)
            self.wake_link.clear()

    def _register(self) -> None:
        if not self.advertised:
            self.advertised = self._local_address()
        job = self.state.current_job()
        # The token proves the job is ours: a restarted dispatcher lets us
        # keep it instead of running it again elsewhere.
        fields = {"instance": self.instance, "busy": job.commit if job else "",
                  "job": job.token if job else "", "limit": f"{self.longest_job:.0f}"}
        if self.args.name:
            fields["name"] = self.args.name
        fields["labels"] = " ".join(self.labels)
        fields["exclusive"] = "yes" if self.args.exclusive else "no"
        reply = helpers.call(self.dispatcher, "register", self.advertised,
                             encode_fields(fields), security=self.security)
        self.last_contact = time.monotonic()  # any answer: the dispatcher is there
        if reply.command != "ok":
            raise ProtocolError(f"register refused: {reply.argument}")
        if reply.argument == "registered":
            log.info("registered with dispatcher %s as %s",
                     format_address(self.dispatcher), self.advertised)

    def _local_address(self) -> str:
        """The address the dispatcher can reach us at: ``--host``, or when
        bound to all interfaces, the local end of a connection to it."""
        host, port = self.address
        if host not in ("0.0.0.0", "::", ""):
            return format_address((host, port))
        with socket.create_connection(self.dispatcher, timeout=5) as sock:
            return format_address((sock.getsockname()[0], port))

    def _deliver(self, reply_timeout: float = 60) -> None:
        """Send every outbox result, oldest first.  ``busy`` (or no answer)
        means later; an ``error`` reply is retried a few rounds, then the
        file is set aside so it cannot block the results behind it."""
        refused = 0
        for name, commit, token in self.outbox.items():
            body = self.outbox.read(name)
            reply = helpers.call(self.dispatcher, "results", f"{commit} {token}", body,
                                 security=self.security,
                                 timeout=(DEFAULT_CONNECT_TIMEOUT, reply_timeout))
            self.last_contact = time.monotonic()
            if reply.command == "ok":
                log.info("delivered result for %s (%s)", commit[:12], reply.argument)
                self.outbox.delivered(name)
                continue
            if reply.command == "busy":
                raise ProtocolError(f"dispatcher busy: {reply.argument}")
            refused += 1
            count = self.outbox.refused(name)
            log.error("dispatcher refused result for %s (%d/%d): %s", commit[:12],
                      count, MAX_REFUSALS, reply.argument)
        if refused:
            raise ProtocolError(f"{refused} result(s) refused; retrying later")

    # ---- live output ------------------------------------------------------
    def _progress_loop(self) -> None:
        """About once a second, send the running command's new output, so
        the dashboard can show it live.  Best effort: a lost message
        changes nothing but what a watcher sees."""
        sent: tuple[object, int] = (None, 0)   # (output file, bytes sent)
        told = None                            # the order folder whose failure was told
        interval = self.args.progress_interval
        while not self.stop_event.wait(interval):
            job = self.state.current_job()
            out = self.slot.output
            if job is None or out is None or not valid_full_commit(job.commit):
                continue
            order = self.slot.order
            if order is not None and order is not told and self._tell_failing(job, order):
                told = order
            if sent[0] is not out:
                sent = (out, 0)
            try:
                size = os.fstat(out.fileno()).st_size
                if size <= sent[1]:
                    continue
                start = max(sent[1], size - PROGRESS_CHUNK)
                data = os.pread(out.fileno(), size - start, start)
                helpers.call(self.dispatcher, "progress", f"{job.commit} {job.token}", data,
                             security=self.security, timeout=(2, 2))
                sent = (out, start + len(data))
            except (OSError, ValueError, ProtocolError) as exc:
                log.debug("progress for %s not sent: %s", job.commit[:12], exc)

    def _tell_failing(self, job: RunnerJob, order) -> bool:
        """Tell the dispatcher of the running tests' first failure, if
        there is one yet; True once it is told (or refused: an older
        dispatcher does not know ``failing``, and asking again is useless)."""
        failure = order.first_failure()
        if failure is None or order.started is None:
            return False
        after = max(failure.at - order.started, 0.0)
        try:
            reply = helpers.call(self.dispatcher, "failing", f"{job.commit} {job.token}",
                                 encode_fields({"test": failure.test, "after": f"{after:.3f}"}),
                                 security=self.security, timeout=(2, 2))
        except (OSError, ProtocolError) as exc:
            log.debug("first failure of %s not told: %s", job.commit[:12], exc)
            return False
        log.info("first failing test of %s after %.1fs: %s (%s %s)", job.commit[:12], after,
                 failure.test, reply.command, reply.argument)
        return True

    # ---- lifecycle ------------------------------------------------------
    def start(self, address: tuple[str, int]) -> None:
        self.address = address
        self.watchdog.start()
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        """Hand back the current job unrun, kill its processes, flush the
        outbox once, and let the threads end."""
        current = self.state.stop()
        self.slot.cancel()
        self.stop_event.set()
        self.wake_link.set()
        if current and self.advertised:
            try:
                helpers.call(self.dispatcher, "release", f"{current.commit} {current.token}",
                             security=self.security, timeout=2)
                log.info("handed %s back to the dispatcher", current.commit[:12])
            except (OSError, ProtocolError) as exc:
                log.info("could not hand back %s: %s", current.commit[:12], exc)
        for thread in self.threads:
            thread.join(5)
        self.watchdog.stop()
        try:
            # Briefly: a dispatcher that accepts and never answers held a
            # stopping runner for the full reply timeout (60 s).
            self._deliver(reply_timeout=STOP_FLUSH_TIMEOUT)
        except (OSError, ProtocolError):
            log.info("undelivered results stay in %s", self.outbox.folder)
