"""The pruner's worker process (ci/retention/worker.py) and its link: the
result gate's shared page, the plan and removal protocol over real pipes,
names it refuses, a worker that dies mid-pass, and the tombstone follower
that gives it the pruned commits' verdicts."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import threading
import time
import types

import pytest
from support.cluster import wait_until

from ci.outcome import Outcome
from ci.results import TestRecord
from ci.retention import tombstones
from ci.retention.gate import REST_CAP, GateView, ResultGate
from ci.retention.gate import STEPS_PER_REST
from ci.retention.policy import KeepPolicy
from ci.retention.tombstones import Tombstone, TombstoneFile, VerdictFollower
from ci.retention import reaper as reaper_module
from ci.retention.reaper import Reaper
from ci.retention.worker import TRASH, FileWorker, decode_entry, encode_entry
from ci.retention.workerlink import WorkerGone, WorkerLink


def cid(n: int) -> str:
    return f"{n:040x}"


def write_chain(folder, count: int, branch: str = "main") -> None:
    previous = None
    for n in range(1, count + 1):
        header = {"verdict": "passed", "tests": 1, "failures": 0, "errors": 0, "skipped": 0,
                  "branch": branch, "commit": cid(n)}
        if previous:
            header["previous"] = previous
        Outcome(header, b"out\n", [TestRecord("t", "test_one")]).write(str(folder), cid(n))
        os.utime(folder / cid(n), (1000.0 + n,) * 2)
        previous = cid(n)


@pytest.fixture
def link(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    links = []

    def make(rules=KeepPolicy(count=1), gate=None):
        made = WorkerLink(str(folder), gate or ResultGate(), threading.Event(), rules,
                          str(tmp_path / tombstones.FILE_NAME))
        links.append(made)
        return made
    yield folder, make
    for made in links:
        proc = made.proc
        made.stop()
        assert proc is None or proc.poll() is not None


def test_the_gate_page_shows_a_result_being_stored():
    gate = ResultGate()
    fd = gate.share()
    if fd < 0:
        pytest.skip("no memfd on this system")
    view = GateView(fd, longest=5.0)
    assert not view.busy()
    with gate:
        assert view.busy()
        with gate:
            assert view.busy()
        assert view.busy()
    assert not view.busy()
    # wait_clear returns once the result is stored, well before ``longest``.
    gate.__enter__()
    threading.Timer(0.2, gate.__exit__, (None, None, None)).start()
    started = time.monotonic()
    assert view.wait_clear()
    assert 0.1 < time.monotonic() - started < 4.0
    assert not GateView(-1).busy() and not GateView(-1).wait_clear()


def test_plan_take_and_remove_over_the_pipes(link):
    folder, make = link
    write_chain(folder, 5)
    worker = make()
    assert worker.plan(set()) == (4, 5)          # the newest is kept
    first = worker.take(3)
    assert [e.commit for e in first] and len(first) == 3
    rest = worker.take(10)
    assert len(rest) == 1 and worker.take(10) == []
    doomed = sorted(e.commit for e in first + rest)
    assert doomed == [cid(n) for n in (1, 2, 3, 4)]
    errors = worker.remove([[c + ".xml", c] for c in doomed])
    assert errors == [None] * 4
    assert sorted(os.listdir(folder)) == [TRASH, cid(5), cid(5) + ".xml"]
    # The pruned files wait in the trash; once no request comes, they are freed.
    wait_until(lambda: os.listdir(folder / TRASH) == [], 30, what="the trash emptied")
    # A commit removed already (no longer in the plan): its error, nothing else.
    [error] = worker.remove([[cid(1) + ".xml", cid(1)]])
    assert isinstance(error, OSError) and "not in the plan" in str(error)


def test_the_xml_left_by_the_moves_is_named_and_dropped_in_the_folders_order(link):
    """The second sweep: ``leftovers`` names the XMLs of the commits whose
    result files were moved (and an XML the plan found without one), in
    the folder's listing order; ``drop`` takes XML names only."""
    folder, make = link
    write_chain(folder, 12)
    os.unlink(folder / cid(12))              # an XML without its result file
    worker = make()
    assert worker.plan(set()) == (10, 11)
    doomed = [e.commit for e in worker.take(20)]
    assert worker.remove([[c] for c in doomed]) == [None] * 10
    assert all((folder / (c + ".xml")).exists() and not (folder / c).exists() for c in doomed)
    left = worker.leftovers(4)               # a few at a time
    while more := worker.leftovers(4):
        assert len(more) <= 4
        left.update(more)
    assert set(left) == {*doomed, cid(12)}
    assert all(names == [c + ".xml"] for c, names in left.items())
    in_folder = [n for n in os.listdir(folder) if n.endswith(".xml") and n[:40] in left]
    assert [names[0] for names in left.values()] == in_folder
    assert worker.leftovers(4) == {}         # named once
    [refused] = worker.drop([[cid(11)]])
    assert isinstance(refused, OSError) and (folder / cid(11)).exists()
    assert worker.drop(list(left.values())) == [None] * 11
    assert sorted(os.listdir(folder)) == [TRASH, cid(11), cid(11) + ".xml"]


def test_a_result_replaced_after_the_plan_is_not_removed(link):
    """A retest that ended between the plan and the batch wrote a new
    result (the dispatcher's mark stops only one still running): its new
    verdict was never weighed, so neither of its files moves."""
    folder, make = link
    write_chain(folder, 3)
    worker = make()
    assert worker.plan(set()) == (2, 3)
    retested = {"verdict": "failed", "tests": 1, "failures": 1, "errors": 0, "skipped": 0,
                "branch": "main", "commit": cid(1)}
    Outcome(retested, b"new\n", [TestRecord("t", "test_one", "failed")]).write(
        str(folder), cid(1))
    errors = worker.remove([[c + ".xml", c] for c in (cid(1), cid(2))])
    assert "changed since the plan" in str(errors[0]) and errors[1] is None
    assert (folder / cid(1)).read_bytes().endswith(b"new\n")
    assert (folder / (cid(1) + ".xml")).exists() and not (folder / cid(2)).exists()


def test_pending_commits_are_kept_and_entries_round_trip(link):
    folder, make = link
    write_chain(folder, 4)
    worker = make()
    # cid(2) pending (a retest) is kept, and so is cid(3) after it: the
    # retest's verdict may make cid(3) the commit that broke or fixed main.
    assert worker.plan({cid(2)}) == (1, 4)
    assert sorted(e.commit for e in worker.take(10)) == [cid(1)]
    entry = FileWorker(str(folder), GateView(-1), KeepPolicy(count=1), "none").entry(
        cid(3), 1003.0)
    assert decode_entry(encode_entry(entry).encode()) == entry
    assert entry.previous == cid(2) and entry.branch == "main"


def test_a_plan_reads_the_headers_without_touching_their_access_times(tmp_path):
    # relatime sets the atime of a file read since it was written (atime not
    # after mtime): 100,000 inodes to write back while results are stored.
    write_chain(tmp_path, 3)
    for n in (1, 2, 3):
        os.utime(tmp_path / cid(n), ns=(1_000_000_000_000, 2_000_000_000_000))
    worker = FileWorker(str(tmp_path), GateView(-1), KeepPolicy(count=1), "none")
    assert worker.plan(set()) == "planned 2 of 3"
    assert {os.stat(tmp_path / cid(n)).st_atime_ns for n in (1, 2, 3)} == {1_000_000_000_000}


class CountingGate:
    """A gate that is never held: counts the looks at it."""

    def __init__(self):
        self.looks = 0

    def wait_clear(self) -> bool:
        self.looks += 1
        return False


def test_a_plan_looks_at_the_gate_before_every_step_of_it(tmp_path):
    # Every name listed (the XML too), every header read and every entry
    # the policy weighs: a step under way when a result comes runs beside
    # it, so no step is longer than one of them.
    write_chain(tmp_path, 100)
    gate = CountingGate()
    worker = FileWorker(str(tmp_path), gate, KeepPolicy(count=1), "none")
    assert worker.plan(set()) == "planned 99 of 100"
    assert gate.looks >= 200 + 100 + 4 * 100
    gate.looks = 0
    assert worker.plan(set()) == "planned 99 of 100"     # every header cached now
    assert gate.looks >= 200 + 4 * 100


def test_a_plan_rests_after_every_few_steps(tmp_path, monkeypatch):
    write_chain(tmp_path, STEPS_PER_REST)
    rests = []
    monkeypatch.setattr(reaper_module.time, "sleep", rests.append)
    FileWorker(str(tmp_path), GateView(-1), KeepPolicy(count=1), "none", rest=1.0).plan(set())
    # 2 names a commit listed, 1 header read, 4 policy loops: 7 steps each
    assert len(rests) >= 6 and all(0 < rest <= REST_CAP for rest in rests)
    rests.clear()
    FileWorker(str(tmp_path), GateView(-1), KeepPolicy(count=1), "none", rest=0.0).plan(set())
    assert rests and set(rests) == {0.0}          # --prune-rest 0: no rest


def test_names_that_are_not_result_files_are_refused(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    outside = tmp_path / "precious"
    outside.write_text("keep me")
    (folder / "notes.txt").write_text("keep me too")
    worker = FileWorker(str(folder), GateView(-1), KeepPolicy(count=1), "none")
    for names in (["../precious"], ["notes.txt"], [cid(1) + "/../../precious"], [],
                  [str(outside)], [cid(1) + ".cell."]):
        assert worker.remove_commit(names) == "error not a result file's name", names
    assert outside.read_text() == "keep me" and (folder / "notes.txt").exists()


def test_a_request_it_cannot_read_ends_the_worker(tmp_path):
    out = io.BytesIO()
    worker = FileWorker(str(tmp_path), GateView(-1), KeepPolicy(count=1), "none")
    worker.serve(io.BytesIO(b"rm -rf 1\nplan 0\n"), out)
    assert out.getvalue() == b""                  # the second request was never read


def test_a_worker_that_dies_is_replaced_on_the_next_request(link):
    folder, make = link
    write_chain(folder, 3)
    worker = make()
    assert worker.plan(set()) == (2, 3)
    first = worker.proc
    first.kill()
    first.wait(10)
    with pytest.raises(WorkerGone):
        worker.take(10)                           # the pass in progress ends
    assert worker.plan(set()) == (2, 3)           # the next pass has a new worker
    assert worker.started == 2 and worker.proc.pid != first.pid


def test_the_worker_waits_while_a_result_is_being_stored(link):
    """While the gate is held the worker removes nothing (each step waits,
    at most ``longest``); once the result is stored the batch goes on."""
    folder, make = link
    write_chain(folder, 3)
    gate = ResultGate(longest=30.0)
    if gate.share() < 0:
        pytest.skip("no memfd on this system")
    worker = make(gate=gate)
    assert worker.plan(set()) == (2, 3)
    taken = worker.take(10)
    answers = []
    with gate:
        remover = threading.Thread(
            target=lambda: answers.append(worker.remove([[e.commit] for e in taken])))
        remover.start()
        remover.join(1.0)
        assert remover.is_alive() and (folder / cid(1)).exists() and (folder / cid(2)).exists()
    remover.join(30)
    assert answers == [[None, None]]
    assert not (folder / cid(1)).exists() and not (folder / cid(2)).exists()


def test_the_verdict_follower_reads_appends_and_trims(tmp_path):
    path = str(tmp_path / tombstones.FILE_NAME)
    follower = VerdictFollower(path)
    assert follower.verdicts() == {}
    stones = TombstoneFile(path, limit=3)
    stones.append([Tombstone(cid(n), "passed", 1.0, float(n), None, "main") for n in (1, 2)])
    assert follower.verdicts() == {cid(1): "passed", cid(2): "passed"}
    with open(path, "ab") as handle:        # a line still being written
        handle.write(tombstones.format_line(
            Tombstone(cid(3), "failed", 1.0, 3.0, None, None)).encode())
    assert cid(3) not in follower.verdicts()
    with open(path, "ab") as handle:
        handle.write(b"\n")
    assert follower.verdicts()[cid(3)] == "failed"
    dropped = stones.append([Tombstone(cid(n), "error", 1.0, float(n), None, None)
                             for n in (4, 5)])
    assert dropped                           # trimmed: a new file
    assert set(follower.verdicts()) == set(TombstoneFile(path).load())


@pytest.mark.skipif(not hasattr(os, "fork") or os.geteuid() != 0,
                    reason="needs root, to read as another user a file that user does not own")
def test_a_header_is_read_when_the_system_refuses_no_atime_to_a_reader_not_its_owner():
    """O_NOATIME is only for a file's owner (or root): any other reader gets
    EPERM, and the header is then read as before.  Checked in a forked
    child that becomes ``nobody`` (the runner's ``ask_as``, so the parent's
    privileges stay), in a folder of its own that anyone may enter (a test
    folder may be root's alone)."""
    from ci import results
    from ci.runner.sandbox.access import ask_as
    folder = tempfile.mkdtemp(prefix="ci-noatime-")
    try:
        os.chmod(folder, 0o755)
        path = os.path.join(folder, cid(1))
        with open(path, "wb") as handle:
            handle.write(results.format_result({"verdict": "passed"}, b"ok\n"))
        os.chmod(path, 0o644)

        def read_as_nobody() -> str:
            try:                                   # the refusal is real here
                os.close(os.open(path, os.O_RDONLY | results.NOATIME))
                return "allowed"
            except PermissionError:
                return (results.read_header(path, keep_atime=True) or {}).get("verdict", "none")
        nobody = types.SimpleNamespace(name="nobody", uid=65534, gid=65534)
        said = ask_as(nobody, read_as_nobody)
        if said == "allowed":
            pytest.skip("this system lets a non-owner open with O_NOATIME")
        assert said == "passed"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_the_reaper_frees_the_trash_only_while_no_request_is_served(tmp_path):
    """Pruned files are moved, then freed one by one in a quiet moment: not
    while a request (a pass) goes on, and never a file that is not a
    result's.  What an earlier worker left is freed too."""
    trash = tmp_path / TRASH
    trash.mkdir()
    names = [cid(n) + suffix for n in range(1, 31) for suffix in ("", ".xml")]
    for name in names:
        (trash / name).write_bytes(b"x" * 2000)
    (trash / "notes.txt").write_text("not ours to free")
    reaper = Reaper(str(trash), GateView(-1), after=0.2)
    reaper.start()
    reaper.busy()                                  # a request is being served
    time.sleep(0.6)                                # (a negative check: nothing may happen)
    assert len(os.listdir(trash)) == len(names) + 1 and reaper.reaped == 0
    reaper.idle()
    wait_until(lambda: os.listdir(trash) == ["notes.txt"], 30, what="the trash freed")
    assert reaper.reaped == len(names)
    # A new prune after a quiet spell: freed once the worker is quiet again.
    (trash / cid(99)).write_bytes(b"y")
    reaper.busy()
    reaper.wake()
    reaper.idle()
    wait_until(lambda: not (trash / cid(99)).exists(), 30, what="the new file freed")


def test_the_reaper_rests_after_each_few_frees(tmp_path, monkeypatch):
    # A rest REAP_REST times as long as each REAP_SYNC unlinks and their
    # fsync took: its frees hold the disk a quarter of the time.
    trash = tmp_path / TRASH
    trash.mkdir()
    for n in range(1, 2 * reaper_module.REAP_SYNC + 2):
        (trash / cid(n)).write_bytes(b"x" * 1500)
    rests = []
    monkeypatch.setattr(reaper_module.time, "sleep", rests.append)
    reaper = Reaper(str(trash), GateView(-1))
    reaper.quiet_since = 0.0                     # no request being served
    assert reaper.reap() and not os.listdir(trash)
    # after the first REAP_SYNC frees and after the next (before the last)
    assert len(rests) == 2 and all(0 < rest <= REST_CAP for rest in rests)


def test_the_reaper_waits_while_a_result_is_being_stored(tmp_path):
    gate = ResultGate(longest=30.0)
    fd = gate.share()
    if fd < 0:
        pytest.skip("no memfd on this system")
    trash = tmp_path / TRASH
    trash.mkdir()
    (trash / cid(1)).write_bytes(b"x")
    reaper = Reaper(str(trash), GateView(fd, 30.0), after=0.05)
    with gate:
        reaper.start()
        reaper.idle()
        time.sleep(0.6)                            # (a negative check)
        assert (trash / cid(1)).exists()
    wait_until(lambda: not (trash / cid(1)).exists(), 30, what="freed after the result")


def test_a_trash_that_is_a_link_is_refused_and_nothing_moves(tmp_path):
    """``.pruned`` must be the dispatcher's own folder: a link put there
    (to send pruned files elsewhere) makes the batch fail, files in place."""
    folder = tmp_path / "results"
    folder.mkdir()
    write_chain(folder, 2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, folder / TRASH)
    worker = FileWorker(str(folder), GateView(-1), KeepPolicy(count=1), "none")
    [reply] = worker.remove([[cid(1) + ".xml", cid(1)]])
    assert reply.startswith("error cannot make") and "not a folder of this user" in reply
    assert (folder / cid(1)).exists() and os.listdir(elsewhere) == []


def test_on_a_full_disk_the_files_are_unlinked_at_once(tmp_path, monkeypatch):
    """A move may need a block for the trash's folder; a full disk (faked:
    a real one cannot be made here without a mount) must not stop pruning."""
    import errno
    folder = tmp_path / "results"
    folder.mkdir()
    write_chain(folder, 2)
    worker = FileWorker(str(folder), GateView(-1), KeepPolicy(count=1), "none")
    assert worker.plan(set()) == "planned 1 of 2"

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "rename", full)
    assert worker.remove([[cid(1) + ".xml", cid(1)]]) == ["ok"]
    assert not (folder / cid(1)).exists() and not (folder / (cid(1) + ".xml")).exists()
    assert os.listdir(folder / TRASH) == []
