"""ci/merging: the pure parsing of git's output and of the flags, and the
merges and pushes against real temporary bare upstreams (a clean merge,
a conflict, publishing, a landing, a lease failing because the target
moved, a non-fast-forward refused before any push, and pushes whose
outcome is unclear decided by reading the remote)."""

import base64
import logging
import os

import pytest
from support.cluster import free_port, git
from support.merging import Upstreams, commit_info

from ci.config import ConfigError
from ci.git import GitError
from ci.merging import Conflict, Failed, Landed, Merged, Stale, merge, push, repo, rules, url

A, B, C = "a" * 40, "b" * 40, "c" * 40


# ---- pure --------------------------------------------------------------------

def test_parse_merge_tree_clean_and_conflicted():
    assert merge.parse_merge_tree(0, f"{A}\0".encode()) == (A, ())
    assert merge.parse_merge_tree(1, f"{A}\0f\0dir/g h\0f\0".encode()) == (A, ("f", "dir/g h"))
    for code, out in ((1, f"{A}\0"), (0, f"{A}\0f\0"), (2, f"{A}\0"), (0, ""), (0, "nope\0")):
        with pytest.raises(ValueError):
            merge.parse_merge_tree(code, out.encode())


def test_parse_identity():
    assert merge.parse_identity(merge.DEFAULT_IDENTITY) == ("CI merge queue", "ci@localhost")
    assert merge.parse_identity("A. Bot <bot@x.example>") == ("A. Bot", "bot@x.example")
    for bad in ("", "<a@b>", "Name", "Name <a b>", "Na\nme <a@b>", "N <a@b> extra"):
        with pytest.raises(ValueError):
            merge.parse_identity(bad)


def test_parse_porcelain_and_outcomes():
    text = ("To https://***@host/r.git\n"
            f"!\t{B}:refs/heads/main\t[rejected] (stale info)\n"
            f"*\t{A}:refs/ci/merges/{A}\t[new reference]\n"
            f"-\t:refs/ci/merges/{C}\t[deleted]\n"
            "Done\n")
    found = push.parse_porcelain(text)
    assert found["refs/heads/main"] == push.RefStatus("!", B, "refs/heads/main", "[rejected]",
                                                      "stale info")
    assert found[f"refs/ci/merges/{A}"].done and found[f"refs/ci/merges/{C}"].done
    assert push.land_outcome(found["refs/heads/main"], B) == Stale()
    assert push.land_outcome(push.RefStatus(" ", B, "r", f"{A[:7]}..{B[:7]}", ""), B) == Landed(B)
    assert push.land_outcome(push.RefStatus("=", B, "r", "[up to date]", ""), B) == Landed(B)
    assert push.land_outcome(push.RefStatus("!", B, "r", "[remote rejected]", "hook declined"),
                             B) == Failed("[remote rejected] (hook declined)")
    assert push.land_outcome(None, B) is None
    assert push.unfinished(found, ["refs/heads/main", "refs/x"]) == [
        "refs/heads/main: [rejected] (stale info)", "refs/x: no report"]


def test_unclear_push_decided_by_the_remote():
    assert push.decide_from_remote(B, A, B, "x") == Landed(B)
    assert isinstance(push.decide_from_remote(A, A, B, "x"), Failed)
    assert isinstance(push.decide_from_remote(C, A, B, "x"), Stale)
    assert isinstance(push.decide_from_remote(None, A, B, "x"), Stale)
    assert push.parse_ls_remote(f"{A}\trefs/heads/main\n{B}\trefs/heads/main2\n",
                                "refs/heads/main2") == B
    assert push.parse_ls_remote("", "refs/heads/main") is None


def test_merge_into_rules():
    rule = rules.parse_rule("feature/*=main")
    assert rule == rules.MergeRule("feature/*", "main")
    ruleset = [rule, rules.parse_rule("*=develop")]
    assert rules.target_of(ruleset, "feature/a") == "main"
    assert rules.target_of(ruleset, "fix") == "develop"
    assert rules.target_of(ruleset, "develop") is None   # never merged into itself
    for bad in ("feature/*", "=main", "feature/*=", "a=ma*in", "a=-x", "a=x..y", "a=x.lock",
                "a=x y", "a=.x", "a=x/", "a b=main", "a=x:y"):
        with pytest.raises(ValueError):
            rules.parse_rule(bad)
    with pytest.raises(ValueError):
        rules.check_rules([rule, rules.parse_rule("feature/*=other")])
    rules.check_rules([rule, rule])


def test_redaction():
    pushed = url.from_flag("https://ci:s3cret-token@git.example/p.git")
    assert pushed.shown == "https://***@git.example/p.git"
    text = "fatal: unable to access 'https://ci:s3cret-token@git.example/p.git/': s3cret-token"
    assert "s3cret" not in pushed.redact(text)
    assert url.redact("see http://u:p@h/x and ssh://me@h/y", None) == \
        "see http://***@h/x and ssh://***@h/y"


def test_an_http_urls_credentials_go_to_git_as_a_header_not_an_argument():
    pushed = url.from_flag("https://ci:t%40k3n:x@git.example:8443/p.git")
    assert pushed.argument == "https://git.example:8443/p.git"
    # What git would have sent, percent-decoded (``t@k3n:x`` is the password).
    assert pushed.git_config == (("http.https://git.example:8443/p.git.extraHeader",
                                  "Authorization: Basic "
                                  + base64.b64encode(b"ci:t@k3n:x").decode()),)
    # git's messages quote the URL it was given: shown as the URL is.
    assert pushed.redact("fatal: unable to access 'https://git.example:8443/p.git/'") == \
        "fatal: unable to access 'https://***@git.example:8443/p.git/'"
    assert url.from_flag("http://tok3n@h/r.git").git_config[0][1] == \
        "Authorization: Basic " + base64.b64encode(b"tok3n:").decode()
    # Anything else reaches git as given: ssh's user is a login, not a secret.
    for given in ("ssh://git@h.example/r.git", "git@h.example:r.git", "file:///srv/r.git",
                  "/srv/r.git", "https://h.example/r.git", "https://h.example/a@b.git"):
        assert url.from_flag(given).argument == given
        assert url.from_flag(given).git_config == ()


def test_push_url_file(tmp_path):
    path = tmp_path / "push-url"
    path.write_text("https://ci:tok3n-value@git.example/p.git\n")
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError, match="chmod 600") as caught:
        url.from_file(str(path))
    assert "tok3n" not in str(caught.value)
    os.chmod(path, 0o600)
    pushed = url.from_file(str(path))
    assert pushed.url == "https://ci:tok3n-value@git.example/p.git"
    assert pushed.shown == f"<push URL from {path}>" and "tok3n" not in pushed.redact(pushed.url)
    path.write_text("two words tok3n\n")
    with pytest.raises(ConfigError) as caught:
        url.from_file(str(path))
    assert "tok3n" not in str(caught.value)


def test_default_push_url_is_the_clones_origin(tmp_path):
    ups = Upstreams(tmp_path)
    assert url.default(ups.clone).url == ups.bare
    git(ups.clone, "remote", "set-url", "--push", "origin", "https://u:pw12@h.example/r.git")
    assert url.default(ups.clone).shown == "https://***@h.example/r.git"


# ---- merging against real repositories ------------------------------------------

@pytest.fixture
def ups(tmp_path):
    return Upstreams(tmp_path)


def test_clean_merge_has_the_target_then_the_head_as_parents(ups):
    head = ups.commit({"feature.txt": "f\n"}, "feature", branch="feature/a")
    git(ups.work, "checkout", "-q", "main")
    target = ups.commit({"main.txt": "m\n"}, "main moves")
    ups.push("main", "feature/a")
    ups.fetch()
    merged = ups.merge_repo().merge(target, head, "feature/a", "main")
    assert isinstance(merged, Merged)
    info = commit_info(ups.clone + "/../state/merge.git", merged.commit)
    assert info["parents"] == [target, head]
    assert info["author"] == info["committer"] == "CI merge queue <ci@localhost>"
    assert info["subject"] == "Merge feature/a into main"
    files = git(ups.root + "/state/merge.git", "ls-tree", "--name-only", merged.commit).split()
    assert files == ["README", "feature.txt", "main.txt"]
    # Made in the merge repository: the clone has not even seen it.
    with pytest.raises(Exception):
        git(ups.clone, "cat-file", "-e", merged.commit)


def test_identity_is_the_flags(ups):
    head = ups.commit({"x": "x\n"}, "x", branch="b")
    ups.push("b")
    ups.fetch()
    made = ups.merge_repo(identity=merge.parse_identity("Gate <gate@ci.example>")).merge(
        ups.head("main"), head, "b", "main")
    assert commit_info(ups.root + "/state/merge.git", made.commit)["committer"] == \
        "Gate <gate@ci.example>"


def test_conflict_names_the_files(ups):
    ups.commit({"a.txt": "1\n", "b.txt": "1\n", "c.txt": "1\n"}, "files")
    ups.push("main")
    ups.commit({"a.txt": "branch\n", "b.txt": "branch\n", "c.txt": "same\n"}, "b",
               branch="feature/x")
    git(ups.work, "checkout", "-q", "main")
    ups.commit({"a.txt": "main\n", "b.txt": "main\n", "c.txt": "same\n"}, "m")
    ups.push("main", "feature/x")
    ups.fetch()
    result = ups.merge_repo().merge(ups.head("main"), ups.head("feature/x"), "feature/x", "main")
    assert result == Conflict(("a.txt", "b.txt"))
    assert result.describe() == "conflict in a.txt, b.txt"


def test_unrelated_histories_are_a_conflict(ups):
    git(ups.work, "checkout", "-q", "--orphan", "other")
    ups.commit({"README": "other\n"}, "root", branch=None)
    ups.push("other")
    ups.fetch()
    result = ups.merge_repo().merge(ups.head("main"), ups.head("other"), "other", "main")
    assert isinstance(result, Conflict) and "no common history" in result.reason


def test_unknown_commit_is_an_error_not_a_conflict(ups):
    with pytest.raises(GitError):
        ups.merge_repo().merge(ups.head("main"), "1" * 40, "b", "main")


def test_a_merge_with_an_oversized_recipe_is_an_error_read_by_its_size(ups, tmp_path):
    """The merge's .ci.ini was written whole to a temporary file and read
    up to 8 MiB, then left to the runner as a recipe that does not parse:
    one plain job, though its matrix was never read.  Its size is asked
    first: past MAX_RECIPE_BYTES the merge's plan is that error."""
    from ci.matrix import decode_plan
    from ci.observer.merges import BranchMerges
    from ci.observer.state import ObserverState
    from ci.runner import recipe
    head = ups.commit({".ci.ini": b"[ci]\nmatrix_python = 3.12\n" + b"#" * (9 << 20)},
                      "big recipe", branch="feature/a")
    git(ups.work, "checkout", "-q", "main")
    target = ups.commit({"main.txt": "m\n"}, "main moves")
    ups.push("main", "feature/a")
    ups.fetch()
    merges = BranchMerges(ups.merge_repo(), [rules.parse_rule("feature/*=main")],
                          ObserverState(str(tmp_path / "state.json")))
    prepared = merges.prepare("feature/a", head, "main", target)
    assert isinstance(prepared.result, Merged)
    plan = [f for f in prepared.fields.split() if f.startswith("error=")]
    assert plan and decode_plan(plan[0], 64).error == ".ci.ini is larger than 65536 bytes"
    from ci.git import TooLarge
    made = prepared.commit
    assert merges.repo.read_blob(made, ".ci.ini", recipe.MAX_RECIPE_BYTES) == \
        TooLarge(len(b"[ci]\nmatrix_python = 3.12\n") + (9 << 20))
    assert merges.repo.read_blob(made, "main.txt", 2) == b"m\n"
    assert merges.repo.read_blob(made, "nothing", 2) is None


def test_publish_and_unpublish_in_one_push_each(ups):
    made = []
    for name in ("p", "q", "r"):
        head = ups.commit({f"{name}.txt": name}, name, branch=name)
        ups.push(name)
        git(ups.work, "checkout", "-q", "main")
        made.append(head)
    ups.fetch()
    merges = ups.merge_repo()
    commits = [merges.merge(ups.head("main"), h, "x", "main").commit for h in made]
    merges.publish(commits)
    assert [ups.remote(push.merge_ref(c)) for c in commits] == commits
    merges.publish(commits)   # again: already there, fine
    merges.unpublish(commits[:2] + ["9" * 40])   # one that never was: fine
    assert [ups.remote(push.merge_ref(c)) for c in commits] == [None, None, commits[2]]
    # The branches were never touched.
    assert ups.remote("refs/heads/main") == ups.head("main")


def test_publish_of_a_commit_the_remote_refuses_is_an_error(ups):
    ups.hook("pre-receive", "echo no refs today >&2\nexit 1\n")
    merges = ups.merge_repo()
    with pytest.raises(GitError, match="publish"):
        merges.publish([ups.head("main")])


# ---- landing ------------------------------------------------------------------

def merge_on_main(ups, name="feature/l"):
    head = ups.commit({f"{name.replace('/', '_')}.txt": "x\n"}, name, branch=name)
    git(ups.work, "checkout", "-q", "main")
    ups.push(name)
    ups.fetch()
    merges = ups.merge_repo()
    old = ups.head("main")
    return merges, old, merges.merge(old, head, name, "main").commit


def test_land_moves_the_target_to_exactly_the_tested_commit(ups):
    merges, old, new = merge_on_main(ups)
    assert merges.land("main", old, new) == Landed(new)
    assert ups.remote("refs/heads/main") == new
    assert merges.remote_head("main") == new
    # Landing it again (a retry after an unclear outcome) is still landed.
    assert merges.land("main", old, new) == Landed(new)


def test_lease_fails_when_the_target_moved(ups):
    merges, old, new = merge_on_main(ups)
    moved = ups.commit({"someone.txt": "else\n"}, "someone else pushes")
    ups.push("main")
    assert isinstance(merges.land("main", old, new), Stale)
    assert ups.remote("refs/heads/main") == moved


def test_non_fast_forward_is_refused_before_pushing(ups, tmp_path):
    feature = ups.commit({"f": "f\n"}, "f", branch="feature/n")
    git(ups.work, "checkout", "-q", "main")
    ups.commit({"m": "m\n"}, "main moves")
    ups.push("main", "feature/n")
    ups.fetch()
    merges = ups.merge_repo()
    old = ups.head("main")
    new = merges.merge(old, feature, "feature/n", "main").commit
    marker = tmp_path / "pushed"
    ups.hook("pre-receive", f"touch {marker}\n")
    # The branch's own head forked from an older main: not on top of main.
    outcome = merges.land("main", old, feature)
    assert isinstance(outcome, Failed) and "not a fast-forward" in outcome.reason
    outcome = merges.land("main", new, old)   # backwards
    assert isinstance(outcome, Failed) and "not a fast-forward" in outcome.reason
    assert not marker.exists()
    assert ups.remote("refs/heads/main") == old


def test_unclear_outcome_after_the_ref_moved_is_landed(ups):
    # The remote updates the ref, then its receive-pack dies before it
    # reports: the push says nothing; ls-remote says it landed.
    merges, old, new = merge_on_main(ups)
    ups.hook("reference-transaction",
             'cat >/dev/null\n[ "$1" = committed ] && kill -9 $PPID\nexit 0\n')
    assert merges.land("main", old, new) == Landed(new)
    assert ups.remote("refs/heads/main") == new


def test_unclear_outcome_before_the_ref_moved_is_failed(ups):
    merges, old, new = merge_on_main(ups)
    ups.hook("pre-receive", "kill -9 $PPID\n")
    outcome = merges.land("main", old, new)
    assert isinstance(outcome, Failed) and "not pushed" in outcome.reason
    assert ups.remote("refs/heads/main") == old


def test_a_hanging_push_is_killed_and_decided_by_the_remote(ups, monkeypatch):
    merges, old, new = merge_on_main(ups)
    ups.hook("pre-receive", "sleep 60\n")
    monkeypatch.setattr(repo, "PUSH_TIMEOUT", 1.0)
    outcome = merges.land("main", old, new)
    assert isinstance(outcome, Failed) and "timed out" in outcome.reason, outcome
    assert ups.remote("refs/heads/main") == old


def test_credentials_never_reach_an_error_or_a_log(ups, caplog):
    token = "tok-7f3a9c1e5b"
    merges = ups.merge_repo(push_url=f"http://ci:{token}@127.0.0.1:{free_port()}/up.git")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(GitError) as caught:
        merges.publish([ups.head("main")])
    assert token not in str(caught.value)
    outcome = merges.land("main", ups.head("main"), ups.head("main"))
    assert isinstance(outcome, Failed) and token not in outcome.reason
    with pytest.raises(GitError) as caught:
        merges.remote_head("main")
    assert token not in str(caught.value)
    assert "***@127.0.0.1" in str(caught.value)
    assert token not in caplog.text


def test_published_merges_are_bounded_per_branch_and_survive_a_restart(tmp_path):
    from ci.observer.state import ObserverState
    path = str(tmp_path / "state.json")
    state = ObserverState(path)
    merges = [f"{i:040x}" for i in range(1, 6)]
    for commit in merges[:4]:
        state.add_published("feature/a", commit, keep=3)
    state.add_published("feature/b", merges[4], keep=3)
    assert state.published_of("feature/a") == merges[1:4]
    assert state.retired_batch(10) == merges[:1]
    state.forget("feature/b")   # a branch that is gone: all its merges go
    again = ObserverState(path)
    assert again.published_of("feature/a") == merges[1:4]
    assert again.retired_batch(10) == [merges[0], merges[4]]
    assert again.retired_batch(1) == [merges[0]]
    again.drop_retired([merges[0]])
    assert ObserverState(path).retired_batch(10) == [merges[4]]
