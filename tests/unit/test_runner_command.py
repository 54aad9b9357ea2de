"""What a runner runs and with what: the default test command (unittest
discovery, top-level folder when ``tests`` is a package) and the
environment its children get (no secret, unbuffered output)."""

from __future__ import annotations

import os
import sys

from test_runner import child_env, default_test_command


def test_default_test_command(tmp_path):
    os.makedirs(tmp_path / "tests")
    command = default_test_command(str(tmp_path))
    assert command == [sys.executable, "-m", "unittest", "discover", "-s", "tests"]
    (tmp_path / "tests" / "__init__.py").write_text("")
    command = default_test_command(str(tmp_path))
    assert command == [sys.executable, "-m", "unittest", "discover", "-s", "tests", "-t", "."]


def test_child_env_hides_the_secret_and_unbuffers_output(monkeypatch):
    monkeypatch.setenv("CI_SECRET", "s3cret")
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    env = child_env()
    assert "CI_SECRET" not in env
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"] == os.environ["PATH"]
