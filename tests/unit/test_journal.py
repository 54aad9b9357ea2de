"""The dispatcher's journal (ci/dispatch/journal.py) when its disk fails:
a compaction that cannot write its new file leaves the old one in use."""

from __future__ import annotations

import os

import pytest

from ci.dispatch.journal import Journal

X, Y = "1" * 40, "2" * 40


def test_journal_keeps_working_after_a_failed_compaction(tmp_path):
    """A compaction that cannot write its new file must leave the old
    journal in use; before, its handle was closed first, so every later
    record failed (and the assignment thread died on the first one)."""
    folder = tmp_path / "state"
    folder.mkdir()
    journal = Journal(str(folder / "journal"))
    journal.rewrite([f"Q {X}"])
    away = tmp_path / "state.away"
    os.rename(folder, away)
    with pytest.raises(OSError):
        journal.rewrite([f"Q {X}", f"Q {Y}"])
    os.rename(away, folder)
    journal.append([f"Q {Y}"], sync=True)
    journal.close()
    assert Journal(str(folder / "journal")).replay().order == [X, Y]
