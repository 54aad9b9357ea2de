"""The test user (``--test-user``): who setup and tests run as; how a
process is switched to it and what environment it gets; and the checks
made once at start (not root, owns the clone, cannot read the runner's
keys)."""

from __future__ import annotations

import os
import pwd

from ci.config import ConfigError
from ci.runner.sandbox.private_git import PrivateRepository


class TestUser:
    """``--test-user``: setup and tests run as this unprivileged user, so a
    test cannot read the runner's key file, its environment, its outbox or
    its state folder (all the runner user's, mode 600/700), nor change the
    repository later checkouts read (see private_git)."""

    def __init__(self, name: str):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise ConfigError(f"--test-user: no such user {name!r}") from None
        if os.geteuid() != 0:
            raise ConfigError("--test-user needs the runner to run as root (it "
                                      "switches to that user for each test run)")
        if entry.pw_uid == 0:
            raise ConfigError("--test-user must be an unprivileged user, not root")
        self.name, self.uid, self.gid = name, entry.pw_uid, entry.pw_gid
        self.home = entry.pw_dir

    def popen_args(self) -> dict:
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def env(self, env: dict) -> dict:
        env = dict(env, USER=self.name, LOGNAME=self.name)
        env["HOME"] = self.home if os.path.isdir(self.home) else "/tmp"
        # The clone's repository is the runner's (private_git): the tests'
        # own git may read it, which git refuses for another owner's
        # repository unless told (a command-scope setting, git >= 2.36).
        count = env.get("GIT_CONFIG_COUNT", "")
        count = int(count) if count.isdigit() else 0
        env.update({"GIT_CONFIG_COUNT": str(count + 1), f"GIT_CONFIG_KEY_{count}":
                    "safe.directory", f"GIT_CONFIG_VALUE_{count}": "*"})
        return env

    def own(self, path: str) -> None:
        """Hand a folder the runner made for one run to the test user."""
        os.chown(path, self.uid, self.gid)

    def can_read(self, path: str) -> bool:
        """Whether this user could open ``path`` (its folders included):
        asked of the kernel, in a child switched to the user."""
        path = os.path.abspath(path)
        pid = os.fork()
        if pid == 0:
            code = 2
            try:
                os.setgroups([])
                os.setgid(self.gid)
                os.setuid(self.uid)
                code = 1
                os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY))
                code = 0
            finally:
                os._exit(code)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code not in (0, 1):
            raise ConfigError(f"--test-user {self.name}: cannot check who may read "
                                      f"{path}")
        return code == 0

    def check_private(self, path: str | None, flag: str) -> None:
        """The runner's key and TLS key must be out of the tests' reach."""
        if path and self.can_read(path):
            raise ConfigError(f"--test-user {self.name} can read {flag} {path}: the "
                                      "tests could too (chmod 600 it, owned by the runner's "
                                      "user)")

    def check_clone(self, repo: str, state_dir: str) -> None:
        owner = os.stat(repo).st_uid
        if owner == os.getuid() and PrivateRepository(
                repo, state_dir, self.uid, self.gid).exists():
            return  # a run stopped during a checkout: setup gives it back
        if owner != self.uid:
            raise ConfigError(f"--test-user {self.name}: the clone {repo} must belong "
                                      f"to that user (chown -R {self.name} {repo})")
