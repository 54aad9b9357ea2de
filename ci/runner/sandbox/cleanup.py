"""The test user's sandbox (``--test-user``): nothing a run leaves behind
may reach the next one.

A hostile commit's test, run as the test user, could otherwise plant what
every later run of that user picks up: a ``.pth`` file in Python's user
site (``~/.local/lib/pythonX.Y/site-packages``, imported by every Python
the user starts), a ``~/.config/pip/pip.conf`` that redirects every later
setup's package index, files in ``/tmp`` that a later test reads, or a
process that escaped its process group (``setsid``, a double fork) and
keeps changing things while later commits run.  A user without a home
had ``HOME=/tmp``, which every homeless user on the machine shares, so
even another runner's tests were reached.

So, for each run (a job's setup and tests):

* the run gets a folder of its own in the runner's state folder (mode
  711, not listable: its random name cannot be guessed, and the test user
  cannot create anything there in advance), holding a private HOME, TMPDIR
  and XDG_RUNTIME_DIR (mode 700, the test user's); the XDG_* folders lie in
  that HOME, and variables naming other writable state (a shared pip or uv
  cache, a user base, a bytecode prefix) are dropped;
* after every command run as the test user, every process of that user is
  killed: a child switches to the user and calls ``kill(-1, SIGKILL)``,
  which reaches exactly the processes of that uid (the runner owns its
  test user: one test user per runner);
* after the run, and after that kill, the run's folder is removed, and so
  is everything the test user owns in the world-writable temporary folders
  (``SHARED_TMP``), walked without following symlinks, entering only the
  folders the user could enter.

A runner killed mid-run leaves its sandbox behind: ``recover`` at the next
start ends the user's processes and removes it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import signal
import stat
import time
from ci.config import ConfigError
from ci.files import ensure_dir, remove_quietly, remove_tree


log = logging.getLogger(__name__)

FOLDER = "sandbox"
# The world-writable folders a test can leave files in (those that exist).
SHARED_TMP = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")
# Variables naming writable state outside the sandbox: not passed on.
DROPPED_ENV = ("PIP_CACHE_DIR", "UV_CACHE_DIR", "PYTHONUSERBASE", "PYTHONPYCACHEPREFIX")
# How long the runner waits for the user's killed processes to be gone.
KILL_WAIT = 5.0
# Bounds of the temporary folders' walk: entries looked at, folder depth.
SWEEP_BUDGET = 200_000
MAX_DEPTH = 64


class UserSandbox:
    """The per-run folders of one test user, and the clean-up after runs."""

    def __init__(self, name: str, uid: int, gid: int, state_dir: str,
                 keep: tuple[str, ...] = ()):
        if uid == 0:
            raise ValueError("the test user must not be root")
        self.name, self.uid, self.gid = name, uid, gid
        self.folder = os.path.join(os.path.abspath(state_dir), FOLDER)
        # The clone is the test user's and may lie in /tmp: it is reset
        # by each checkout, never swept away.
        self.keep = keep
        self.current: str | None = None   # the running job's folder

    def describe(self) -> str:
        """For the runner's start-up line: what is done for each run."""
        shared = ", ".join(path for path in SHARED_TMP if os.path.isdir(path))
        return (f"private HOME and TMPDIR per run; after each run every process of "
                f"{self.name} is ended and its files in {shared} removed")

    # ---- once, at start ---------------------------------------------------
    def recover(self) -> None:
        """Make the sandboxes' folder (the runner's, mode 711) and clear
        what a runner killed mid-run left: processes, folders, files."""
        ensure_dir(self.folder, "sandbox folder")
        info = os.lstat(self.folder)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise ConfigError(f"sandbox folder {self.folder} must be a folder of "
                                      "the runner's user")
        os.chmod(self.folder, 0o711)
        self.end_processes()
        for name in os.listdir(self.folder):
            log.info("removing the sandbox %s a previous runner left", name)
            self._remove(os.path.join(self.folder, name))
        self.sweep()

    # ---- each run -----------------------------------------------------------
    def env(self, env: dict) -> dict:
        """``env`` with the run's private folders (made at the run's first
        command)."""
        if self.current is None:
            self.current = self._make()
        home = os.path.join(self.current, "home")
        tmp = os.path.join(self.current, "tmp")
        env = {k: v for k, v in env.items() if k not in DROPPED_ENV}
        env.update(HOME=home, TMPDIR=tmp, TMP=tmp, TEMP=tmp,
                   XDG_CONFIG_HOME=os.path.join(home, ".config"),
                   XDG_CACHE_HOME=os.path.join(home, ".cache"),
                   XDG_DATA_HOME=os.path.join(home, ".local", "share"),
                   XDG_STATE_HOME=os.path.join(home, ".local", "state"),
                   XDG_RUNTIME_DIR=os.path.join(self.current, "runtime"))
        return env

    def _make(self) -> str:
        """A fresh run folder: the runner's (711), with the user's own
        home, tmp and runtime folders (700)."""
        path = os.path.join(self.folder, secrets.token_hex(12))
        os.mkdir(path, 0o711)
        os.chmod(path, 0o711)
        for name in ("home", "tmp", "runtime"):
            inner = os.path.join(path, name)
            os.mkdir(inner, 0o700)
            os.chown(inner, self.uid, self.gid)
        return path

    def end(self) -> None:
        """After a run: end the user's processes, then remove the run's
        folder and the user's files in the shared temporary folders."""
        self.end_processes()
        if self.current is not None:
            self._remove(self.current)
            self.current = None
        self.sweep()

    def end_processes(self) -> None:
        try:
            left = end_processes(self.uid, self.gid)
        except OSError as exc:   # no fork: say so, the next run tries again
            log.error("cannot end the processes of test user %s: %s", self.name, exc)
            return
        if left:
            log.warning("processes of test user %s still alive after SIGKILL: %s",
                        self.name, " ".join(map(str, left[:20])))

    def sweep(self) -> None:
        removed = remove_owned(self.uid, self.gid, keep=self.keep)
        if removed:
            log.info("removed %d entr%s test user %s left in the temporary folders",
                     removed, "y" if removed == 1 else "ies", self.name)

    @staticmethod
    def _remove(path: str) -> None:
        remove_quietly(path, "sandbox")   # fd-based on Linux: never follows a symlink


# --------------------------------------------------------------------------
# Ending every process of a user.

def live_pids(uid: int) -> list[int]:
    """The processes (not zombies) whose real or saved uid is ``uid``:
    those ``kill(-1)`` sent as that user reaches (Linux /proc)."""
    found = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as handle:
                text = handle.read()
        except OSError:
            continue
        fields = dict(line.split(b":", 1) for line in text.splitlines() if b":" in line)
        try:
            state = fields[b"State"].split()[0]
            uids = [int(value) for value in fields[b"Uid"].split()]
        except (KeyError, IndexError, ValueError):
            continue
        if state not in (b"Z", b"X") and uid in (uids[0], uids[2]):
            found.append(int(name))
    return found


def signal_all(uid: int, gid: int) -> None:
    """SIGKILL every process of ``uid``, from a child that becomes that
    user: ``kill(-1)`` then reaches exactly that user's processes (and
    never the runner's, whatever else fails: the child kills nothing
    unless the switch succeeded)."""
    if uid == 0:
        raise ValueError("refusing to kill every process of root")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            if os.getresuid() == (uid, uid, uid):
                code = 0
                # A fork racing the first kill is caught by the next.
                for _ in range(3):
                    os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            code = 0   # none left
        finally:
            os._exit(code)
    os.waitpid(pid, 0)


def end_processes(uid: int, gid: int, wait: float = KILL_WAIT) -> list[int]:
    """Kill every process of ``uid`` until none is alive (bounded by
    ``wait`` seconds); the PIDs still alive then."""
    deadline = time.monotonic() + wait
    while True:
        signal_all(uid, gid)
        left = live_pids(uid)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.01)


# --------------------------------------------------------------------------
# Removing what a user left in the shared temporary folders.

@dataclasses.dataclass
class _Walk:
    """What one sweep needs at every level of its walk."""
    uid: int
    gid: int
    dev: int = 0
    keep: frozenset = frozenset()     # (dev, inode) of the folders kept whole
    through: frozenset = frozenset()  # (dev, inode) of the folders above them
    budget: int = SWEEP_BUDGET


def _identities(paths: tuple[str, ...]) -> tuple[frozenset, frozenset]:
    """(the paths, every folder above them) as (dev, inode) pairs."""
    keep, through = set(), set()
    for path in paths:
        path = os.path.realpath(path)
        try:
            info = os.stat(path)
        except OSError:
            continue
        keep.add((info.st_dev, info.st_ino))
        while path != os.path.dirname(path):
            path = os.path.dirname(path)
            info = os.stat(path)
            through.add((info.st_dev, info.st_ino))
    return frozenset(keep), frozenset(through)


def remove_owned(uid: int, gid: int, roots: tuple[str, ...] = SHARED_TMP,
                 keep: tuple[str, ...] = (), budget: int = SWEEP_BUDGET) -> int:
    """Remove every entry ``uid`` owns under ``roots`` (with its contents),
    except the folders ``keep`` (and the folders they lie in); the number
    removed.  Call it once the user's processes are gone: then nothing can
    be swapped under the walk but by another user, in a folder that user
    may write anyway.  At most ``budget`` entries are looked at; each
    folder's own entries come before any of its sub-folders', so what the
    user left at the top of a temporary folder goes even when others'
    trees there are too big to walk."""
    removed = 0
    walk = _Walk(uid, gid, budget=budget)
    walk.keep, walk.through = _identities(keep)
    for root in roots:
        try:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            walk.dev = os.fstat(fd).st_dev
            removed += _sweep(fd, root, walk, 0)
        finally:
            os.close(fd)
    if walk.budget <= 0:
        log.warning("the temporary folders hold over %d entries: not all were looked at",
                    SWEEP_BUDGET)
    return removed


SEARCH, WRITE = 0o1, 0o3   # as the "other" bits: x, and w with x


def _allows(info: os.stat_result, walk: _Walk, need: int) -> bool:
    """Whether the user may do ``need`` (``SEARCH``, ``WRITE``) in this
    folder, by its mode bits (the user runs without supplementary groups;
    ACLs are not read)."""
    shift = 6 if info.st_uid == walk.uid else 3 if info.st_gid == walk.gid else 0
    return (info.st_mode >> shift) & need == need


def _sweep(fd: int, path: str, walk: _Walk, depth: int) -> int:
    """Remove the user's entries in the open folder ``fd``, if the user
    could have made them (it may write there: an entry it was given where it
    cannot, such as a hard link git's local clone shares with its origin,
    stays); then enter, by descriptor and never through a symlink, the
    others' folders on the same file system that the user could enter, and
    the folders holding a kept one."""
    removed, inside = 0, []
    try:
        writable = _allows(os.fstat(fd), walk, WRITE)
        with os.scandir(fd) as entries:
            listed = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
    except OSError:
        return 0
    for name, listed_dir in listed:
        walk.budget -= 1
        if walk.budget <= 0:
            break
        if not writable and not listed_dir:
            continue   # not the user's doing, and nothing to enter: no stat
        try:
            info = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            continue
        identity = (info.st_dev, info.st_ino)
        if identity in walk.keep:
            continue
        is_dir = stat.S_ISDIR(info.st_mode)
        if info.st_uid == walk.uid and writable and identity not in walk.through:
            removed += _remove_entry(name, fd, path, info)
        elif is_dir and info.st_dev == walk.dev and depth < MAX_DEPTH and (
                identity in walk.through or _allows(info, walk, SEARCH)):
            inside.append((name, info))
    for name, info in inside:      # after this folder's own entries
        if walk.budget <= 0:
            break
        removed += _enter(name, fd, path, info, walk, depth)
    return removed


def _enter(name: str, fd: int, path: str, info: os.stat_result, walk: _Walk,
           depth: int) -> int:
    """Sweep the sub-folder ``name`` of ``fd``, if it is still the folder
    that was looked at."""
    try:
        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
    except OSError:
        return 0
    try:
        if not os.path.samestat(os.fstat(sub), info):
            return 0
        return _sweep(sub, os.path.join(path, name), walk, depth + 1)
    finally:
        os.close(sub)


def _remove_entry(name: str, fd: int, path: str, info: os.stat_result) -> int:
    """Remove one entry of the open folder ``fd`` (a folder with all it
    holds); 1 if it went."""
    try:
        if stat.S_ISDIR(info.st_mode):
            remove_tree(name, fd, path)
        else:
            os.unlink(name, dir_fd=fd)
        log.debug("removed %s", os.path.join(path, name))
        return 1
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("cannot remove %s: %s", os.path.join(path, name), exc)
        return 0
