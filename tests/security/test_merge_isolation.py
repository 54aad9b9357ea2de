"""Nothing a commit holds, and nothing of the machine's git configuration,
steers how the observer merges (issue 22): its ``.gitattributes``
(``merge=union`` would silently "resolve" a conflict by keeping both
sides; an eol, an encoding, a filter would rewrite blobs), hook-like
files, a ``.gitmodules`` and gitlinks, a global config or ``GIT_*``
variables of the observer's environment.  And the credentials of the push
URL appear in no log line of a real observer, and on no command line of
the git processes that push."""

from __future__ import annotations

import base64
import http.server
import os
import re
import subprocess
import threading

import pytest
from support.cluster import free_port, git, wait_until
from support.merging import Upstreams, commit_info

from ci.git import GitError
from ci.merging import Conflict, Landed, Merged, MergeRepo, isolation, url

ATTRIBUTES = ("* merge=union text eol=crlf working-tree-encoding=UTF-16 filter=evil ident "
              "conflict-marker-size=1 diff=evil\n")


@pytest.fixture
def ups(tmp_path):
    return Upstreams(tmp_path / "repos")


class Hostile:
    """A HOME whose global config, and GIT_* variables, that would run a
    hook or a filter (each leaving a mark in ``marks``), or sign merges as
    someone else: ``arm()`` puts them in this process's environment (after
    the test made its commits, which they would spoil)."""

    def __init__(self, marks, env, monkeypatch):
        self.marks, self.env, self.monkeypatch = marks, env, monkeypatch

    def arm(self):
        for name, value in self.env.items():
            self.monkeypatch.setenv(name, value)

    def left(self) -> list[str]:
        return os.listdir(self.marks)


@pytest.fixture
def hostile_machine(tmp_path, monkeypatch):
    marks = tmp_path / "marks"
    marks.mkdir()
    home = tmp_path / "home"
    hooks = home / "evil-hooks"
    hooks.mkdir(parents=True)
    for hook in ("pre-push", "post-commit", "pre-commit", "reference-transaction",
                 "post-merge", "post-rewrite"):
        path = hooks / hook
        path.write_text(f"#!/bin/sh\ntouch {marks}/{hook}\nexit 0\n")
        path.chmod(0o755)
    (home / ".gitconfig").write_text(
        f"[core]\n\thooksPath = {hooks}\n\tattributesFile = {home}/attrs\n"
        f"[filter \"evil\"]\n\tclean = touch {marks}/filter\n\tsmudge = touch {marks}/filter\n"
        f"[merge \"union-evil\"]\n\tdriver = touch {marks}/driver\n"
        "[user]\n\tname = Evil\n\temail = evil@example.invalid\n"
        "[merge]\n\trenormalize = true\n")
    (home / "attrs").write_text("* merge=union-evil filter=evil\n")
    return Hostile(marks, {"HOME": str(home), "XDG_CONFIG_HOME": str(home),
                           "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "core.hooksPath",
                           "GIT_CONFIG_VALUE_0": str(hooks), "GIT_COMMITTER_NAME": "Evil",
                           "GIT_AUTHOR_NAME": "Evil"}, monkeypatch)


def diverged(ups, base: dict, on_branch: dict, on_main: dict, branch: str):
    """A base commit on main, then ``branch`` and main each one commit
    further; pushed and fetched.  Returns (main's head, the branch's)."""
    ups.commit(base, "base")
    ups.push("main")
    head = ups.commit(on_branch, "branch", branch=branch)
    git(ups.work, "checkout", "-q", "main")
    target = ups.commit(on_main, "main")
    ups.push("main", branch)
    ups.fetch()
    return target, head


def same_line_edits(ups, attributes: str):
    """main and feature/x both change the one line of f.txt, with
    ``attributes`` committed as .gitattributes in their common base."""
    return diverged(ups, {".gitattributes": attributes, "f.txt": "one\ntwo\nthree\n"},
                    {"f.txt": "one\nBRANCH\nthree\n"}, {"f.txt": "one\nMAIN\nthree\n"},
                    "feature/x")


def test_merge_union_in_the_tree_does_not_resolve_a_conflict(ups, hostile_machine):
    target, head = same_line_edits(ups, "* merge=union\n")
    # The attribute is real: git merging in the work clone would take both sides.
    proc = subprocess.run(["git", "-C", ups.work, "merge-tree", "--write-tree", target, head],
                          capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert proc.returncode == 0, "the test's premise: union merges it cleanly in a work tree"
    hostile_machine.arm()
    assert ups.merge_repo().merge(target, head, "feature/x", "main") == Conflict(("f.txt",))
    assert not hostile_machine.left()


def test_attributes_in_the_tree_and_the_machine_change_no_blob(ups, hostile_machine):
    # The test's own commits store the files as written, whatever they say.
    with open(os.path.join(ups.work, ".git", "info", "attributes"), "w") as handle:
        handle.write(isolation.NEUTRAL_ATTRIBUTES)
    target, head = diverged(ups, {".gitattributes": ATTRIBUTES, "f.txt": "$Id$\nlf only\n"},
                            {"g.txt": "branch\n"}, {"h.txt": "main\n"}, "feature/y")
    hostile_machine.arm()
    merges = ups.merge_repo()
    merged = merges.merge(target, head, "feature/y", "main")
    assert isinstance(merged, Merged)
    for name, text in (("f.txt", b"$Id$\nlf only\n"), ("g.txt", b"branch\n"),
                       ("h.txt", b"main\n"), (".gitattributes", ATTRIBUTES.encode())):
        assert merges.read_blob(merged.commit, name, 1024) == text
    assert commit_info(merges.path, merged.commit)["committer"] == \
        "CI merge queue <ci@localhost>"
    assert not hostile_machine.left()


def test_hook_like_files_and_planted_hooks_never_run(ups, hostile_machine):
    hook = f"#!/bin/sh\ntouch {hostile_machine.marks}/from-tree\n"
    files = {f"{folder}/{name}": hook for folder in ("hooks", ".githooks", "git/hooks")
             for name in ("pre-push", "post-commit", "reference-transaction")}
    head = ups.commit(files, "hooks", branch="feature/h")
    for name in files:
        os.chmod(os.path.join(ups.work, name), 0o755)
    head = ups.commit({}, "executable")
    git(ups.work, "checkout", "-q", "main")
    ups.push("feature/h")
    ups.fetch()
    old = ups.head("main")
    hostile_machine.arm()
    merges = ups.merge_repo()
    # A hook planted in the merge repository itself is not run either.
    os.makedirs(os.path.join(merges.path, "hooks"), exist_ok=True)
    planted = os.path.join(merges.path, "hooks", "pre-push")
    with open(planted, "w") as handle:
        handle.write(f"#!/bin/sh\ntouch {hostile_machine.marks}/planted\nexit 1\n")
    os.chmod(planted, 0o755)
    merged = merges.merge(old, head, "feature/h", "main")
    merges.publish([merged.commit])
    assert merges.land("main", old, merged.commit) == Landed(merged.commit)
    merges.unpublish([merged.commit])
    assert not hostile_machine.left()


def test_gitmodules_and_gitlinks_are_only_data(ups, hostile_machine, tmp_path):
    sub = Upstreams(tmp_path / "sub")
    one = sub.commit({"s": "1\n"}, "s1")
    two = sub.commit({"s": "2\n"}, "s2")
    three = sub.commit({"s": "3\n"}, "s3")
    gitmodules = f'[submodule "lib"]\n\tpath = lib\n\turl = {sub.bare}\n\tupdate = !touch ' \
                 f'{hostile_machine.marks}/update\n'

    def with_gitlink(commit, message, branch=None):
        if branch:
            git(ups.work, "checkout", "-q", "-B", branch)
        git(ups.work, "update-index", "--add", "--cacheinfo", f"160000,{commit},lib")
        with open(os.path.join(ups.work, ".gitmodules"), "w") as handle:
            handle.write(gitmodules)
        git(ups.work, "add", ".gitmodules")
        git(ups.work, "commit", "-q", "-m", message)
        return git(ups.work, "rev-parse", "HEAD")

    with_gitlink(one, "lib at one")
    ups.push("main")
    head = with_gitlink(two, "lib at two", branch="feature/s")
    git(ups.work, "checkout", "-q", "main")
    target = with_gitlink(three, "lib at three")
    ups.push("main", "feature/s")
    ups.fetch()
    hostile_machine.arm()
    merges = ups.merge_repo()
    # Both moved the submodule: a conflict, even though the submodule's own
    # history could be looked up; nothing is fetched or run, nothing made.
    assert merges.merge(target, head, "feature/s", "main") == Conflict(("lib",))
    assert not os.path.exists(os.path.join(merges.path, "modules"))
    assert not hostile_machine.left()


def test_push_credentials_appear_in_no_log_line(cluster, ups, tmp_path, threaded_servers):
    from support.cluster import ThreadedServer
    from ci.wire import Message

    class Accepting(ThreadedServer):
        def __init__(self):
            super().__init__({"dispatch": lambda m, p: Message("ok", "queued"),
                              "prefetch": lambda m, p: Message("ok")})

    token = "pw-5d1c0ffee9ab"
    url_file = tmp_path / "push-url"
    url_file.write_text(f"http://ci:{token}@127.0.0.1:{free_port()}/up.git\n")
    os.chmod(url_file, 0o600)
    ups.commit({"f": "f\n"}, "f", branch="feature/c")
    git(ups.work, "checkout", "-q", "main")
    ups.push("feature/c")
    cluster.dispatcher_port = threaded_servers(Accepting).port
    observer = cluster.start_observer("--poll", "0.2", "--merge-into", "feature/*=main",
                                      "--push-url-file", str(url_file), clone=ups.clone)
    # Publishing fails (nothing listens there) and is logged on every poll.
    wait_until(lambda: observer.log().count("branch feature/c:") >= 2, 20,
               what="failed publishing logged")
    second = cluster.start_observer(
        "--poll", "0.2", "--merge-into", "feature/*=main", "--state-dir",
        str(tmp_path / "second"),
        "--push-url", f"http://ci:{token}@127.0.0.1:{free_port()}/up.git", clone=ups.clone)
    wait_until(lambda: second.log().count("branch feature/c:") >= 2, 20,
               what="failed publishing logged")
    for daemon in (observer, second):
        daemon.stop()
        log = daemon.log()
        assert "git push" in log and token not in log, log[-3000:]
    assert f"<push URL from {url_file}>" in observer.log()
    # The one merge is published again on every poll, not made again.
    assert len(set(re.findall(r"refs/ci/merges/([0-9a-f]{40})", observer.log()))) == 1
    assert "http://***@127.0.0.1" in second.log()


class HoldingRemote(http.server.ThreadingHTTPServer):
    """An http remote that asks for Basic credentials, notes the ones each
    request brings, and holds every request until ``release`` is set, so
    a test can look at the git processes while they talk to it.  It never
    serves a repository: with credentials, git is told 403."""

    daemon_threads = True

    def __init__(self):
        self.arrived, self.release = threading.Event(), threading.Event()
        self.seen: list[tuple[str, str | None]] = []
        remote = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                remote.seen.append((self.path, self.headers.get("Authorization")))
                remote.arrived.set()
                remote.release.wait(20)
                if self.headers.get("Authorization") is None:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="ci"')
                else:
                    self.send_response(403)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass
        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.shutdown()
        self.thread.join(5)
        self.server_close()


def command_lines() -> list[str]:
    """Every process's command line, as any local user can read it."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                found.append(handle.read().replace(b"\0", b" ").decode("utf-8", "replace"))
        except OSError:
            pass   # gone meanwhile
    return found


def test_push_credentials_are_on_no_command_line(ups, tmp_path):
    """The password of ``--push-url-file`` was an argument of ``git push``
    and ``git ls-remote`` and of the ``git-remote-http`` they start, which
    every local user reads in ``/proc/<pid>/cmdline``; it reaches git in
    its environment now, and the remote still gets it."""
    token = "tok-5e1f00d9c3"
    remote = HoldingRemote()
    url_file = tmp_path / "push-url"
    url_file.write_text(f"http://ci:{token}@127.0.0.1:{remote.port}/up.git\n")
    os.chmod(url_file, 0o600)
    merges = MergeRepo(ups.clone, str(tmp_path / "state"), url.from_file(str(url_file)))
    try:
        for call in (lambda: merges.publish([ups.head("main")]),
                     lambda: merges.remote_head("main")):
            remote.arrived.clear()
            remote.release.clear()
            failed = []

            def run():
                try:
                    call()
                except GitError as exc:
                    failed.append(str(exc))
            thread = threading.Thread(target=run)
            thread.start()
            assert remote.arrived.wait(30), "git never called the remote"
            lines = command_lines()
            remote.release.set()
            thread.join(60)
            # The processes talking to the remote were looked at ...
            assert any(f"127.0.0.1:{remote.port}" in line for line in lines), lines
            # ... and no command line on the machine holds the password.
            assert not [line for line in lines if token in line]
            assert failed and "403" in failed[0] and token not in failed[0], failed
            assert f"<push URL from {url_file}>" in failed[0], failed
    finally:
        remote.close()
    basic = "Basic " + base64.b64encode(f"ci:{token}".encode()).decode()
    assert {(path, auth) for path, auth in remote.seen if auth} == {
        ("/up.git/info/refs?service=git-receive-pack", basic),
        ("/up.git/info/refs?service=git-upload-pack", basic)}, remote.seen
