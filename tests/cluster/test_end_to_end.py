"""The whole system as its users see it: the three daemons as real
processes on loopback ports, a real upstream git repository, and verdicts
read back from the result files.

Each test makes the commits that set up one situation (a burst, a merge, a
force-push, a hung test, a runner killed mid-run...) and checks what lands
in ``test_results/``.  Observers that must not poll on their own run with a
long ``--poll`` and are woken with ``notify``, so a test never waits for a
timer it does not need."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import signal
import subprocess
import time

import pytest

import helpers
from support.cluster import FAILING_TEST, PY, ROOT, git, send_raw, wait_until
from support.procs import cmdline, process_alive
from ci.wire import Message, decode_fields, decode_header, decode_message, encode_frame

LONG_POLL = "30"

MORE_TESTS = """import unittest

class TestMore(unittest.TestCase):
    def test_one(self):
        self.assertTrue(True)

    def test_two(self):
        self.assertIn("a", "abc")

    @unittest.skip("not today")
    def test_skipped(self):
        raise AssertionError("skipped tests never run")
"""

FAILURE_AND_ERROR = """import unittest

class TestBad(unittest.TestCase):
    def test_failure(self):
        print("Ran 99 tests in 0.001s\\n\\nOK")  # must not pass for the summary
        self.assertEqual("left", "right")

    def test_error(self):
        raise RuntimeError("an error, not a failure")
"""

SLOW_TEST = """import os
import time
import unittest

class TestSlow(unittest.TestCase):
    def test_slow(self):
        with open(os.path.join({pid_dir!r}, "pid-%d" % os.getpid()), "w") as handle:
            handle.write(str(os.getpid()))
        time.sleep({seconds})
"""

HANGING_TEST = """import os
import subprocess
import sys
import time
import unittest

class TestHang(unittest.TestCase):
    def test_hang(self):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        with open(os.path.join({pid_dir!r}, "hang-pids"), "w") as handle:
            handle.write("%d %d" % (os.getpid(), child.pid))
        time.sleep(60)
"""

# Shared by the committed test (which prints the payload) and this file
# (which rebuilds it to compare): about 5 MB of random bytes, so plenty that
# is not UTF-8, interleaved with lines that look like our own protocol.
PAYLOAD_CODE = r'''
import random


def make_payload():
    rng = random.Random(20240601)
    parts = []
    for i in range(2500):
        parts.append(b"results:%040x %d\n\nverdict: passed\nCI1 5 1.0 abcdef12 -\n" % (i, i))
        parts.append(rng.randbytes(2000))
    return b"".join(parts)
'''

BIG_OUTPUT_TEST = PAYLOAD_CODE + r'''
import hashlib
import sys
import unittest


class TestBigOutput(unittest.TestCase):
    def test_prints_five_megabytes(self):
        data = make_payload()
        sys.stdout.buffer.write(b"<<<BEGIN>>>" + data + b"<<<END>>>\n")
        sys.stdout.buffer.flush()
        sys.stdout.write("sha256=%s\n" % hashlib.sha256(data).hexdigest())
        sys.stdout.flush()
'''

PYTEST_STYLE_TESTS = """import pytest

def test_a():
    assert 1 + 1 == 2

def test_b():
    assert "ci"

def test_c():
    assert [1, 2] == [1, 2]

def test_wrong():
    assert 2 * 2 == 5

@pytest.mark.skip(reason="not yet")
def test_later():
    pass
"""


# --------------------------------------------------------------------------
# Helpers.

def dispatcher_status(cluster) -> dict[str, int]:
    reply = helpers.call(("127.0.0.1", cluster.dispatcher_port), "status", timeout=5)
    assert reply.command == "ok", reply
    return {k: int(v) for k, v in decode_fields(reply.body).items()}


def wait_idle(cluster, done: int, timeout: float = 30) -> dict[str, int]:
    """Wait until ``done`` commits are finished and nothing is queued or running."""
    def idle():
        status = dispatcher_status(cluster)
        return status if (status["done"] >= done and status["queued"] == 0
                          and status["running"] == 0) else None
    return wait_until(idle, timeout, what=f"dispatcher idle with {done} done")


def wait_runners(cluster, count: int) -> None:
    wait_until(lambda: dispatcher_status(cluster)["runners"] == count, 15,
               what=f"{count} runners registered")


def notify(observer) -> None:
    reply = helpers.call(("127.0.0.1", observer.port), "notify", timeout=5)
    assert reply.command == "ok", reply


def observer_polls(observer) -> int:
    reply = helpers.call(("127.0.0.1", observer.port), "status", timeout=5)
    return int(decode_fields(reply.body)["polls"])


def observer_warnings(observer) -> list[str]:
    """The observer's own warnings (not the server's notes on port probes)."""
    return [line for line in observer.log().splitlines() if " WARNING __main__: " in line or " WARNING ci.observer." in line]


def runner_address(runner) -> str:
    return f"127.0.0.1:{runner.port}"


def counts(fields: dict) -> tuple[str, str, str, str, str]:
    return (fields["verdict"], fields["tests"], fields["failures"], fields["errors"],
            fields["skipped"])


def run_by_hand(upstream, commit: str, dest) -> tuple[str, str, str, str, str]:
    """What a developer sees running the suite in a fresh checkout."""
    subprocess.run(["git", "clone", "-q", upstream.path, str(dest)], check=True,
                   capture_output=True, timeout=60)
    git(dest, "checkout", "-q", "--detach", commit)
    proc = subprocess.run([PY, "-m", "unittest", "discover", "-s", "tests"], cwd=dest,
                          capture_output=True, text=True, timeout=60)
    ran = re.search(r"^Ran (\d+) tests? in ", proc.stderr, re.M)
    status = re.search(r"^(OK|FAILED)(?: \((.*)\))?$", proc.stderr, re.M)
    assert ran and status, proc.stderr
    extra = dict(part.split("=") for part in status.group(2).split(", ")) \
        if status.group(2) else {}
    verdict = "passed" if proc.returncode == 0 else "failed"
    return (verdict, ran.group(1), extra.get("failures", "0"), extra.get("errors", "0"),
            extra.get("skipped", "0"))


def recorded_pids(pid_dir: str) -> list[int]:
    pids = []
    for name in os.listdir(pid_dir):
        with open(os.path.join(pid_dir, name)) as handle:
            pids.extend(int(p) for p in handle.read().split())
    return pids


@pytest.fixture
def pid_dir(tmp_path):
    """Where test code run by the CI records its PIDs; any still alive at
    the end (a runner was SIGKILLed under it) is killed by PID."""
    folder = tmp_path / "pids"
    folder.mkdir()
    yield str(folder)
    for pid in recorded_pids(str(folder)):
        args = cmdline(pid) or b""
        ours = b"unittest" in args or b"time.sleep" in args
        if ours and process_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --------------------------------------------------------------------------
# Verdicts.

def test_verdicts_and_counts_match_a_run_by_hand(cluster, upstream, tmp_path):
    passing = upstream.commit({"tests/test_more.py": MORE_TESTS})
    cluster.start_dispatcher()
    # As an operator would start it: stdout of the tests is a file, so
    # Python buffers it unless the runner says otherwise.
    env = {k: v for k, v in cluster.env.items() if k != "PYTHONUNBUFFERED"}
    cluster.start_runner(env=env)
    cluster.start_observer()
    passed = cluster.result(passing)
    failing = upstream.commit({"tests/test_bad.py": FAILURE_AND_ERROR})
    failed = cluster.result(failing)

    assert counts(passed) == ("passed", "4", "0", "0", "1")
    assert counts(failed) == ("failed", "6", "1", "1", "1")
    assert counts(passed) == run_by_hand(upstream, passing, tmp_path / "by-hand-1")
    assert counts(failed) == run_by_hand(upstream, failing, tmp_path / "by-hand-2")
    assert passed["commit"] == passing and failed["commit"] == failing
    assert b"RuntimeError: an error, not a failure" in failed["output"]


def test_every_commit_of_a_burst_is_tested(cluster, upstream):
    cluster.start_dispatcher()
    cluster.start_runner()
    cluster.start_runner()
    observer = cluster.start_observer("--poll", LONG_POLL)
    first = git(upstream.path, "rev-parse", "HEAD")
    assert cluster.result(first)["verdict"] == "passed"

    burst = [
        (upstream.commit({"tests/test_more.py": MORE_TESTS}), "passed"),
        (upstream.commit({"tests/test_broken.py": FAILING_TEST}), "failed"),
        (upstream.commit({"tests/test_broken.py": None}), "passed"),
        (upstream.commit({"tests/test_bad.py": FAILURE_AND_ERROR}), "failed"),
        (upstream.commit({"tests/test_bad.py": None, "README": "fixed\n"}), "passed"),
    ]
    notify(observer)
    verdicts = [cluster.result(commit)["verdict"] for commit, _ in burst]
    assert verdicts == [expected for _, expected in burst]
    wait_idle(cluster, done=6)
    assert cluster.result_files() == sorted([first] + [c for c, _ in burst])
    assert f"dispatched 5 commit(s) of main up to {burst[-1][0][:12]}" in observer.log()


def test_merge_is_tested_as_its_merge_commit_only(cluster, upstream):
    cluster.start_dispatcher()
    cluster.start_runner()
    observer = cluster.start_observer("--poll", LONG_POLL)
    base = git(upstream.path, "rev-parse", "HEAD")
    assert cluster.result(base)["verdict"] == "passed"

    git(upstream.path, "checkout", "-q", "-b", "feature")
    feature_1 = upstream.commit({"tests/test_feature.py": FAILING_TEST})
    feature_2 = upstream.commit({"tests/test_feature.py": MORE_TESTS})
    git(upstream.path, "checkout", "-q", "main")
    on_main = upstream.commit({"README": "main moves on\n"})
    git(upstream.path, "merge", "-q", "--no-ff", "-m", "merge feature", "feature")
    merge = git(upstream.path, "rev-parse", "HEAD")
    assert git(upstream.path, "rev-parse", "HEAD^1", "HEAD^2").split() == [on_main, feature_2]
    notify(observer)

    assert counts(cluster.result(on_main)) == ("passed", "1", "0", "0", "0")
    # The merge commit carries the feature's tests.
    assert counts(cluster.result(merge)) == ("passed", "4", "0", "0", "1")
    wait_idle(cluster, done=3)
    assert cluster.result_files() == sorted([base, on_main, merge])
    assert not os.path.exists(cluster.result_path(feature_1))
    assert not os.path.exists(cluster.result_path(feature_2))
    assert f"dispatched 2 commit(s) of main up to {merge[:12]}" in observer.log()


def test_first_start_takes_the_head_and_a_force_push_the_new_head(cluster, upstream):
    initial = git(upstream.path, "rev-parse", "HEAD")
    upstream.commit()
    head = upstream.commit()
    cluster.start_dispatcher()
    cluster.start_runner()
    observer = cluster.start_observer()
    assert cluster.result(head)["verdict"] == "passed"
    polls = observer_polls(observer)
    wait_until(lambda: observer_polls(observer) >= polls + 2, 10, what="two more polls")
    wait_idle(cluster, done=1)
    assert cluster.result_files() == [head]
    assert observer_warnings(observer) == []

    # Force-push: the branch now starts again from the first commit.  The
    # new commit is made aside and the branch moved in one step, as a push
    # would, so no poll can see the branch at the old commit in between.
    git(upstream.path, "checkout", "-q", "--detach", initial)
    rewritten = upstream.commit({"tests/test_broken.py": FAILING_TEST}, "rewritten")
    git(upstream.path, "checkout", "-q", "-B", "main")
    assert cluster.result(rewritten)["verdict"] == "failed"
    wait_idle(cluster, done=2)
    assert cluster.result_files() == sorted([head, rewritten])
    warnings = observer_warnings(observer)
    assert len(warnings) == 1 and "rewritten" in warnings[0], warnings
    assert head[:12] in warnings[0] and rewritten[:12] in warnings[0]


# --------------------------------------------------------------------------
# Runners.

def test_two_runners_test_two_commits_at_once(cluster, upstream, pid_dir):
    cluster.start_dispatcher()
    runners = [cluster.start_runner(), cluster.start_runner()]
    wait_runners(cluster, 2)
    observer = cluster.start_observer("--poll", LONG_POLL)
    assert cluster.result(git(upstream.path, "rev-parse", "HEAD"))["verdict"] == "passed"
    wait_idle(cluster, done=1)

    slow = SLOW_TEST.format(pid_dir=pid_dir, seconds=3)
    commits = [upstream.commit({"tests/test_slow.py": slow}), upstream.commit()]
    started = time.monotonic()
    notify(observer)
    results = [cluster.result(c, timeout=20) for c in commits]
    elapsed = time.monotonic() - started

    durations = [float(r["duration"]) for r in results]
    assert all(r["verdict"] == "passed" for r in results)
    assert min(durations) >= 3
    # One after the other would take at least the sum of both runs (the
    # rest of a 3 s run is slack for a busy machine's start-up).
    assert elapsed < sum(durations), (elapsed, durations)
    assert {r["runner"] for r in results} == {runner_address(r) for r in runners}


def test_runner_killed_mid_test_is_replaced(cluster, upstream, pid_dir):
    commit = upstream.commit({"tests/test_slow.py": SLOW_TEST.format(pid_dir=pid_dir,
                                                                      seconds=1.5)})
    dispatcher = cluster.start_dispatcher()
    runners = [cluster.start_runner(), cluster.start_runner()]
    wait_runners(cluster, 2)
    cluster.start_observer()
    wait_until(lambda: os.listdir(pid_dir), 20, what="the slow test to start")
    victim = next(r for r in runners if f"accepted {commit[:12]}" in r.log())
    survivor = next(r for r in runners if r is not victim)
    # The file is there before its pid is written.
    orphan = wait_until(lambda: recorded_pids(pid_dir), 10, what="the test's pid")[0]
    os.kill(victim.pid, signal.SIGKILL)  # the runner alone, not its group
    # Its watchdog ends the test it was running, though nobody restarts it.
    wait_until(lambda: not process_alive(orphan), 1.5, what="the killed runner's test to die")

    fields = cluster.result(commit, timeout=30)
    assert fields["verdict"] == "passed"
    assert fields["runner"] == runner_address(survivor)
    assert f"accepted {commit[:12]}" in survivor.log()
    assert len(os.listdir(pid_dir)) == 2  # started twice, reported once
    # A closed port is a dead runner: dropped at the first refused ping.
    assert f"runner {runner_address(victim)} refused the connection" in dispatcher.log()


def test_hung_test_times_out_and_the_runner_moves_on(cluster, upstream, pid_dir):
    cluster.start_dispatcher()
    runner = cluster.start_runner("--timeout", "1")
    observer = cluster.start_observer("--poll", LONG_POLL)
    assert cluster.result(git(upstream.path, "rev-parse", "HEAD"))["verdict"] == "passed"

    hung = upstream.commit({"tests/test_hang.py": HANGING_TEST.format(pid_dir=pid_dir)})
    fixed = upstream.commit({"tests/test_hang.py": None})
    notify(observer)
    fields = cluster.result(hung, timeout=20)
    assert fields["verdict"] == "timeout"
    assert "time limit" in fields["reason"]
    assert 1.0 <= float(fields["duration"]) < 10
    pids = recorded_pids(pid_dir)
    assert len(pids) == 2
    wait_until(lambda: not any(process_alive(p) for p in pids), 5,
               what="the hung test and its child to be killed")

    after = cluster.result(fixed, timeout=20)
    assert after["verdict"] == "passed"
    assert after["runner"] == fields["runner"] == runner_address(runner)


def test_five_megabytes_of_binary_output_arrive_intact(cluster, upstream):
    commit = upstream.commit({"tests/test_big.py": BIG_OUTPUT_TEST})
    cluster.start_dispatcher()
    cluster.start_runner()
    cluster.start_observer()
    fields = cluster.result(commit, timeout=30)
    namespace: dict = {}
    exec(PAYLOAD_CODE, namespace)
    expected = namespace["make_payload"]()
    assert len(expected) > 5_000_000

    assert counts(fields) == ("passed", "2", "0", "0", "0")
    output = fields["output"]
    begin, end = output.index(b"<<<BEGIN>>>"), output.index(b"<<<END>>>")
    assert output[begin + len(b"<<<BEGIN>>>"):end] == expected
    printed = re.search(rb"^sha256=([0-9a-f]{64})$", output, re.M).group(1).decode()
    assert printed == hashlib.sha256(expected).hexdigest()
    assert os.path.getsize(cluster.result_path(commit)) > len(expected)


def test_missing_broken_and_packaged_test_folders(cluster, upstream):
    cluster.start_dispatcher()
    cluster.start_runner()
    observer = cluster.start_observer("--poll", LONG_POLL)
    assert cluster.result(git(upstream.path, "rev-parse", "HEAD"))["verdict"] == "passed"

    no_tests = upstream.commit({"tests/test_sample.py": None, "README": "no tests\n"})
    broken = upstream.commit({"tests/test_imports.py":
                              "import module_that_does_not_exist_anywhere\n"})
    packaged = upstream.commit({
        "tests/test_imports.py": None,
        "mypkg/__init__.py": "",
        "mypkg/core.py": "def double(x):\n    return 2 * x\n",
        "tests/__init__.py": "",
        "tests/support.py": "EXPECTED = 42\n",
        "tests/test_pkg.py": "import unittest\n\nfrom mypkg.core import double\n"
                             "from .support import EXPECTED\n\n\n"
                             "class TestPkg(unittest.TestCase):\n"
                             "    def test_double(self):\n"
                             "        self.assertEqual(double(21), EXPECTED)\n",
    })
    notify(observer)

    fields = cluster.result(no_tests)
    assert fields["verdict"] == "error"
    assert "no tests/ folder" in fields["reason"]
    fields = cluster.result(broken)
    assert fields["verdict"] == "error"
    assert "imported" in fields["reason"]
    assert b"module_that_does_not_exist_anywhere" in fields["output"]
    fields = cluster.result(packaged)
    # Only test_pkg.py is left; its relative import needs discovery from the root.
    assert counts(fields) == ("passed", "1", "0", "0", "0"), fields["output"][-2000:]


def test_test_command_override_runs_pytest(cluster, upstream):
    command = f"{shlex.quote(PY)} -m pytest -q -p no:cacheprovider tests"
    cluster.start_dispatcher()
    cluster.start_runner("--test-command", command)
    cluster.start_observer()
    first = cluster.result(git(upstream.path, "rev-parse", "HEAD"))
    assert counts(first) == ("passed", "1", "0", "0", "0")
    assert re.search(rb"^1 passed in ", first["output"], re.M)

    commit = upstream.commit({"tests/test_pytest_style.py": PYTEST_STYLE_TESTS})
    fields = cluster.result(commit)
    assert counts(fields) == ("failed", "6", "1", "0", "1")
    assert fields["exit_code"] == "1"
    assert re.search(rb"^1 failed, 4 passed, 1 skipped in ", fields["output"], re.M)


# --------------------------------------------------------------------------
# The dispatcher and the wire.

def test_the_same_commit_is_queued_once(cluster, upstream):
    commit = git(upstream.path, "rev-parse", "HEAD")
    address = ("127.0.0.1", cluster.dispatcher_port)
    cluster.start_dispatcher()
    assert helpers.call(address, "dispatch", commit).argument == "queued 1"
    assert helpers.call(address, "dispatch", commit).argument == "queued 0"
    assert helpers.call(address, "dispatch", f"{commit} {commit}").argument == "queued 0"
    assert dispatcher_status(cluster)["queued"] == 1

    runner = cluster.start_runner()
    assert cluster.result(commit)["verdict"] == "passed"
    status = wait_idle(cluster, done=1)
    assert (status["completed"], status["done"]) == (1, 1)
    assert helpers.call(address, "dispatch", commit).argument == "queued 0"
    status = dispatcher_status(cluster)
    assert (status["queued"], status["running"], status["completed"]) == (0, 0, 1)
    assert runner.log().count(f"accepted {commit[:12]}") == 1


def decode_reply(data: bytes) -> Message:
    line, _, payload = data.partition(b"\n")
    header = decode_header(line)
    assert header.length == len(payload)
    return decode_message(payload)


def test_bad_requests_get_error_replies_and_daemons_keep_serving(cluster, upstream):
    commit = git(upstream.path, "rev-parse", "HEAD")
    daemons = {"dispatcher": cluster.start_dispatcher()}
    daemons["runner"] = cluster.start_runner()
    daemons["observer"] = cluster.start_observer("--poll", LONG_POLL)
    ports = {"dispatcher": cluster.dispatcher_port, "runner": daemons["runner"].port,
             "observer": daemons["observer"].port}
    bad = {
        "dispatcher": [("dispatch", "", b""), ("dispatch", "not-a-commit", b""),
                       ("dispatch", commit[:12], b""),
                       ("results", f"{commit} 1", b"verdict: passed\n"),
                       ("results", f"{commit} 1", b"verdict: great\n\n"),
                       ("results", f"{commit} 1", b"verdict: passed\ntests: many\n\n"),
                       ("results", "../../etc/passwd 1", b"verdict: passed\n\n"),
                       ("register", "not an address", b""),
                       ("register", "127.0.0.1:9", b"Bad Field\n"),
                       ("release", "nothing", b"")],
        "runner": [("runtest", "", b""), ("runtest", "not-a-commit 1", b""),
                   ("runtest", commit, b""), ("runtest", f"{commit} job/1", b"")],
        "observer": [],
    }
    raw_garbage = [b"GET / HTTP/1.0\r\n\r\n", b"CI1 abc 1.0 abcdefgh -\n",
                   b"CI1 999999999 1.0 abcdefgh -\n", b"CI1 100 1.0 abcdefgh -\nshort",
                   encode_frame(b"\xff\xfe not a command"),
                   encode_frame(b"UPPER:case")]
    for name, port in ports.items():
        address = ("127.0.0.1", port)
        for command, argument, body in [("no_such_command", "", b"")] + bad[name]:
            reply = helpers.call(address, command, argument, body, timeout=5)
            assert reply.command == "error", (name, command, argument, reply)
            assert reply.argument, "an error says why"
        for data in raw_garbage:
            reply = decode_reply(send_raw(port, data))
            assert reply.command == "error", (name, data[:30], reply)

    assert helpers.call(("127.0.0.1", ports["dispatcher"]), "status").command == "ok"
    assert helpers.call(("127.0.0.1", ports["runner"]), "ping").command == "ok"
    assert helpers.call(("127.0.0.1", ports["observer"]), "status").command == "ok"
    assert cluster.result(commit)["verdict"] == "passed"  # and real work still flows
    for name, daemon in daemons.items():
        assert daemon.alive(), name
        assert "Traceback" not in daemon.log(), name


COMMON_FLAGS = ["--help", "--log-level", "--secret-file", "--insecure", "--tls-cert",
                "--tls-key", "--tls-ca", "--max-message-size", "--read-timeout",
                "--max-connections", "--max-per-client", "--auth-window"]
FLAGS = {
    "dispatcher.py": ["--host", "--port", "--results-dir", "--state-dir", "--ping-interval",
                      "--ping-misses", "--ping-timeout", "--job-timeout", "--max-attempts",
                      "--workers"],
    "test_runner.py": ["REPO", "--host", "--port", "--advertise", "--dispatcher-server",
                       "--test-command", "--timeout", "--checkout-timeout", "--state-dir",
                       "--heartbeat", "--retry-max", "--dispatcher-timeout"],
    "repo_observer.py": ["REPO", "--dispatcher-server", "--poll", "--branch", "--host",
                         "--port", "--no-listen", "--state-dir"],
}


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("CI_SECRET", None)
    return subprocess.run([PY, os.path.join(ROOT, script), *args], capture_output=True,
                          text=True, timeout=15, stdin=subprocess.DEVNULL, env=env)


@pytest.mark.parametrize("script", list(FLAGS))
def test_help_lists_every_flag(script):
    proc = run_script(script, "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in COMMON_FLAGS + FLAGS[script]:
        assert flag in proc.stdout, f"{script} --help does not mention {flag}"
    # And nothing the parser knows is missing from the help.
    module = __import__(script[:-3])
    for action in module.build_parser()._actions:
        for option in action.option_strings:
            assert option in proc.stdout
    if script == "repo_observer.py":
        notify_help = run_script(script, "notify", "--help")
        assert notify_help.returncode == 0
        for flag in ["--observer", "--timeout", "--log-level", "--secret-file"]:
            assert flag in notify_help.stdout


def assert_one_line_error(proc: subprocess.CompletedProcess, *parts: str) -> None:
    """Exactly one line on stderr, ``prog: error: ...``, no traceback,
    exit status 2."""
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if ": error: " in line]
    assert len(lines) == 1 and len(errors) == 1, proc.stderr
    for part in parts:
        assert part in errors[0], proc.stderr


@pytest.mark.parametrize("script", list(FLAGS))
def test_bad_command_lines_give_one_line_errors(script, upstream, tmp_path):
    clone = upstream.clone(tmp_path / "clone")
    repo_args = [clone] if "REPO" in FLAGS[script] else []
    assert_one_line_error(run_script(script, "--no-such-flag", *repo_args), "--no-such-flag")
    assert_one_line_error(run_script(script, "--port", "eighty", *repo_args), "--port")
    if repo_args:
        missing = str(tmp_path / "no-such-repo")
        proc = run_script(script, "--port", "0", missing)
        assert_one_line_error(proc, missing)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    else:
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        proc = run_script(script, "--port", "0", "--results-dir", str(blocker / "results"))
        assert_one_line_error(proc, "results")
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
