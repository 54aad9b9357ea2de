"""Environments without the daemons: what the key depends on, LRU pruning,
unfinished builds never used, one folder per runner, and one real build
and reuse through ``prepare`` (offline, from a wheel made here)."""

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest
from support.cluster import PY, ThreadedServer, wait_until
from support.wheels import make_wheel

from ci.runner import environments
from ci.runner import recipe
import test_runner
from ci.runner.sandbox import ownership
from ci.runner.slot import ProcessSlot, child_env
from ci.config import ConfigError
from ci.wire import Message, decode_fields


ENV_FILES = recipe.DEFAULT_ENV_FILES
MAIN = environments.TRUSTED_SCOPE
C1 = "1" * 40


@pytest.fixture
def project(tmp_path):
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    (repo / "requirements-test.txt").write_text("tinydep\n")
    (repo / "code.py").write_text("X = 1\n")
    return str(repo)


def test_the_key_follows_setup_python_and_env_files(tmp_path, project):
    cache = environments.EnvironmentCache(str(tmp_path / "envs"))
    setup = ("python", "-m", "pip", "install", "-r", "requirements-test.txt")
    key = cache.key(setup, project, ENV_FILES, MAIN)
    assert key == cache.key(setup, project, ENV_FILES, MAIN)
    # Code changes do not matter; the requirements and the command do.
    with open(os.path.join(project, "code.py"), "w") as handle:
        handle.write("X = 2\n")
    assert cache.key(setup, project, ENV_FILES, MAIN) == key
    assert cache.key(setup + ("-q",), project, ENV_FILES, MAIN) != key
    with open(os.path.join(project, "requirements-test.txt"), "a") as handle:
        handle.write("other\n")
    changed = cache.key(setup, project, ENV_FILES, MAIN)
    assert changed != key
    # Only the files the recipe names, when it names some.
    assert cache.key(setup, project, ("code.py",), MAIN) != changed
    # A symlink out of the clone is not read.
    os.symlink("/etc/hostname", os.path.join(project, "requirements-evil.txt"))
    assert cache.key(setup, project, ENV_FILES, MAIN) == changed
    assert environments.env_file_paths(project, recipe.DEFAULT_ENV_FILES) == [
        ("requirements-test.txt", os.path.join(project, "requirements-test.txt"))]
    # A big lock file is keyed by all of its content, however long.
    with open(os.path.join(project, "requirements-test.txt"), "wb") as handle:
        handle.write(b"# pinned\n" * (2 << 20))
    big = cache.key(setup, project, ENV_FILES, MAIN)
    with open(os.path.join(project, "requirements-test.txt"), "ab") as handle:
        handle.write(b"one-more==1.0\n")
    assert cache.key(setup, project, ENV_FILES, MAIN) not in (big, changed)


def test_env_files_match_the_tree_and_a_symlinked_folder_is_a_leaf(tmp_path, project):
    """glob followed symlinked folders: two links to ``.`` and a 30-level
    ``*/*/.../x`` (glob visits 2**30 paths) hung the runner's job for good
    before any setup ran, and the next runner it was given to.  Matched as
    git sees the tree, the links are leaves; the match ends at once (in a
    process of its own, bounded: on the old code it never ends)."""
    for name in ("a", "b"):
        os.symlink(".", os.path.join(project, name))
    os.makedirs(os.path.join(project, "sub", "deep"))
    os.makedirs(os.path.join(project, ".hidden"))
    for name in ("sub/requirements.txt", "sub/deep/pins.txt", ".hidden/requirements.txt"):
        with open(os.path.join(project, name), "w") as handle:
            handle.write("x\n")
    os.symlink("requirements-test.txt", os.path.join(project, "requirements-link.txt"))
    hostile = "/".join(["*"] * 30) + "/x"
    script = ("import json, sys; from ci.runner import environments; "
              "print(json.dumps(environments.env_file_paths(sys.argv[1], tuple(sys.argv[2:]))))")
    try:
        proc = subprocess.run([PY, "-c", script, project, hostile, "*/requirements*.txt"],
                              capture_output=True, text=True, timeout=30,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    except subprocess.TimeoutExpired:
        pytest.fail("matching env_files did not end in 30 s")
    assert proc.returncode == 0, proc.stderr
    assert [name for name, _ in json.loads(proc.stdout)] == ["sub/requirements.txt"]

    def named(*patterns):
        return [name for name, _ in environments.env_file_paths(project, patterns)]
    # What env_files always matched still is, as glob matched it.
    assert named(*ENV_FILES) == ["requirements-link.txt", "requirements-test.txt"]
    assert named("*/*/*.txt", "./sub//requirements.txt") == \
        ["sub/deep/pins.txt", "sub/requirements.txt"]
    assert named(".hidden/*", "*/requirements.txt") == \
        [".hidden/requirements.txt", "sub/requirements.txt"]
    assert named("sub", "sub/*", "nothing/*", "a/requirements-test.txt") == \
        ["sub/requirements.txt"]


def test_env_files_that_look_at_too_much_are_an_error_not_a_wait(tmp_path, project,
                                                                  monkeypatch):
    """A tree past MAX_ENV_FILE_ENTRIES (lowered here; 100,000 by default)
    is the commit's ``error`` verdict with the reason, before any build."""
    monkeypatch.setattr(environments, "MAX_ENV_FILE_ENTRIES", 20, raising=False)
    os.makedirs(os.path.join(project, "many"))
    for number in range(30):
        open(os.path.join(project, "many", f"f{number}.txt"), "w").close()
    with open(os.path.join(project, recipe.RECIPE_FILE), "w") as handle:
        handle.write("[ci]\nsetup = python -c pass\nenv_files = many/*\n")
    cache = environments.EnvironmentCache(str(tmp_path / "envs"))
    prepared, output = prepare(environments.Preparer(recipe.Limits(), cache), project)
    reason = ".ci.ini: matching env_files looked at more than 20 files and folders"
    assert prepared.failed and prepared.fields["verdict"] == "error"
    assert prepared.fields["reason"].startswith(reason) and reason.encode() in output
    assert cache.finished() == [] and prepared.fields["setup"] == "none"
    assert len(environments.env_file_paths(project, ("many/*",), limit=31)) == 30


def test_a_jobs_scope_follows_its_branch_and_trust_and_is_in_the_key(tmp_path, project):
    main = environments.job_scope("main", True, C1)
    feature = environments.job_scope("feature/x", False, C1)
    other = environments.job_scope("feature/y", False, C1)
    unsaid = environments.job_scope(None, False, C1)
    assert main is MAIN and main.reads == (MAIN,)
    assert (feature.label, feature.trusted, feature.reads) == ("branch", False, (feature, MAIN))
    assert (unsaid.label, unsaid.reads) == ("commit", (unsaid, MAIN))
    # Trust without a branch is not trust: the commit's own scope.
    assert environments.job_scope(None, True, C1) == unsaid
    assert environments.job_scope(None, False, "2" * 40) != unsaid
    cache = environments.EnvironmentCache(str(tmp_path / "envs"))
    setup = ("python", "-m", "pip", "install", "-r", "requirements-test.txt")
    keys = [cache.key(setup, project, ENV_FILES, s) for s in (main, feature, other, unsaid)]
    assert len(set(keys)) == 4
    assert keys[0].startswith("trusted-") and all(k.startswith("untrusted-") for k in keys[1:])
    assert cache.keys(setup, project, ENV_FILES, feature.reads) == [keys[1], keys[0]]
    assert cache.key(setup, project, ENV_FILES, environments.job_scope("feature/x", False,
                                                                       "3" * 40)) == keys[1]


def fake_env(folder, key, age, finished=True):
    path = os.path.join(folder, key)
    os.makedirs(os.path.join(path, "bin"))
    if finished:
        marker = os.path.join(path, environments.MARKER)
        with open(marker, "w") as handle:
            handle.write("{}")
        os.utime(marker, (time.time() - age, time.time() - age))
    return path


def test_least_recently_used_pruned_and_unfinished_never_used(tmp_path):
    folder = str(tmp_path / "envs")
    os.makedirs(folder)
    for key, age in (("a", 50), ("b", 40), ("c", 30), ("d", 20)):
        fake_env(folder, key, age)
    half = fake_env(folder, "half", 0, finished=False)
    cache = environments.EnvironmentCache(folder, keep=2)
    assert not os.path.exists(half)  # a killed build's folder is removed at start
    assert cache.lookup("half") is None
    assert cache.lookup("a") == os.path.join(folder, "a")  # "a" is now the newest
    cache.prune()
    assert sorted(k for _, k in cache.finished()) == ["a", "d"]
    assert sorted(os.listdir(folder)) == [".lock", "a", "d"]
    # One folder, one runner.
    with pytest.raises(ConfigError, match="in use by another runner"):
        environments.EnvironmentCache(folder)
    cache.close()
    environments.EnvironmentCache(folder).close()


def test_trusted_and_untrusted_environments_are_pruned_apart(tmp_path):
    folder = str(tmp_path / "envs")
    os.makedirs(folder)
    for key, age in (("trusted-a", 50), ("trusted-b", 10), ("untrusted-c", 40),
                     ("untrusted-d", 30), ("untrusted-e", 5), ("0123456789abcdef", 1)):
        fake_env(folder, key, age)
    cache = environments.EnvironmentCache(folder, keep=1)
    cache.prune(keep_also="untrusted-c")   # just built
    # The untrusted builds (an unscoped one from before scopes among them)
    # never push out the newest trusted environment.
    assert sorted(k for _, k in cache.finished()) == ["trusted-b", "untrusted-c"]
    cache.close()


def test_a_branch_reuses_trusted_and_its_own_builds_and_builds_only_its_own(tmp_path,
                                                                            project):
    with open(os.path.join(project, recipe.RECIPE_FILE), "w") as handle:
        handle.write("[ci]\nsetup = python -c pass\n")
    preparer = environments.Preparer(recipe.Limits(), environments.EnvironmentCache(
        str(tmp_path / "envs")))
    feature = environments.job_scope("feature/x", False, C1)

    def setup_of(scope):
        prepared, _ = prepare(preparer, project, scope)
        assert not prepared.failed
        return prepared.fields["setup"], prepared.fields["setup_scope"], prepared.env

    built = setup_of(feature)
    assert built[:2] == ("built", "branch")
    assert setup_of(feature)[:2] == ("reused", "branch")
    # main never takes what a branch built; the branch then keeps its own.
    main = setup_of(MAIN)
    assert main[:2] == ("built", "trusted")
    assert main[2]["VIRTUAL_ENV"] != built[2]["VIRTUAL_ENV"]
    assert setup_of(feature)[2]["VIRTUAL_ENV"] == built[2]["VIRTUAL_ENV"]
    # Another branch, and a job of no known branch, reuse main's.
    for scope in (environments.job_scope("feature/y", False, C1),
                  environments.job_scope(None, False, C1)):
        reused = setup_of(scope)
        assert reused[:2] == ("reused", "trusted")
        assert reused[2]["VIRTUAL_ENV"] == main[2]["VIRTUAL_ENV"]


def prepare(preparer, repo, scope=environments.TRUSTED_SCOPE):
    with tempfile.TemporaryFile() as out:
        prepared = preparer.prepare(
            environments.SetupRun(repo, ProcessSlot(), child_env(), out), scope)
        out.seek(0)
        return prepared, out.read()


def test_build_reuse_and_a_failing_setup(tmp_path, project):
    wheels = str(tmp_path / "wheels")
    make_wheel(wheels, "tinydep", "1.0", "VALUE = 42\n")
    with open(os.path.join(project, recipe.RECIPE_FILE), "w") as handle:
        handle.write(f"[ci]\nsetup = python -m pip install --no-index --find-links {wheels}"
                     " -r requirements-test.txt\ntest = python -c 'import tinydep'\n")
    cache = environments.EnvironmentCache(str(tmp_path / "envs"))
    preparer = environments.Preparer(recipe.Limits(), cache)
    prepared, output = prepare(preparer, project)
    assert prepared.fields["setup"] == "built" and not prepared.failed, output
    assert b"Successfully installed tinydep-1.0" in output
    env = prepared.env
    assert env["VIRTUAL_ENV"] == os.path.dirname(os.path.dirname(prepared.python))
    assert env["PATH"].startswith(os.path.join(env["VIRTUAL_ENV"], "bin") + os.pathsep)
    # The tests' "python" is the environment's, and the dependency is there.
    proc = subprocess.run(prepared.command, cwd=project, env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr

    again, output = prepare(preparer, project)
    assert again.fields["setup"] == "reused" and output == b""
    assert float(again.fields["setup_duration"]) < 0.1
    assert again.env["VIRTUAL_ENV"] == env["VIRTUAL_ENV"]

    # A failing setup (another key) leaves nothing behind; the good one stays.
    with open(os.path.join(project, recipe.RECIPE_FILE), "w") as handle:
        handle.write("[ci]\nsetup = python -c 'print(\"boom\"); raise SystemExit(3)'\n")
    broken, output = prepare(preparer, project)
    assert broken.failed and broken.fields["verdict"] == "error"
    assert broken.fields["reason"] == "setup failed: exited 3"
    assert broken.fields["setup"] == "failed" and b"boom" in output
    assert [k for _, k in cache.finished()] == [os.path.basename(env["VIRTUAL_ENV"])]
    assert len([n for n in os.listdir(cache.folder) if not n.startswith(".")]) == 1


def test_a_setup_past_its_time_limit_is_killed(tmp_path, project):
    with open(os.path.join(project, recipe.RECIPE_FILE), "w") as handle:
        handle.write("[ci]\nsetup = python -c 'import time; time.sleep(60)'\n")
    cache = environments.EnvironmentCache(str(tmp_path / "envs"))
    preparer = environments.Preparer(recipe.Limits(setup_timeout=1), cache)
    started = time.monotonic()
    prepared, _ = prepare(preparer, project)
    assert prepared.fields["reason"] == "setup failed: timed out after 1s"
    assert time.monotonic() - started < 15 and cache.finished() == []


def test_recipe_symlink_and_bad_bytes_are_errors(tmp_path, project):
    preparer = environments.Preparer(recipe.Limits())
    os.symlink("/etc/passwd", os.path.join(project, recipe.RECIPE_FILE))
    prepared, output = prepare(preparer, project)
    assert prepared.failed and "cannot be read" in prepared.fields["reason"]
    assert b"root:" not in output
    os.unlink(os.path.join(project, recipe.RECIPE_FILE))
    with open(os.path.join(project, recipe.RECIPE_FILE), "wb") as handle:
        handle.write(b"[ci]\ntest = \xff\n")
    prepared, _ = prepare(preparer, project)
    assert prepared.fields["reason"] == ".ci.ini is not UTF-8 (byte 12)"


def test_runner_flags_are_checked(upstream, tmp_path):
    clone = upstream.clone(tmp_path / "clone")
    envs = str(tmp_path / "envs")
    holder = environments.EnvironmentCache(envs)  # as a running runner would
    for flags, message in ((["--timeout", "1000", "--max-timeout", "500"], "larger than"),
                           (["--keep-envs", "0"], "at least 1"),
                           (["--setup-timeout", "nan"], "must be positive"),
                           (["--setup-command", "pip 'install"], "invalid --setup-command"),
                           (["--env-dir", envs], "in use by another runner")):
        proc = subprocess.run([PY, test_runner.__file__, "--port", "0", *flags, clone],
                              capture_output=True, text=True, timeout=20)
        assert proc.returncode == 2 and message in proc.stderr, (flags, proc.stderr)
        assert proc.stderr.count("\n") == 1
    holder.close()


def test_ignored_recipe_and_capped_timeouts(project):
    with open(os.path.join(project, recipe.RECIPE_FILE), "w") as handle:
        handle.write("[ci]\ntest = python -m pytest\ntimeout = 7200\n")
    limits = recipe.Limits(test=("make", "check"), timeout=600, max_timeout=900)
    prepared, output = prepare(environments.Preparer(limits), project)
    assert (prepared.command, prepared.timeout) == (["python", "-m", "pytest"], 900)
    assert output == b"[ci] timeout 7200s in .ci.ini capped at 900s by the runner's " \
                     b"--max-timeout\n"
    # --ignore-repo-recipe: the flags alone, even over a malformed file.
    with open(os.path.join(project, recipe.RECIPE_FILE), "w") as handle:
        handle.write("not a recipe at all\n")
    prepared, output = prepare(environments.Preparer(limits, read_recipe=False), project)
    assert not prepared.failed and output == b""
    assert (prepared.command, prepared.timeout, prepared.fields) == \
        (["make", "check"], 600, {"setup": "none"})


class RegisterRecorder(ThreadedServer):
    """Keeps the fields of every ``register``."""

    def __init__(self):
        self.registers = []
        super().__init__({"register": self.register})

    def register(self, message, peer):
        with self.lock:
            self.registers.append(decode_fields(message.body))
        return Message("ok", "registered")


@pytest.mark.parametrize("flags, limit", [
    # checkout 10 + an environment build and the tests, each as far as a
    # recipe may raise it (--max-timeout)
    (["--max-timeout", "50"], 10 + 50 + 50),
    (["--timeout", "5", "--setup-timeout", "7"], 10 + 7 + 5),
    # the flags alone, no setup command: no environment is ever built
    (["--timeout", "5", "--max-timeout", "50", "--ignore-repo-recipe"], 10 + 5),
])
def test_a_runner_tells_the_dispatcher_how_long_its_limits_allow(cluster, upstream,
                                                                 threaded_servers, flags,
                                                                 limit):
    recorder = threaded_servers(RegisterRecorder)
    cluster.dispatcher_port = recorder.port
    runner = cluster.start_runner("--checkout-timeout", "10", *flags, wait=False)
    wait_until(lambda: recorder.registers, 20, what="the runner to register")
    assert recorder.registers[0]["limit"] == str(limit)
    runner.stop(timeout=10)


def test_an_explicit_job_timeout_below_a_runners_limits_is_warned_about(cluster, upstream):
    dispatcher = cluster.start_dispatcher("--job-timeout", "60")
    cluster.start_runner("--checkout-timeout", "10", "--timeout", "5", "--setup-timeout", "7",
                         "--ignore-repo-recipe")  # 15 s: within it, no warning
    cluster.start_runner("--checkout-timeout", "10", "--max-timeout", "100")
    wait_until(lambda: "may by its own limits take 210s per commit" in dispatcher.log(), 20,
               what="the warning")
    assert dispatcher.log().count("more than --job-timeout 60s") == 1


def test_taking_a_tree_back_copies_its_hard_links_or_removes_them(tmp_path):
    """An installer's hard link from its cache (uv's default) must stay in
    a built environment as a file of its own; a tree given to the tests
    drops it. Either way the file linked to keeps its inode and mode."""
    cache = tmp_path / "cache-file"
    cache.write_text("installed\n")
    cache.chmod(0o644)
    for copy_links in (True, False):
        tree = tmp_path / f"tree-{copy_links}"
        (tree / "lib").mkdir(parents=True)
        os.link(cache, tree / "lib" / "module.py")
        ownership.chown_tree(str(tree), ownership.Owner(os.getuid(), os.getgid(), strip=0o6022,
                                                        copy_links=copy_links))
        linked = tree / "lib" / "module.py"
        if copy_links:
            assert linked.read_text() == "installed\n"
            assert linked.stat().st_nlink == 1 and linked.stat().st_mode & 0o777 == 0o644
        else:
            assert not linked.exists()
        assert sorted(os.listdir(tree / "lib")) == (["module.py"] if copy_links else [])
    assert cache.stat().st_nlink == 1 and cache.read_text() == "installed\n"


# ---- matrix cells: the cell's interpreter builds its environment ----------

CELL_RECIPE = """[ci]
setup = python -c "import os, sys; open('setup-seen', 'w').write(os.environ.get('CI_DJANGO', '-') + ' ' + sys.version[:4])"
test = python -m unittest discover -s tests
matrix_python = 3.12 3.13
matrix_django = 4.2
"""
CELL_TEST = """import os, sys, unittest

class TestCell(unittest.TestCase):
    def test_cell(self):
        with open('test-seen', 'w') as handle:
            handle.write(os.environ.get('CI_DJANGO', '-') + ' ' + sys.version[:4])
"""


def cell_settings(clone: str, tmp_path):
    from ci.runner.pipeline import Settings
    cache = environments.EnvironmentCache(str(tmp_path / "envs"))
    return Settings(clone, ProcessSlot(),
                    environments.Preparer(recipe.Limits(timeout=120, setup_timeout=120), cache),
                    1 << 20, checkout_timeout=60), cache


def test_each_cell_builds_its_environment_with_its_own_interpreter(upstream, tmp_path):
    """Two pyenv interpreters: each cell's venv is made by ``<python> -m
    venv`` (its bin/python is that version), keyed by interpreter and axis
    values; CI_DJANGO reaches the setup and the tests; the header names
    the cell; the same cell again reuses its environment."""
    from support.pythons import pyenv_python
    from ci.runner import interpreters
    from ci.runner.pipeline import execute
    cells = {}
    for version in ("3.12", "3.13"):
        python = interpreters.resolve(pyenv_python(version), version)
        cells[version] = interpreters.JobCell(f"py{version}-django4.2", python,
                                              {"CI_DJANGO": "4.2"})
    head = upstream.commit({".ci.ini": CELL_RECIPE, "tests/test_cell.py": CELL_TEST}, "cells")
    clone = upstream.clone(tmp_path / "clone")
    settings, cache = cell_settings(clone, tmp_path)
    keys = set()
    for version, cell in cells.items():
        outcome = execute(settings, head, cell=cell)
        assert outcome.verdict == "passed", outcome.output.decode()[-2000:]
        assert outcome.header["cell"] == cell.name and outcome.header["setup"] == "built"
        assert open(os.path.join(clone, "setup-seen")).read() == f"4.2 {version}"
        assert open(os.path.join(clone, "test-seen")).read() == f"4.2 {version}"
        key = cache.key(("python", "-c", CELL_RECIPE.splitlines()[1].split("-c ", 1)[1]
                         .strip('"')), clone, ENV_FILES,
                        environments.job_scope(None, False, head), cell)
        keys.add(key)
    envs = [name for _, name in cache.finished()]
    assert len(envs) == 2
    for name in envs:
        version = subprocess.run([cache.python_of(name), "-c",
                                  "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30).stdout.strip()
        assert version in cells
    again = execute(settings, head, cell=cells["3.12"])
    assert again.verdict == "passed" and again.header["setup"] == "reused"
    other_axis = interpreters.JobCell("py3.12-django5.1", cells["3.12"].python,
                                      {"CI_DJANGO": "5.1"})
    assert cache.key(("x",), clone, ENV_FILES, MAIN, other_axis) != \
        cache.key(("x",), clone, ENV_FILES, MAIN, cells["3.12"])
    assert cache.key(("x",), clone, ENV_FILES, MAIN, cells["3.13"]) != \
        cache.key(("x",), clone, ENV_FILES, MAIN, cells["3.12"])
    # A commit without a matrix keeps the key it always had.
    assert cache.key(("x",), clone, ENV_FILES, MAIN) == \
        cache.key(("x",), clone, ENV_FILES, MAIN, interpreters.JobCell.plain())


def test_a_cell_without_setup_still_runs_python_as_its_interpreter(upstream, tmp_path):
    """No setup command: the cell still gets a bare environment, so that
    ``python`` in its test command is the cell's interpreter."""
    from support.pythons import pyenv_python
    from ci.runner import interpreters
    from ci.runner.pipeline import execute
    python = interpreters.resolve(pyenv_python("3.13"), "3.13")
    head = upstream.commit({".ci.ini": "[ci]\ntest = python -m unittest discover -s tests\n",
                            "tests/test_cell.py": CELL_TEST}, "no setup")
    clone = upstream.clone(tmp_path / "clone")
    settings, _ = cell_settings(clone, tmp_path)
    outcome = execute(settings, head, cell=interpreters.JobCell("py3.13", python, {}))
    assert outcome.verdict == "passed", outcome.output.decode()[-2000:]
    assert open(os.path.join(clone, "test-seen")).read() == "- 3.13"


def test_a_cell_with_the_runners_own_python_is_not_left_to_a_shim_on_path(
        upstream, tmp_path, monkeypatch):
    """A cell whose interpreter is the runner's own, without setup: ``python``
    in its test command is still that interpreter, not whatever a version
    shim first on the runner's PATH picks (pyenv's follows the commit's
    .python-version)."""
    from ci.runner import interpreters
    from ci.runner.pipeline import execute
    shims = tmp_path / "shims"
    shims.mkdir()
    shim = shims / "python"
    shim.write_text("#!/bin/sh\necho 'the shim ran' >&2\nexit 3\n")
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shims}{os.pathsep}{os.environ['PATH']}")
    head = upstream.commit({".ci.ini": "[ci]\ntest = python -m unittest discover -s tests\n",
                            ".python-version": "3.9\n", "tests/test_cell.py": CELL_TEST},
                           "own python, no setup")
    clone = upstream.clone(tmp_path / "clone")
    settings, _ = cell_settings(clone, tmp_path)
    own = interpreters.own()
    outcome = execute(settings, head, cell=interpreters.JobCell(f"py{own.version}", own, {}))
    assert outcome.verdict == "passed", outcome.output.decode()[-2000:]
    assert open(os.path.join(clone, "test-seen")).read() == f"- {sys.version[:4]}"
