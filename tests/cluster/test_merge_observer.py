"""Merged results (--merge-into): a real observer process against a real
bare upstream dispatches, for each new head of a matching branch, the
merge of that head into the target's head (published under
refs/ci/merges/ first), and for a branch that conflicts with the target,
its own id with the conflicting files.  The dispatcher is a
stand-in that records every line (the real one's handling of these
fields is tested with it)."""

import json
import os
import subprocess

import pytest
from support.cluster import PY, ThreadedServer, git, wait_until
from support.merging import Upstreams, commit_info

import repo_observer
from ci.mergeinfo import MergeInfo, conflict_id, encode_conflicts, encode_merge_field, parse_merge_field
from ci.wire import Message


class LineRecorder(ThreadedServer):
    """Accepts every dispatch and keeps each body line split in fields."""

    def __init__(self):
        self.lines: list[list[str]] = []
        super().__init__({"dispatch": self.do_dispatch, "prefetch": self.do_prefetch})

    def do_dispatch(self, message, peer):
        with self.lock:
            self.lines.extend(line.split(" ") for line in message.body.decode().splitlines())
        return Message("ok", "queued")

    def do_prefetch(self, message, peer):
        return Message("ok")

    def of(self, branch):
        with self.lock:
            return [line for line in self.lines if line[2] == branch]


@pytest.fixture
def recorder(threaded_servers):
    return threaded_servers(LineRecorder)


@pytest.fixture
def ups(tmp_path):
    return Upstreams(tmp_path / "repos")


def start(cluster, recorder, ups, *flags):
    cluster.dispatcher_port = recorder.port
    return cluster.start_observer("--poll", "0.2", "--merge-into", "feature/*=main", *flags,
                                  clone=ups.clone)


def merge_line(line):
    """(merge info, conflicts or None) of a recorded line's extra fields."""
    info = conflict = None
    for field in line[3:]:
        info = info or parse_merge_field(field)
        if field.startswith("conflict="):
            conflict = field
    return info, conflict


def test_merged_results_and_conflicts_are_dispatched(cluster, recorder, ups):
    ups.commit({"shared.txt": "line\n"}, "shared")
    ups.push("main")
    clean = ups.commit({"a.txt": "a\n"}, "a", branch="feature/a")
    git(ups.work, "checkout", "-q", "main")
    clash = ups.commit({"shared.txt": "theirs\n"}, "b", branch="feature/b")
    git(ups.work, "checkout", "-q", "main")
    main = ups.commit({"shared.txt": "ours\n"}, "main moves")
    ups.push("main", "feature/a", "feature/b")

    observer = start(cluster, recorder, ups, "--keep-merges", "1")
    wait_until(lambda: len(recorder.lines) == 3, 20, what="main and the two feature branches")
    # main is tested as it is (it is the target, and matches no rule).
    assert recorder.of("main") == [[main, "-", "main"]]

    # feature/a: its merge into main, published, with both parents.
    [line] = recorder.of("feature/a")
    merge, previous = line[0], line[1]
    assert previous == "-" and merge != clean
    assert line[3:] == [encode_merge_field(MergeInfo(clean, main, "main"))]
    assert ups.remote(f"refs/ci/merges/{merge}") == merge
    info = commit_info(ups.bare, merge)
    assert info["parents"] == [main, clean]
    assert info["committer"] == "CI merge queue <ci@localhost>"

    # feature/b: a conflict is dispatched under its own id, naming the file.
    [line] = recorder.of("feature/b")
    assert line[:3] == [conflict_id(MergeInfo(clash, main, "main")), "-", "feature/b"]
    assert clash not in line[:3]
    assert line[3:] == [encode_merge_field(MergeInfo(clash, main, "main")),
                        encode_conflicts(["shared.txt"])]
    assert not [r for r in git(ups.bare, "for-each-ref", "refs/ci/").splitlines()
                if clash in r]

    # Two new commits on feature/a: ONE new merge (of the new head), naming
    # the previous merge; with --keep-merges 1 the older merge is unpublished.
    git(ups.work, "checkout", "-q", "feature/a")
    ups.commit({"a2.txt": "2\n"}, "a2")
    head = ups.commit({"a3.txt": "3\n"}, "a3")
    git(ups.work, "checkout", "-q", "main")
    ups.push("feature/a")
    wait_until(lambda: len(recorder.of("feature/a")) == 2, 20, what="the new merge")
    newer = recorder.of("feature/a")[1]
    assert newer[1] == merge
    assert merge_line(newer) == (MergeInfo(head, main, "main"), None)
    assert ups.remote(f"refs/ci/merges/{newer[0]}") == newer[0]
    assert commit_info(ups.bare, newer[0])["parents"] == [main, head]
    wait_until(lambda: ups.remote(f"refs/ci/merges/{merge}") is None, 20,
               what="the older merge unpublished")
    # Nothing more is sent while nothing moves, and the state names the head.
    polls = observer.log().count("poll ")
    wait_until(lambda: observer.log().count("poll ") >= polls + 3, 20, what="three polls")
    assert len(recorder.lines) == 4
    with open(os.path.join(ups.clone, ".git", "ci-observer", "state.json")) as handle:
        state = json.load(handle)
    assert state["last_dispatched"]["feature/a"] == head
    assert state["previous"]["feature/a"] == newer[0]
    assert state["published"]["feature/a"] == [newer[0]]


def test_a_branch_already_in_its_target_is_not_merged(cluster, recorder, ups):
    ups.commit({"x": "x\n"}, "x", branch="feature/done")
    git(ups.work, "checkout", "-q", "main")
    git(ups.work, "merge", "-q", "--ff-only", "feature/done")
    ups.push("main", "feature/done")
    observer = start(cluster, recorder, ups)
    wait_until(lambda: "is already in main: nothing to merge" in observer.log(), 20,
               what="the branch to be skipped")
    assert recorder.of("feature/done") == []


def test_bad_merge_flags_are_refused(ups, tmp_path):
    secret = tmp_path / "url"
    secret.write_text("https://ci:hunter22@git.example/x.git\n")
    os.chmod(secret, 0o644)
    for flags, message in ((["--merge-into", "feature/*"], "PATTERN=TARGET"),
                           (["--merge-into", "feature/*=ma*n"], "invalid target"),
                           (["--merge-into", "feature/*=nosuch"], "no branch 'nosuch'"),
                           (["--merge-into", "f/*=main", "--merge-into", "f/*=x"], "two targets"),
                           (["--merge-into", "f/*=main", "--merge-identity", "bot"],
                            "Name <email>"),
                           (["--merge-into", "f/*=main", "--push-url-file", str(secret)],
                            "chmod 600"),
                           (["--merge-into", "f/*=main", "--push-url", "x",
                             "--push-url-file", str(secret)], "not allowed with")):
        proc = subprocess.run([PY, repo_observer.__file__, *flags, "--no-listen", ups.clone],
                              capture_output=True, text=True, timeout=20)
        assert proc.returncode == 2 and message in proc.stderr, (flags, proc.stderr)
        assert "hunter22" not in proc.stderr
