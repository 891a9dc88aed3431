"""``receive --fileattr``: the ``chattr`` flags of the subvolume being received.

The flags are set when the subvolume is finished (:func:`set_all`), so that an immutable
or append-only flag cannot block the stream's own later commands. A FILEATTR record comes
only for an inode whose flags changed, so an incremental receive starts from the parent's
(:func:`from_parent`): a btrfs snapshot has them, and its immutable and append-only inodes
would refuse the stream's writes, renames and unlinks (EPERM); a copy (the directory
backend, ``cp -a``) has none. Those two flags are cleared in the new subvolume before the
first record and set back at the end, with the flags a copy lacks; a FILEATTR record of the
same inode, queued later, has the last word.

Paths break on the stream's later renames, so an inode is kept as an open descriptor; past
:data:`HELD` of them (a parent with thousands of flagged inodes would meet the default
``RLIMIT_NOFILE`` of 1,024) as its inode number and generation (``FS_IOC_GETVERSION``),
found again at the end by one walk of the new subvolume (an inode the stream deleted is not
found; a number the filesystem reused for a new inode has another generation, on the
filesystems that keep one: btrfs, ext4, XFS).
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct

from .. import TYPE_CHECKING
from ..fs import btrfs
from ..fs.btrfs import FS_FLAGS_KNOWN

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

__all__ = ["HELD", "Pending"]

#: FS_IMMUTABLE_FL | FS_APPEND_FL: what refuses the stream's changes to an inode
_BLOCKING = 0x10 | 0x20
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: FS_IOC_GETVERSION: the inode's generation (a reused inode number has another)
_FS_IOC_GETVERSION = 0x80087601
#: descriptors a receive keeps open for the flags of a subvolume; the rest by inode number
HELD = 64


def _flags(path: bytes, dir_fd: int | None = None) -> tuple[int, int]:
    """An open descriptor of ``path`` (a directory or regular file) and its known flags."""
    fd = os.open(path, _OPEN, dir_fd=dir_fd)
    try:
        return fd, btrfs.get_fsflags(fd) & FS_FLAGS_KNOWN
    except OSError:
        os.close(fd)
        raise


def _identity(fd: int) -> tuple[int, int]:
    """(inode number, generation or -1 where the filesystem has none) of open ``fd``."""
    buf = bytearray(8)
    try:
        fcntl.ioctl(fd, _FS_IOC_GETVERSION, buf)
        gen = int(struct.unpack("<I", buf[:4])[0])
    except OSError:
        gen = -1
    return os.fstat(fd).st_ino, gen


class Pending:
    """The flags to set on a subvolume's inodes when it is finished, in order (a later
    entry of the same inode wins): (descriptor or -1, inode, generation, flags, path)."""

    def __init__(self) -> None:
        self._entries: list[tuple[int, int, int, int, bytes]] = []
        self._held = 0

    def __bool__(self) -> bool:
        return bool(self._entries)

    def add(self, fd: int, flags: int, path: bytes) -> None:
        """Queue ``flags`` for the inode open as ``fd`` (taken: kept or closed now)."""
        try:
            ino, gen = _identity(fd)
            if self._held < HELD:
                self._held += 1
                self._entries.append((fd, ino, gen, flags, path))
                return
            self._entries.append((-1, ino, gen, flags, path))
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)

    def from_parent(self, parent: Path, root_fd: int, copied: bool) -> None:
        """Queue each of ``parent``'s inodes that have flags to set back at the end: every
        one with flags after a copy (``copied``), the immutable and append-only ones after a
        snapshot; those two flags are cleared now. The new subvolume, whose root is
        ``root_fd``, holds nothing of the stream yet."""
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
            self.add(fd, flags, rel)

    def _find(self, root_fd: int) -> dict[int, bytes]:
        """A path (relative to ``root_fd``) of each inode queued without a descriptor, by
        one walk of the subvolume (not into a nested subvolume or mount)."""
        want = {ino for fd, ino, _, _, _ in self._entries if fd < 0}
        found: dict[int, bytes] = {}
        if not want:
            return found
        root = os.fstat(root_fd)
        dev = root.st_dev
        if root.st_ino in want:  # (the root: no entry names it)
            found[root.st_ino] = b"."
        stack = [b"."]
        while stack and len(found) < len(want):
            rel = stack.pop()
            try:
                dfd = os.open(rel, _OPEN | os.O_DIRECTORY, dir_fd=root_fd)
            except OSError:
                continue
            try:
                if os.fstat(dfd).st_dev != dev:
                    continue
                with os.scandir(dfd) as it:
                    for e in it:
                        path = os.path.join(rel, os.fsencode(e.name))
                        if e.inode() in want:
                            found.setdefault(e.inode(), path)
                        if e.is_dir(follow_symlinks=False):
                            stack.append(path)
            finally:
                os.close(dfd)
        return found

    def _open(self, entry: tuple[int, int, int, int, bytes], found: dict[int, bytes],
              root_fd: int) -> int:
        """A descriptor of ``entry``'s inode, or -1 if it is no longer in the subvolume."""
        fd, ino, gen, _, _ = entry
        if fd >= 0:
            return fd
        path = found.get(ino)
        if path is None:
            return -1
        try:
            fd = os.open(path, _OPEN, dir_fd=root_fd)
        except OSError:
            return -1
        if _identity(fd) != (ino, gen) or os.fstat(fd).st_dev != os.fstat(root_fd).st_dev:
            os.close(fd)  # (another inode now, or a nested subvolume's root)
            return -1
        return fd

    def apply(self, root_fd: int, warn: Callable[[str], None]) -> None:
        """Set every queued entry's flags in the subvolume whose root is ``root_fd`` and
        close the descriptors; a filesystem that refuses is warned about once, naming the
        first file."""
        found = self._find(root_fd)
        warned = False
        for i, entry in enumerate(self._entries):
            fd = self._open(entry, found, root_fd)
            self._entries[i] = (-1, *entry[1:])
            if fd < 0:
                continue  # (deleted by the stream)
            flags, path = entry[3], entry[4]
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
        self.close()

    def close(self) -> None:
        """Close every held descriptor and forget the entries."""
        for fd, _, _, _, _ in self._entries:
            if fd >= 0:
                os.close(fd)
        self._entries.clear()
        self._held = 0
