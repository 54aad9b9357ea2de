"""The result index (ci/retention/index.py): its lines, the dispatcher's
line for every result it stores, and the pruner's worker planning from it
without reading the headers it describes, but never trusting a line its
file no longer matches."""

from __future__ import annotations

import json
import os

import pytest

from ci.dispatch.journal import Journal
from ci.dispatch.work import Meta
from ci.dispatch.state import DispatcherState
from ci.outcome import Outcome
from ci.results import TestRecord
from ci.retention import index
from ci.retention import worker as worker_module
from ci.retention.gate import GateView
from ci.retention.policy import Entry, KeepPolicy
from ci.retention.worker import FileWorker

A = ("127.0.0.1", 9001)


def cid(n: int) -> str:
    return f"{n:040x}"


def test_a_line_reads_back_and_a_bad_one_is_skipped():
    entry = Entry(cid(2), "main", cid(1), "failed", 1234.5, ("py3.11", "py3.12"))
    line = index.format_line((10, 20, 30), entry)
    assert line.endswith("\n") and "\n" not in line[:-1]
    assert index.parse_line(line.encode()) == ((10, 20, 30), entry)
    good = json.loads(line)
    for bad in (b"", b"{", b"[]", line[:-5].encode(), b"x" * (index.MAX_LINE + 1),
                json.dumps(["nope", *good[1:]]).encode(),
                json.dumps([good[0], [1, 2], *good[2:]]).encode(),
                json.dumps([*good[:3], "../../etc", *good[4:]]).encode(),
                json.dumps([*good[:4], "", *good[5:]]).encode(),
                json.dumps([*good[:5], "soon", good[6]]).encode(),
                json.dumps([*good[:6], [1]]).encode(),
                json.dumps([*good[:6], "py3.11"]).encode(),
                json.dumps([*good[:5], True, good[6]]).encode()):
        assert index.parse_line(bad) is None, bad


def test_a_labelled_commits_line_keeps_its_labels_and_an_older_line_has_none():
    labelled = Entry(cid(3), "main", None, "passed", 5.0, (), "gpu big")
    line = index.format_line((1, 2, 3), labelled)
    assert index.parse_line(line.encode()) == ((1, 2, 3), labelled)
    # A line of an earlier version (no labels field) reads as none.
    older = json.loads(index.format_line((1, 2, 3), Entry(cid(3), "main", None, "passed", 5.0)))
    assert len(older) == 7
    assert index.parse_line(json.dumps(older).encode())[1].labels == ""
    assert index.parse_line(json.dumps([*older, 7]).encode()) is None
    assert worker_module.decode_entry(worker_module.encode_entry(labelled).encode()) == labelled


def test_load_takes_each_commits_last_line_and_counts_them_all(tmp_path):
    path = str(tmp_path / index.FILE_NAME)
    assert index.load(path) == ({}, 0)
    old = Entry(cid(1), "main", None, "passed", 1.0)
    new = Entry(cid(1), "main", None, "failed", 2.0)
    other = Entry(cid(2), "dev", cid(1), "passed", 3.0)
    index.append(path, (1, 1, 1), old)
    index.append(path, (2, 2, 2), other)
    index.append(path, (3, 3, 3), new)
    with open(path, "ab") as handle:
        handle.write(b'["torn')                         # a crash in mid-write
    found, lines = index.load(path)
    assert found == {cid(1): ((3, 3, 3), new), cid(2): ((2, 2, 2), other)}
    assert lines == 4


def test_the_dispatcher_adds_a_line_for_every_result_it_stores(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    state = DispatcherState(str(results), Journal(str(tmp_path / "journal")), 3)
    state.result_index = str(tmp_path / index.FILE_NAME)
    state.recover(0.0)
    state.register(A, "ia", None)
    state.enqueue([cid(7)], {cid(7): Meta("main", cid(6))})
    job = state.next_assignment()
    header = {"verdict": "failed", "tests": 1, "failures": 1, "errors": 0, "skipped": 0}
    assert state.record_result(job.commit, job.token, None,
                               Outcome(header, b"out\n", [TestRecord("t", "test_one")]))
    found, lines = index.load(state.result_index)
    stamp, entry = found[cid(7)]
    assert lines == 1 and stamp == index.stamp_of(os.stat(results / cid(7)))
    assert entry == Entry(cid(7), "main", cid(6), "failed",
                          os.stat(results / cid(7)).st_mtime, ())


def write_chain(folder, count: int) -> None:
    previous = None
    for n in range(1, count + 1):
        header = {"verdict": "passed", "tests": 1, "failures": 0, "errors": 0, "skipped": 0,
                  "branch": "main"}
        if previous:
            header["previous"] = previous
        Outcome(header, b"out\n").write(str(folder), cid(n))
        os.utime(folder / cid(n), (1000.0 + n,) * 2)
        previous = cid(n)


def index_folder(folder, path: str) -> None:
    """The lines the dispatcher would have written for these files."""
    for name in sorted(os.listdir(folder)):
        if len(name) == 40:
            st = os.stat(folder / name)
            n = int(name, 16)
            index.append(path, index.stamp_of(st),
                         Entry(name, "main", cid(n - 1) if n > 1 else None, "passed",
                               st.st_mtime))


def counting_reads(monkeypatch) -> list:
    reads = []
    real = worker_module.results.read_header

    def read_header(path, *args, **kwargs):
        reads.append(os.path.basename(path))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(worker_module.results, "read_header", read_header)
    return reads


@pytest.fixture
def indexed(tmp_path):
    """A folder of 20 results on one branch and the index the dispatcher
    would have written for them: (folder, index path)."""
    folder = tmp_path / "results"
    folder.mkdir()
    write_chain(folder, 20)
    path = str(tmp_path / index.FILE_NAME)
    index_folder(folder, path)
    return folder, path


def test_a_new_worker_plans_from_the_index_without_reading_headers(indexed, monkeypatch):
    folder, path = indexed
    reads = counting_reads(monkeypatch)
    with_index = FileWorker(str(folder), GateView(-1), KeepPolicy(count=1), "none", index=path)
    assert with_index.plan(set()) == "planned 19 of 20"
    assert reads == []
    without = FileWorker(str(folder), GateView(-1), KeepPolicy(count=1), "none")
    assert without.plan(set()) == "planned 19 of 20" and len(reads) == 20


def test_a_line_its_file_no_longer_matches_is_not_trusted(indexed, monkeypatch):
    # Commit 20 was retested after its line was written (another file now,
    # failed), and commit 21's line is missing: both headers are read; the
    # failure of the newest is what the plan judges by (it broke the
    # branch: kept).
    folder, path = indexed
    Outcome({"verdict": "failed", "branch": "main", "previous": cid(19)},
            b"out\n").write(str(folder), cid(20))
    os.utime(folder / cid(20), (2000.0,) * 2)
    Outcome({"verdict": "passed", "branch": "main", "previous": cid(20)},
            b"out\n").write(str(folder), cid(21))
    os.utime(folder / cid(21), (2001.0,) * 2)
    reads = counting_reads(monkeypatch)
    worker = FileWorker(str(folder), GateView(-1), KeepPolicy(count=1), "none", index=path)
    assert worker.plan(set()) == "planned 19 of 21"
    assert sorted(reads) == [cid(20), cid(21)]
    assert cid(20) not in {e.commit for e in worker.doomed}       # it broke the branch
    assert worker.headers[cid(20)][1].verdict == "failed"


def test_the_worker_rewrites_an_index_of_pruned_files(indexed):
    folder, path = indexed
    worker = FileWorker(str(folder), GateView(-1), KeepPolicy(count=1), "none", index=path)
    worker.plan(set())
    assert index.load(path)[1] == 20                  # nothing to rewrite yet
    taken = worker.take(100)
    assert worker.remove([[e.commit + ".xml", e.commit] for e in taken]) == ["ok"] * 19
    worker.plan(set())                                # 20 lines, 1 file left
    found, lines = index.load(path)
    assert lines == 1 and list(found) == [cid(20)]
    assert found[cid(20)][0] == index.stamp_of(os.stat(folder / cid(20)))
