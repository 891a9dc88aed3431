"""The content digest of a file made from a parent's file by WRITEs and TRUNCATEs, reading
from the file itself only the byte ranges the stream wrote and the rest from the parent's
file.

An incremental stream usually rewrites a few ranges of a large file (a shared library
rebuilt: some KiB in a few MB). In a btrfs snapshot the ranges it did not write are the
parent's extents, but another inode's pages: reading them again is cold I/O, while the
parent's pages were read moments ago to hash it. :class:`Overlay` records, in stream order,
the ranges written and the sizes set (merging consecutive writes); :meth:`Overlay.layout`
turns them, given the parent file's size, into the final size and, for each range of the
final content, where its bytes are: in the parent's file at the same offset, or in the new
file (written there, or zeros past a truncation). :func:`overlay_digest` hashes those
ranges in order: the same BLAKE3 as :func:`~.treesum.tree_sum` reading the new file whole,
provided the new file's unwritten ranges hold the parent's bytes (what a snapshot or a
copy of the parent makes, see :mod:`.incremental`).

Knows nothing of records or trees: the caller feeds offsets and sizes.
"""

from __future__ import annotations

import errno
import os

import blake3

__all__ = ["Overlay", "overlay_digest"]

_WRITE = 0
_TRUNCATE = 1
_READ = 1 << 20

#: (start, end, from the parent's file) ranges covering a file's content in order
Layout = list[tuple[int, int, bool]]


class Overlay:
    """The writes and truncations of one file, in stream order."""

    __slots__ = ("ops",)

    def __init__(self) -> None:
        self.ops: list[tuple[int, int, int]] = []

    def write(self, offset: int, length: int) -> None:
        """``length`` bytes written at ``offset``."""
        if length <= 0:
            return
        ops = self.ops
        end = offset + length
        if ops and ops[-1][0] == _WRITE and ops[-1][2] == offset:
            ops[-1] = (_WRITE, ops[-1][1], end)
        else:
            ops.append((_WRITE, offset, end))

    def truncate(self, size: int) -> None:
        """The file's size set to ``size``."""
        self.ops.append((_TRUNCATE, size, 0))

    def layout(self, old_size: int) -> tuple[int, Layout]:
        """The final size and where each range of the content is, for a parent file of
        ``old_size`` bytes."""
        size = limit = old_size  # limit: bytes below it not written are the parent's
        written: list[tuple[int, int]] = []
        for kind, a, b in self.ops:
            if kind == _WRITE:
                written.append((a, b))
                size = max(size, b)
            else:
                if a < size:
                    written = [(x, min(y, a)) for x, y in written if x < a]
                    limit = min(limit, a)
                size = a
        merged: list[tuple[int, int]] = []
        for x, y in sorted(written):
            if merged and x <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], y))
            else:
                merged.append((x, y))
        out: Layout = []
        pos = 0
        for x, y in merged:
            _unwritten(out, pos, x, limit)
            out.append((x, y, False))
            pos = y
        _unwritten(out, pos, size, limit)
        return size, out


def _unwritten(out: Layout, a: int, b: int, limit: int) -> None:
    """Range [a, b) that no write covers: the parent's below ``limit``, zeros above."""
    if a < min(b, limit):
        out.append((a, min(b, limit), True))
    if max(a, limit) < b:
        out.append((max(a, limit), b, False))


def overlay_digest(new_fd: int, old_fd: int, layout: Layout) -> str:
    """BLAKE3 (hex) of the content ``layout`` describes, read from the open new and parent
    files.

    Raises:
        OSError: a read failed or ended early (a file shorter than the layout).
    """
    h = blake3.blake3()
    for start, end, old in layout:
        fd = old_fd if old else new_fd
        pos = start
        while pos < end:
            chunk = os.pread(fd, min(_READ, end - pos), pos)
            if not chunk:
                raise OSError(errno.EIO, "file shorter than its writes and truncations")
            h.update(chunk)
            pos += len(chunk)
    return str(h.hexdigest())
