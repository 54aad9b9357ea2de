"""--test-user start-up checks (user_access): a runner whose test user
cannot execute its interpreters or reach the clone and the environment
folder refuses to start with one line that says what and why, before it
registers with a dispatcher; and a runner whose own code lies where only
root can go still runs its tests (it hands the test user a copy of the
recorder).  Root only: the runner switches to a test user of the test's own."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess

import pytest

import helpers
from support.cluster import (PASSING_TEST, ROOT, SYSTEM_PYTHON, Cluster, Daemon,
                             Upstream, free_port, project_copy, wait_for_port, wait_until)
from support.privilege import LOOPBACK, nobody_clone, nobody_folder



def nobody_base(request):
    """A folder 'nobody' can traverse, with a root-only folder 'private'
    holding a link to a Python (which 'nobody' therefore cannot execute),
    an upstream with one passing test and a clone that belongs to
    'nobody'; returns (base, upstream, clone, the user)."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"needs {SYSTEM_PYTHON}")
    base, upstream, nobody = nobody_folder(request, "ci-startup-")
    (base / "private").mkdir(mode=0o700)
    os.symlink(SYSTEM_PYTHON, base / "private" / "python3")
    upstream.commit({"tests/test_sample.py": PASSING_TEST}, "initial")
    clone = nobody_clone(upstream, base / "clone", nobody)
    return base, upstream, clone, nobody


def start_runner(request, user, python, clone, state, dispatcher_port, *extra):
    """A runner started as root with --test-user ``user``, ended by PID."""
    args = [python, os.path.join(ROOT, "test_runner.py"), "--host", LOOPBACK, "--port",
            str(free_port()), "--dispatcher-server", f"{LOOPBACK}:{dispatcher_port}",
            "--test-user", user.pw_name, "--state-dir", str(state), "--heartbeat", "0.5",
            "--retry-max", "0.2", "--dispatcher-timeout", "5", *extra, str(clone)]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)

    def end():
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        proc.communicate(timeout=10)
    request.addfinalizer(end)
    return proc


def case_setup(case: str, base: pathlib.Path, clone: str, nobody):
    """(the runner's Python, its clone, extra flags, expected line) for
    each thing the test user cannot use."""
    private = base / "private"
    python = str(private / "python3")
    closed = f"{private} is mode 700 (owner root)"
    if case == "runner python":
        return python, clone, [], (f"test user {nobody.pw_name} cannot execute {python} (the runner's "
                                   f"Python, which its environments and default test "
                                   f"command use): {closed}")
    if case == "test command":
        return SYSTEM_PYTHON, clone, ["--ignore-repo-recipe", "--test-command",
                                      f"{python} -m unittest discover -s tests"], \
            f"test user {nobody.pw_name} cannot execute {python} (the test command): {closed}"
    if case == "script interpreter":
        script = base / "run-tests"
        script.write_text(f"#!{python}\nimport unittest\nunittest.main(module=None)\n")
        script.chmod(0o755)
        return SYSTEM_PYTHON, clone, ["--ignore-repo-recipe", "--test-command", str(script)], \
            (f"test user {nobody.pw_name} cannot execute {python} (the interpreter of {script}, the "
             f"test command): {closed}")
    if case == "clone":
        hidden = own_clone_in(base, private, nobody)
        return SYSTEM_PYTHON, hidden, [], (f"test user {nobody.pw_name} cannot enter and change "
                                           f"{hidden} (the clone): {closed}")
    if case == "cell interpreter":
        version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print('%d.%d' % "
                                  "sys.version_info[:2])"], capture_output=True, text=True,
                                 timeout=30).stdout.strip()
        return SYSTEM_PYTHON, clone, ["--python", f"{version}={python}"], \
            (f"test user {nobody.pw_name} cannot execute {python} (--python {version}, for "
             f"matrix cells): {closed}")
    assert case == "environment folder"
    return SYSTEM_PYTHON, clone, ["--env-dir", str(private / "envs")], \
        (f"test user {nobody.pw_name} cannot pass through {private / 'envs'} (the environment "
         f"folder): {closed}")


def own_clone_in(base, folder, nobody) -> str:
    upstream = Upstream(base / "upstream2")
    upstream.commit({"tests/test_sample.py": PASSING_TEST}, "initial")
    return nobody_clone(upstream, folder / "clone", nobody)


@pytest.mark.parametrize("case", ["runner python", "test command", "script interpreter",
                                  "clone", "environment folder", "cell interpreter"])
def test_a_runner_whose_test_user_cannot_use_what_it_needs_refuses_to_start(request, case):
    """Without the check such a runner started and gave every commit the
    verdict 'error' ("cannot start test command: Permission denied")."""
    base, _upstream, clone, nobody = nobody_base(request)
    python, clone, extra, expected = case_setup(case, base, clone, nobody)
    # A dispatcher's port that only counts who connects.
    listener = socket.create_server((LOOPBACK, 0))
    request.addfinalizer(listener.close)
    proc = start_runner(request, nobody, python, clone, base / "state", listener.getsockname()[1],
                        *extra)
    wait_until(lambda: proc.poll() is not None, 15, what="the runner to exit")
    _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("test_runner: error:")]
    assert errors == [f"test_runner: error: {expected}"], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.accept()   # it never tried to register


def test_a_runner_whose_code_only_root_can_read_hands_its_test_user_the_recorder(request):
    """The runner's own files in a folder only root may enter (a clone in
    root's home): the test user runs the recorder from the runner's copy
    in the state folder, and the commit passes (it was 'error':
    "can't open file .../unittest_recorder.py: Permission denied")."""
    base, upstream, clone, _nobody = nobody_base(request)
    code = project_copy(base / "private" / "ci")
    cluster = Cluster(base, upstream)
    request.addfinalizer(cluster.close)
    cluster.start_dispatcher()
    port = free_port()
    args = [SYSTEM_PYTHON, os.path.join(code, "test_runner.py"), "--host", LOOPBACK,
            "--port", str(port), "--dispatcher-server", cluster.dispatcher_address,
            "--heartbeat", "0.5", "--retry-max", "0.5", "--log-level", "DEBUG",
            "--test-user", _nobody.pw_name, "--state-dir", str(base / "state"),
            "--ignore-repo-recipe",
            "--test-command", f"{SYSTEM_PYTHON} -m unittest discover -s tests", clone]
    daemon = Daemon("runner", args, str(base / "runner.log"), str(base), cluster.env)
    cluster.daemons.append(daemon)
    wait_for_port(port, daemon)
    commit = upstream.commit({"tests/test_more.py": PASSING_TEST.replace("TestSample",
                                                                          "TestMore")}, "more")
    reply = helpers.call((LOOPBACK, cluster.dispatcher_port), "dispatch", commit, timeout=5)
    assert reply.command == "ok", reply
    fields = cluster.result(commit, 60)
    assert fields["verdict"] == "passed", fields["output"][-3000:]
    assert fields["tests"] == "2", fields
    # The recorder, and the plugins it and a pytest run load from beside it.
    for name in ("unittest_recorder.py", "ci_order.py", "ci_shard.py"):
        copy = base / "state" / "ci_support" / name
        assert copy.stat().st_uid == 0 and copy.stat().st_mode & 0o777 == 0o644, name
