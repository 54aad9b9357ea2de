"""Notifications through a real dispatcher: a loopback HTTP receiver and a
recording command are told once each, in order, across outages and
SIGKILL, signed, never slowing result writing; bad flags are refused.
The parts alone are tested in tests/unit/test_notify_*.py."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import os
import subprocess
import threading
import time

import pytest

from support.cluster import FAILING_TEST, PY, ROOT, Fleet, free_port, wait_until
from support.notify import cid, recorded, recorder

import helpers
from ci.notify.store import JOURNAL_NAME
from ci.security import Security
from ci.wire import encode_fields, parse_address


class Receiver:
    """An HTTP server in a thread that records every POST; ``mode`` decides
    the answer: ok (204), fail (500) or hang (until released)."""

    def __init__(self, port=0, mode="ok"):
        self.mode = mode
        self.posts = []
        self.hanging = 0
        self.lock = threading.Lock()
        self.release = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if receiver.mode == "hang":
                    with receiver.lock:
                        receiver.hanging += 1
                    receiver.release.wait(30)
                    return
                with receiver.lock:
                    receiver.posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(500 if receiver.mode == "fail" else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def events(self) -> list[dict]:
        with self.lock:
            return [json.loads(body) for _, body in self.posts]

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.thread.join(5)
        self.server.server_close()


@pytest.fixture
def receivers():
    made = []

    def make(**kwargs):
        made.append(Receiver(**kwargs))
        return made[-1]
    yield make
    for receiver in made:
        receiver.close()


def address(cluster):
    return parse_address(cluster.dispatcher_address)


def dispatch(cluster, commits, branch="main", previous=None, security=None, fake=True):
    """Queue commits with their metadata; unless real runners run them,
    fake runners take them all at once, so the test can post their results
    in any order."""
    if fake:
        # Kept on the cluster itself: an id() of a closed one may come back.
        fleet = getattr(cluster, "fleet", None)
        if fleet is None:
            fleet = cluster.fleet = Fleet(12)
            cluster.closers.append(fleet)
        fleet.register(cluster.dispatcher_port)
    lines = []
    for commit in commits:
        lines.append(f"{commit} {previous or '-'} {branch}")
        previous = commit
    reply = helpers.call(address(cluster), "dispatch", " ".join(commits),
                         ("\n".join(lines) + "\n").encode(), security=security)
    assert reply.command == "ok", reply


def post_result(cluster, commit, verdict, failures=0):
    """What the fake runner the commit was assigned to sends, with its token."""
    body = encode_fields({"verdict": verdict, "tests": 4, "failures": failures,
                                  "errors": 0, "runner": "fake"}) + b"\nout\n"
    started = time.monotonic()
    token = cluster.fleet.token(commit)
    reply = helpers.call(address(cluster), "results", f"{commit} {token}", body)
    assert reply.command == "ok", reply
    return time.monotonic() - started


def journal_events(cluster) -> dict:
    """Event id -> (event kind, delivered to some target)."""
    path = os.path.join(cluster.state, JOURNAL_NAME)
    found = {}
    with open(path, "rb") as handle:
        for line in handle.read().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("e"):
                found.setdefault(record["e"]["id"], [record["e"]["event"], False])
            if record.get("ok") in found:
                found[record["ok"]][1] = True
    return found


FAST = ["--notify-retry-max", "0.2", "--notify-timeout", "5"]


def test_red_red_green_with_real_runs_command_and_signed_webhook(cluster, upstream, tmp_path,
                                                                  receivers):
    secret = b"webhook-secret"
    (tmp_path / "hook.secret").write_bytes(secret + b"\n")
    receiver = receivers()
    command, out = recorder(tmp_path)
    env = dict(cluster.env, CI_SECRET="cluster-secret")
    security = Security(secret=b"cluster-secret")
    cluster.start_dispatcher("--notify-on", "failure", "--notify-command", command,
                             "--webhook", receiver.url, "--webhook-secret-file",
                             str(tmp_path / "hook.secret"), "--dashboard-url",
                             "http://ci.example/commit/{commit}", *FAST, env=env)
    cluster.start_runner(env=env)
    base = upstream.commit(message="base")
    red = upstream.commit({"tests/test_broken.py": FAILING_TEST}, "Break the sums")
    red2 = upstream.commit(message="Still broken")
    green = upstream.commit({"tests/test_broken.py": None}, "Fix the sums")
    dispatch(cluster, [base, red, red2, green], security=security, fake=False)
    assert cluster.result(green)["branch"] == "main"
    wait_until(lambda: len(receiver.events()) >= 3 and len(recorded(out)) >= 3, 30,
               what="three notifications to each target")
    hooks = receiver.events()
    assert [(e["event"], e["commit"]) for e in hooks] == \
        [("broken", red), ("still-failing", red2), ("fixed", green)]
    for (headers, body), event in zip(receiver.posts, hooks):
        expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["x-ci-signature-256"], expected)
        assert event["url"] == f"http://ci.example/commit/{event['commit']}"
    assert "main is broken by" in hooks[0]["text"] and hooks[0]["failures"] == 1
    assert hooks[0]["previous_verdict"] == "passed" and hooks[0]["previous"] == base
    runs = recorded(out)
    assert [(r["CI_EVENT"], r["CI_COMMIT"], r["CI_EVENT_ID"]) for r in runs] == \
        [(e["event"], e["commit"], e["id"]) for e in hooks]
    assert runs[0]["CI_BRANCH"] == "main" and runs[0]["CI_VERDICT"] == "failed"
    assert runs[0]["CI_RESULT_FILE"] == cluster.result_path(red)
    assert runs[0]["CI_URL"] == f"http://ci.example/commit/{red}"
    assert f"commit: {red}\n" in runs[0]["stdin"] and "verdict: failed" in runs[0]["stdin"]
    # Exactly the result file's header: not the per-test records the
    # dispatcher holds beside it (the default command records every test).
    with open(cluster.result_path(red), "rb") as handle:
        header = handle.read().partition(b"\n\n")[0].decode() + "\n"
    assert runs[0]["stdin"] == header
    assert "records" not in runs[0]["stdin"]
    assert "CI_SECRET" not in runs[0]["env_keys"]


def test_out_of_order_results_and_a_retest_flip(cluster, receivers):
    receiver = receivers()
    cluster.start_dispatcher("--webhook", receiver.url, *FAST)  # --notify-on change
    commits = [cid(f"ooo-{n}") for n in range(4)]
    dispatch(cluster, commits)
    for commit, verdict in [(commits[2], "failed"), (commits[3], "passed"),
                            (commits[1], "error")]:
        post_result(cluster, commit, verdict)
    post_result(cluster, commits[0], "passed")
    wait_until(lambda: len(receiver.events()) >= 2, 20, what="broken and fixed")
    assert [(e["event"], e["commit"]) for e in receiver.events()] == \
        [("broken", commits[1]), ("fixed", commits[3])]
    # A retest that fails now: the branch is broken again, by that commit.
    reply = helpers.call(address(cluster), "retest", commits[3])
    assert reply.argument == "queued 1"
    post_result(cluster, commits[3], "failed", failures=2)
    wait_until(lambda: len(receiver.events()) >= 3, 20, what="the retest's event")
    last = receiver.events()[2]
    assert (last["event"], last["commit"], last["retest"], last["previous_verdict"]) == \
        ("broken", commits[3], True, "passed")
    assert len({e["id"] for e in receiver.events()}) == 3


def test_receiver_down_then_up_gets_every_event_once(cluster, receivers):
    port = free_port()
    dispatcher = cluster.start_dispatcher("--webhook", f"http://127.0.0.1:{port}/hook",
                                          "--notify-on", "all", *FAST)
    commits = [cid(f"down-{n}") for n in range(3)]
    dispatch(cluster, commits)
    for commit, verdict in zip(commits, ["passed", "failed", "passed"]):
        post_result(cluster, commit, verdict)
    wait_until(lambda: "failed (try 3)" in dispatcher.log(), 20, what="failed tries")
    receiver = receivers(port=port)
    wait_until(lambda: len(receiver.events()) >= 3, 20, what="three events")
    wait_until(lambda: all(ok for _, ok in journal_events(cluster).values()), 10,
               what="delivery marks")
    # A restart sends nothing again.
    assert dispatcher.stop() == 0
    restarted = cluster.start_dispatcher("--webhook", receiver.url, "--notify-on", "all", *FAST)
    wait_until(lambda: "0 undelivered event(s) to retry, 0 result(s)" in restarted.log(), 10,
               what="the replay")
    events = receiver.events()
    assert [(e["event"], e["commit"]) for e in events] == \
        [("passed", commits[0]), ("broken", commits[1]), ("fixed", commits[2])]
    assert len({e["id"] for e in events}) == 3


def test_sigkill_between_journal_and_delivery(cluster, receivers):
    port = free_port()
    flags = ["--webhook", f"http://127.0.0.1:{port}/hook", *FAST]
    dispatcher = cluster.start_dispatcher(*flags)
    commits = [cid(f"kill-{n}") for n in range(2)]
    dispatch(cluster, commits)
    post_result(cluster, commits[0], "passed")
    post_result(cluster, commits[1], "failed")
    wait_until(lambda: "failed (try 1)" in dispatcher.log(), 20, what="a failed try")
    (event_id, (kind, delivered)), = journal_events(cluster).items()
    assert (kind, delivered) == ("broken", False)
    dispatcher.kill()
    receiver = receivers(port=port)
    restarted = cluster.start_dispatcher(*flags)
    wait_until(lambda: len(receiver.events()) >= 1, 20, what="delivery after the restart")
    wait_until(lambda: journal_events(cluster)[event_id][1], 10, what="the delivery mark")
    assert "1 undelivered event(s) to retry" in restarted.log()
    (event,) = receiver.events()
    assert (event["id"], event["event"], event["commit"]) == (event_id, "broken", commits[1])
    assert receiver.posts[0][0]["x-ci-event-id"] == event_id


def test_a_hanging_receiver_does_not_slow_results(cluster, receivers):
    def post_many(prefix):
        commits = [cid(f"{prefix}-{n}") for n in range(12)]
        dispatch(cluster, commits)
        return sum(post_result(cluster, c, "failed" if n % 2 else "passed")
                   for n, c in enumerate(commits))

    plain = cluster.start_dispatcher()
    without = post_many("plain")
    assert plain.stop() == 0
    receiver = receivers(mode="hang")
    cluster.start_dispatcher("--webhook", receiver.url, "--notify-timeout", "30")
    with_hang = post_many("hang")
    assert receiver.hanging >= 1 or wait_until(lambda: receiver.hanging >= 1, 10)
    assert receiver.events() == []  # nothing was answered, so the hang was in effect
    assert with_hang < 3 * without + 1.5, (with_hang, without)


@pytest.mark.parametrize("flags, message", [
    (["--webhook", "ftp://example.com/x"], "only http:// or https:// URLs"),
    (["--webhook", "http://127.0.0.1:9/x", "--webhook-secret-file", "/nonexistent/secret"],
     "cannot read --webhook-secret-file"),
    (["--notify-command", "no-such-program-anywhere --x"], "cannot find program"),
    (["--webhook", "http://127.0.0.1:9/x", "--notify-retry-for", "0"], "must be positive"),
])
def test_bad_flags_are_refused_with_one_line(tmp_path, flags, message):
    proc = subprocess.run([PY, os.path.join(ROOT, "dispatcher.py"), "--port", "0",
                           "--results-dir", str(tmp_path / "r"), *flags],
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / "dispatcher_state" / JOURNAL_NAME)


def test_a_flaky_only_commit_notifies_nobody_and_a_broken_one_names_new_failures(
        cluster, upstream, tmp_path, receivers):
    """Real runs: a commit whose only failure is flaky (caught by a rerun)
    passes and makes no broke/fixed event; the commit that then breaks the
    branch names its failing tests, the new ones marked."""
    counter = tmp_path / "counter"
    flaky = ("import unittest\n\nclass TestF(unittest.TestCase):\n"
             "    def test_sometimes(self):\n"
             f"        with open({str(counter)!r}, 'a+') as f:\n"
             "            f.seek(0)\n            runs = len(f.read())\n"
             "            f.write('x')\n"
             "        self.assertEqual(runs % 2, 1)\n")
    receiver = receivers()
    cluster.start_dispatcher("--webhook", receiver.url, *FAST)
    cluster.start_runner()
    base = upstream.commit({".ci.ini": "[ci]\nrerun_failures = 1\n"}, "rerun failures")
    shaky = upstream.commit({"tests/test_flaky.py": flaky}, "a flaky test")
    red = upstream.commit({"tests/test_broken.py": FAILING_TEST}, "Break the sums")
    dispatch(cluster, [base, shaky, red], fake=False)
    header = cluster.result(shaky)
    assert header["verdict"] == "passed" and header["flaky"] == "1"
    assert cluster.result(red)["verdict"] == "failed"
    wait_until(lambda: receiver.events(), 30, what="the broken event")
    # Decisions are journalled in commit order: the flaky commit's came first.
    assert [kind for kind, _ in journal_events(cluster).values()] == ["broken"]
    events = receiver.events()
    assert [(e["event"], e["commit"]) for e in events] == [("broken", red)]
    named = {item["id"]: item["new"] for item in events[0]["failing_tests"]}
    assert named == {"test_broken.TestBroken.test_wrong": True}
    assert events[0]["failing_count"] == 1
    assert "(new)" in events[0]["text"]
