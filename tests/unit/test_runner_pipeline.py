"""ci/runner/pipeline.py step by step, on a real clone (the checkout
script, the slot, the judge), and the outbox's storing and refusals."""

from __future__ import annotations

import os
import sys
import threading

from support.cluster import PASSING_TEST

from ci.jobspec import JobSpec
from ci.runner import environments, recipe
from ci.runner.outbox import MAX_REFUSALS, Outbox
from ci.runner.pipeline import JobPipeline, Settings, execute
from ci.runner.slot import ProcessSlot

PY = sys.executable


def settings(clone: str, command=None) -> Settings:
    limits = recipe.Limits(test=tuple(command) if command else None, timeout=60)
    return Settings(clone, ProcessSlot(), environments.Preparer(limits, read_recipe=False),
                    1 << 20, checkout_timeout=60)


def test_checkout_reads_the_commits_metadata_and_a_bad_commit_is_an_error(upstream, tmp_path):
    head = upstream.commit({"README": "hello\n"}, "a subject line")
    clone = upstream.clone(tmp_path / "clone")
    code, timed_out, log = JobPipeline(settings(clone), head).checkout()
    assert (code, timed_out) == (0, False) and b"ci-meta\t" in log
    outcome = execute(settings(clone), "f" * 40)
    assert outcome.verdict == "error" and "checkout of " + "f" * 40 in outcome.header["reason"]
    assert float(outcome.header["duration"]) >= 0


def test_a_commit_without_tests_is_an_error_and_a_passing_one_passes(upstream, tmp_path):
    clone = upstream.clone(tmp_path / "clone")
    good = upstream.commit({}, "nothing changed")
    outcome = execute(settings(clone), good)
    assert outcome.verdict == "passed" and outcome.header["tests"] == 1
    assert outcome.header["subject"] == "nothing changed" and outcome.junit_xml
    bare = upstream.commit({"tests/test_sample.py": None}, "no tests left")
    outcome = execute(settings(clone), bare)
    assert outcome.verdict == "error"
    assert outcome.header["reason"] == "no tests/ folder in this commit"


def test_a_shard_with_nothing_to_run_passes_without_running(upstream, tmp_path):
    from ci import sharding
    clone = upstream.clone(tmp_path / "clone")
    head = upstream.commit({"tests/test_more.py": PASSING_TEST}, "two")
    ran = tmp_path / "ran"
    command = [PY, "-c", f"open({str(ran)!r}, 'w').close()"]
    job = JobPipeline(settings(clone, command), head, JobSpec(sharding.ShardSpec(2, 2, {})))
    outcome = job.run()
    assert outcome.verdict == "passed" and outcome.header["shards"] == "2/2 skipped"
    assert b"nothing to run" in outcome.output and not ran.exists()


def test_the_outbox_stores_and_sets_a_refused_result_aside(tmp_path):
    outbox = Outbox(str(tmp_path / "outbox"))
    commit, token = "a" * 40, "0" * 32
    assert outbox.store(commit, token, b"body", threading.Event(), 0.1)
    ((name, got_commit, got_token),) = outbox.items()
    assert (got_commit, got_token) == (commit, token) and outbox.read(name) == b"body"
    counts = [outbox.refused(name) for _ in range(MAX_REFUSALS)]
    assert counts == list(range(1, MAX_REFUSALS + 1))
    assert outbox.items() == [] and os.listdir(outbox.folder) == ["refused-" + name]


def test_the_outbox_gives_up_storing_only_when_stopping(tmp_path):
    outbox = Outbox(str(tmp_path / "outbox"))
    os.rmdir(outbox.folder)   # every write now fails
    stop = threading.Event()
    stop.set()
    assert outbox.store("a" * 40, "0" * 32, b"body", stop, 0.1) is False
