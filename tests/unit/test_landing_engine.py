"""The land queue's engine (ci/landing/engine.py) with real git: a bare
upstream, the observer's clone, merges and lease pushes by
``ports.QueueGit`` over the observer's private merge repository
(ci/merging); the dispatcher is an in-test stand-in that judges each
dispatched merge commit by its tree (the real dispatcher's ``verdicts``,
``queue-state`` and ``queue-event`` are built beside this part)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from ci.git import GitError, run_git, script_path
from ci.landing.engine import Engine, Refused
from ci.landing.journal import QueueJournal
from ci import matrix
from ci.landing.ports import QueueGit, land_result
from ci.verdicts import parse_reply as parse_verdicts
from ci.merging import Failed, Landed, MergeRepo, Stale, url as push_urls
from ci.merging.rules import MergeRule, parse_rule, target_of
from ci.notify.queue_events import parse_queue_event
from ci.wire import encode_fields
from support.cluster import GIT_ENV, git


class StandInDispatcher:
    """Judges a merge commit when asked for its verdict: ``judge(files)``
    returns (verdict, reason) from the commit's file names."""

    def __init__(self, repo, judge=None):
        self.repo = repo
        self.judge = judge or (lambda files: ("passed", "-"))
        self.dispatched: list[str] = []
        self.states: list[dict] = []
        self.events: list[dict] = []
        self.hold = False        # verdicts stay "running" while set
        self.down = False
        self.events_down = False

    def _check(self):
        if self.down:
            raise OSError("dispatcher down")

    def dispatch(self, lines):
        self._check()
        self.dispatched.extend(lines)

    def verdicts(self, commits):
        self._check()
        known = {line.split()[0] for line in self.dispatched}
        found = {}
        for commit in commits:
            if commit not in known:
                found[commit] = ("unknown", "-")
            elif self.hold:
                found[commit] = ("running", "-")
            else:
                files = run_git(self.repo, "ls-tree", "-r", "--name-only", commit).split()
                found[commit] = self.judge(files)
        return found

    def send_state(self, body):
        self._check()
        self.states.append(json.loads(body))

    def send_event(self, fields):
        self._check()
        if self.events_down:
            raise OSError("not now")
        self.events.append({k: str(v) for k, v in fields.items()})


class World:
    def __init__(self, tmp_path, judge=None, depth=3):
        self.tmp = tmp_path
        self.bare = str(tmp_path / "upstream.git")
        seed = str(tmp_path / "seed")
        os.makedirs(seed)
        git(seed, "init", "-q", "-b", "main")
        self.write(seed, "README", "hello\n")
        git(seed, "add", "-A")
        git(seed, "commit", "-q", "-m", "initial")
        subprocess.run(["git", "clone", "-q", "--bare", seed, self.bare], check=True)
        self.work = str(tmp_path / "work")
        subprocess.run(["git", "clone", "-q", self.bare, self.work], check=True)
        self.clone = str(tmp_path / "observer")
        subprocess.run(["git", "clone", "-q", self.bare, self.clone], check=True)
        self.state = str(tmp_path / "state")
        os.makedirs(self.state)
        # Merges are made in the observer's merge repository and published
        # to the upstream: the stand-in reads them there.
        self.dispatcher = StandInDispatcher(self.bare, judge)
        self.depth = depth
        self.engine = self.new_engine()

    def new_engine(self) -> Engine:
        journal = QueueJournal(os.path.join(self.state, "queue.journal"))
        merges = MergeRepo(self.clone, self.state, push_urls.default(self.clone))
        return Engine(journal, QueueGit(self.clone, merges), self.dispatcher,
                      [parse_rule("feature/*=main")], self.depth)

    @staticmethod
    def write(repo, name, text):
        with open(os.path.join(repo, name), "w") as handle:
            handle.write(text)

    def branch(self, name, files, base="origin/main", email="dev@example.invalid") -> str:
        git(self.work, "fetch", "-q", "origin")
        git(self.work, "checkout", "-q", "-B", name, base)
        for path, text in files.items():
            self.write(self.work, path, text)
        git(self.work, "add", "-A")
        subprocess.run(["git", "-C", self.work, "commit", "-q", "-m", f"work on {name}"],
                       check=True, env={**os.environ, **GIT_ENV, "GIT_AUTHOR_EMAIL": email})
        git(self.work, "push", "-q", "-f", "origin", f"{name}:{name}")
        return git(self.work, "rev-parse", "HEAD")

    def push_main(self, files) -> str:
        return self.branch("main", files)

    def heads(self) -> dict:
        out = subprocess.run(["bash", script_path("update_repo.sh"), self.clone],
                             capture_output=True, text=True, check=True).stdout
        return {b: c for c, _, b in (line.partition(" ") for line in out.splitlines()) if c}

    def step(self, times=1):
        for _ in range(times):
            self.engine.step(self.heads())

    def main(self) -> str:
        return git(self.bare, "rev-parse", "refs/heads/main")

    def first_parents(self) -> list[str]:
        return git(self.bare, "rev-list", "--first-parent", "refs/heads/main").split()

    def state_of(self, branch) -> str:
        snap = self.engine.snapshot()
        for entry in snap["entries"] + snap["recent"]:
            if entry["branch"] == branch:
                return entry["state"]
        return "absent"


@pytest.fixture
def world(tmp_path):
    made = []

    def make(**kwargs) -> World:
        made.append(World(tmp_path, **kwargs))
        return made[-1]
    yield make
    for w in made:
        w.engine.close()


def test_three_branches_land_each_tested_on_top_of_those_ahead(world):
    w = world()
    start = w.main()
    heads = [w.branch(f"feature/{n}", {f"{n}.txt": n}) for n in "abc"]
    for n in "abc":
        w.engine.ask(f"feature/{n}", "operator:alice")
    w.dispatcher.hold = True
    w.step()
    # All three built at once (depth 3), each on the one ahead.
    lines = [line.split() for line in w.dispatcher.dispatched]
    assert len(lines) == 3
    tested = [line[0] for line in lines]
    assert lines[0][3] == f"merge={heads[0]}:{start}:main"
    assert lines[1][3] == f"merge={heads[1]}:{tested[0]}:main"
    assert lines[2][3] == f"merge={heads[2]}:{tested[1]}:main"
    assert [w.state_of(f"feature/{n}") for n in "abc"] == ["testing"] * 3
    assert w.main() == start
    w.dispatcher.hold = False
    w.step()
    assert w.first_parents() == tested[::-1] + [start]
    assert [w.state_of(f"feature/{n}") for n in "abc"] == ["landed"] * 3
    assert [e["event"] for e in w.dispatcher.events] == ["landed"] * 3
    assert w.dispatcher.events[0]["author"] == "dev@example.invalid"
    assert w.dispatcher.events[0]["tested"] == tested[0]
    snap = w.dispatcher.states[-1]
    assert snap["entries"] == [] and snap["targets"]["main"] == {"head": tested[2],
                                                                 "depth": 3}
    # Each landed commit is exactly the one tested, its parents the old head and the branch.
    for commit, parent, head in zip(tested, [start] + tested, heads):
        assert git(w.bare, "rev-parse", f"{commit}^1", f"{commit}^2").split() == [parent, head]
    assert git(w.bare, "for-each-ref", "--format=%(refname)", "refs/ci/merges").split() == \
        [f"refs/ci/merges/{c}" for c in sorted(tested)]


def test_a_semantically_bad_branch_is_rejected_and_those_behind_land_without_it(world):
    def judge(files):
        if "a.txt" in files and "b.txt" in files:
            return "failed", "1 failure: tests.test_ab.T.test_both"
        return "passed", "-"
    w = world(judge=judge)
    start = w.main()
    for n in "abc":
        w.branch(f"feature/{n}", {f"{n}.txt": n})
        w.engine.ask(f"feature/{n}", "operator:alice")
    w.step(3)
    assert w.state_of("feature/a") == "landed" and w.state_of("feature/c") == "landed"
    assert w.state_of("feature/b") == "rejected"
    rejected = [e for e in w.dispatcher.events if e["event"] == "rejected"]
    assert len(rejected) == 1 and rejected[0]["branch"] == "feature/b"
    assert rejected[0]["reason"] == "failed: 1 failure: tests.test_ab.T.test_both"
    files = run_git(w.bare, "ls-tree", "--name-only", "main").split()
    assert "a.txt" in files and "c.txt" in files and "b.txt" not in files
    assert len(w.first_parents()) == 3 and w.first_parents()[-1] == start


def test_a_red_entry_behind_the_front_is_failing_until_it_reaches_the_front(world):
    w = world(judge=lambda files: ("failed", "boom") if "b.txt" in files else ("passed", "-"))
    for n in "ab":
        w.branch(f"feature/{n}", {f"{n}.txt": n})
        w.engine.ask(f"feature/{n}", "x")
    w.dispatcher.hold = True
    w.step()
    first = w.dispatcher.dispatched[0].split()[0]
    # b's verdict arrives first: failing while a is undecided.
    w.dispatcher.judge = lambda files: ("failed", "boom") if "b.txt" in files else ("running",
                                                                                     "-")
    w.dispatcher.hold = False
    w.step()
    assert w.state_of("feature/a") == "testing" and w.state_of("feature/b") == "failing"
    w.dispatcher.judge = lambda files: ("failed", "boom") if "b.txt" in files else ("passed",
                                                                                    "-")
    w.step()
    assert w.main() == first
    assert w.state_of("feature/b") == "rejected"
    # Rejected at once: it failed on exactly what main now is, no rebuild.
    assert len(w.dispatcher.dispatched) == 2


def test_the_target_moved_by_someone_else_rebuilds_on_the_new_head(world):
    w = world()
    w.branch("feature/a", {"a.txt": "a"})
    w.engine.ask("feature/a", "x")
    w.dispatcher.hold = True
    w.step()
    moved = w.push_main({"other.txt": "x"})
    w.dispatcher.hold = False
    w.step(2)
    assert len(w.dispatcher.dispatched) == 2
    assert w.dispatcher.dispatched[1].split()[3].split(":")[1] == moved
    assert w.first_parents()[1] == moved and w.state_of("feature/a") == "landed"


def test_a_lost_lease_race_rebuilds_and_lands_on_the_new_head(world):
    w = world()
    w.branch("feature/a", {"a.txt": "a"})
    w.engine.ask("feature/a", "x")
    w.step()                      # built and dispatched, not yet judged
    git_land = w.engine.git.land

    def racing_land(target, old, new):
        w.push_main({"race.txt": "r"})   # someone pushes just before our push
        w.engine.git.land = git_land
        return git_land(target, old, new)
    w.engine.git.land = racing_land
    w.step()
    assert w.state_of("feature/a") != "landed"
    w.step(2)
    assert w.state_of("feature/a") == "landed"
    assert "race.txt" in run_git(w.bare, "ls-tree", "--name-only", "main").split()
    assert len(w.dispatcher.dispatched) == 2


def test_refusals_change_nothing(world, tmp_path):
    w = world()
    w.branch("feature/a", {"a.txt": "a"})
    w.branch("feature/conflict", {"README": "mine\n"})
    w.branch("feature/merged", {"m.txt": "m"})
    w.branch("other/x", {"x.txt": "x"})
    w.heads()
    w.engine.ask("feature/a", "x")
    # Merge feature/merged into main by hand; and move main's README.
    git(w.work, "checkout", "-q", "main")
    git(w.work, "pull", "-q", "origin", "main")
    git(w.work, "merge", "-q", "--no-edit", "origin/feature/merged")
    w.write(w.work, "README", "theirs\n")
    git(w.work, "commit", "-q", "-am", "readme")
    git(w.work, "push", "-q", "origin", "main")
    w.heads()
    journal = os.path.join(w.state, "queue.journal")
    before = open(journal, "rb").read()
    cases = {"feature/nope": "unknown branch feature/nope",
             "other/x": "matches no --merge-into rule",
             "feature/a": "already queued as entry 1",
             "feature/merged": "already merged into main",
             "feature/conflict": "conflicts with main",
             "feature/bad name": "invalid branch name"}
    for branch, text in cases.items():
        with pytest.raises(Refused) as caught:
            w.engine.ask(branch, "x")
        assert text in str(caught.value), (branch, caught.value)
    assert open(journal, "rb").read() == before
    with pytest.raises(Refused, match="not queued"):
        w.engine.cancel("feature/zzz", "x")


def test_unland_cancels_but_not_while_its_push_is_under_way(world):
    w = world()
    w.branch("feature/a", {"a.txt": "a"})
    w.branch("feature/b", {"b.txt": "b"})
    w.engine.ask("feature/a", "x")
    w.engine.ask("feature/b", "x")
    w.dispatcher.hold = True
    w.step()
    w.engine.cancel("feature/a", "operator:bob")
    w.dispatcher.hold = False
    w.step(2)
    assert w.state_of("feature/a") == "cancelled" and w.state_of("feature/b") == "landed"
    assert "b.txt" in run_git(w.bare, "ls-tree", "--name-only", "main").split()
    assert "a.txt" not in run_git(w.bare, "ls-tree", "--name-only", "main").split()
    # During the push, unland is refused.
    w.branch("feature/c", {"c.txt": "c"})
    w.engine.ask("feature/c", "x")
    git_land = w.engine.git.land
    refusals = []

    def land(target, old, new):
        with pytest.raises(Refused, match="being landed now") as caught:
            w.engine.cancel("feature/c", "x")
        refusals.append(caught.value)
        return git_land(target, old, new)
    w.engine.git.land = land
    w.step(2)
    assert refusals and w.state_of("feature/c") == "landed"


@pytest.mark.parametrize("pushed", ["yes", "no", "moved"])
def test_a_push_intent_left_by_a_crash_is_settled_from_the_real_head(world, pushed):
    w = world()
    start = w.main()
    w.branch("feature/a", {"a.txt": "a"})
    w.engine.ask("feature/a", "x")
    w.step()
    entry = w.engine.journal.entries[1]
    tested = entry.tested
    # The crash: the intent is on disk, the outcome never was.
    w.engine.journal.write("intent", 1, old=start, new=tested)
    if pushed == "yes":
        assert w.engine.git.land("main", start, tested) == "landed"
    elif pushed == "moved":
        w.push_main({"m.txt": "m"})
    w.engine.close()
    w.engine = w.new_engine()
    assert w.engine.journal.entries[1].intent == [start, tested]
    assert w.state_of("feature/a") == "landing"
    w.step(2)
    assert w.state_of("feature/a") == "landed"
    assert [e["event"] for e in w.dispatcher.events] == ["landed"]
    if pushed == "moved":
        assert len(w.dispatcher.dispatched) == 2 and w.first_parents()[0] != tested
    else:
        assert w.first_parents() == [tested, start]
        assert len(w.dispatcher.dispatched) == 1
    # Restarted again: nothing lands twice, no event twice.
    w.engine.close()
    w.engine = w.new_engine()
    w.step()
    assert [e["event"] for e in w.dispatcher.events] == ["landed"]


def test_events_are_retried_until_taken_and_journalled_as_sent(world):
    w = world()
    w.branch("feature/a", {"a.txt": "a"})
    w.engine.ask("feature/a", "x")
    w.step()
    w.dispatcher.events_down = True
    w.step()             # lands, but the event is not taken
    assert w.state_of("feature/a") == "landed" and not w.dispatcher.events
    w.step()
    w.engine.close()
    w.engine = w.new_engine()
    w.dispatcher.events_down = False
    w.step()
    w.step()
    assert [e["event"] for e in w.dispatcher.events] == ["landed"]


def test_a_pushed_land_ref_asks_and_is_deleted(world):
    w = world()
    head = w.branch("feature/a", {"a.txt": "a"})
    git(w.work, "push", "-q", "origin", f"{head}:refs/heads/land/feature/a")
    git(w.work, "push", "-q", "origin", f"{head}:refs/heads/land/other/x")
    w.dispatcher.hold = True
    w.step()
    assert w.state_of("feature/a") == "testing"
    refs = git(w.bare, "for-each-ref", "--format=%(refname)", "refs/heads/land").split()
    assert refs == []
    # The refused one is shown and told as rejected, with the reason.
    assert w.state_of("other/x") == "rejected"
    w.dispatcher.hold = False
    w.step()
    assert w.state_of("feature/a") == "landed"
    events = {e["branch"]: e for e in w.dispatcher.events}
    assert "matches no --merge-into rule" in events["other/x"]["reason"]


def test_a_land_ref_pushed_again_asks_again_and_one_queued_already_is_told(world):
    """A land ref at the head of a finished (rejected) entry was taken for
    one already asked and deleted without an entry; one pushed at a new
    head while the branch was queued was deleted without a word."""
    flaky = {"fail": True}
    w = world(judge=lambda files: ("failed", "-") if flaky["fail"] else ("passed", "-"))
    head = w.branch("feature/a", {"a.txt": "a"})
    git(w.work, "push", "-q", "origin", f"{head}:refs/heads/land/feature/a")
    w.step(3)
    assert w.state_of("feature/a") == "rejected"
    flaky["fail"] = False
    git(w.work, "push", "-q", "origin", f"{head}:refs/heads/land/feature/a")
    w.dispatcher.hold = True
    w.step()
    assert w.state_of("feature/a") == "testing"
    newer = w.branch("feature/a", {"a2.txt": "b"}, base="origin/feature/a")
    git(w.work, "push", "-q", "origin", f"{newer}:refs/heads/land/feature/a")
    w.step()
    rejected = [e for e in w.dispatcher.events if e["event"] == "rejected"]
    assert rejected[-1]["head"] == newer and "already queued" in rejected[-1]["reason"]
    w.dispatcher.hold = False
    w.step(2)
    assert w.state_of("feature/a") == "landed"
    assert git(w.bare, "for-each-ref", "--format=%(refname)", "refs/heads/land").split() == []


def test_a_push_whose_report_was_lost_while_the_upstream_was_unreadable_lands(world,
                                                                            monkeypatch):
    """The push happened but its report was lost, and the upstream could
    not be read just then: the land was journalled 'unpushed', the entry
    rebuilt, found "already merged into main", and rejected (told
    'rejected'; 'landed' never) though its merge was on main."""
    w = world()
    start = w.main()
    w.branch("feature/a", {"a.txt": "a"})
    w.engine.ask("feature/a", "x")
    w.dispatcher.hold = True
    w.step()
    w.dispatcher.hold = False
    merges = w.engine.git.merges
    real_run, real_remote = merges.git.run, merges.remote_head

    def run(*args, **kwargs):
        done = real_run(*args, **kwargs)            # the push really happens...
        if args[0] == "push":
            raise GitError(["push"], "", -1, "connection reset")   # ...its report is lost
        return done

    def remote_head(branch):
        raise GitError(["ls-remote"], "", 128, "upstream unreachable")
    monkeypatch.setattr(merges.git, "run", run)
    monkeypatch.setattr(merges, "remote_head", remote_head)
    w.step()
    monkeypatch.setattr(merges.git, "run", real_run)
    monkeypatch.setattr(merges, "remote_head", real_remote)
    assert w.main() != start and w.state_of("feature/a") != "rejected"
    w.step(2)
    assert w.state_of("feature/a") == "landed"
    assert [e["event"] for e in w.dispatcher.events] == ["landed"]


def test_a_refused_push_cut_between_its_two_records_is_rejected_next_poll(world):
    """A crash after a refused push's ask record and before its rejection
    left an entry with no target active for ever (the queue never idle)."""
    w = world()
    head = w.branch("other/x", {"x.txt": "x"})
    w.engine.journal.ask("other/x", "-", head, "push")      # ...and the crash
    assert w.engine.busy()
    w.step(2)
    assert w.state_of("other/x") == "rejected"
    assert [e["event"] for e in w.dispatcher.events] == ["rejected"]
    assert not w.engine.busy()


def test_an_event_of_an_entry_never_tested_is_one_the_dispatcher_takes(world):
    # A rejected entry with no tested commit (a refused land ref, a
    # conflict) says so with an empty ``tested`` (ci/notify/queue_events.py):
    # a "-" was refused as a bad event, and held back every later event.
    w = world()
    head = w.branch("other/x", {"x.txt": "x"})
    git(w.work, "push", "-q", "origin", f"{head}:refs/heads/land/other/x")
    w.step()
    assert [e["event"] for e in w.dispatcher.events] == ["rejected"]
    told = parse_queue_event(encode_fields(w.dispatcher.events[0]))
    assert told.tested == "" and told.head == head


def test_a_dispatch_refused_or_lost_is_sent_again(world):
    w = world()
    w.branch("feature/a", {"a.txt": "a"})
    w.engine.ask("feature/a", "x")
    w.dispatcher.down = True
    w.step()                      # built, published; the dispatch failed
    assert w.dispatcher.dispatched == []
    w.dispatcher.down = False
    w.step()                      # the verdict says "unknown": dispatched again
    assert len(w.dispatcher.dispatched) == 1
    w.step()
    assert w.state_of("feature/a") == "landed"


# --------------------------------------------------------------------------
# Pure parts of the ports and the rules.


def test_push_outcomes_as_the_engine_reads_them():
    assert land_result(Landed("a" * 40)) == "landed"
    assert land_result(Stale()) == "stale"
    assert land_result(Failed("could not read from remote")) == \
        "failed:could not read from remote"


def test_verdicts_reply_parsing():
    a, b = "a" * 40, "b" * 40
    body = f"{a} failed 2 failures: t.a, t.b\n{b} queued -\nnot a line\n".encode()
    assert parse_verdicts(body) == {a: ("failed", "2 failures: t.a, t.b"), b: ("queued", "-")}


def test_merge_into_rules():
    rules = [parse_rule("feature/*=main"), parse_rule("rel/*=release")]
    assert target_of(rules, "feature/x") == "main"
    assert target_of(rules, "rel/1") == "release"
    assert target_of(rules, "main") is None
    assert rules[0] == MergeRule("feature/*", "main")
    for bad in ("feature/*", "=main", "x=", "x=ma in", "x=a..b"):
        with pytest.raises(ValueError):
            parse_rule(bad)


def test_an_entry_is_dispatched_with_its_merge_recipe_matrix_and_labels(world):
    """The tested merge's recipe travels with its dispatch line, as for any
    commit: its matrix cells and labels.  A plain line is one cell on any
    runner, and its pass could land a branch never run where it asked."""
    w = world()
    w.dispatcher.hold = True
    w.branch("feature/m", {".ci.ini": "[ci]\nmatrix_python = 3.9 3.13\nlabels = gpu\n"})
    w.branch("feature/plain", {"plain.txt": "plain\n"})
    for name in ("feature/m", "feature/plain"):
        w.engine.ask(name, "operator:alice")
    w.step()
    lines = {line.split()[2]: line.split() for line in w.dispatcher.dispatched}
    assert set(lines) == {"feature/m", "feature/plain"}
    # feature/plain is merged on top of feature/m's merge: its recipe too.
    for name in lines:
        fields = [f for f in lines[name][3:] if f.startswith(matrix.CELLS_FIELD)]
        assert len(fields) == 1, lines[name]
        plan = matrix.decode_plan(fields[0], matrix.MAX_CELLS_LIMIT)
        assert plan.error is None
        assert [(c.python, sorted(c.labels)) for c in plan.cells] == [("3.9", ["gpu"]),
                                                                      ("3.13", ["gpu"])]
    # Dispatched again (the dispatcher lost it), it still carries them.
    w.engine._undispatched.add(w.engine._active()[0].id)
    w.engine._dispatch_pending()
    assert w.dispatcher.dispatched[-1].split()[3:] == lines["feature/m"][3:]


def test_an_unusable_matrix_of_an_entry_is_dispatched_as_its_error(world):
    w = world()
    w.dispatcher.hold = True
    w.branch("feature/bad", {".ci.ini": "[ci]\nmatrix_python = 3.9 3.9\n"})
    w.engine.ask("feature/bad", "operator:alice")
    w.step()
    [line] = [line.split() for line in w.dispatcher.dispatched]
    [error] = [f for f in line[3:] if f.startswith(matrix.ERROR_FIELD)]
    assert "listed twice" in matrix.decode_plan(error, matrix.MAX_CELLS_LIMIT).error
