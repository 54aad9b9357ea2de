"""Spare files for the result path (ci/dispatch/spares.py): a result is
written into a file made ahead of time, so no inode is allocated while it
is stored; what a pool leaves and refuses."""

from __future__ import annotations

import os

import pytest

from ci.dispatch.spares import PREFIX, SUBFOLDER, SpareFiles
from ci.files import atomic_write
from ci.outcome import Outcome
from ci.results import TestRecord, parse_result
from ci.retention.gate import ResultGate
from support.cluster import wait_until

COMMIT = "a" * 40


@pytest.fixture
def pool(tmp_path):
    spares = SpareFiles(str(tmp_path), size=4)
    assert spares.start()
    yield spares
    spares.stop()


def spare_inodes(spares: SpareFiles) -> set[int]:
    with spares.cond:
        return {os.stat(p).st_ino for p in spares.ready}


def test_a_result_and_its_xml_are_written_into_spares_and_the_pool_fills_again(pool, tmp_path):
    assert pool.wait_full(10)
    ready = spare_inodes(pool)
    outcome = Outcome({"verdict": "passed", "tests": 1, "failures": 0, "errors": 0,
                       "skipped": 0, "runner": "r"}, b"ok\n", records=(TestRecord("t.T", "t"),))
    outcome.write(str(tmp_path), COMMIT, spares=pool)
    written = {os.stat(tmp_path / COMMIT).st_ino, os.stat(tmp_path / (COMMIT + ".xml")).st_ino}
    assert written <= ready                     # both files were spares
    assert parse_result((tmp_path / COMMIT).read_bytes())[0]["verdict"] == "passed"
    assert sorted(os.listdir(tmp_path)) == [SUBFOLDER, COMMIT, COMMIT + ".xml"]
    assert oct(os.stat(tmp_path / COMMIT).st_mode & 0o777) == oct(0o600)
    assert pool.wait_full(10) and pool.made >= 6
    assert not spare_inodes(pool) & written


def test_a_file_elsewhere_or_an_empty_pool_creates_its_file_as_before(tmp_path):
    spares = SpareFiles(str(tmp_path / "results"), size=4)
    os.makedirs(spares.parent)
    other = tmp_path / "other"
    other.mkdir()
    atomic_write(str(other / "f"), b"x", spares=spares)      # not the pool's folder
    atomic_write(os.path.join(spares.parent, "g"), b"y", spares=spares)   # not started: empty
    assert (other / "f").read_bytes() == b"x"
    assert sorted(os.listdir(spares.parent)) == ["g"]
    assert spares.made == 0


def test_a_start_clears_empty_leftovers_and_keeps_any_with_data(tmp_path):
    folder = tmp_path / SUBFOLDER
    folder.mkdir(mode=0o700)
    (folder / (PREFIX + "empty")).write_bytes(b"")
    # After a crash without a journal, a renamed spare's old name may remain
    # beside the result: it has data and must not be unlinked.
    (folder / (PREFIX + "written")).write_bytes(b"verdict: passed\n")
    spares = SpareFiles(str(tmp_path), size=2)
    try:
        assert spares.start()
        assert spares.wait_full(10)
        names = os.listdir(folder)
        assert PREFIX + "written" in names and PREFIX + "empty" not in names
    finally:
        spares.stop()
    # Stopping removes the spares it made; the folder stays while it holds data.
    assert os.listdir(folder) == [PREFIX + "written"]


def test_stop_removes_the_spares_and_the_folder(tmp_path):
    spares = SpareFiles(str(tmp_path), size=3)
    assert spares.start() and spares.wait_full(10)
    spares.stop()
    assert os.listdir(tmp_path) == []
    assert not spares.thread.is_alive()


def test_a_planted_link_is_refused_and_results_are_written_as_before(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    results = tmp_path / "results"
    results.mkdir()
    os.symlink(elsewhere, results / SUBFOLDER)
    spares = SpareFiles(str(results), size=2)
    assert not spares.start()
    atomic_write(str(results / COMMIT), b"verdict: passed\n", spares=spares)
    assert os.listdir(elsewhere) == []
    assert (results / COMMIT).read_bytes() == b"verdict: passed\n"


def test_the_refill_waits_while_a_result_is_being_stored(tmp_path):
    gate = ResultGate(longest=30)
    spares = SpareFiles(str(tmp_path), gate=gate, size=2)
    try:
        with gate:
            assert spares.start()
            wait_until(lambda: gate.waiting == 1, 10, what="the refill to wait at the gate")
            assert spares.made == 0 and not os.listdir(tmp_path / SUBFOLDER)
        assert spares.wait_full(10)
    finally:
        spares.stop()
