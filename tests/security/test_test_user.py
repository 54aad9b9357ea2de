"""The test user (``--test-user``, root only): environments it builds are
then read-only to it; handing an environment back never follows a symlink
it swapped in; a runner refuses a key file its test user could read."""

from __future__ import annotations

import os
import subprocess

from ci import auth
from support.cluster import PASSING_TEST, PY, ROOT, SYSTEM_PYTHON, Daemon, free_port, wait_for_port
from support.users import new_test_user
from support.privilege import (LOOPBACK, MASTER, ask, nobody_clone, nobody_folder,
                               user_folder_cluster)


ENV_TEST = """import os
import sys
import unittest


class TestEnvironment(unittest.TestCase):
    def test_built_by_the_setup_and_read_only_now(self):
        self.assertTrue(os.path.exists(os.path.join(sys.prefix, "setup-was-here")))
        try:
            open(os.path.join(sys.prefix, "poisoned"), "w").close()
        except PermissionError:
            return
        self.fail("the cached environment is writable by the test")
"""


def test_environments_under_test_user_are_built_by_it_then_read_only(request):
    """--test-user with a setup command: the setup runs as the test user in
    the new environment; once built, the environment is the runner's, so
    no later commit's test can poison it."""
    user = new_test_user(request)   # its own: the runner ends all its processes
    cluster, upstream, base, _nobody = user_folder_cluster(request)
    cluster.start_dispatcher()
    clone = nobody_clone(upstream, base / "clone", user)
    port = free_port()
    # The setup also hard-links a file from a cache of its own, as uv does.
    setup = ("python -c \"import os, sys; open(sys.prefix + '/setup-was-here', 'w').close(); "
             "open('cache-file', 'w').write('installed'); "
             "os.link('cache-file', sys.prefix + '/linked-from-cache')\"")
    args = [SYSTEM_PYTHON, os.path.join(ROOT, "test_runner.py"), "--host", LOOPBACK,
            "--port", str(port), "--dispatcher-server", cluster.dispatcher_address,
            "--heartbeat", "0.5", "--retry-max", "0.5", "--log-level", "DEBUG",
            "--test-user", user.pw_name, "--state-dir", str(base / "state"),
            "--setup-command", setup, clone]
    daemon = Daemon("runner", args, str(base / "runner.log"), str(base), cluster.env)
    cluster.daemons.append(daemon)
    wait_for_port(port, daemon)
    first = upstream.commit({"tests/test_env.py": ENV_TEST}, "uses its environment")
    second = upstream.commit({"tests/test_env2.py": ENV_TEST.replace("TestEnvironment",
                                                                      "TestAgain")}, "again")
    # main builds; a feature branch reuses main's environment, read-only.
    for commit, branch in ((first, "main"), (second, "feature/x")):
        reply = ask(cluster.dispatcher_port, "dispatch", commit,
                    f"{commit} - {branch}\n".encode())
        assert reply.command == "ok", reply
        fields = cluster.result(commit, 60)
        assert fields["verdict"] == "passed", fields["output"][-3000:].decode("utf-8", "replace")
    assert [(cluster.result(c)["setup"], cluster.result(c)["setup_scope"])
            for c in (first, second)] == [("built", "trusted"), ("reused", "trusted")]
    envs = base / "state" / "envs"
    built = [p for p in envs.iterdir() if p.is_dir()]
    assert len(built) == 1
    assert (built[0] / "setup-was-here").stat().st_uid == 0
    linked = built[0] / "linked-from-cache"
    assert linked.read_text() == "installed" and linked.stat().st_nlink == 1
    assert linked.stat().st_uid == 0
    assert not (built[0] / "poisoned").exists()
    assert (base / "state" / "outbox").stat().st_mode & 0o777 == 0o700


def test_handing_an_environment_back_never_follows_a_swapped_symlink(tmp_path, monkeypatch):
    """While the runner hands a built environment back, a process the
    setup left behind (as the test user) may swap any name for a symlink
    to the runner's key the moment after the runner looked at it: the
    key's mode must not change, whatever the runner looked with."""
    from ci.runner.sandbox import ownership
    key = tmp_path / "runner.key"
    key.write_bytes(b"ci-key-v1 runner:r1 " + b"0" * 64 + b"\n")
    key.chmod(0o600)
    lib = tmp_path / "env" / "lib"
    lib.mkdir(parents=True)
    victim = lib / "module.py"
    victim.write_text("x = 1\n")
    victim.chmod(0o777)
    swapped = []

    def swap_after(real):
        def looked(*args, **kwargs):
            result = real(*args, **kwargs)
            path = args[0]
            if isinstance(path, (str, os.PathLike)) and not swapped and \
                    os.path.basename(path) == victim.name:
                os.unlink(victim)
                os.symlink(key, victim)
                swapped.append(real.__name__)
            return result
        return looked
    for name in ("lstat", "stat", "open"):
        monkeypatch.setattr(os, name, swap_after(getattr(os, name)))
    ownership.chown_tree(str(tmp_path / "env"), ownership.Owner(os.getuid(), os.getgid(),
                                                               strip=0o6022))
    monkeypatch.undo()
    assert swapped, "the tree walk never looked at the file"
    assert key.stat().st_mode & 0o7777 == 0o600
    assert victim.is_symlink()


def test_a_runner_with_test_user_refuses_a_key_file_the_test_user_can_read(request):
    """A key file printed with a shell redirect (mode 644) would be open
    to the tests: --test-user refuses to start with it, naming the file."""
    base, upstream, nobody = nobody_folder(request, "ci-keymode-")
    upstream.commit({"tests/test_sample.py": PASSING_TEST}, "initial")
    clone = nobody_clone(upstream, base / "clone", nobody)
    key = base / "r1.key"
    key.write_text(auth.format_key_file("runner", "r1", MASTER))

    def start(mode):
        key.chmod(mode)
        return subprocess.run(
            [PY, os.path.join(ROOT, "test_runner.py"), "--host", LOOPBACK, "--port",
             str(free_port()), "--dispatcher-server", f"{LOOPBACK}:9", "--secret-file",
             str(key), "--test-user", nobody.pw_name, "--state-dir", str(base / "state"),
             "--dispatcher-timeout", "0.5", "--retry-max", "0.1", str(clone)],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    refused = start(0o644)
    assert refused.returncode == 2, refused.stderr
    assert f"--test-user {nobody.pw_name} can read --secret-file {key}" in refused.stderr
    assert not (base / "state").exists()
    # Private to the runner's user: it starts (and gives up on the absent
    # dispatcher after --dispatcher-timeout).
    accepted = start(0o600)
    assert "can read" not in accepted.stderr, accepted.stderr
    assert f"test user {nobody.pw_name}" in accepted.stderr, accepted.stderr[-2000:]
    # A runner's repository git cannot use is a clear error, not a traceback.
    (base / "state" / "git" / "config").write_text("[broken\n")
    broken = start(0o600)
    assert broken.returncode == 2 and "is unusable" in broken.stderr, broken.stderr[-2000:]
