"""Merged results through the real daemons (issue 22): a merge commit made
with plain git and published only under ``refs/ci/merges/<commit>`` in the
upstream is dispatched with ``merge=``; the runner fetches refs/ci/*,
tests it, and judges it by the TARGET's quarantine list (so a branch that
quarantines its own failing test still fails once merged); the result
header records the merge; a ``conflict=`` dispatch gets its verdict from
the dispatcher with no runner, also when the dispatcher died between
journalling it and writing it; ``verdicts:`` answers all of it."""

from __future__ import annotations

import os
import signal

import helpers
from ci import mergeinfo, verdicts
from ci.dispatch import journal
from support.cluster import FAILING_TEST, git, wait_until

UNKNOWN = "9" * 40


def merge_commit(upstream, target: str, head: str) -> str:
    """The merge of ``head`` into ``target`` (parents exactly target, head),
    published as refs/ci/merges/<commit> and on no branch."""
    tree = git(upstream.path, "merge-tree", "--write-tree", target, head).splitlines()[0]
    commit = git(upstream.path, "commit-tree", tree, "-p", target, "-p", head, "-m",
                 f"merge {head[:12]} into main")
    git(upstream.path, "update-ref", f"refs/ci/merges/{commit}", commit)
    return commit


def branch(upstream, name: str, base: str, files: dict) -> str:
    git(upstream.path, "checkout", "-q", "-b", name, base)
    head = upstream.commit(files, f"work on {name}")
    git(upstream.path, "checkout", "-q", "main")
    return head


def dispatch(cluster, lines: list[str]) -> str:
    commits = [line.split(" ")[0] for line in lines]
    reply = helpers.call(("127.0.0.1", cluster.dispatcher_port), "dispatch", " ".join(commits),
                         "".join(line + "\n" for line in lines).encode())
    assert reply.command == "ok", reply
    return reply.argument


def ask(cluster, *commits: str) -> dict:
    reply = helpers.call(("127.0.0.1", cluster.dispatcher_port), "verdicts",
                         verdicts.format_request(commits))
    assert reply.command == "ok", reply
    return verdicts.parse_reply(reply.body)


def test_merged_results_conflicts_and_verdicts(cluster, upstream):
    target = git(upstream.path, "rev-parse", "HEAD")
    good = branch(upstream, "feature/good", target, {"good.txt": "good\n"})
    # Passes on its own by quarantining its own failing test...
    sneaky = branch(upstream, "feature/sneaky", target, {
        "tests/test_broken.py": FAILING_TEST, ".ci.ini": "[ci]\nquarantine = *test_wrong\n"})
    clash = branch(upstream, "feature/clash", target, {"tests/test_sample.py": "# clash\n"})
    late = branch(upstream, "feature/late", target, {"late.txt": "late\n"})
    # The runner's clone, made before the merges exist (a local clone copies
    # every object): its checkout must fetch them from refs/ci/.
    clone = upstream.clone(cluster.tmp / "runner-clone")
    merged_good = merge_commit(upstream, target, good)
    merged_sneaky = merge_commit(upstream, target, sneaky)
    assert git(upstream.path, "branch", "--contains", merged_good) == ""

    def merge_line(commit, head, name, *extra):
        info = mergeinfo.MergeInfo(head, target, "main")
        return " ".join([commit, "-", name, "future=ignored", *extra,
                         mergeinfo.encode_merge_field(info)])

    cluster.start_dispatcher()
    # No runner yet: the conflict is judged at once, the merge waits.
    conflict_field = mergeinfo.encode_conflicts(["tests/test_sample.py", "odd name.txt"])
    assert dispatch(cluster, [merge_line(clash, clash, "feature/clash", conflict_field),
                              merge_line(merged_good, good, "feature/good")]) == "queued 2"
    result = cluster.result(clash, timeout=10)
    assert (result["verdict"], result["runner"]) == ("conflict", "dispatcher")
    assert result["merged_into"] == f"main {target}" and result["merge_head"] == clash
    assert mergeinfo.parse_paths(result["conflicts"]) == ("tests/test_sample.py",
                                                          "odd name.txt")
    assert b"odd name.txt" in result["output"] and b"tests/test_sample.py" in result["output"]
    got = ask(cluster, merged_good, clash, UNKNOWN)
    assert got[merged_good] == ("queued", "-")
    assert got[clash] == ("conflict", "tests/test_sample.py odd name.txt")
    assert got[UNKNOWN] == ("unknown", "-")

    # The dispatcher dies after journalling a conflict, before writing its
    # verdict: the restart writes it, and no runner ever gets it.
    dispatcher = cluster.daemons[-1]
    dispatcher.stop(signal.SIGKILL)
    info = mergeinfo.MergeInfo(late, target, "main")
    with open(os.path.join(cluster.state, "journal"), "a") as handle:
        handle.write(f"{journal.queue_record(late)}\n"
                     f"{journal.meta_record(late, 'feature/late', None, info, ('late.txt',))}\n")
    cluster.start_dispatcher()
    assert cluster.result(late, timeout=10)["verdict"] == "conflict"
    assert ask(cluster, late)[late] == ("conflict", "late.txt")

    runner = cluster.start_runner(clone=clone)
    assert dispatch(cluster, [merge_line(merged_sneaky, sneaky, "feature/sneaky"),
                              f"{sneaky} - feature/sneaky"]) == "queued 2"
    result = cluster.result(merged_good)
    assert result["verdict"] == "passed", result["output"]
    assert (result["merged_into"], result["merge_head"]) == (f"main {target}", good)
    assert "conflicts" not in result and result["branch"] == "feature/good"
    # Judged by main's rules (no quarantine), the merge fails; the branch
    # head alone, by its own, passes.
    result = cluster.result(merged_sneaky)
    assert result["verdict"] == "failed", result["output"]
    assert b"judged by the target's rules" in result["output"]
    assert cluster.result(sneaky)["verdict"] == "passed"
    got = ask(cluster, merged_good, merged_sneaky, clash, late, UNKNOWN)
    assert got[merged_good] == ("passed", "-")
    state, reason = got[merged_sneaky]
    assert state == "failed" and "test_wrong" in reason, reason
    assert got[clash][0] == got[late][0] == "conflict" and got[UNKNOWN][0] == "unknown"
    # The runner's checkout fetched the upstream's refs/ci/.
    assert merged_good in git(runner.clone, "for-each-ref", "refs/ci/")
    # The conflicts never reached the runner.
    log = runner.log()
    assert clash[:12] not in log and late[:12] not in log
    # Dispatched again, a finished commit is not queued again.
    assert dispatch(cluster, [merge_line(clash, clash, "feature/clash", conflict_field)]) \
        == "queued 0"
    wait_until(lambda: ask(cluster, merged_good)[merged_good][0] == "passed", 5)


def test_a_conflicting_head_is_still_tested_as_itself_on_a_plain_branch(cluster, upstream):
    """The real observer files a conflict under the conflict's own id, not
    the head's: when the head later reaches a plainly tested branch
    (``release`` fast-forwarded to it), it is tested as itself.  Filed
    under the head, the conflict was the head's verdict, and the dispatcher
    answered the release's dispatch with "queued 0"."""
    base = git(upstream.path, "rev-parse", "HEAD")
    git(upstream.path, "branch", "release", base)
    clash = branch(upstream, "feature/clash", base, {"shared.txt": "theirs\n"})
    target = upstream.commit({"shared.txt": "ours\n"}, "main's own shared.txt")
    cluster.start_dispatcher()
    cluster.start_runner()
    observer = cluster.start_observer("--poll", "0.2", "--all-branches",
                                      "--merge-into", "feature/*=main")
    conflict = mergeinfo.conflict_id(mergeinfo.MergeInfo(clash, target, "main"))
    result = cluster.result(conflict, timeout=30)
    assert (result["verdict"], result["branch"]) == ("conflict", "feature/clash")
    assert (result["merge_head"], result["merged_into"]) == (clash, f"main {target}")
    assert mergeinfo.parse_paths(result["conflicts"]) == ("shared.txt",)
    assert not os.path.exists(cluster.result_path(clash))
    assert ask(cluster, clash)[clash] == ("unknown", "-")

    git(upstream.path, "branch", "-f", "release", clash)
    result = cluster.result(clash, timeout=60)
    assert (result["verdict"], result["branch"]) == ("passed", "release"), result["output"]
    assert "merge_head" not in result and result["runner"] != "dispatcher"
    assert ask(cluster, conflict)[conflict][0] == "conflict"
    assert "dispatched the conflict of feature/clash" in observer.log()
