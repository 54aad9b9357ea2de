"""Every branch: glob patterns, --all-branches, new branches dispatching only
their own commits (capped), deleted branches forgotten, one failing branch
never stopping the others, and the commit metadata sent with ``dispatch``.

The observer runs as a real process; the dispatcher is a stand-in that
records each ``dispatch`` with its body (a real dispatcher ignores what it
does not need), except in the last test, which runs the whole system."""

import json
import os
import subprocess

import pytest
from support.cluster import PY, ThreadedServer, git, wait_until

import repo_observer
from ci.observer import commits
from ci.wire import Message, encode_fields


class RecordingDispatcher(ThreadedServer):
    """Accepts every dispatch and keeps (commit, previous, branch) lines;
    refuses the dispatches of the branches in ``refuse``."""

    def __init__(self, refuse=()):
        self.lines: list[tuple[str, str, str]] = []
        self.arguments: list[list[str]] = []
        self.refused = 0
        self.refuse = set(refuse)
        super().__init__({"status": self.do_status, "dispatch": self.do_dispatch})

    def do_status(self, message, peer):
        return Message("ok", "", encode_fields({"queued": 0}))

    def do_dispatch(self, message, peer):
        lines = [tuple(line.split(" ")) for line in message.body.decode().splitlines()]
        with self.lock:
            if any(branch in self.refuse for _, _, branch in lines):
                self.refused += 1
                return Message("error", "refused by the test")
            self.arguments.append(message.argument.split())
            self.lines.extend(lines)
        return Message("ok", f"queued {len(lines)}")

    def of(self, branch):
        with self.lock:
            return [(c, p) for c, p, b in self.lines if b == branch]

    def commits(self):
        with self.lock:
            return [c for c, _, _ in self.lines]


@pytest.fixture
def recorder(threaded_servers):
    return threaded_servers(RecordingDispatcher)


def start_observer(cluster, recorder, *flags):
    cluster.dispatcher_port = recorder.port
    return cluster.start_observer("--poll", "0.2", *flags)


def branch_commits(upstream, branch, count, start="main", name="own"):
    """``count`` commits on a new ``branch`` made aside (on a branch no
    pattern matches) and published in one step, as a push would."""
    aside = f"aside-{branch.replace('/', '-')}"
    git(upstream.path, "checkout", "-q", "-b", aside, start)
    made = [upstream.commit({f"{name}-{branch.replace('/', '-')}-{i}.txt": f"{i}\n"})
            for i in range(count)]
    git(upstream.path, "checkout", "-q", "main")
    git(upstream.path, "branch", "-q", branch, aside)
    git(upstream.path, "branch", "-q", "-D", aside)
    return made


def state_of(observer) -> dict:
    with open(os.path.join(observer.clone, ".git", "ci-observer", "state.json")) as handle:
        return json.load(handle)


def test_patterns_new_branches_deleted_branches_and_the_cap(cluster, upstream, recorder):
    main0 = git(upstream.path, "rev-parse", "main")
    feature_a = branch_commits(upstream, "feature/a", 2)
    branch_commits(upstream, "other", 1)
    observer = start_observer(cluster, recorder, "--branch", "main", "--branch", "feature/*",
                              "--new-branch-limit", "5")
    # First start: the head of each watched branch, as before; 'other' is not watched.
    wait_until(lambda: len(recorder.lines) == 2, 20, what="the two heads")
    assert recorder.of("main") == [(main0, "-")]
    assert recorder.of("feature/a") == [(feature_a[-1], "-")]

    # A new commit on main names the one before it; a new branch made from
    # it dispatches only its own commits, the first naming the fork point.
    main1 = upstream.commit({"m1.txt": "1\n"})
    wait_until(lambda: recorder.of("main")[1:] == [(main1, main0)], 20, what="main1")
    feature_b = branch_commits(upstream, "feature/b", 3, start="main")
    wait_until(lambda: len(recorder.of("feature/b")) == 3, 20, what="feature/b's commits")
    assert recorder.of("feature/b") == [(feature_b[0], main1), (feature_b[1], feature_b[0]),
                                        (feature_b[2], feature_b[1])]

    # More commits than --new-branch-limit: the newest 5; the first of them
    # names no previous commit (its parent was never dispatched).
    big = branch_commits(upstream, "feature/big", 8, start="main")
    wait_until(lambda: len(recorder.of("feature/big")) == 5, 20, what="the capped branch")
    assert recorder.of("feature/big") == [(big[3], "-")] + list(zip(big[4:], big[3:]))

    # A deleted branch is dropped and forgotten; made again, it is new again.
    git(upstream.path, "branch", "-q", "-D", "feature/a")
    wait_until(lambda: "feature/a" not in state_of(observer)["last_dispatched"], 20,
               what="feature/a forgotten")
    again = branch_commits(upstream, "feature/a", 1, start="main", name="again")
    wait_until(lambda: len(recorder.of("feature/a")) == 2, 20, what="feature/a again")
    assert recorder.of("feature/a")[1] == (again[0], main1)

    # Nothing was sent twice, and no commit of 'other' at all.
    seen = recorder.commits()
    assert len(seen) == len(set(seen)) == 2 + 1 + 3 + 5 + 1
    assert recorder.of("other") == []
    # Each dispatch's argument is exactly the commits its body describes.
    assert [c for batch in recorder.arguments for c in batch] == seen


def test_a_force_pushed_branch_has_each_of_its_new_commits_tested(cluster, upstream, recorder):
    """A rewritten branch (rebased, amended) sent its new head only: the
    commits under it, new ids never tested, were skipped."""
    branch_commits(upstream, "feature/x", 2)
    start_observer(cluster, recorder, "--branch", "main", "--branch", "feature/*")
    wait_until(lambda: len(recorder.lines) == 2, 20, what="the two heads")
    main1 = upstream.commit({"m1.txt": "1\n"})
    wait_until(lambda: recorder.of("main")[1:] == [(main1, recorder.of("main")[0][0])], 20,
               what="main1")
    # Rebased onto main1: three new commits (one more), the branch moved by
    # force in one step (as a push -f does; never seen deleted).
    rebased = branch_commits(upstream, "rebased", 3, start="main", name="rebased")
    git(upstream.path, "update-ref", "refs/heads/feature/x", rebased[-1])
    wait_until(lambda: len(recorder.of("feature/x")) == 4, 20, what="the rebased commits")
    assert recorder.of("feature/x")[1:] == [(rebased[0], main1), (rebased[1], rebased[0]),
                                            (rebased[2], rebased[1])]


def test_all_branches_and_a_branch_with_nothing_of_its_own(cluster, upstream, recorder):
    dev = branch_commits(upstream, "dev", 1)
    observer = start_observer(cluster, recorder, "--all-branches")
    wait_until(lambda: len(recorder.lines) == 2, 20, what="both heads")
    assert {b for _, _, b in recorder.lines} == {"main", "dev"}
    # A branch at main's head has no commits of its own: nothing to send,
    # and its first commit names main's head, which was dispatched.
    main0 = git(upstream.path, "rev-parse", "main")
    git(upstream.path, "branch", "fix", "main")
    wait_until(lambda: "new branch fix at" in observer.log(), 20, what="fix seen")
    git(upstream.path, "checkout", "-q", "fix")
    fix1 = upstream.commit({"fix.txt": "1\n"})
    git(upstream.path, "checkout", "-q", "main")
    wait_until(lambda: recorder.of("fix") == [(fix1, main0)], 20, what="fix's commit")
    assert recorder.of("dev") == [(dev[0], "-")]


def test_one_failing_branch_never_stops_the_others(cluster, upstream, threaded_servers):
    recorder = threaded_servers(RecordingDispatcher, {"feature/bad"})
    branch_commits(upstream, "feature/bad", 1)
    observer = start_observer(cluster, recorder, "--all-branches")
    wait_until(lambda: recorder.of("main"), 20, what="main's head")
    # feature/bad sorts first and is refused on every poll; main goes on.
    first = upstream.commit({"a.txt": "1\n"})
    second = upstream.commit({"b.txt": "2\n"})
    wait_until(lambda: [c for c, _ in recorder.of("main")][-2:] == [first, second], 20,
               what="main's new commits")
    wait_until(lambda: recorder.refused >= 3, 20, what="refusals on several polls")
    assert "branch feature/bad: dispatch refused" in observer.log()
    assert recorder.of("feature/bad") == []
    assert "feature/bad" not in state_of(observer)["last_dispatched"]


def test_dispatch_body_is_one_line_per_commit():
    a, b, c = "a" * 40, "b" * 40, "c" * 40
    assert commits.dispatch_body([b, c], a, "feature/x") == \
        f"{b} {a} feature/x\n{c} {b} feature/x\n".encode()
    assert commits.dispatch_body([a], None, "main") == f"{a} - main\n".encode()
    heads = commits.parse_heads(f"{a} main\n\n{b} feature/x\nnot a line\n{c} a b\n")
    assert heads == {"main": a, "feature/x": b}
    # Not UTF-8 (two such names could read alike) or not printable: named
    # for a warning, never watched.
    skipped = []
    heads = commits.parse_heads(f"{a} main\n{b} caf\ufffd\n{c} tab\there\n", skipped)
    assert heads == {"main": a} and skipped == ["caf\ufffd", "tab\there"]


def test_bad_flags_are_refused(upstream, tmp_path):
    clone = upstream.clone(tmp_path / "clone")
    for flags, message in ((["--all-branches", "--branch", "main"], "not both"),
                           (["--branch", "a b"], "invalid branch"),
                           (["--new-branch-limit", "0"], "at least 1")):
        proc = subprocess.run([PY, repo_observer.__file__, *flags, "--no-listen", clone],
                              capture_output=True, text=True, timeout=20)
        assert proc.returncode == 2 and message in proc.stderr, (flags, proc.stderr)


def test_feature_branches_on_the_whole_system_each_commit_tested_once(cluster, upstream):
    cluster.start_dispatcher()
    runner = cluster.start_runner()
    observer = cluster.start_observer("--branch", "main", "--branch", "feature/*")
    main0 = git(upstream.path, "rev-parse", "main")
    assert cluster.result(main0)["verdict"] == "passed"
    own = branch_commits(upstream, "feature/x", 2)
    assert [cluster.result(c)["verdict"] for c in own] == ["passed", "passed"]
    # Merged into main by fast-forward: main's new commits are the
    # feature's, already tested; the dispatcher is told and tests none again.
    git(upstream.path, "merge", "-q", "--ff-only", "feature/x")
    wait_until(lambda: state_of(observer)["last_dispatched"].get("main") == own[-1], 20,
               what="main to advance")
    wait_until(lambda: "2 commit(s), 0 new" in cluster.daemons[0].log(), 10,
               what="the dispatcher to see nothing new")
    assert sorted(cluster.result_files()) == sorted([main0, *own])
    accepted = [line for line in runner.log().splitlines() if " accepted " in line]
    assert len(accepted) == 3
