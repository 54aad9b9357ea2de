"""Environments are scoped by branch, end to end with the real daemons:
a feature branch's setup runs the branch's own code (``python -m pip`` in
the clone's root imports a ``./pip`` package from the tree), so what it
builds is never reused by a trusted branch; the branch reuses its own
builds, and a trusted branch's environment read-only."""

import pytest
from support.cluster import FAILING_TEST, git
from support.wheels import make_wheel

# Runs in place of pip: plants a .pth in the environment that makes every
# failing assertEqual pass, then runs the real pip so the setup succeeds.
EVIL_PIP = """import os, runpy, sys, sysconfig
site = sysconfig.get_paths()["purelib"]
with open(os.path.join(site, "zz_planted.pth"), "w") as handle:
    handle.write("import unittest.case; "
                 "unittest.case.TestCase.assertEqual = lambda *a, **k: None\\n")
here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
for name in [m for m in sys.modules if m == "pip" or m.startswith("pip.")]:
    del sys.modules[name]
runpy.run_module("pip", run_name="__main__", alter_sys=True)
"""


@pytest.fixture
def wheels(tmp_path):
    folder = str(tmp_path / "wheels")
    make_wheel(folder, "tinydep", "1.0", "VALUE = 42\n")
    return folder


def on_branch(upstream, branch, files, message, create=False):
    """Commit ``files`` on ``branch`` of the upstream; the commit id."""
    git(upstream.path, "checkout", "-q", *(["-b"] if create else []), branch)
    return upstream.commit(files, message)


def test_a_branch_cannot_build_an_environment_main_reuses(cluster, upstream, wheels):
    setup = (f"[ci]\nsetup = python -m pip install --no-index --find-links {wheels} "
             "-r requirements-test.txt")
    recipe = setup + "\n"
    evil = {".ci.ini": recipe, "pip/__init__.py": "", "pip/__main__.py": EVIL_PIP}
    main_1 = upstream.commit({".ci.ini": recipe, "requirements-test.txt": "tinydep==1.0\n"},
                             "recipe")
    cluster.start_dispatcher()
    # One environment kept: before scopes, a branch's build evicted main's.
    cluster.start_runner("--keep-envs", "1")
    cluster.start_observer("--branch", "main", "--branch", "feature/*")
    first = cluster.result(main_1)
    assert (first["verdict"], first["setup"], first.get("setup_scope")) == \
        ("passed", "built", "trusted")

    other = on_branch(upstream, "feature/a", {".ci.ini": setup + " -q\n"}, "other setup",
                      create=True)
    assert cluster.result(other)["setup"] == "built"
    # main's recipe, and a ./pip package that the setup's `python -m pip` runs:
    # main's environment was not evicted, so it is reused and the pip not run.
    planted = on_branch(upstream, "feature/a", evil, "main's recipe, and a pip of our own")
    result = cluster.result(planted)
    assert (result.get("setup"), result.get("setup_scope")) == ("reused", "trusted")

    # main's next failing commit: never an environment the branch built.
    failing = on_branch(upstream, "main", {"tests/test_broken.py": FAILING_TEST}, "broken")
    result = cluster.result(failing)
    assert result["verdict"] == "failed", result["output"].decode(errors="replace")[-2000:]
    assert (result["setup"], result["setup_scope"], result["branch"]) == \
        ("reused", "trusted", "main")

    # The branch builds first what main will need next (a changed lock
    # file), running its own pip: main builds its own all the same.
    pinned = {"requirements-test.txt": "tinydep==1.0\n# pinned\n"}
    ahead = on_branch(upstream, "feature/a", pinned, "main's next requirements")
    result = cluster.result(ahead)
    assert (result["setup"], result["setup_scope"]) == ("built", "branch")
    follows = on_branch(upstream, "main", pinned, "pin")
    result = cluster.result(follows)
    assert result["verdict"] == "failed", result["output"].decode(errors="replace")[-2000:]
    assert (result["setup"], result["setup_scope"]) == ("built", "trusted")

    # The branch's next commit reuses its own build, planted .pth and all
    # (its failing test passes: the pip did plant it).
    again = on_branch(upstream, "feature/a", {"tests/test_broken.py": FAILING_TEST}, "code")
    result = cluster.result(again)
    assert (result["setup"], result["setup_scope"], result["branch"]) == \
        ("reused", "branch", "feature/a")
    assert result["verdict"] == "passed"

    # Another branch from main reuses main's environment, read-only.
    git(upstream.path, "checkout", "-q", "main")
    fresh = on_branch(upstream, "feature/b", {"code.py": "X = 2\n"}, "b", create=True)
    result = cluster.result(fresh)
    assert (result["setup"], result["setup_scope"], result["branch"]) == \
        ("reused", "trusted", "feature/b")
    assert result["verdict"] == "failed"  # main's broken test, and a clean environment
