"""Flags that change how the daemons find each other and what they watch."""

from support.cluster import free_port, git, wait_until


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
