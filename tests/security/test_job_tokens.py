"""Job tokens against a real dispatcher (issue 8), with runner stand-ins
holding issued keys (``keyed_runners``, so the test decides when each one
reports): only the assignee's token moves a job; forged, another commit's,
another runner's and late tokens change nothing."""

from __future__ import annotations

import re

from support.cluster import wait_until
from ci.outcome import Outcome
from ci.wire import Message
from support.privilege import C1, C2, MASTER, ask, key_security, warnings, write_secret


def verdict_body(verdict: str, note: str = "") -> bytes:
    return Outcome({"verdict": verdict}, note.encode()).to_body()


def test_results_release_and_progress_need_the_assignees_token(cluster, tmp_path,
                                                                keyed_runners):
    disp = cluster.start_dispatcher("--secret-file", write_secret(tmp_path / "master", MASTER))
    port = cluster.dispatcher_port
    r1, r2 = keyed_runners("r1", "r2")
    r1.register(port)
    r2.register(port)
    observer = key_security("observer", "obs")
    assert ask(port, "dispatch", f"{C1} {C2}", security=observer).argument == "queued 2"
    wait_until(lambda: (r1.token(C1) or r2.token(C1)) and (r1.token(C2) or r2.token(C2)), 10,
               what="both commits assigned")
    a, b = (r1, r2) if r1.token(C1) else (r2, r1)   # a runs C1, b runs C2
    t1, t2 = a.token(C1), b.token(C2)
    assert re.fullmatch(r"[0-9a-f]{32}", t1) and t1 != t2
    before = len(warnings(disp))

    refused = {
        "no token": a.send(port, "results", C1, None, verdict_body("passed")),
        "made-up token": a.send(port, "results", C1, "0123456789abcdef" * 2,
                                verdict_body("passed")),
        "another commit's token": a.send(port, "results", C1, t2, verdict_body("passed")),
        "another runner's job": b.send(port, "results", C1, t1, verdict_body("passed")),
        "release by another": b.send(port, "release", C1, t1),
        "release, wrong token": a.send(port, "release", C1, t2),
        "progress by another": b.send(port, "progress", C1, t1, b"forged output"),
        "progress, wrong token": a.send(port, "progress", C1, "f" * 32, b"forged output"),
    }
    for what, reply in refused.items():
        assert reply.startswith("error:"), (what, reply)
    assert "usage: results:<full commit id> <token>" in refused["no token"]
    assert "no such assignment" in refused["made-up token"]
    assert "no such assignment" in refused["another commit's token"]
    assert "assigned to another runner" in refused["another runner's job"]
    assert len(warnings(disp)) - before >= len(refused)
    assert not cluster.result_files()
    viewer = key_security("viewer", "v")
    assert ask(port, "log", C1, security=viewer) == Message("ok", "running", b"")

    # The assignee's own progress and result count.
    assert a.send(port, "progress", C1, t1, b"real output") == "ok:"
    assert ask(port, "log", C1, security=viewer).body == b"real output"
    assert a.send(port, "results", C1, t1, verdict_body("failed")) == "ok:stored"
    assert cluster.result(C1)["verdict"] == "failed"

    # Retest: a new round, a new token; the old token is now a duplicate.
    assert ask(port, "retest", C1, security=observer).argument == "queued 1"
    wait_until(lambda: r1.count(C1) + r2.count(C1) == 2, 10, what="C1 assigned again")
    again = r1 if r1.count(C1) == (2 if a is r1 else 1) else r2
    t1_new = again.token(C1)
    assert t1_new not in (t1, t2)
    assert a.send(port, "results", C1, t1, verdict_body("passed")) == "ok:duplicate"
    assert cluster.result(C1)["verdict"] == "failed"
    # Release: only the current assignee, with the current token.  (``b``
    # was busy with C2, so the retest went to ``a``; ``b`` finishes C2 now.)
    other = b
    assert again is a
    assert b.send(port, "results", C2, t2, verdict_body("passed")) == "ok:stored"
    assert "assigned to another runner" in other.send(port, "release", C1, t1_new)
    assert "not the current assignment" in again.send(port, "release", C1, t1)
    before = other.count(C1)
    assert again.send(port, "release", C1, t1_new) == "ok:released"
    wait_until(lambda: other.count(C1) > before, 10, what="C1 handed to the other runner")
    t1_third = other.token(C1)
    assert t1_third not in (t1, t1_new)
    assert other.send(port, "results", C1, t1_third, verdict_body("passed", "round 2")) == \
        "ok:stored"
    wait_until(lambda: cluster.result(C1)["verdict"] == "passed", 5, what="retest verdict")


def test_a_late_result_from_a_reassigned_job_wins_if_it_is_first(cluster, tmp_path,
                                                                  keyed_runners):
    cluster.start_dispatcher("--secret-file", write_secret(tmp_path / "master", MASTER))
    port = cluster.dispatcher_port
    r1, = keyed_runners("r1")
    r1.register(port)
    observer = key_security("observer", "obs")
    assert ask(port, "dispatch", C2, security=observer).argument == "queued 1"
    first = wait_until(lambda: r1.token(C2), 10, what="C2 assigned to r1")
    r1.close()  # its port goes dead: the dispatcher drops it and requeues C2
    r2, = keyed_runners("r2")
    r2.register(port)
    second = wait_until(lambda: r2.token(C2), 10, what="C2 reassigned to r2")
    assert second != first
    # r1's run was not lost after all: its result, with its real token, comes first.
    assert r1.send(port, "results", C2, first, verdict_body("failed", "r1")) == "ok:stored"
    assert r2.send(port, "results", C2, second, verdict_body("passed", "r2")) == "ok:duplicate"
    fields = cluster.result(C2)
    assert fields["verdict"] == "failed" and fields["output"] == b"r1"
