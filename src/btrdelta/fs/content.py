"""A file's content as copies, sends and tree-sums take it: its data (non-hole) ranges
(``SEEK_DATA``/``SEEK_HOLE``: they read only those), and the xattrs that are not part of a
tree.

A module apart from :mod:`.copy` (copies that keep holes, tree copies): a ``send
--from-sendshot`` imported the copy module (and :mod:`.remove`, ``contextlib``, a 1 MiB
zero buffer made at import) only for these two (~0.4 ms of its start; docs/performance.md,
session 24).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

__all__ = ["NOT_COPIED_XATTRS", "data_segments", "has_byte_at", "iter_data_segments"]

#: xattrs that are not part of a tree, skipped as ``cp -a`` and rsync skip them (libattr's
#: /etc/xattr.conf): XFS lists to root its own stored form of the POSIX ACLs besides
#: ``system.posix_acl_*``; anywhere else they would be plain trusted xattrs of no meaning
NOT_COPIED_XATTRS = frozenset({"trusted.SGI_ACL_FILE", "trusted.SGI_ACL_DEFAULT"})


def has_byte_at(fd: int, pos: int) -> bool:
    """Whether the open file is longer than ``pos``."""
    # (none at 2^63 - 1, the largest size a file can have on Linux, MAX_LFS_FILESIZE: it
    # refuses that read, EINVAL)
    return pos < (1 << 63) - 1 and bool(os.pread(fd, 1, pos))


def data_segments(fd: int, size: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of the data (non-hole) ranges of the open file, below ``size``
    (:func:`iter_data_segments`, those that touch merged)."""
    out: list[tuple[int, int]] = []
    for data, n in iter_data_segments(fd, size):
        if out and out[-1][0] + out[-1][1] == data:
            out[-1] = (out[-1][0], data + n - out[-1][0])
        else:
            out.append((data, n))
    return out


def iter_data_segments(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` of the data (non-hole) ranges of the open file, below ``size``,
    in order, found one at a time (a file of millions of holes is not listed whole; two
    may touch).

    A file without holes (nearly every file) takes one ``lseek``: the first hole from 0
    at or after ``size``."""
    pos = 0
    if size > 0:
        try:
            hole = os.lseek(fd, 0, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # empty
                return
            if exc.errno == errno.EINVAL:  # no SEEK_HOLE support: all data
                yield 0, size
                return
            raise
        if hole > 0:  # data from 0 to the first hole
            pos = min(hole, size)
            yield 0, pos
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            if exc.errno == errno.EINVAL:  # no SEEK_DATA support: all data
                data = pos
            else:
                raise
        if data >= size:
            break
        try:
            hole = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError:
            hole = size
        hole = min(hole, size)
        yield data, hole - data
        pos = hole
