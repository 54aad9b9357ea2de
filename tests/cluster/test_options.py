"""Flags that change how the daemons find each other and what they watch."""

import json
import os
import subprocess

from support.cluster import PY, ROOT, free_port, git, wait_until

import helpers
from ci.wire import encode_fields


def test_runner_gives_up_after_dispatcher_timeout(cluster):
    cluster.dispatcher_port = free_port()  # nothing listens there
    runner = cluster.start_runner("--dispatcher-timeout", "1")
    assert runner.proc.wait(15) == 1
    assert "--dispatcher-timeout" in runner.log()


def test_runner_without_dispatcher_timeout_keeps_waiting(cluster):
    cluster.dispatcher_port = free_port()
    runner = cluster.start_runner()
    wait_until(lambda: runner.log().count("unreachable") >= 5, 15,
               what="several failed attempts")
    assert runner.alive()


def test_runner_on_all_interfaces_advertises_its_link_address(cluster, upstream, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cret-for-tests\n")
    cluster.start_dispatcher("--secret-file", str(secret))
    port = free_port()
    # The later --host wins over the fixture's own 127.0.0.1.
    runner = cluster.start_runner("--secret-file", str(secret), "--host", "0.0.0.0",
                                  port=port)
    # The port answers a moment before the line is in the log.
    wait_until(lambda: f"listening on 0.0.0.0:{port}" in runner.log(), 10,
               what="the runner's listening line")
    dispatcher = cluster.daemons[0]
    wait_until(lambda: f"runner 127.0.0.1:{port} registered" in dispatcher.log(), 15,
               what="the runner to register")
    cluster.start_observer("--secret-file", str(secret))
    assert cluster.result(git(upstream.path, "rev-parse", "HEAD"))["verdict"] == "passed"


def test_observer_watches_several_branches(cluster, upstream):
    git(upstream.path, "branch", "dev")
    cluster.start_dispatcher()
    cluster.start_runner()
    main_head = git(upstream.path, "rev-parse", "main")
    cluster.start_observer("--branch", "main", "--branch", "dev")
    assert cluster.result(main_head)["verdict"] == "passed"
    git(upstream.path, "checkout", "-q", "dev")
    on_dev = upstream.commit({"dev.txt": "dev\n"})
    git(upstream.path, "checkout", "-q", "main")
    on_main = upstream.commit({"main.txt": "main\n"})
    assert cluster.result(on_dev)["verdict"] == "passed"
    assert cluster.result(on_main)["verdict"] == "passed"


def test_a_runner_is_shown_by_the_name_it_gives(cluster, tmp_path):
    """``--name`` travels in ``register``: the dispatcher's state calls the
    runner by it; one without a name is shown by its address.  A name a
    runner may not have is refused with the rule, at start-up or by the
    dispatcher, and registers nothing."""
    cluster.start_dispatcher()
    named = cluster.start_runner("--name", "box-1.ci")
    plain = cluster.start_runner()
    dispatcher = ("127.0.0.1", cluster.dispatcher_port)

    def names():
        reply = helpers.call(dispatcher, "state")
        return {r["address"]: r["name"] for r in json.loads(reply.body)["runners"]}
    expected = {f"127.0.0.1:{named.port}": "box-1.ci",
                f"127.0.0.1:{plain.port}": f"127.0.0.1:{plain.port}"}
    wait_until(lambda: names() == expected, 15, what="both runners registered")
    reply = helpers.call(dispatcher, "register", f"127.0.0.1:{free_port()}",
                         encode_fields({"instance": "i1", "busy": "",
                                                "name": "no spaces"}))
    assert reply.command == "error" and "invalid runner name" in reply.argument, reply
    assert names() == expected
    proc = subprocess.run([PY, os.path.join(ROOT, "test_runner.py"), "--name", "a/b",
                           str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "invalid runner name 'a/b'" in proc.stderr, proc.stderr
