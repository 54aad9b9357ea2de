"""Notifications: the decision in commit order (pure), the durable event
journal, and the real dispatcher delivering to a loopback HTTP receiver and
a recording command: once each, in order, across outages and SIGKILL, and
never slowing result writing."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import itertools
import json
import os
import subprocess
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

from support.cluster import FAILING_TEST, PY, ROOT, Fleet, free_port, wait_until

import helpers
import notifications
from ci import results
from notifications import PENDING, UNKNOWN, Decider, EventStore, Result


def cid(n) -> str:
    return hashlib.sha1(str(n).encode()).hexdigest()


def chain(verdicts, branch="main", first_previous=None):
    """Results of one branch, oldest first, each naming the one before."""
    results, previous = [], first_previous
    for n, verdict in enumerate(verdicts):
        commit = cid(f"{branch}-{n}")
        results.append(Result(commit, branch, previous, verdict, {"tests": "3"}))
        previous = commit
    return results


def pending_lookup(results):
    """Commits of the chain not given yet are pending; anything else unknown."""
    known = {r.commit for r in results}
    return lambda commit: PENDING if commit in known else UNKNOWN


# --------------------------------------------------------------------------
# The decision (pure).

@pytest.mark.parametrize("notify_on, announced", [
    ("change", ["broken", "fixed"]),
    ("failure", ["broken", "still-failing", "fixed"]),
    ("all", ["passed", "broken", "still-failing", "fixed"]),
])
def test_red_red_green(notify_on, announced):
    results = chain(["passed", "failed", "timeout", "passed"])
    decider = Decider(notifications.NOTIFY_ON[notify_on])
    decisions = decider.add(results, pending_lookup(results))
    assert [d.kind for d in decisions] == ["passed", "broken", "still-failing", "fixed"]
    assert [d.kind for d in decisions if d.announce] == announced
    assert decisions[3].previous_verdict == "timeout"
    assert decisions[0].previous_verdict is None


def test_out_of_order_arrival_waits_for_the_earlier_commit():
    results = chain(["passed", "failed", "failed", "passed"])
    decider = Decider(notifications.NOTIFY_ON["all"])
    lookup = pending_lookup(results)
    for later in (results[3], results[1], results[2]):
        assert decider.add([later], lookup) == []
    assert decider.waiting()[results[1].commit] == results[0].commit
    decisions = decider.add([results[0]], lookup)
    assert [d.result.commit for d in decisions] == [r.commit for r in results]
    assert [d.kind for d in decisions] == ["passed", "broken", "still-failing", "fixed"]
    assert decider.waiting() == {}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["passed", "failed", "error"]), min_size=1, max_size=7),
       st.lists(st.sampled_from(["passed", "failed"]), min_size=1, max_size=4),
       st.randoms(use_true_random=False))
def test_any_arrival_order_gives_the_in_order_decisions(main, feature, rnd):
    results = chain(main) + chain(feature, "feature", first_previous=cid("main-0"))
    expected = Decider(notifications.NOTIFY_ON["all"]).add(results, pending_lookup(results))
    shuffled = list(results)
    rnd.shuffle(shuffled)
    decider = Decider(notifications.NOTIFY_ON["all"])
    lookup = pending_lookup(results)
    got = list(itertools.chain.from_iterable(decider.add([r], lookup) for r in shuffled))
    for branch in ("main", "feature"):
        mine = [(d.result.commit, d.kind, d.event_id) for d in got
                if d.result.branch == branch]
        assert mine == [(d.result.commit, d.kind, d.event_id) for d in expected
                        if d.result.branch == branch]


def test_retest_flip_emits_the_implied_event_and_a_new_id():
    results = chain(["passed", "failed"])
    decider = Decider()
    first = decider.add(results, pending_lookup(results))
    assert [d.kind for d in first] == ["passed", "broken"]
    flipped = Result(results[1].commit, "main", results[0].commit, "passed")
    (fixed,) = decider.add([flipped])
    assert (fixed.kind, fixed.retest, fixed.previous_verdict, fixed.n) == \
        ("fixed", True, "failed", 2)
    assert fixed.event_id != first[1].event_id
    assert decider.add([flipped]) == []  # the same verdict again decides nothing
    (again,) = decider.add([Result(results[1].commit, "main", results[0].commit, "error")])
    assert (again.kind, again.n) == ("broken", 3)


def test_unknown_previous_is_judged_alone_and_pending_waits():
    commit, previous = cid("x"), cid("gone")
    decider = Decider(notifications.NOTIFY_ON["failure"])
    (alone,) = decider.add([Result(commit, "main", previous, "failed")])
    assert (alone.kind, alone.announce) == ("failed", True)
    waiting = Result(cid("y"), "dev", cid("running"), "failed")
    assert decider.add([waiting], lambda c: PENDING) == []


def test_a_previous_result_not_given_yet_is_read_and_decided_first():
    base = Result(cid("base"), None, None, "passed")        # no branch: never announced
    one = Result(cid("one"), "main", base.commit, "failed")
    two = Result(cid("two"), "main", one.commit, "failed")
    files = {base.commit: base, one.commit: one}
    decisions = Decider(notifications.NOTIFY_ON["all"]).add(
        [two], lambda c: files.get(c, UNKNOWN))
    assert [(d.result.commit, d.kind) for d in decisions] == \
        [(one.commit, "broken"), (two.commit, "still-failing")]


def test_a_waiting_commit_is_released_by_a_result_without_branch():
    old, new = cid("old-style"), cid("new-style")
    decider = Decider()
    assert decider.add([Result(new, "main", old, "failed")], lambda c: PENDING) == []
    (decision,) = decider.add([Result(old, None, None, "passed")])
    assert (decision.result.commit, decision.kind) == (new, "broken")


def test_a_cycle_in_bad_metadata_does_not_hang():
    a, b = cid("a"), cid("b")
    decisions = Decider().add([Result(a, "main", b, "failed"), Result(b, "main", a, "passed")],
                              lambda c: PENDING)
    assert sorted(d.result.commit for d in decisions) == sorted([a, b])


def test_event_text_and_payload():
    result = Result(cid(1), "main", cid(0), "failed",
                    {"subject": "Break\nit", "author": "Ann <a@x>", "tests": "10",
                     "failures": "3", "errors": "0"})
    broken = notifications.Decision(result, "broken", "passed", 1, False, True)
    event = notifications.build_event(broken, "/r", "http://ci/c/{commit}", ["command"])
    assert event["text"].startswith(f'main is broken by {cid(1)[:12]} ("Break it", Ann <a@x>)')
    assert "3 failures, 0 errors of 10 tests" in event["text"]
    assert event["url"] == f"http://ci/c/{cid(1)}"
    payload = json.loads(notifications.webhook_body(event))
    assert payload["id"] == broken.event_id and payload["tests"] == 10
    env = notifications.command_environment(event, {"PATH": "/bin", "CI_SECRET": "s",
                                                    "CI_EVENT": "forged", "API_TOKEN": "t"})
    assert env["CI_EVENT"] == "broken" and env["CI_SUBJECT"] == "Break it"
    assert "CI_SECRET" not in env and "API_TOKEN" not in env and env["PATH"] == "/bin"


# --------------------------------------------------------------------------
# The journal.

def decision_records(results, kinds="all"):
    decider = Decider(notifications.NOTIFY_ON[kinds])
    records = []
    for d in decider.add(results, pending_lookup(results)):
        event = notifications.build_event(d, "/r", None, ["command", "webhook:x"]) \
            if d.announce else None
        records.append({"j": d.result.commit, "v": d.result.verdict, "n": d.n, "e": event})
    return records


def test_store_replay_keeps_undelivered_events_in_order(tmp_path):
    path = str(tmp_path / "journal")
    store = EventStore(path)
    assert store.load() is False
    store.open()
    records = decision_records(chain(["passed", "failed", "failed", "passed"]), "failure")
    store.append(records, sync=True)
    broken, still, fixed = [r["e"]["id"] for r in records if r["e"]]
    store.mark(broken, "command")
    store.mark(broken, "webhook:x")
    store.mark(still, "webhook:x", "gave_up")
    store.close()
    with open(path, "ab") as handle:
        handle.write(b'{"ok": "torn')  # a crash mid-write
    again = EventStore(path)
    assert again.load() is True
    assert [(e["id"], e["targets"]) for e in again.pending()] == \
        [(still, ["command"]), (fixed, ["command", "webhook:x"])]
    assert again.judged == {r["j"]: (r["v"], 1) for r in records}


def test_store_compaction_keeps_what_is_needed(tmp_path):
    path = str(tmp_path / "journal")
    store = EventStore(path)
    store.load()
    store.open()
    results = chain(["passed", "failed"])
    store.append(decision_records(results), sync=True)
    # A retest of the broken commit: a second pending event for it.
    retest = Result(results[1].commit, "main", results[0].commit, "passed")
    decider = Decider()
    decider.judged = store.judged
    (fixed,) = decider.add([retest])
    event = notifications.build_event(fixed, "/r", None, ["command"])
    store.append([{"j": retest.commit, "v": "passed", "n": fixed.n, "e": event}], sync=True)
    for n in range(50):
        store.append([{"j": cid(n), "v": "passed", "n": 1, "e": None}], sync=False)
    before = [e["id"] for e in store.pending()]
    assert len(before) == 3
    store.compact(keep=lambda commit: commit != cid(7))
    store.close()
    again = EventStore(path)
    again.load()
    assert [e["id"] for e in again.pending()] == before
    assert again.judged[retest.commit] == ("passed", 2)
    assert cid(7) not in again.judged and cid(8) in again.judged
    assert again.records == len(again.judged) + 3


# --------------------------------------------------------------------------
# Real processes: a loopback HTTP receiver and a recording command.

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


RECORDER = """import json, os, sys
record = {k: v for k, v in os.environ.items() if k.startswith("CI_")}
record["env_keys"] = sorted(os.environ)
record["stdin"] = sys.stdin.read()
with open(sys.argv[1], "a") as handle:
    handle.write(json.dumps(record) + "\\n")
"""


def recorder(tmp_path) -> tuple[str, str]:
    script, out = tmp_path / "record.py", tmp_path / "recorded.jsonl"
    script.write_text(RECORDER)
    return f"{PY} {script} {out}", str(out)


def recorded(path) -> list[dict]:
    try:
        with open(path) as handle:
            return [json.loads(line) for line in handle]
    except FileNotFoundError:
        return []


def address(cluster):
    return helpers.parse_address(cluster.dispatcher_address)


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
    body = helpers.encode_fields({"verdict": verdict, "tests": 4, "failures": failures,
                                  "errors": 0, "runner": "fake"}) + b"\nout\n"
    started = time.monotonic()
    token = cluster.fleet.token(commit)
    reply = helpers.call(address(cluster), "results", f"{commit} {token}", body)
    assert reply.command == "ok", reply
    return time.monotonic() - started


def journal_events(cluster) -> dict:
    """Event id -> (event kind, delivered to some target)."""
    path = os.path.join(cluster.state, notifications.JOURNAL_NAME)
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
    security = helpers.Security(secret=b"cluster-secret")
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
    assert not os.path.exists(tmp_path / "dispatcher_state" / notifications.JOURNAL_NAME)


# --------------------------------------------------------------------------
# The notifier in this process, with a real command.

def write_result(folder, result: Result):
    fields = {"commit": result.commit, "verdict": result.verdict, "tests": 2,
              "branch": result.branch}
    if result.previous:
        fields["previous"] = result.previous
    helpers.atomic_write(os.path.join(folder, result.commit),
                         results.format_result(fields, b"out\n"), fsync=False)
    return fields


def test_notifier_first_start_and_a_result_missed_in_a_crash(tmp_path):
    results, state = str(tmp_path / "results"), str(tmp_path / "state")
    os.makedirs(results)
    os.makedirs(state)
    history = chain(["passed", "failed", "failed", "passed", "failed"])
    for old in history[:2]:
        write_result(results, old)
    command, out = recorder(tmp_path)
    target = notifications.CommandTarget(command.split(), 10)

    def start():
        notifier = notifications.Notifier(state, results, [target],
                                          notifications.NOTIFY_ON["all"], retry_max=0.2)
        notifier.start(lambda commit: False)
        return notifier

    notifier = start()
    # Old results are not announced; a new one is, against the old verdict.
    notifier.result_written(history[2].commit, write_result(results, history[2]))
    wait_until(lambda: recorded(out) and not notifier.store.pending(), 10,
               what="the first notification")
    notifier.stop()
    # Written, then the dispatcher died before telling the notifier.
    write_result(results, history[3])
    notifier = start()
    wait_until(lambda: len(recorded(out)) >= 2, 10, what="the missed result's notification")
    notifier.result_written(history[4].commit, write_result(results, history[4]))
    wait_until(lambda: len(recorded(out)) >= 3, 10, what="the last notification")
    notifier.stop()
    assert [(r["CI_EVENT"], r["CI_COMMIT"]) for r in recorded(out)] == \
        [("still-failing", history[2].commit), ("fixed", history[3].commit),
         ("broken", history[4].commit)]


def test_gives_up_after_retry_for_and_goes_on(tmp_path):
    results, state = str(tmp_path / "results"), str(tmp_path / "state")
    os.makedirs(results)
    os.makedirs(state)
    failing = notifications.CommandTarget([PY, "-c", "import sys; sys.exit(3)"], 10)
    notifier = notifications.Notifier(state, results, [failing], notifications.NOTIFY_ON["all"],
                                      retry_for=0.3, retry_max=0.05)
    notifier.start(lambda commit: False)
    for result in chain(["failed", "passed"]):
        notifier.result_written(result.commit, write_result(results, result))
    wait_until(lambda: notifier.store.judged and not notifier.store.pending(), 20,
               what="both events given up")
    notifier.stop()
    with open(os.path.join(state, notifications.JOURNAL_NAME)) as handle:
        assert handle.read().count('"gave_up"') == 2


def test_a_hanging_command_is_killed_at_its_timeout():
    target = notifications.CommandTarget([PY, "-c", "import time; time.sleep(60)"], 0.5)
    (decision,) = Decider(notifications.NOTIFY_ON["all"]).add(chain(["failed"]))
    event = notifications.build_event(decision, "/r", None, ["command"])
    started = time.monotonic()
    with pytest.raises(notifications.DeliveryError, match="timed out"):
        target.deliver(event)
    assert time.monotonic() - started < 5


def test_an_event_for_a_removed_target_is_dropped_at_start(tmp_path):
    results, state = str(tmp_path / "results"), str(tmp_path / "state")
    os.makedirs(results)
    os.makedirs(state)
    store = EventStore(os.path.join(state, notifications.JOURNAL_NAME))
    store.load()
    store.open()
    records = decision_records(chain(["failed"]))
    records[0]["e"]["targets"] = ["webhook:removed"]
    store.append(records, sync=True)
    store.close()
    command, out = recorder(tmp_path)
    notifier = notifications.Notifier(state, results,
                                      [notifications.CommandTarget(command.split(), 10)])
    notifier.start()
    wait_until(lambda: notifier.store.judged and not notifier.store.pending(), 10,
               what="the stale event dropped")
    notifier.stop()
    assert recorded(out) == []


def test_giving_up_resets_the_backoff():
    """The next event's first retry starts short again, not at the delay
    the given-up event's retries had grown to."""
    class Refusing:
        key = label = "refusing"

        def deliver(self, event):
            raise notifications.DeliveryError("down")

    class Marks:
        def __init__(self):
            self.outcomes = []

        def mark(self, event_id, target, outcome):
            self.outcomes.append(outcome)

    store, stop = Marks(), threading.Event()
    worker = notifications.TargetWorker(Refusing(), store, retry_for=0.5, retry_max=10.0,
                                        stop_event=stop)
    worker.backoff = helpers.Backoff(first=0.01, cap=10.0)
    (decision,) = Decider(notifications.NOTIFY_ON["all"]).add(chain(["failed"]))
    event = notifications.build_event(decision, "/r", None, ["refusing"])
    event["created"] = time.time() - 0.3   # a few quick retries, then given up
    worker.thread.start()
    try:
        worker.submit(event)
        wait_until(lambda: store.outcomes == ["gave_up"] and worker.backoff.current == 0.01,
                   10, what="the event given up and the backoff reset")
    finally:
        stop.set()
        worker.wake()
        worker.thread.join(5)
