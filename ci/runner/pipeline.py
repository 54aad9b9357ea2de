"""The job pipeline: one commit checked out in the runner's clone
(``test_runner_script.sh``), its environment prepared (recipe, setup),
its tests run in the process slot, and the result judged.

Each step is a method of ``JobPipeline``; what every job shares (the
clone, the slot, the limits) is one ``Settings``.  A step that ends the
job early returns its result through ``_finish``, so every result has a
``duration`` and the output of every step that ran.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time

from ci import commands, jobspec, results
from ci.outcome import Outcome
from ci.git import script_path
from ci.runner import (command_line, environments, interpreters, junit_capture, ordering, reruns,
                       rules)
from ci.runner.interpreters import JobCell
from ci.runner.sandbox.private_git import PrivateRepository
from ci.runner.slot import ProcessSlot, child_env, git_run_args
from ci.runner.verdict import judge, judge_records
from ci.wire import one_line

log = logging.getLogger(__name__)

DEFAULT_CHECKOUT_TIMEOUT = 300.0
# The most of the checkout's output kept (its last line has the metadata).
CHECKOUT_LOG_LIMIT = 64 * 1024
META_FIELDS = ("commit", "author", "committed", "subject")
# A rerun is not started with less than this left of the tests' time limit.
MIN_RERUN_SECONDS = 1.0
# The exit status of pytest, and of unittest from Python 3.12, that ran no test.
NO_TESTS_RAN = 5


@dataclasses.dataclass
class Settings:
    """What every job on this runner runs with.  ``preparer`` (the recipe
    defaults and the environments) decides each job's test command,
    environment and time limit; ``private`` (with --test-user): the
    runner's own repository, in which the checkout runs as the runner's
    user, the tree then being the test user's."""
    repo: str
    slot: ProcessSlot
    preparer: environments.Preparer
    max_output: int
    checkout_timeout: float = DEFAULT_CHECKOUT_TIMEOUT
    junit_pattern: str | None = None
    private: PrivateRepository | None = None
    # The runner's own folder for each run's report and order folders
    # (emptied at its start: a killed runner's are left there, not in /tmp).
    scratch: str | None = None


def execute(settings: Settings, commit: str, spec: jobspec.JobSpec | None = None,
            cell: JobCell | None = None) -> Outcome:
    """Check out ``commit`` and run its tests as ``spec`` (what ``runtest``
    said: ci/jobspec.py) asks; return their outcome.  From the spec: the
    shard, the environments the commit may reuse and build (its branch's
    scope; without a branch, the commit's own, never a trusted one), the
    test ids to run before the rest (see ordering.py) and whose ``.ci.ini``
    quarantine list judges the run (``rules``: a merge commit's target;
    None: the commit's own, see rules.py).  ``cell``: the spec's matrix
    cell with the interpreter this runner resolved for it (default: the
    runner's own Python).  Per-test records, when there are any, come as
    the outcome's ``records`` (and as its ``junit_xml`` for older
    dispatchers), and the counts are theirs."""
    return JobPipeline(settings, commit, spec, cell).run()


class JobPipeline:
    """One job through checkout, setup and tests."""

    def __init__(self, settings: Settings, commit: str, spec: jobspec.JobSpec | None = None,
                 cell: JobCell | None = None):
        spec = spec or jobspec.JobSpec()
        self.settings = settings
        self.rules_commit = spec.rules
        self.failing_first = spec.failing_first
        self.commit = commit
        self.shard = spec.shard
        self.scope = environments.job_scope(spec.branch, spec.trusted, commit)
        self.cell = cell or JobCell(spec.cell, interpreters.own(), spec.env)
        self.started = time.time()
        # When the tests' time limit runs out (set as they start).
        self.deadline = time.monotonic()
        self.fields: dict = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "tests": 0, "failures": 0, "errors": 0, "skipped": 0, "exit_code": -1}
        if self.cell.name:
            self.fields["cell"] = self.cell.name

    def run(self) -> Outcome:
        code, timed_out, checkout_log = self.checkout()
        self.fields.update(parse_checkout_meta(checkout_log))
        if code != 0:
            why = "timed out" if timed_out else f"exited {code}"
            reason = f"checkout of {self.commit} failed ({why})"
            return self._finish(checkout_log + f"\n{reason}\n".encode(), verdict="error",
                                reason=reason)
        prepared, setup_log = self.prepare()
        if prepared.failed:
            return self._finish(setup_log)
        if self.rules_commit is not None:
            prepared.quarantine, note = self.target_rules()
            setup_log += note.encode()
        if prepared.command is None and not os.path.isdir(
                os.path.join(self.settings.repo, "tests")):
            reason = "no tests/ folder in this commit"
            return self._finish(setup_log + f"{reason}\n".encode(), verdict="error",
                                reason=reason)
        return self.test(prepared, setup_log)

    def _finish(self, output: bytes, **fields) -> Outcome:
        """The job's result: ``fields`` added, then its duration."""
        self.fields.update(fields)
        self.fields["duration"] = f"{time.time() - self.started:.3f}"
        return Outcome(self.fields, output)

    def checkout(self) -> tuple[int, bool, bytes]:
        """(exit code, timed out, its output): ``test_runner_script.sh``,
        with --test-user in the runner's repository, the tree taken from
        the test user for it and given back after."""
        settings, private = self.settings, self.settings.private
        if private is not None:
            private.take_tree()
        try:
            with tempfile.TemporaryFile() as out:
                code, timed_out = settings.slot.run(
                    ["bash", script_path("test_runner_script.sh"), settings.repo, self.commit],
                    settings.repo, settings.checkout_timeout, out, **git_run_args(private))
                out.seek(0)
                checkout_log = out.read(CHECKOUT_LOG_LIMIT)
        finally:
            if private is not None:
                private.give_tree()
        log.debug("checkout of %s took %.3fs", self.commit[:12], time.time() - self.started)
        return code, timed_out, checkout_log

    def target_rules(self) -> tuple[tuple[str, ...], str]:
        """The quarantine list of the job's ``rules`` commit (see rules.py),
        read by the runner's own git (its private repository, if any)."""
        settings, private = self.settings, self.settings.private
        env = private.git_env(dict(os.environ)) if private is not None else None
        return rules.target_quarantine(settings.repo, self.rules_commit,
                                       settings.preparer.limits, env)

    def prepare(self) -> tuple[environments.Prepared, bytes]:
        """The recipe read and the environment made ready; the setup
        fields are the job's.  The setup's log comes first in the output
        but must leave room for the tests'."""
        settings, slot = self.settings, self.settings.slot
        with tempfile.TemporaryFile() as out:
            # A cell's CI_<AXIS> variables reach its setup and its tests.
            run = environments.SetupRun(settings.repo, slot,
                                        {**child_env(slot.user), **self.cell.env}, out,
                                        slot.user, self.cell)
            prepared = settings.preparer.prepare(run, self.scope)
            limit = settings.max_output if prepared.failed else settings.max_output // 4
            setup_log = read_bounded(out, limit)
        self.fields.update(prepared.fields)
        return prepared, setup_log

    def test(self, prepared: environments.Prepared, setup_log: bytes) -> Outcome:
        """Run the tests (or this shard's share), run the failing ones
        again if the recipe asks (``reruns``), and judge them."""
        settings = self.settings
        # Room for the reruns' output and notes, when there may be reruns.
        spare = settings.max_output // 8 if prepared.rerun_failures else 0
        with tempfile.TemporaryFile() as out, \
                junit_capture.Capture(settings.repo, settings.junit_pattern,
                                      settings.scratch) as capture, \
                ordering.OrderFolder(self.failing_first, settings.scratch) as order:
            line = command_line.build(settings.repo, prepared.command, prepared.python,
                                      self.shard, capture, order)
            if line.shards is not None:
                self.fields["shards"] = line.shards
            if line.label == "whole":
                setup_log += (f"[ci] shard {self.shard.index}/{self.shard.total} runs the whole "
                              f"suite, not its share: {line.note}\n").encode()
            if line.argv is None:
                note = f"shard {self.shard.index}/{self.shard.total}: {line.label}, " \
                       "nothing to run\n"
                return self._finish(setup_log + note.encode(), verdict="passed", exit_code=0)
            # The reruns of failing tests share the tests' time limit.
            self.deadline = time.monotonic() + prepared.timeout
            try:
                code, timed_out = self._run_tests(line.argv, line.env(prepared.env), capture,
                                                  out, order)
            except OSError as exc:
                return self._finish(
                    setup_log + f"cannot start test command {line.argv!r}: {exc}\n".encode(),
                    verdict="error", reason=f"cannot start test command: {exc}")
            log.debug("tests of %s ran %.3fs", self.commit[:12], time.time() - self.started)
            self.fields.update(order.fields())
            stopped = order.stopped()
            junit = capture.collect(timed_out, settings.max_output // 2)
            output = read_bounded(out, settings.max_output - len(setup_log) - junit.size
                                  - spare)
        self.fields.update(junit.fields())
        if junit.records is None or timed_out:
            verdict, counts, reason = judge(code, timed_out, output, junit.counts)
            if verdict == "passed" and capture.paths and junit.note == "missing":
                # Our recorder or pytest writes the report as the run ends:
                # a test that ended the process (os._exit(0)) skipped it.
                verdict, reason = "error", ("the test command exited 0 without its tests' "
                                            "report: the run ended early (a test ended the "
                                            "process?)")
            counted = dataclasses.asdict(counts)
            counted.pop("found")
            return self._judged(setup_log + output, verdict, reason, code, counted, junit)
        records, more = self.rerun_and_quarantine(prepared, line, junit.records, spare)
        verdict, reason = judge_records(code, timed_out, output, records, stopped)
        split = self.shard is not None and line.label == ""
        if verdict == "passed" and not records and not split:
            # Python 3.12's unittest exits 5 here, 3.11's 0: one verdict for both.
            verdict, reason = "error", "no tests ran"
        elif split and code == NO_TESTS_RAN and not records and not timed_out \
                and (commands.is_unittest(line.ran or [])
                     or commands.pytest_position(line.ran or []) is not None):
            # This shard's files held no test: its share ran, and passed, as
            # under 3.11's unittest.  Whether the commit ran any test is the
            # merge's to say (sharding.merge: 'no tests ran').
            verdict, reason = "passed", ""
        output = setup_log + output + more
        if records != junit.records:
            # Within what the output leaves of the message, as the first run's were.
            budget = min(settings.max_output - len(output), settings.max_output // 2)
            junit = junit_capture.fit(records, budget) or junit_capture.Collected(
                note="too large")
        return self._judged(output, verdict, reason, code, results.record_fields(records),
                            junit)

    def _judged(self, output: bytes, verdict: str, reason: str, code: int, counts: dict,
                junit: junit_capture.Collected) -> Outcome:
        """The job's result: its verdict, counts (the header's fields of
        them) and the records (with their XML for older dispatchers)."""
        if reason:
            self.fields["reason"] = reason
        if junit.note:
            self.fields["junit"] = junit.note
        outcome = self._finish(output, verdict=verdict, exit_code=code, **counts)
        return dataclasses.replace(outcome, records=junit.records, junit_xml=junit.xml)

    def _run_tests(self, argv: list[str], env: dict, capture: junit_capture.Capture, out,
                   order: ordering.OrderFolder | None = None) -> tuple[int, bool]:
        """One run of a test command in the slot, within what is left of
        the time limit: (exit code, timed out).  With ``order`` (the first
        run, not a rerun) its order folder is shown to the progress thread
        while it runs (the first failure is told live)."""
        settings = self.settings
        folders = (capture.tmp, order.path if order is not None else None)
        for folder in folders if settings.slot.user else ():
            if folder:
                # The tests run as the test user and write their files here.
                settings.slot.user.own(folder)
        left = max(self.deadline - time.monotonic(), 0.001)
        if order is None:
            return settings.slot.run(argv, settings.repo, left, out, env)
        order.started = time.time()
        settings.slot.order = order
        try:
            return settings.slot.run(argv, settings.repo, left, out, env)
        finally:
            settings.slot.order = None

    def rerun_and_quarantine(self, prepared: environments.Prepared,
                             line: command_line.CommandLine,
                             records: list, budget: int) -> tuple[list, bytes]:
        """(the records after the reruns and the quarantine, what to add to
        the output: each rerun's output, then a ``[ci]`` line for each
        round and for each quarantine entry that matched nothing)."""
        # Quarantine first: a quarantined test's failure decides nothing,
        # so it is not run again (reruns.rerunnable).
        marked, unused = reruns.quarantine(records, prepared.quarantine)
        plan = reruns.Reruns.start(marked, prepared.rerun_failures)
        chunks: list[bytes] = []
        while plan.wanted:
            chunks.append(self._rerun_round(prepared, line, plan,
                                            budget // max(prepared.rerun_failures, 1)))
        final = plan.records
        notes = [*plan.notes, *(f"quarantine: {one_line(p, 200)!r} matches no test"
                                + (" of this shard" if self.shard else "") for p in unused)]
        text = "".join(f"[ci] {note}\n" for note in notes).encode()
        return final, b"".join(chunks)[-budget:] + (b"\n" + text if text else b"")

    def _rerun_round(self, prepared: environments.Prepared, line: command_line.CommandLine,
                     plan: reruns.Reruns, budget: int) -> bytes:
        """Run the tests ``plan`` still has failing once more; its output."""
        settings = self.settings
        with tempfile.TemporaryFile() as out, \
                junit_capture.Capture(settings.repo, scratch=settings.scratch) as capture:
            argv = command_line.rerun(settings.repo, line, plan.todo, capture)
            if argv is None:
                plan.took(None, "this test command's tests cannot be run by name")
                return b""
            if self.deadline - time.monotonic() < MIN_RERUN_SECONDS:
                plan.took(None, "the time limit is used up")
                return b""
            head = f"\n[ci] ===== rerun of {len(plan.todo)} failing tests =====\n".encode()
            try:
                # Not reordered, but with the first run's environment (PYTHONPATH).
                code, timed_out = self._run_tests(argv, line.env(prepared.env), capture, out)
            except OSError as exc:
                plan.took(None, f"cannot start it: {exc}")
                return head
            junit = capture.collect(timed_out, results.MAX_JUNIT_BYTES)
            log.info("rerun of %d failing tests of %s: exit %s", len(plan.todo),
                     self.commit[:12], code)
            plan.took(junit.records, "timed out" if timed_out else f"exit {code}, "
                      f"JUnit {junit.note or 'none'}")
            return head + read_bounded(out, max(budget - len(head), 0))


def parse_checkout_meta(log_bytes: bytes) -> dict:
    """The ``ci-meta`` line test_runner_script.sh prints after checkout:
    the commit's author, time and subject for the result header (one
    printable line each, capped: a subject is whatever its author typed)."""
    for line in reversed(log_bytes.splitlines()):
        if line.startswith(b"ci-meta\t"):
            parts = line.decode("utf-8", "replace").split("\t", 4)[1:]
            if len(parts) == 4:
                return {k: one_line(v, 200) for k, v in zip(META_FIELDS, parts)
                        if k != "commit"}
    return {}


def read_bounded(handle, limit: int) -> bytes:
    """Read a whole output file, or its head and tail with a visible marker
    when it exceeds ``limit`` (summaries are at the end, so the tail is
    the larger part)."""
    size = handle.seek(0, os.SEEK_END)
    handle.seek(0)
    if size <= limit:
        return handle.read()
    keep = max(limit - 200, 0)
    head = handle.read(keep // 4)
    handle.seek(size - (keep - keep // 4))
    tail = handle.read()
    marker = (f"\n[... output truncated by the runner: {size - len(head) - len(tail)} "
              f"of {size} bytes omitted ...]\n").encode()
    return head + marker + tail
