"""Files written so a crash never leaves half of one (atomic replace,
fsync of the folder, append-only files whose torn last line is never
read), and files a tested commit holds read without following them out of
the clone."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile

from ci.config import ConfigError

log = logging.getLogger(__name__)


def atomic_write(path: str, data: bytes, fsync: bool = True, spares=None) -> os.stat_result:
    """Write a file so that readers see either nothing or all of it.
    ``spares`` (ci/dispatch/spares.py): a pool of files made ahead of time
    in a subfolder of the file's folder, taken instead of creating one.
    Returns the written file's stat, taken before it was renamed into
    place (so it is this write's, whatever replaces the file later)."""
    folder = os.path.dirname(path) or "."
    opened = spares.open(folder) if spares is not None else None
    fd, tmp = opened or tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
            written = os.fstat(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if fsync:
        fsync_dir(folder)
    return written


def own_subfolder(path: str) -> None:
    """Make ``path`` (mode 700) unless it is there; OSError unless it is
    then a real folder (not a link) of this user: what the dispatcher
    keeps beside its results (spare files, pruned files) is its own."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise OSError(f"{path} is not a folder of this user")


def fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def whole_lines(data: bytes) -> list[bytes]:
    """The lines of an append-only file that were written to their end.
    What follows the last newline is a record a crash cut short, and a
    prefix of a record can parse as another record (``main-untrusted`` cut
    to ``main``), so it is never read, however well it parses."""
    return data.split(b"\n")[:-1]


def open_append(path: str):
    """``path`` opened (binary) to append lines to.  A torn last line is
    cut off first: the next record would be glued to it and lost with it
    at the next read.  A file this creates is fsynced into its folder, or
    a power loss could take the file with every record fsynced in it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o666)
        created = True
    except FileExistsError:
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
        created = False
    try:
        if created:
            fsync_dir(os.path.dirname(path) or ".")
        else:
            _cut_torn_tail(fd, path)
        return os.fdopen(fd, "ab")
    except BaseException:
        os.close(fd)
        raise


def _cut_torn_tail(fd: int, path: str) -> None:
    """Truncate the open file after its last newline (durably: records
    appended next must not land after a tail that comes back)."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    keep, end = 0, size
    while end > 0:      # backwards in blocks: the file may be long
        start = max(0, end - (1 << 16))
        at = os.pread(fd, end - start, start).rfind(b"\n")
        if at >= 0:
            keep = start + at + 1
            break
        end = start
    os.ftruncate(fd, keep)
    os.fsync(fd)
    log.warning("%s: a torn last line (%d bytes) cut off", path, size - keep)


def open_inside(path: str, inside: str) -> int:
    """A read-only descriptor of a regular file that lies, symlinks
    resolved, under the folder ``inside``.  For files a tested commit
    wrote or committed: a symlink to a secret or to /dev/zero, or a FIFO
    that never ends, raises OSError instead of being opened."""
    folder = os.path.realpath(inside)
    real = os.path.realpath(path)
    if os.path.commonpath([real, folder]) != folder:
        raise OSError(f"{path} leads outside {inside}")
    fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return fd


def read_inside(path: str, inside: str, limit: int) -> bytes:
    """At most ``limit`` bytes of a file ``open_inside`` opens."""
    fd = open_inside(path, inside)
    try:
        chunks, left = [], limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def ensure_dir(path: str, what: str) -> str:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {what} {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"{what} {path} is not writable")
    return path


def create_fresh_at(folder_fd: int, name: str, mode: int) -> int:
    """A new file ``name`` in the open folder ``folder_fd``, opened for
    writing: a stale one (this process's name, left by a crash) is removed
    first, and nothing is followed (a symlink planted there fails the
    open).  For writing a file into a folder another user may change,
    then renaming it into place."""
    try:
        os.unlink(name, dir_fd=folder_fd)
    except FileNotFoundError:
        pass
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode,
                   dir_fd=folder_fd)


def remove_tree(name: str, dir_fd: int | None = None, path: str | None = None) -> None:
    """Remove the folder ``name`` (of the open folder ``dir_fd``, whose path
    is ``path``) with all it holds, never following a symlink, at any depth.

    ``shutil.rmtree`` is fd-based (on Linux) but recursive: a test's
    folders nested a thousand deep raised RecursionError, which no cleanup
    caught, and left them for every later run.  Then GNU ``rm``, which
    walks any depth, is given the folder through ``/proc/self/fd`` (Linux,
    as the sandbox is).  FileNotFoundError for a folder already gone."""
    try:
        if dir_fd is None:
            shutil.rmtree(name)
        elif sys.version_info >= (3, 11):
            shutil.rmtree(name, dir_fd=dir_fd)
        else:   # still fd-based inside: never follows a symlink
            shutil.rmtree(os.path.join(path, name))
    except RecursionError:
        target = name if dir_fd is None else f"/proc/self/fd/{dir_fd}/{name}"
        proc = subprocess.run(["rm", "-rf", "--", target], stdin=subprocess.DEVNULL,
                              capture_output=True, pass_fds=() if dir_fd is None else (dir_fd,),
                              timeout=3600)
        if proc.returncode:
            raise OSError(f"rm -rf failed: {proc.stderr.decode(errors='replace')[-500:]}") \
                from None


def remove_quietly(path: str, what: str = "") -> None:
    """``remove_tree`` for a folder of our own that a test may have filled
    (at any depth): what cannot be removed is left to the next start
    (with ``what``, logged as a warning, "cannot remove <what> <path>")."""
    try:
        remove_tree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if what:
            log.warning("cannot remove %s %s: %s", what, path, exc)
