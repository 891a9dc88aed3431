"""``CLONE`` records no longer than :data:`~.clones.CLONE_MAX` (4 GiB less a block), for
copies and shifted ranges longer than that.

btrfs-progs' receive (6.2, Debian 12's) keeps only the low 32 bits of a ``CLONE``'s
length: one ``CLONE`` of a 5 GiB copy made a file of 1 GiB, of a 2^62-byte copy one of
4 KiB, without an error (the kernel's send clones one extent at a time, never that much).
A whole-file copy past the bound becomes a ``CLONE`` of each of its data ranges, its holes
left holes (a copy of 2^62 bytes is a few records, not 2^30), and a ``TRUNCATE`` to its
size; a range past it, consecutive pieces. Imported only for such a copy or range.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from ..fs.content import data_segments
from ..stream.records import Clone, Record, Truncate
from .clones import CLONE_MAX
from .onepass import block_segments
from .scan import Node, Tree, open_file

__all__ = ["clones_of", "cut_clone", "whole_clones"]


def cut_clone(clone: Clone) -> list[Clone]:
    """``clone`` in consecutive pieces of at most :data:`~.clones.CLONE_MAX` bytes."""
    return [Clone(offset=clone.offset + k, length=min(CLONE_MAX, clone.length - k),
                  path=clone.path, clone_uuid=clone.clone_uuid,
                  clone_ctransid=clone.clone_ctransid, clone_path=clone.clone_path,
                  clone_offset=clone.clone_offset + k)
            for k in range(0, clone.length, CLONE_MAX)]


def whole_clones(clone: Clone, data: Iterable[tuple[int, int]]) -> list[Record]:
    """The records of ``clone``, a ``CLONE`` of a whole file (``data``: its data ranges)
    into an empty one: a ``CLONE`` of each range widened to 4 KiB blocks, cut to
    :data:`~.clones.CLONE_MAX`, and a ``TRUNCATE`` to the size where the last one ends
    before it."""
    size, end = clone.length, 0
    out: list[Record] = []
    for off, n in block_segments(data, size):
        out += cut_clone(Clone(offset=off, length=n, path=clone.path,
                               clone_uuid=clone.clone_uuid,
                               clone_ctransid=clone.clone_ctransid,
                               clone_path=clone.clone_path, clone_offset=off))
        end = off + n
    if end < size:
        out.append(Truncate(path=clone.path, size=size))
    return out


def clones_of(clone: Clone, node: Node, tree: Tree) -> list[Record]:
    """:func:`whole_clones` of ``clone``, of all of new file ``node`` of ``tree`` (its data
    ranges: recorded, else found with ``SEEK_DATA``)."""
    if node.segments is not None:
        return whole_clones(clone, node.segments)
    fd = open_file(tree.abspath(node.path))
    try:
        return whole_clones(clone, data_segments(fd, node.size))
    finally:
        os.close(fd)
