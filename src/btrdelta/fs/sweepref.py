"""The Python references of the ``sweep`` C accelerator (``fs/_sweep.c``): the items of a
tree search's results walked one at a time, where that module is not built (or
``BTRDELTA_PURE_PYTHON=1``): :func:`inodes` of a change sweep
(:func:`~.btrfs.changed_inodes`), :func:`extents` of a file
(:func:`~.btrfs.file_extent_batches`). The tests hold the C code to them.
"""

from __future__ import annotations

import struct

from .btrfs import _EXTENT_DATA_KEY, _SEARCH_HDR, _results, extent_item

__all__ = ["extents", "inodes"]

_INODE_ITEM = struct.Struct("<QQ56xQ")  # generation, transid, (at byte 72) sequence
#: a search result's header (:data:`~.btrfs._SEARCH_HDR`) in parts: its type and length,
#: objectid
_ITEM_KIND = struct.Struct("<24xII")
_ITEM_OBJECTID = struct.Struct("<8xQ")


def inodes(buf: bytearray, pos: int, nr_items: int, key_type: int, since: int,
              out: dict[int, tuple[int, int, int]], written: set[int] | None = None
              ) -> tuple[int, int, int]:
    """The ``nr_items`` search results in ``buf`` from ``pos``: ``out[objectid] = (generation,
    transid, sequence)`` for each inode item (``key_type``) written after ``since``, and
    ``written`` those of file extent items written after it; returns the key of the last
    item. The reference of the ``sweep`` C accelerator (``fs/_sweep.c``: one call a buffer
    instead of ~1,700 instructions an item).

    Raises:
        ValueError: an item runs past the buffer.
    """
    kind, objectid, inode_item = (_ITEM_KIND.unpack_from, _ITEM_OBJECTID.unpack_from,
                                  _INODE_ITEM.unpack_from)
    last, size = pos, len(buf)
    for _ in range(nr_items):
        if pos + 32 > size:
            raise ValueError("a search result runs past the buffer")
        # only the type and length of each item (small ints, no object made for them)
        typ, length = kind(buf, pos)
        if pos + 32 + length > size:
            raise ValueError("a search result runs past the buffer")
        if typ == key_type and length >= 80:
            generation, transid, sequence = inode_item(buf, pos + 32)
            if transid > since:
                out[objectid(buf, pos)[0]] = (generation, transid, sequence)
        elif typ == _EXTENT_DATA_KEY and written is not None and length >= 8 and \
                int.from_bytes(buf[pos + 32:pos + 40], "little") > since:  # (its generation)
            written.add(objectid(buf, pos)[0])
        last = pos
        pos += 32 + length
    _transid, obj, off, typ, _length = _SEARCH_HDR.unpack_from(buf, last)
    return obj, typ, off


def extents(buf: bytearray, pos: int, nr_items: int, ino: int
                ) -> tuple[bytes | None, int, int]:
    """The file extent items of inode ``ino`` among the ``nr_items`` search results in
    ``buf`` from ``pos``, packed as :data:`EXTENT` (None: one cannot be compared), the key
    offset of the last result and where the results end. The reference of the ``sweep``
    C accelerator's ``extents`` (``fs/_sweep.c``)."""
    out, off, end = bytearray(), 0, pos
    for obj, off, typ, at, length in _results(buf, pos, nr_items):
        end = at + length
        if obj == ino and typ == _EXTENT_DATA_KEY:
            item = extent_item(buf, at, length, off)
            if item is None:
                return None, off, end
            out += item
    return bytes(out), off, end
