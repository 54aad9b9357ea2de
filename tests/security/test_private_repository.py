"""The runner's private repository (``--test-user``, root only): a commit
whose test plants a hook, a config entry, a replace ref, an object, a
submodule repository, a git folder or a hard link for the next checkout
on its runner changes nothing that checkout runs, and no folder of the
tree is the test user's while the runner checks out."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest

from support.cluster import FAILING_TEST, PASSING_TEST, ROOT, Upstream, git
from support.users import new_test_user
from support.privilege import (TEST_COMMAND, git_head, nobody_clone, nobody_folder, user_folder_cluster)


TAMPERING_TEST = r'''import json, os, subprocess, unittest

MARKER = %r


def attempt(what, action):
    try:
        action()
        return "done"
    except (OSError, subprocess.CalledProcessError) as exc:
        return "refused: %%s" %% exc


def git(*args):
    subprocess.run(["git", *args], check=True, capture_output=True)


class Tamper(unittest.TestCase):
    def test_reach_for_the_next_checkout(self):
        gitdir = subprocess.run(["git", "rev-parse", "--absolute-git-dir"], check=True,
                                capture_output=True, text=True).stdout.strip()
        head = subprocess.run(["git", "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
        hook = "#!/bin/sh\ntouch " + MARKER + "\n"

        def write_hook(folder):
            path = os.path.join(folder, "hooks", "post-checkout")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as handle:
                handle.write(hook)
            os.chmod(path, 0o755)

        def own_repository():
            # A repository of its own where the runner's pointer was.
            os.unlink(".git")
            git("init", "-q", ".git-own")
            os.rename(".git-own/.git", ".git")
            write_hook(".git")
            git("config", "core.fsmonitor", "touch " + MARKER)
        report = {
            "gitdir": gitdir,
            "hook": attempt("hook", lambda: write_hook(gitdir)),
            "config": attempt("config", lambda: git("config", "core.fsmonitor",
                                                     "touch " + MARKER)),
            "replace": attempt("replace", lambda: git("update-ref", "refs/replace/" + head,
                                                      head)),
            "objects": attempt("objects", lambda: open(os.path.join(
                gitdir, "objects", "planted"), "w").close()),
            "pointer": attempt("pointer", own_repository),
        }
        print("TAMPER REPORT " + json.dumps(report), flush=True)
'''


def test_a_test_user_cannot_change_the_repository_later_checkouts_use(request):
    """--test-user: the clone's repository is the runner's (private_git).
    A commit whose test tries to plant a hook, a config entry, a replace
    ref or an object in it, or a repository of its own in the tree, is
    refused each time (or ignored), and the next commit on that runner is
    checked out and judged as itself."""
    user = new_test_user(request)   # its own: the runner ends all its processes
    cluster, upstream, base, _nobody = user_folder_cluster(request)
    # No global safe.directory: the runner must give the tests' git its own.
    cluster.env.pop("GIT_CONFIG_GLOBAL")
    marker = base / "hook-ran"
    clone = pathlib.Path(nobody_clone(upstream, base / "clone", user))
    state = base / "state"
    cluster.start_dispatcher()
    cluster.start_runner("--test-command", TEST_COMMAND, "--test-user", user.pw_name,
                         "--state-dir", str(state), clone=clone)
    cluster.start_observer("--poll", "0.3", "--no-listen", wait=False)
    cluster.result(git_head(upstream), 30)
    tamper = upstream.commit({"tests/test_tamper.py": TAMPERING_TEST % str(marker)},
                             "tamper with the repository")
    tampered = cluster.result(tamper, 30)
    assert b"TAMPER REPORT " in tampered["output"], tampered["output"][-3000:]
    report = json.loads(tampered["output"].split(b"TAMPER REPORT ", 1)[1].splitlines()[0])
    assert report["gitdir"] == str(state / "git"), report
    for what in ("hook", "config", "replace", "objects"):
        assert report[what].startswith("refused"), (what, report)
    assert report["pointer"] == "done", report   # its own tree: but the runner ignores it
    broken = upstream.commit({"tests/test_tamper.py": None,
                              "tests/test_sample.py": FAILING_TEST}, "break it")
    result = cluster.result(broken, 30)
    assert result["verdict"] == "failed", result
    assert result["failures"] == "1", result
    assert not marker.exists(), "a planted hook ran"
    # The tree's .git names the runner's repository again, which holds no hook.
    assert (clone / ".git").read_text() == f"gitdir: {state / 'git'}\n"
    assert not (state / "git" / "hooks" / "post-checkout").exists()
    assert (state / "git").stat().st_uid == os.getuid()
    assert (clone / "tests" / "test_sample.py").stat().st_uid == user.pw_uid


def private_clone(request):
    """A clone given to 'nobody' with the runner's own repository
    (private_git) beside it, in a folder that user can traverse; returns
    (upstream, the repository, a function checking out a commit as the
    runner does, the user)."""
    from ci.runner.sandbox import private_git
    base, upstream, nobody = nobody_folder(request, "ci-private-")
    upstream.commit({"tests/test_sample.py": PASSING_TEST, "docs/notes.txt": "notes\n"},
                    "initial")
    clone = nobody_clone(upstream, base / "clone", nobody)
    (base / "state").mkdir(mode=0o711)
    private = private_git.PrivateRepository(clone, str(base / "state"), nobody.pw_uid,
                                            nobody.pw_gid)
    private.setup()

    def checkout(commit):
        subprocess.run(["bash", os.path.join(ROOT, "test_runner_script.sh"), clone, commit],
                       cwd=clone, env=private.git_env(dict(os.environ)), check=True,
                       capture_output=True)
        private.give_tree()
    return upstream, private, checkout, nobody


def as_user(user, script: str, cwd) -> None:
    """Run a shell script as ``user``, in the environment the runner gives
    its tests."""
    from ci.runner.sandbox.user import TestUser
    env = TestUser(user.pw_name).env({"PATH": os.environ["PATH"]})
    subprocess.run(["bash", "-c", script], cwd=cwd, check=True, user=user.pw_uid,
                   group=user.pw_gid, extra_groups=[], env=env)


def test_the_runners_git_never_enters_a_submodule_repository_a_test_planted(request):
    """Git fetches a changed submodule on its own when the submodule's
    folder holds a repository, and runs what that repository's config says:
    one a test (or a process it left behind) plants would run as the
    runner's user at the next push that moves the submodule."""
    upstream, private, checkout, nobody = private_clone(request)
    other = Upstream(pathlib.Path(upstream.path).parent / "other")
    first, second = other.commit(message="o1"), other.commit(message="o2")

    def move_submodule(to: str) -> str:
        with open(os.path.join(upstream.path, ".gitmodules"), "w") as handle:
            handle.write('[submodule "sub"]\n\tpath = sub\n\turl = ../other\n')
        git(upstream.path, "add", ".gitmodules")
        git(upstream.path, "update-index", "--add", "--cacheinfo", f"160000,{to},sub")
        git(upstream.path, "commit", "-q", "-m", f"submodule at {to[:8]}")
        return git_head(upstream)
    checkout(move_submodule(first))
    marker = pathlib.Path(private.repo).parent / "MARKER-ran-as-runner"
    as_user(nobody, f"git init -q sub && git -C sub config remote.origin.url {other.path}"
                    f" && git -C sub config remote.origin.uploadpack "
                    f"'touch {marker}; git-upload-pack'", private.repo)
    head = move_submodule(second)
    checkout(head)   # a fetch: the new commit is not in the runner's repository yet
    assert not marker.exists()
    assert subprocess.run(["git", "rev-parse", "HEAD"], env=private.git_env(dict(os.environ)),
                          capture_output=True, text=True).stdout.strip() == head


def test_a_git_folder_or_hard_link_a_test_leaves_in_the_tree_is_gone_after_checkout(request):
    """git's clean leaves every .git alone: a repository a test puts in a
    tracked folder would be the one a later test's git uses there (its
    config runs commands), and a hard link named .git would be given to
    the test user, and with it the file it links to."""
    upstream, private, checkout, nobody = private_clone(request)
    head = git_head(upstream)
    checkout(head)
    outside = pathlib.Path(private.repo).parent / "root-file"
    outside.write_text("root's\n")
    outside.chmod(0o666)   # one the test user may link to (fs.protected_hardlinks)
    marker = pathlib.Path(private.repo).parent / "config-ran"
    as_user(nobody, f"""set -e
        git init -q tests && git --git-dir=tests/.git config core.fsmonitor 'touch {marker}'
        ln {outside} docs/.git
        ln {outside} docs/linked""", private.repo)
    checkout(head)
    assert not os.path.lexists(os.path.join(private.repo, "tests", ".git"))
    assert not os.path.lexists(os.path.join(private.repo, "docs", ".git"))
    assert outside.stat().st_uid == 0, "the linked file was given to the test user"
    assert outside.read_text() == "root's\n"
    as_user(nobody, "git status --short >/dev/null", os.path.join(private.repo, "tests"))
    assert not marker.exists()
    # A hard link chown_tree meets (say, one made while it walks) is
    # removed, never given.
    as_user(nobody, f"ln {outside} docs/late", private.repo)
    from ci.runner.sandbox import ownership
    ownership.chown_tree(private.repo, ownership.Owner(nobody.pw_uid, nobody.pw_gid),
                         skip=(".git",))
    assert outside.stat().st_uid == 0
    assert not os.path.lexists(os.path.join(private.repo, "docs", "late"))


def test_while_the_runner_checks_out_no_folder_of_the_tree_is_the_test_users(request):
    """The runner's git (as root) writes in the tree: a process a test
    left behind that could still rename in it could swap a folder for a
    symlink under git (which looks at a folder once, then writes all its
    files) and have root write a commit's files anywhere.  So the tree is
    the runner's, closed to others, from before the checkout to after."""
    upstream, private, checkout, nobody = private_clone(request)
    head = git_head(upstream)
    checkout(head)
    as_user(nobody, "mkdir -p tests/made && chmod 777 tests/made docs", private.repo)
    private.take_tree()
    victim = pathlib.Path(private.repo).parent / "victim"
    victim.mkdir(mode=0o777)
    for folder in (".", "tests", "tests/made", "docs"):
        with pytest.raises(subprocess.CalledProcessError):
            as_user(nobody, f"mv {folder}/. {folder}/x 2>/dev/null || "
                            f"ln -s {victim} {folder}/swapped", private.repo)
    assert not list(pathlib.Path(private.repo).rglob("swapped"))
    checkout(head)
    assert os.stat(private.repo).st_uid == nobody.pw_uid
    assert os.stat(os.path.join(private.repo, "tests")).st_uid == nobody.pw_uid
    # A runner stopped between the two starts again (the tree is given back).
    private.take_tree()
    private.setup()
    assert os.stat(private.repo).st_uid == nobody.pw_uid
