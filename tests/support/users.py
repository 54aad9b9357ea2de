"""Test users of their own, for runners with ``--test-user``."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess

import pytest

from ci.runner.sandbox import cleanup as user_sandbox


def new_test_user(request):
    """A system user without a home (README's ``useradd --system
    --no-create-home``), unique to this test and deleted afterwards (after
    the finalisers registered later, so after the daemons it ran under),
    with whatever it left running or in the shared temporary folders.
    A runner with ``--test-user`` ends every process of its user after each
    run, so no two runners, nor two tests, may share one.  Skips unless
    this runs as root with ``useradd``."""
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("needs root and useradd (a test user of its own)")
    name = f"ci-t-{secrets.token_hex(5)}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/false", name],
                   check=True, capture_output=True, timeout=30)
    user = pwd.getpwnam(name)

    def remove():
        # What outlived the daemons (no runner ended it), and what it left
        # in /tmp (read by every homeless user's Python).
        user_sandbox.end_processes(user.pw_uid, user.pw_gid, wait=5)
        user_sandbox.remove_owned(user.pw_uid, user.pw_gid)
        subprocess.run(["userdel", name], capture_output=True, timeout=30)
    request.addfinalizer(remove)
    return user
