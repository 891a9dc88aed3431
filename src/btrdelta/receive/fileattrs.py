"""``receive --fileattr``: the ``chattr`` flags of the subvolume being received.

The flags are set when the subvolume is finished (:func:`set_all`), so that an immutable
or append-only flag cannot block the stream's own later commands. A FILEATTR record comes
only for an inode whose flags changed, so an incremental receive starts from the parent's
(:func:`from_parent`): a btrfs snapshot has them, and its immutable and append-only inodes
would refuse the stream's writes, renames and unlinks (EPERM); a copy (the directory
backend, ``cp -a``) has none. Those two flags are cleared in the new subvolume before the
first record and set back at the end, with the flags a copy lacks; a FILEATTR record of the
same inode, queued later, has the last word.
"""

from __future__ import annotations

import os
import stat

from .. import TYPE_CHECKING
from ..fs import btrfs
from ..fs.btrfs import FS_FLAGS_KNOWN

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

__all__ = ["from_parent", "set_all"]

#: FS_IMMUTABLE_FL | FS_APPEND_FL: what refuses the stream's changes to an inode
_BLOCKING = 0x10 | 0x20
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _flags(path: bytes, dir_fd: int | None = None) -> tuple[int, int]:
    """An open descriptor of ``path`` (a directory or regular file) and its known flags."""
    fd = os.open(path, _OPEN, dir_fd=dir_fd)
    try:
        return fd, btrfs.get_fsflags(fd) & FS_FLAGS_KNOWN
    except OSError:
        os.close(fd)
        raise


def from_parent(parent: Path, root_fd: int, copied: bool) -> list[tuple[int, int, bytes]]:
    """(descriptor in the new subvolume, flags, path) of each of ``parent``'s inodes that
    have flags to set back at the end: every one with flags after a copy (``copied``), the
    immutable and append-only ones after a snapshot; those two flags are cleared now.
    The new subvolume, whose root is ``root_fd``, holds nothing of the stream yet."""
    out: list[tuple[int, int, bytes]] = []
    top = os.fsencode(parent)
    stack = [b""]
    while stack:
        rel = stack.pop()
        try:
            pfd, flags = _flags(os.path.join(top, rel))
        except OSError:
            continue  # (no flags on this filesystem, or not readable: nothing to keep)
        try:
            if stat.S_ISDIR(os.fstat(pfd).st_mode):
                with os.scandir(pfd) as it:
                    stack += [os.path.join(rel, os.fsencode(e.name)) for e in it
                              if e.is_dir(follow_symlinks=False)
                              or e.is_file(follow_symlinks=False)]
        finally:
            os.close(pfd)
        if not flags or not (copied or flags & _BLOCKING):
            continue
        try:
            fd, now = _flags(rel or b".", dir_fd=root_fd)
        except OSError:
            continue  # (a nested subvolume: not in the snapshot)
        try:
            if now & _BLOCKING:
                btrfs.set_fsflags(fd, btrfs.get_fsflags(fd) & ~_BLOCKING)
        except OSError:
            os.close(fd)
            raise
        out.append((fd, flags, rel))
    return out


def set_all(pending: list[tuple[int, int, bytes]], warn: Callable[[str], None]) -> None:
    """Set each (descriptor, flags, path) of ``pending`` in order (a later entry of the same
    inode wins) and close the descriptors; a filesystem that refuses is warned about once,
    naming the first file."""
    warned = False
    for fd, flags, path in pending:
        try:
            old = btrfs.get_fsflags(fd)
            btrfs.set_fsflags(fd, (old & ~FS_FLAGS_KNOWN) | flags)
        except OSError as exc:
            if not warned:
                warned = True
                warn(f"cannot set file attributes {flags:#x} of "
                     f"{path.decode('utf-8', 'backslashreplace')!r}: {exc.strerror}")
        finally:
            os.close(fd)
    pending.clear()
