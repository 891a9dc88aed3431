"""Small filesystem helpers shared by the layers that read trees (send, tree-sum)."""

from __future__ import annotations

import errno
import os

__all__ = ["data_segments"]


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
