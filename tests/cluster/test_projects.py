"""A real project with a third-party dependency, end to end with the real
daemons and offline: the dependency comes from a wheel folder made here and
``pip install --no-index --find-links``.  The recipe in .ci.ini, environments
built, reused and rebuilt, broken and malformed recipes, and a runner
SIGKILLed in the middle of a setup."""

import os
import signal

import pytest
from support.cluster import git, wait_until
from support.procs import watchdog_of
from support.wheels import make_wheel

DEP_TEST = """import unittest

import tinydep


class TestDependency(unittest.TestCase):
    def test_value(self):
        self.assertGreaterEqual(tinydep.VALUE, 42)
"""


@pytest.fixture
def wheels(tmp_path):
    folder = str(tmp_path / "wheels")
    make_wheel(folder, "tinydep", "1.0", "VALUE = 42\n")
    make_wheel(folder, "tinydep", "2.0", "VALUE = 43\n")
    return folder


def recipe_text(wheels, test=None, extra=""):
    text = (f"[ci]\nsetup = python -m pip install --no-index --find-links {wheels} "
            "-r requirements-test.txt\n")
    if test:
        text += f"test = {test}\n"
    return text + extra


def test_recipe_and_environments_commit_by_commit(cluster, upstream, wheels):
    cluster.start_dispatcher()
    runner = cluster.start_runner()
    cluster.start_observer()
    first = cluster.result(git(upstream.path, "rev-parse", "HEAD"))
    assert (first["verdict"], first["setup"]) == ("passed", "none")

    no_recipe = upstream.commit({"tests/test_dep.py": DEP_TEST}, "needs tinydep")
    with_recipe = upstream.commit({".ci.ini": recipe_text(wheels),
                                   "requirements-test.txt": "tinydep==1.0\n"}, "recipe")
    code_change = upstream.commit({"code.py": "X = 1\n"}, "code")
    new_requirements = upstream.commit({"requirements-test.txt": "tinydep==2.0\n"}, "bump")
    code_again = upstream.commit({"code.py": "X = 2\n"}, "code again")
    new_command = upstream.commit(
        {".ci.ini": recipe_text(wheels, "python -m unittest -v tests.test_dep")}, "command")
    malformed = upstream.commit(
        {".ci.ini": recipe_text(wheels, extra="script = rm -rf /\n")}, "malformed")
    broken_setup = upstream.commit(
        {".ci.ini": recipe_text(wheels), "requirements-test.txt": "tinydep==9.9\n"}, "broken")

    # Without its setup the project cannot import its dependency.
    result = cluster.result(no_recipe)
    assert result["verdict"] == "error" and result["setup"] == "none"
    assert b"No module named 'tinydep'" in result["output"]

    result = cluster.result(with_recipe)
    assert (result["verdict"], result["tests"], result["setup"]) == ("passed", "2", "built")
    assert float(result["setup_duration"]) > 0
    # The setup's output comes before the tests'.
    output = result["output"]
    assert output.index(b"Successfully installed tinydep-1.0") < output.index(b"Ran 2 tests")

    result = cluster.result(code_change)
    assert (result["verdict"], result["setup"]) == ("passed", "reused")
    assert b"Successfully installed" not in result["output"]
    assert float(result["setup_duration"]) < 0.5

    result = cluster.result(new_requirements)
    assert (result["verdict"], result["setup"]) == ("passed", "built")
    assert b"Successfully installed tinydep-2.0" in result["output"]
    assert cluster.result(code_again)["setup"] == "reused"

    # The test command from .ci.ini, from that commit on.
    result = cluster.result(new_command)
    assert (result["verdict"], result["tests"], result["setup"]) == ("passed", "1", "reused")
    assert b"test_value (tests.test_dep.TestDependency" in result["output"]

    result = cluster.result(malformed)
    assert result["verdict"] == "error"
    assert result["reason"] == ".ci.ini line 3: unknown key 'script' (known: setup, test, " \
                               "timeout, setup_timeout, env_files, rerun_failures, quarantine)"

    result = cluster.result(broken_setup)
    assert (result["verdict"], result["reason"], result["setup"]) == \
        ("error", "setup failed: exited 1", "failed")
    assert b"tinydep==9.9" in result["output"]
    assert runner.alive()
    # Two environments were built and kept; the failed one left nothing.
    envs = os.path.join(runner.clone, ".git", "ci-runner", "envs")
    assert len([n for n in os.listdir(envs) if not n.startswith(".")]) == 2


SLOW_SETUP = """import os, subprocess, sys, time
if not os.path.exists(sys.argv[2]):
    open(sys.argv[2], "w").close()
    time.sleep(120)  # the first build is killed here
subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links",
                sys.argv[1], "tinydep"], check=True)
"""


def test_runner_killed_mid_setup_builds_afresh(cluster, upstream, wheels, tmp_path):
    flag = str(tmp_path / "setup-started")
    commit = upstream.commit({
        "tests/test_dep.py": DEP_TEST, "ci_setup.py": SLOW_SETUP,
        ".ci.ini": f"[ci]\nsetup = python ci_setup.py {wheels} {flag}\n"})
    cluster.start_dispatcher()
    runner = cluster.start_runner()
    cluster.start_observer()
    wait_until(lambda: os.path.exists(flag), 60, what="the setup to be under way")
    # Its watchdog would end the setup at once: killed first, as if it had
    # died too, so that the restart's own cleanup is what is shown.
    os.kill(watchdog_of(runner.pid), signal.SIGKILL)
    runner.send_signal(signal.SIGKILL)
    runner.proc.wait(10)
    envs = os.path.join(runner.clone, ".git", "ci-runner", "envs")
    assert [n for n in os.listdir(envs) if not n.startswith(".")]  # the half-built env

    restarted = cluster.start_runner(port=runner.port, clone=runner.clone)
    result = cluster.result(commit)
    assert (result["verdict"], result["setup"]) == ("passed", "built")
    assert "removing unfinished environment" in restarted.log()
    assert "killing process group" in restarted.log()  # the old setup, still sleeping


SLOW_TEST = """import time, unittest


class TestSlow(unittest.TestCase):
    def test_slow(self):
        time.sleep(60)
"""


def test_max_timeout_alone_lowers_the_defaults_and_caps_the_recipe(cluster, upstream):
    # --max-timeout below the default --timeout and --setup-timeout is a
    # runner's whole configuration, not a contradiction with defaults it
    # was never given.
    cluster.start_dispatcher()
    cluster.start_runner("--max-timeout", "2")
    cluster.start_observer()
    cluster.result(git(upstream.path, "rev-parse", "HEAD"))
    commit = upstream.commit({"tests/test_slow.py": SLOW_TEST,
                              ".ci.ini": "[ci]\ntimeout = 100\n"}, "slow")
    result = cluster.result(commit)
    assert result["verdict"] == "timeout"
    assert float(result["duration"]) < 30
    assert b"[ci] timeout 100s in .ci.ini capped at 2s by the runner's --max-timeout" \
        in result["output"]
