"""procgroup.Child, the one start / wait / kill / reap of a child group
(the runner's slot, the observer's fetch and the notify command use it),
with real processes; and CommandTarget's abort through it."""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import pytest

from support.cluster import PY, ROOT, wait_until

from support.notify import chain

from ci import procgroup
from ci.notify.decider import NOTIFY_ON, Decider
from ci.notify.events import build_event
from ci.notify.targets import CommandTarget, DeliveryError


def an_event(verdict: str) -> dict:
    (decision,) = Decider(NOTIFY_ON["all"]).add(chain([verdict]))
    return build_event(decision, "/r", None, ["command"])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not alive for our purpose.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


@pytest.fixture
def helper_pids():
    """PIDs of helpers a test's command leaves behind, killed at the end."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_with_helper(child: procgroup.Child, tmp_path, helper_pids) -> tuple:
    """A leader that starts a ``sleep`` in its group and exits at once."""
    pidfile = tmp_path / f"helper-{len(helper_pids)}.pid"
    proc = child.start(["bash", "-c", f"sleep 60 & echo $! > {pidfile}"],
                       stdin=open(os.devnull), stdout=open(os.devnull, "wb"))
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10,
               what="the helper's pid")
    helper = int(pidfile.read_text())
    helper_pids.append(helper)
    return proc, helper


def test_finish_ends_the_whole_group_only_when_asked(tmp_path, helper_pids):
    child = procgroup.Child()
    proc, helper = start_with_helper(child, tmp_path, helper_pids)
    assert child.finish(proc, 10, end_group=False)
    assert proc.returncode == 0 and alive(helper)
    proc, helper = start_with_helper(child, tmp_path, helper_pids)
    assert child.finish(proc, 10)
    wait_until(lambda: not alive(helper), 10, what="the helper killed with its group")


def test_a_timed_out_command_is_killed_and_forgotten_before_it_is_reaped(monkeypatch):
    child = procgroup.Child()
    proc = child.start([PY, "-c", "import time; time.sleep(60)"])
    seen = []
    # on_end runs under the lock, after the group is forgotten: the leader
    # must not be reaped yet (its PID could be someone else's after).
    assert not child.finish(proc, 0.2, end_group=False,
                            on_end=lambda: seen.append(proc.returncode))
    assert seen == [None]
    assert proc.returncode == -signal.SIGKILL
    killed = []
    monkeypatch.setattr(procgroup, "kill_group", killed.append)
    child.kill()
    child.cancel()
    assert killed == []   # nothing held: no signal to a reaped PID


# A parent that starts a watched command and is SIGKILLed inside on_start,
# where a runner tells its watchdog the new group: the command must not
# have run, nor run later, since nobody would end it.
DIES_IN_ON_START = """
import os, signal, sys
from ci import procgroup
def started(proc):
    with open(sys.argv[2], "w") as handle:
        handle.write(str(proc.pid))
    os.kill(os.getpid(), signal.SIGKILL)
procgroup.Child().start(["touch", sys.argv[1]], on_start=started)
"""


def test_a_command_whose_parent_dies_before_on_start_returned_never_runs(tmp_path):
    marker, held = tmp_path / "ran", tmp_path / "held.pid"
    parent = subprocess.run([PY, "-c", DIES_IN_ON_START, str(marker), str(held)], cwd=ROOT,
                            timeout=30)
    assert parent.returncode == -signal.SIGKILL
    pid = int(held.read_text())
    wait_until(lambda: not alive(pid), 10, what="the held command's shell to end")
    assert not marker.exists()


def test_on_start_runs_before_the_command_and_then_it_runs(tmp_path):
    marker = tmp_path / "ran"
    seen = []
    child = procgroup.Child()
    proc = child.start(["touch", str(marker)], on_start=lambda proc: seen.append(marker.exists()))
    assert child.finish(proc, 10) and proc.returncode == 0
    assert seen == [False] and marker.exists()


def test_a_held_command_that_cannot_be_run_raises_as_popen_would(tmp_path):
    child = procgroup.Child()
    with pytest.raises(FileNotFoundError):
        child.start(["no-such-program-here"], on_start=lambda proc: None)
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\nexit 3\n")
    with pytest.raises(PermissionError):
        child.start(["./run.sh"], on_start=lambda proc: None, cwd=tmp_path)
    script.chmod(0o755)
    proc = child.start(["./run.sh"], on_start=lambda proc: None, cwd=tmp_path)
    assert child.finish(proc, 10) and proc.returncode == 3


def test_a_command_whose_on_start_fails_never_runs_and_is_reaped(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    child = procgroup.Child()

    def fails(proc):
        raise RuntimeError("no watchdog")
    with pytest.raises(RuntimeError):
        child.start(["touch", str(marker)], on_start=fails)
    assert not marker.exists()
    killed = []
    monkeypatch.setattr(procgroup, "kill_group", killed.append)
    child.kill()     # nothing held any more: no signal to a reaped PID
    assert killed == []


def test_a_pidfile_written_before_a_reboot_kills_nothing(tmp_path, helper_pids):
    """After a reboot the recorded group's number may be another
    program's; in this boot the group a killed runner left is killed."""
    from ci.runner.slot import ProcessSlot
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    helper_pids.append(sleeper.pid)
    pidfile = tmp_path / "running.pid"
    started = procgroup.start_time(sleeper.pid)
    pidfile.write_text(f"{sleeper.pid} {started} 00000000-another-boot\n")
    ProcessSlot(str(pidfile)).reap_leftovers()
    assert sleeper.poll() is None and not pidfile.exists()
    pidfile.write_text(f"{sleeper.pid} {started} {procgroup.boot_id()}\n")
    ProcessSlot(str(pidfile)).reap_leftovers()
    assert sleeper.wait(10) == -signal.SIGKILL and not pidfile.exists()


def test_cancel_stops_later_starts_and_kill_does_not():
    child = procgroup.Child()
    proc = child.start([PY, "-c", "import time; time.sleep(60)"])
    child.kill()
    child.finish(proc, 10)
    assert proc.returncode == -signal.SIGKILL
    again = child.start([PY, "-c", "pass"])
    assert again is not None and child.finish(again, 10) and again.returncode == 0
    running = child.start([PY, "-c", "import time; time.sleep(60)"])
    child.cancel()
    child.finish(running, 10)
    assert running.returncode == -signal.SIGKILL
    assert child.cancelled and child.start([PY, "-c", "pass"]) is None


def test_abort_ends_a_notify_command_and_the_next_one_still_runs(tmp_path):
    started = tmp_path / "started"
    hanging = CommandTarget([PY, "-c", f"import time; open({str(started)!r}, 'w').close(); "
                                       "time.sleep(60)"], 30)
    errors = []

    def deliver():
        try:
            hanging.deliver(an_event("failed"))
        except DeliveryError as exc:
            errors.append(str(exc))
    thread = threading.Thread(target=deliver)
    thread.start()
    try:
        wait_until(started.exists, 10, what="the command to start")
        hanging.abort()
        thread.join(10)
        assert not thread.is_alive()
        assert errors == [f"exited {-signal.SIGKILL}"]
    finally:
        hanging.abort()
        thread.join(10)
    echo = tmp_path / "echo"
    hanging.argv = [PY, "-c", f"import sys; open({str(echo)!r}, 'w').write(sys.stdin.read())"]
    event = an_event("failed")
    hanging.deliver(event)
    assert echo.read_text() == event["header"]
