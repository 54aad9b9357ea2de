"""Issue 17: nothing a test leaves in the working tree reaches the next
commit.  The tree is cleaned *before* the runner's git checks out the next
commit, not only after: git reads the tree's ``.gitattributes`` while it
writes files, so an untracked ``*.py working-tree-encoding=UTF-16`` left by
one commit's test made git write the next commit's files as UTF-16 (an
innocent commit then came out ``error``).

Unit tests run test_runner_script.sh (the runner's checkout) against real
repositories, once per kind of leftover, in both modes: the plain clone
(as the test's own user) and the runner's private repository of
``--test-user`` (root only).  Two end-to-end tests push a commit whose
test leaves everything at once through real runners."""

from __future__ import annotations

import os
import pathlib
import pwd
import shutil
import subprocess
import tempfile

import pytest

from support.cluster import PASSING_TEST, ROOT, Upstream, git

UTF16 = "*.py working-tree-encoding=UTF-16\n"
SCRIPT = "test_runner_script.sh"

# The commit a test runs in (BASE) and the innocent one after it (NEXT):
# NEXT changes a file under each place a leftover could apply.
BASE = {"tests/test_sample.py": PASSING_TEST,
        ".gitattributes": "*.txt text\n",
        ".gitignore": "/pkg/.gitattributes\n",
        "pkg/mod.py": "VALUE = 1\n",
        "data": "a file\n"}
NEXT = {"tests/test_sample.py": PASSING_TEST + "# changed\n",
        "pkg/mod.py": "VALUE = 2\n",
        "data": None, "data/x.py": "X = 1\n"}

# What one test may leave behind, as shell run in the tree as the test's user.
LEFTOVERS = {
    "untracked .gitattributes": f"printf '{UTF16}' > tests/.gitattributes",
    # Git reads a tracked one from the index: this one passed before too.
    "modified tracked .gitattributes": "printf '* working-tree-encoding=UTF-16\\n' "
                                       "> .gitattributes",
    "ignored .gitattributes": f"printf '{UTF16}' > pkg/.gitattributes",
    # A name the index has as a file hides the folder from git clean.
    "tracked file made a folder": f"rm data && mkdir data && printf '{UTF16}' "
                                  "> data/.gitattributes",
    "repository in a tracked folder": "mkdir -p tests/.git && printf '[core]\\n' "
                                      "> tests/.git/config",
    # Git cannot open a folder past PATH_MAX (4096 bytes): its clean failed,
    # and with it every later checkout on that runner.
    "folders nested past PATH_MAX": "d=$(printf 'd%.0s' {1..250}) && mkdir deep && cd deep "
                                    "&& for i in {1..20}; do mkdir $d && cd $d; done "
                                    f"&& mkdir .git && printf '{UTF16}' > .gitattributes",
    # Deeper than Python's walks recurse (the runner's take-back of the tree).
    "folders nested 1,500 deep": "python3 -c \"import os\nfor _ in range(1500): "
                                 "os.mkdir('ddd'); os.chdir('ddd')\nopen('.gitattributes', "
                                 f"'w').write('{UTF16.strip()}')\"",
    "folders locked": "mkdir -p junk/deep && touch junk/deep/f && chmod 000 junk/deep "
                      "&& chmod 500 junk && chmod 000 pkg",
}


def user_or_skip():
    """The test's user when the suite runs as root: 'nobody' (root's
    permissions would hide a locked folder); None when not root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("needs a user 'nobody' to run as")


def open_folder(request, prefix: str) -> pathlib.Path:
    """A temporary folder another user can traverse (pytest's are private
    to root), removed afterwards; it holds a copy of the checkout script,
    which that user may not be able to read where the suite lies."""
    base = pathlib.Path(tempfile.mkdtemp(prefix=prefix))
    request.addfinalizer(lambda: force_remove(base))
    os.chmod(base, 0o755)
    shutil.copy(os.path.join(ROOT, SCRIPT), base / SCRIPT)
    return base


def force_remove(path) -> None:
    """rm -rf that also gets through folders a test locked (as non-root);
    both walk any depth (shutil.rmtree recurses)."""
    for command in (["chmod", "-R", "u+rwx"], ["rm", "-rf"]):
        subprocess.run([*command, "--", str(path)], capture_output=True, timeout=120)


def give(path, user) -> None:
    if user is None:
        return
    for folder, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(folder, name), user.pw_uid, user.pw_gid)
    os.chown(path, user.pw_uid, user.pw_gid)


def run_as(user, args, cwd, env=None, check=True) -> subprocess.CompletedProcess:
    """A process as ``user`` (None: as we are), output captured."""
    ids = {} if user is None else {"user": user.pw_uid, "group": user.pw_gid,
                                   "extra_groups": []}
    proc = subprocess.run(args, cwd=cwd, env=env or dict(os.environ), capture_output=True,
                          text=True, timeout=60, **ids)
    if check:
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


def two_commits(base: pathlib.Path) -> tuple[Upstream, str, str]:
    upstream = Upstream(base / "upstream")
    first = upstream.commit(BASE, "base")
    return upstream, first, upstream.commit(NEXT, "innocent")


def blob(repo, commit: str, path: str) -> bytes:
    return subprocess.run(["git", "-C", str(repo), "cat-file", "blob", f"{commit}:{path}"],
                          check=True, capture_output=True).stdout


def assert_tree_is(clone: pathlib.Path, upstream: Upstream, commit: str) -> None:
    """Every file of ``commit`` byte for byte, and nothing else (no file,
    no folder) in the tree but its top ``.git``."""
    paths = git(upstream.path, "ls-tree", "-r", "--name-only", commit).splitlines()
    for path in paths:
        assert (clone / path).read_bytes() == blob(upstream.path, commit, path), path
    wanted = set(paths) | {str(pathlib.PurePath(p).parents[i]) for p in paths
                           for i in range(len(pathlib.PurePath(p).parents) - 1)}
    found = set()
    for folder, dirs, files in os.walk(clone):
        rel = pathlib.Path(folder).relative_to(clone)
        if folder == str(clone):
            dirs[:] = [d for d in dirs if d != ".git"]
            files = [f for f in files if f != ".git"]
        found.update(str(rel / name) for name in [*dirs, *files])
    assert found == wanted, (sorted(found - wanted), sorted(wanted - found))


# --------------------------------------------------------------------------
# The checkout script alone, in each mode.

@pytest.mark.parametrize("leftover", list(LEFTOVERS))
def test_without_test_user_nothing_left_reaches_the_next_checkout(request, leftover):
    """The plain clone: the script runs as the user the tests ran as."""
    user = user_or_skip()
    base = open_folder(request, "ci-clean-")
    upstream, first, second = two_commits(base)
    clone = pathlib.Path(upstream.clone(base / "clone"))
    give(clone, user)
    script = ["bash", str(base / SCRIPT), str(clone)]
    run_as(user, [*script, first], clone)
    assert_tree_is(clone, upstream, first)
    run_as(user, ["bash", "-c", LEFTOVERS[leftover]], clone)
    run_as(user, [*script, second], clone)
    assert_tree_is(clone, upstream, second)


@pytest.mark.parametrize("leftover", list(LEFTOVERS))
def test_with_test_user_nothing_left_reaches_the_next_checkout(request, leftover):
    """--test-user: the runner's private repository, the tree taken back
    before the script runs as root and given to the test user after it,
    as the runner does (ci.runner.pipeline)."""
    from ci.runner.sandbox import private_git
    user = user_or_skip()
    if user is None:
        pytest.skip("needs root (the runner of --test-user is root)")
    base = open_folder(request, "ci-clean-private-")
    upstream, first, second = two_commits(base)
    clone = pathlib.Path(upstream.clone(base / "clone"))
    give(clone, user)
    (base / "state").mkdir(mode=0o711)
    private = private_git.PrivateRepository(str(clone), str(base / "state"), user.pw_uid,
                                            user.pw_gid)
    private.setup()

    def checkout(commit):
        private.take_tree()
        try:
            run_as(None, ["bash", str(base / SCRIPT), str(clone), commit], clone,
                   env=private.git_env(dict(os.environ)))
        finally:
            private.give_tree()
    checkout(first)
    assert_tree_is(clone, upstream, first)
    run_as(user, ["bash", "-c", LEFTOVERS[leftover]], clone)
    checkout(second)
    assert_tree_is(clone, upstream, second)
    assert (clone / "data" / "x.py").stat().st_uid == user.pw_uid


def test_a_leftover_the_runner_cannot_remove_is_a_clear_checkout_error(request):
    """Without --test-user, a folder the runner's user can neither fix nor
    empty (here: root's, in the tree) fails the checkout with the reason,
    instead of a checkout that read what is left there."""
    user = user_or_skip()
    if user is None:
        pytest.skip("needs root (to put a folder of another user in the tree)")
    base = open_folder(request, "ci-clean-stuck-")
    upstream, first, second = two_commits(base)
    clone = pathlib.Path(upstream.clone(base / "clone"))
    give(clone, user)
    script = ["bash", str(base / SCRIPT), str(clone)]
    run_as(user, [*script, first], clone)
    (clone / "tests" / "stuck").mkdir()
    (clone / "tests" / "stuck" / ".gitattributes").write_text(UTF16)
    failed = run_as(user, [*script, second], clone, check=False)
    assert failed.returncode == 4, (failed.stdout, failed.stderr)
    assert f"cannot clean the tree of {clone}: git clean failed" in failed.stderr
    assert "ci-meta" not in failed.stdout
    # Nothing was checked out: the tree is still the first commit's.
    assert (clone / "pkg" / "mod.py").read_text() == BASE["pkg/mod.py"]


# --------------------------------------------------------------------------
# End to end: real dispatcher, observer and runner.

# A commit's test that leaves every kind of leftover above at once.
LEAVE_EVERYTHING_TEST = '''import os
import unittest

ATTRS = "*.py working-tree-encoding=UTF-16\\n"


def write(path, text):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)


class TestLeaveEverything(unittest.TestCase):
    def test_leave(self):
        write("tests/.gitattributes", ATTRS)
        write("pkg/.gitattributes", ATTRS)
        write(".gitattributes", "* working-tree-encoding=UTF-16\\n")
        os.unlink("data")
        write("data/.gitattributes", ATTRS)
        write("tests/.git/config", "[core]\\n")
        write("junk/deep/f", "x")
        os.chmod("junk/deep", 0)
        os.chmod("junk", 0o500)
        os.chmod("pkg", 0)
'''
LEFT = ("tests/.gitattributes", "pkg/.gitattributes", "data/.gitattributes", "tests/.git",
        "junk")


def push_leftovers_then_an_innocent_commit(cluster, upstream, clone) -> None:
    """The commit whose test leaves everything passes; the innocent one
    after it, on the same runner, passes too and was checked out byte for
    byte with nothing of the first's left."""
    leaving = upstream.commit({"tests/test_leave.py": LEAVE_EVERYTHING_TEST}, "leave things")
    assert cluster.result(leaving, 60)["verdict"] == "passed"
    innocent = upstream.commit({**NEXT, "tests/test_leave.py": None}, "innocent")
    result = cluster.result(innocent, 60)
    assert result["verdict"] == "passed", (result, result["output"][-3000:])
    assert result["tests"] == "1", result
    clone = pathlib.Path(clone)
    for path in git(upstream.path, "ls-tree", "-r", "--name-only", innocent).splitlines():
        assert (clone / path).read_bytes() == blob(upstream.path, innocent, path), path
    for path in LEFT:
        assert not os.path.lexists(clone / path), path


def test_an_innocent_commit_after_one_that_leaves_everything_passes(cluster, upstream):
    upstream.commit(BASE, "base")
    cluster.start_dispatcher()
    runner = cluster.start_runner()
    cluster.start_observer()
    cluster.result(git(upstream.path, "rev-parse", "HEAD"), 60)
    push_leftovers_then_an_innocent_commit(cluster, upstream, runner.clone)


def test_with_test_user_an_innocent_commit_after_one_that_leaves_everything_passes(request):
    # The --test-user cluster of the least-privilege tests (same folder).
    from support.privilege import TEST_COMMAND, nobody_clone, user_folder_cluster
    cluster, upstream, base, nobody = user_folder_cluster(request)
    upstream.commit(BASE, "base")
    clone = nobody_clone(upstream, base / "clone", nobody)
    cluster.start_dispatcher()
    cluster.start_runner("--test-command", TEST_COMMAND, "--test-user", nobody.pw_name,
                         "--state-dir", str(base / "state"), clone=clone)
    cluster.start_observer("--poll", "0.3", "--no-listen", wait=False)
    cluster.result(git(upstream.path, "rev-parse", "HEAD"), 60)
    push_leftovers_then_an_innocent_commit(cluster, upstream, clone)
