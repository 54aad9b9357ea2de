"""Giving a tree to a user and taking it back (``--test-user``), as root,
in a tree that user's left-over processes may still be changing: the one
place ownership changes are made (the environments, the working tree)."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import stat

from ci.files import create_fresh_at, remove_tree

log = logging.getLogger(__name__)

# ``chown_tree`` walks this deep at most and removes what lies deeper: no
# real tree or environment comes near it, and ``os.fwalk`` recurses (and
# holds a descriptor per level), so a test's folders nested a thousand
# deep raised RecursionError at every later checkout.
MAX_DEPTH = 200


@dataclasses.dataclass(frozen=True)
class Owner:
    """Whom ``chown_tree`` gives a tree to, and how: ``uid`` and ``gid``,
    the permission bits to ``strip``, and whether a hard link is replaced
    by a copy of its own (``copy_links``) rather than removed."""
    uid: int
    gid: int
    strip: int = 0
    copy_links: bool = False

    def give(self, fd: int, mode: int) -> None:
        os.fchown(fd, self.uid, self.gid)
        if self.strip:
            os.fchmod(fd, stat.S_IMODE(mode) & ~self.strip)

    def give_entry(self, name: str, folder: str, folder_fd: int) -> None:
        """One entry of ``chown_tree``'s walk, through a descriptor opened
        without following it: given, or (a hard link) removed or copied."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY,
                         dir_fd=folder_fd)
        except FileNotFoundError:
            return
        except OSError:
            # A symlink (ELOOP), or a socket that cannot be opened:
            # change the entry itself, never what it points to.
            try:
                os.chown(name, self.uid, self.gid, dir_fd=folder_fd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            return
        try:
            info = os.fstat(fd)
            if not stat.S_ISDIR(info.st_mode) and info.st_nlink > 1:
                if self.copy_links and stat.S_ISREG(info.st_mode):
                    _replace_with_copy(name, fd, folder_fd,
                                       lambda out: self.give(out, info.st_mode))
                    return
                log.warning("removing %s: a hard link, never given away",
                            os.path.join(folder, name))
                _remove(name, folder_fd, folder)
                return
            self.give(fd, info.st_mode)
        finally:
            os.close(fd)


def chown_tree(path: str, owner: Owner, skip: tuple[str, ...] = (),
               drop: tuple[str, ...] = ()) -> None:
    """Give a whole tree (an environment, a working tree) to ``owner``
    (symlinks themselves, never their targets), taking the ``strip``
    permission bits away; the top-level names in ``skip`` are left alone,
    the names in ``drop`` below the top level are removed.

    A file with more than one link is never given: the test user could
    have linked a file from outside the tree into it (one it can write, or
    any one where fs.protected_hardlinks is off), and giving the inode
    away would give that file away.  It is removed, or with ``copy_links``
    replaced by a copy of its own: installers link files from their cache
    (uv does by default), and a built environment must keep them.  Only
    for a tree given to the runner: the copy keeps the link's mode bits,
    so it is no more readable than the file it was linked to.

    The test user may own the tree and a process it left behind may still
    be changing it, so every change goes through a file descriptor opened
    without following symlinks (and every folder is entered through its
    parent's descriptor): a name swapped for a symlink after it was looked
    at must not lead a chmod, run as root, to the runner's key file.

    Folders deeper than MAX_DEPTH are removed, not walked."""
    top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        owner.give(top, os.fstat(top).st_mode)
    finally:
        os.close(top)
    top_depth = path.rstrip(os.sep).count(os.sep)
    for folder, dirs, files, folder_fd in os.fwalk(path, follow_symlinks=False):
        if folder.count(os.sep) - top_depth >= MAX_DEPTH:
            for name in dirs:
                log.warning("removing %s: folders nested deeper than %d",
                            os.path.join(folder, name)[:300] + "...", MAX_DEPTH)
                _remove(name, folder_fd, folder)
            dirs[:] = []
        if skip and folder == path:
            dirs[:] = [d for d in dirs if d not in skip]
            files = [f for f in files if f not in skip]
        elif drop:
            for name in drop:
                if name in dirs or name in files:
                    _remove(name, folder_fd, folder)
            dirs[:] = [d for d in dirs if d not in drop]
            files = [f for f in files if f not in drop]
        # Sub-folders are given away here, as entries of their parent,
        # before the walk enters them.
        for name in [*dirs, *files]:
            owner.give_entry(name, folder, folder_fd)


def _replace_with_copy(name: str, fd: int, folder_fd: int, give) -> None:
    """Put a file of its own, with the data of ``fd`` and given by
    ``give``, in the place of the hard link ``name``."""
    tmp = f".ci-copy-{os.getpid()}"
    out = create_fresh_at(folder_fd, tmp, 0o600)
    try:
        with open(fd, "rb", closefd=False) as source, open(out, "wb", closefd=False) as copy:
            shutil.copyfileobj(source, copy, 1 << 20)
        give(out)
        os.replace(tmp, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=folder_fd)
        except FileNotFoundError:
            pass
        raise
    finally:
        os.close(out)


def _remove(name: str, folder_fd: int, folder: str) -> None:
    """Remove an entry of a folder (a folder with its contents), never
    following a symlink."""
    try:
        if stat.S_ISDIR(os.stat(name, dir_fd=folder_fd, follow_symlinks=False).st_mode):
            remove_tree(name, folder_fd, folder)
        else:
            os.unlink(name, dir_fd=folder_fd)
    except FileNotFoundError:
        pass
