"""The observer's clone is fetched from two threads: the poll's fetch of
every branch (update_repo.sh) and the land queue's ``fresh_head`` (an ask
on the listener's thread reads the branch and the target as the upstream
has them now).  Two fetches updating the same remote-tracking ref at once
make one of them fail ("cannot lock ref ... is at X but expected Y"): a
person's ``land`` was refused with "git failed" whenever it met a poll
after the target moved.  They take turns (ci/observer/fetchlock.py)."""

from __future__ import annotations

import subprocess
import threading

import pytest

from support.cluster import git

from ci.landing.ports import QueueGit
from ci.observer.poller import Observer, Watch
from ci.observer.state import ObserverState
from ci.security import Security

ROUNDS = 15


def test_an_ask_and_a_poll_fetching_at_once_both_succeed(tmp_path, upstream):
    bare = str(tmp_path / "upstream.git")
    subprocess.run(["git", "clone", "-q", "--bare", upstream.path, bare], check=True)
    work, clone = str(tmp_path / "work"), str(tmp_path / "clone")
    for path in (work, clone):
        subprocess.run(["git", "clone", "-q", bare, path], check=True)
    observer = Observer(Watch(clone, ["main"], 0.2), ("127.0.0.1", 9),
                        ObserverState(str(tmp_path / "state.json")), Security())
    queue_git = QueueGit(clone, None)
    errors: list[Exception] = []
    for n in range(ROUNDS):
        # main moves, so both fetches update refs/remotes/origin/main.
        git(work, "commit", "-q", "--allow-empty", "-m", f"move {n}")
        git(work, "push", "-q", "origin", "HEAD:main")
        head = git(work, "rev-parse", "HEAD")
        start = threading.Barrier(2)
        polled: dict = {}

        def poll():
            start.wait()
            try:
                polled.update(observer._update())
            except Exception as exc:   # noqa: BLE001 -- collected, asserted below
                errors.append(exc)
        thread = threading.Thread(target=poll)
        thread.start()
        start.wait()
        try:
            assert queue_git.fresh_head("main") == head
        except Exception as exc:       # noqa: BLE001
            errors.append(exc)
        thread.join(30)
        assert polled.get("main") == head or errors
    assert not errors, errors[:3]


def test_a_listing_longer_than_read_is_an_error_never_a_cut(tmp_path, upstream, monkeypatch):
    """Cut at 2 MiB, a listing of 20,000 long branch names lost "main"
    (which sorts after them) and the half line at the cut became a branch."""
    from ci.git import GitError
    from ci.observer import poller
    clone = str(tmp_path / "clone")
    subprocess.run(["git", "clone", "-q", upstream.path, clone], check=True)
    observer = Observer(Watch(clone, ["main"], 0.2), ("127.0.0.1", 9),
                        ObserverState(str(tmp_path / "state.json")), Security())
    assert "main" in observer._update()
    monkeypatch.setattr(poller, "MAX_LISTING", 30)
    with pytest.raises(GitError, match="more than 30 bytes of branches"):
        observer._update()
