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


def test_a_cell_line_without_a_name_carries_labels_only():
    """A commit's only, unnamed cell (a recipe with labels and no matrix)
    is journalled with its labels; an unnamed cell with an interpreter or
    axes is damage (no dispatch makes one) and is skipped at replay, not
    handed to the job encoder, which refuses it."""
    from ci.dispatch.journal import parse_record
    labelled = parse_record(f"C {X} - gpu,linux")
    assert labelled is not None and labelled.value.name == "" \
        and labelled.value.labels == frozenset({"gpu", "linux"})
    assert parse_record(f"C {X} 3.11 -") is None
    assert parse_record(f"C {X}:py3.11 3.11 -").value.python == "3.11"
