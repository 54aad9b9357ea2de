"""The dispatcher's journal (ci/dispatch/journal.py) when its disk fails:
a compaction that cannot write its new file leaves the old one in use; the
append-only files a power loss must not take away."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

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


CREATE_BOTH = """import sys
from ci.appendlog import AppendLog
from ci.retention.tombstones import Tombstone, TombstoneFile
log = AppendLog(sys.argv[1] + "/journal")
log.open()
log.close()
TombstoneFile(sys.argv[1] + "/pruned").append([Tombstone("1" * 40, "passed", 1, 2, None, None)])
"""


def folder_fsyncs(tmp_path, folder) -> int:
    """How many times a process running CREATE_BOTH fsyncs ``folder``, seen
    by strace (the system calls really made)."""
    trace = tmp_path / "trace"
    proc = subprocess.run(["strace", "-qq", "-o", str(trace), "-e", "trace=openat,fsync,close",
                           sys.executable, "-c", CREATE_BOTH, str(folder)],
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                          capture_output=True, timeout=60)
    if proc.returncode and b"ptrace" in proc.stderr:
        pytest.skip("strace may not trace here")
    assert proc.returncode == 0, proc.stderr
    opened, count = set(), 0
    for line in trace.read_text().splitlines():
        if m := re.match(rf'openat\(AT_FDCWD, "{re.escape(str(folder))}", .*\) = (\d+)$', line):
            opened.add(m[1])
        elif (m := re.match(r"fsync\((\d+)\)", line)) and m[1] in opened:
            count += 1
        elif m := re.match(r"close\((\d+)\)", line):
            opened.discard(m[1])
    return count


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_an_append_only_file_is_fsynced_into_its_folder_when_created(tmp_path):
    """The journal (AppendLog.open) and the tombstone file were created by
    an append that fsynced the file only: a power loss could take the new
    file, and every record fsynced in it, with its folder entry.  Once
    each, when created; never for a file already there."""
    folder = tmp_path / "state"
    folder.mkdir()
    assert folder_fsyncs(tmp_path, folder) == 2
    assert folder_fsyncs(tmp_path, folder) == 0


APPEND_PAST_A_LIMIT = """import resource, signal, sys
from ci.appendlog import AppendLog
from ci.files import whole_lines
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
log = AppendLog(sys.argv[1])
log.open()
log.append(b"first\\n", 1, sync=True)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (100, hard))    # as a disk that is full
try:
    log.append(b"x" * 200 + b"\\n", 1, sync=True)
except OSError as exc:
    print("refused:", exc.strerror)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))   # room again
log.append(b"third\\n", 1, sync=True)
log.close()
print(whole_lines(open(sys.argv[1], "rb").read()))
"""


def test_an_append_that_fails_part_way_is_cut_back_and_the_next_one_survives(tmp_path):
    """A write past the room there is (here a file size limit, in a child
    process) puts part of a record on disk: it is cut back off, so the next
    record starts on a line of its own; glued to the part, it was lost at
    the next read.  Nothing buffered is written late either."""
    proc = subprocess.run([sys.executable, "-c", APPEND_PAST_A_LIMIT, str(tmp_path / "log")],
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    refused, lines = proc.stdout.splitlines()
    assert refused.startswith("refused: ")
    assert lines == "[b'first', b'third']"
