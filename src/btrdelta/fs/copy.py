"""Copies and holes, in the kernel (no Python byte loops).

``data_segments`` lists the data (non-hole) ranges of a file with ``SEEK_DATA``/``SEEK_HOLE``
(send and tree-sum read only those). ``copy_range`` copies a byte range between two files
with ``copy_file_range`` one data segment at a time and punches holes where the source has
them, so a CLONE that cannot be a reflink still gives the same hole layout.
``copy_tree`` copies a received directory for an incremental stream with
``cp -a --reflink=auto`` (reflinks where the filesystem can, ``copy_file_range`` otherwise;
hard links, xattrs, owners, ns mtimes and holes kept): the directory backend of receive.
"""

from __future__ import annotations

import contextlib
import errno
import os
from typing import TYPE_CHECKING

from ..errors import ApplyError
from .btrfs import fallocate
from .remove import remove_tree

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["copy_range", "copy_tree", "data_segments", "write_zeros"]

_FALLOC_PUNCH = 0x02 | 0x01  # PUNCH_HOLE | KEEP_SIZE
_ZEROS = bytes(1 << 20)


def data_segments(fd: int, size: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of the data (non-hole) ranges of the open file, below ``size``."""
    out: list[tuple[int, int]] = []
    pos = 0
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
        if out and out[-1][0] + out[-1][1] == data:
            out[-1] = (out[-1][0], hole - out[-1][0])
        else:
            out.append((data, hole - data))
        pos = hole
    return out


def write_zeros(fd: int, offset: int, length: int) -> None:
    """Write ``length`` zero bytes at ``offset`` (where holes cannot be punched)."""
    while length > 0:
        n = os.pwrite(fd, memoryview(_ZEROS)[: min(length, len(_ZEROS))], offset)
        offset += n
        length -= n


def copy_range(src: int, src_off: int, dst: int, dst_off: int, length: int) -> None:
    """Copy a byte range between files in the kernel, keeping holes of the source."""
    end = src_off + length
    pos = src_off
    while pos < end:
        try:
            data = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: only a hole up to EOF
                raise
            data = end
        data = min(data, end)
        if data > pos:  # a hole in the source: make the destination range a hole too
            hole_dst = dst_off + (pos - src_off)
            size = os.fstat(dst).st_size
            try:
                if hole_dst < size:
                    fallocate(dst, _FALLOC_PUNCH, hole_dst, min(data - pos, size - hole_dst))
            except OSError:
                write_zeros(dst, hole_dst, min(data - pos, size - hole_dst))
            if dst_off + (data - src_off) > size:
                os.ftruncate(dst, dst_off + (data - src_off))
            pos = data
            if pos >= end:
                break
        hole = min(os.lseek(src, pos, os.SEEK_HOLE), end)
        while pos < hole:
            n = os.copy_file_range(src, dst, hole - pos, pos, dst_off + (pos - src_off))
            if n == 0:
                return
            pos += n


def copy_tree(src: Path, dst: Path) -> None:
    """Copy a received directory for an incremental stream (reflinks where possible)."""
    import subprocess  # an incremental receive into a directory only

    proc = subprocess.run(
        ["cp", "-a", "--reflink=auto", "--no-target-directory", "--", str(src), str(dst)],
        capture_output=True, check=False,
    )
    if proc.returncode != 0:
        with contextlib.suppress(OSError):
            pfd = os.open(dst.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                remove_tree(pfd, dst.name)
            finally:
                os.close(pfd)
        raise ApplyError(
            f"copying parent {src} failed: {proc.stderr.decode(errors='replace').strip()}",
            op="snapshot",
        )
