"""The observer's bookkeeping: batches, restarts and the notify hook."""

import os
import re
import subprocess
import time

from support.cluster import PY, ROOT, git, wait_until

import helpers
from ci.wire import decode_fields, parse_address


def many_commits(repo: str, count: int) -> list[str]:
    """Append ``count`` empty commits to main in one git call."""
    parent = git(repo, "rev-parse", "main")
    stream = []
    for i in range(count):
        stream.append(f"commit refs/heads/main\nmark :{i + 1}\n"
                      f"committer CI Test <ci@example.invalid> {1700000000 + i} +0000\n"
                      f"data 4\nc{i:03d}\n" + (f"from {parent}\n" if i == 0 else "") + "\n")
    subprocess.run(["git", "-C", repo, "fast-import", "--quiet"], input="".join(stream),
                   text=True, check=True)
    # fast-import moves the branch but not the work tree.
    git(repo, "reset", "-q", "--hard", "main")
    return git(repo, "rev-list", "--reverse", f"{parent}..main").split()


def dispatcher_status(cluster) -> dict:
    reply = helpers.call(parse_address(cluster.dispatcher_address), "status")
    return {k: int(v) for k, v in decode_fields(reply.body).items()}


def test_backlog_after_restart_is_sent_in_batches_exactly_once(cluster, upstream):
    cluster.start_dispatcher()
    observer = cluster.start_observer()
    wait_until(lambda: dispatcher_status(cluster)["queued"] == 1, 20,
               what="the initial head to be queued")
    assert observer.stop() == 0
    commits = many_commits(upstream.path, 450)
    cluster.start_observer(clone=observer.clone)
    # The dispatcher logs a batch after queueing it.
    wait_until(lambda: dispatcher_status(cluster)["queued"] == 451
               and "50 new" in cluster.daemons[0].log(), 30,
               what="all 450 new commits to be queued")
    log = cluster.daemons[0].log()
    assert log.count("200 new") == 2 and log.count("50 new") == 1
    # Nothing more is sent on later polls.  Counted as sent, not as queued:
    # the dispatcher would drop a repeat, so the queue cannot tell.
    restarted = cluster.daemons[-1]
    polls = observer_polls(restarted)
    wait_until(lambda: observer_polls(restarted) >= polls + 3, 10, what="three more polls")
    sent = [int(n) for n in re.findall(r"dispatch from \S+: (\d+) commit\(s\)",
                                        cluster.daemons[0].log())]
    assert sum(sent) == 1 + 450, sent
    assert dispatcher_status(cluster)["queued"] == 451
    assert len(commits) == 450


def observer_polls(observer) -> int:
    reply = helpers.call(("127.0.0.1", observer.port), "status")
    return int(decode_fields(reply.body)["polls"])


def test_notify_wakes_observer_at_once(cluster, upstream):
    cluster.start_dispatcher()
    cluster.start_runner()
    observer = cluster.start_observer("--poll", "60")
    first = cluster.result(git(upstream.path, "rev-parse", "HEAD"), 20)
    assert first["verdict"] == "passed"
    commit = upstream.commit()
    started = time.monotonic()
    proc = subprocess.run([PY, os.path.join(ROOT, "repo_observer.py"), "notify",
                           "--observer", f"127.0.0.1:{observer.port}"],
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    assert cluster.result(commit, 20)["verdict"] == "passed"
    # Far sooner than the 60 s poll.
    assert time.monotonic() - started < 20


def test_notify_to_nothing_fails_cleanly():
    from support.cluster import free_port
    proc = subprocess.run([PY, os.path.join(ROOT, "repo_observer.py"), "notify",
                           "--observer", f"127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 1
    assert "unreachable" in proc.stderr and "Traceback" not in proc.stderr
