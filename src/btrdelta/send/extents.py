"""A changed file read only where its file extent items changed (btrfs, sendshot records).

A record made from a read-only btrfs snapshot keeps, per regular file of at least
:data:`EXTENT_MIN` bytes that is not ``NOCOW``, the file extent items (``EXTENT_DATA``) its
content was read with (:func:`extents_of`). When the change sweep (:mod:`.rescan`) finds
such a file changed, :func:`hash_changed` compares the file's items now with the recorded
ones and reads and hashes only the 4 KiB blocks that are not proven unchanged; the other
blocks keep the record's digests. Why a range mapped by the same extent in the same way
holds the same bytes (and which cases are never trusted: ``NOCOW`` files, inline data,
encrypted or otherwise encoded extents, files below the size) is argued in
``docs/formats/sendshot.md`` §3a. A file whose items take more than :data:`EXTENT_MAX`
bytes is recorded as *cells* (:func:`bounded`): ranges with a digest of the extents they
map, compared by :func:`same_in_cells` (a changed cell is read whole).

A file hashed in parts has no whole-content digests (they would need every byte): its
DIGESTS are the *parts digests* (:func:`parts_digests`), a function of its size, data
ranges and block digests, so that two versions compare equal exactly when their blocks do.
A file whose blocks are all taken from the record, with the same size and data ranges,
keeps the record's digests.

Owns this comparison and the partial read only; the items come from
:func:`btrdelta.fs.btrfs.file_extent_batches`, the rest of the hashing is :mod:`.hashing`'s.
"""

from __future__ import annotations

import os
import struct
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator

import blake3

from .. import TYPE_CHECKING, _native
from .._optional import need
from ..errors import BtrdeltaError
from ..fs.btrfs import EXTENT, EXTENT_SEARCH, file_extent_batches, get_fileattr
from ..fs.content import has_byte_at, iter_data_segments
from ..tree.sendshot import RecordInode

if TYPE_CHECKING:
    import mmap

    from .scan import Node

__all__ = ["CELL", "EXTENT_MAX", "EXTENT_MIN", "NOCOW", "SEARCH_MIN", "Planned", "bounded",
           "extents_of", "first_blocks", "from_sweep", "hash_changed", "is_cells",
           "parts_digests", "plan_changed", "same_in_cells"]

#: smallest file whose extent items a record keeps (smaller files are read whole: a few
#: blocks). Since session 16 16 KiB (was 1 MiB): the changed files of the sendshot
#: benchmark's in-place round are mostly 16-128 KiB, a third of them changed in metadata
#: only (renamed, linked, an xattr); read whole they were 5.9 MB of reads for a 0.42 MB
#: stream, in parts 1.1 MB (the record: +1 %)
EXTENT_MIN = 16 << 10
#: smallest file whose items the hashing threads search for themselves (:func:`extents_of`,
#: one search a file: ~16 µs); a full send's smaller files get theirs from the sweep that
#: stamps its inodes (:func:`from_sweep`: every item of the snapshot in a few searches),
#: which a search a file would have cost ~18 ms of CPU for Debian's ``/usr``
SEARCH_MIN = 1 << 20
#: the most bytes of extent items a record keeps for one file (a store's ``extent_max``):
#: 4 MiB, ~84,000 items, every item of a file of up to ~330 MiB however fragmented. A file
#: with more is recorded as at most as many *cells* (:func:`bounded`): a 100 GiB image in 4
#: KiB extents takes 4 MiB of the record, not 1.3 GB, and a change of one block reads the
#: ~1.2 MiB of its cell, not the file
EXTENT_MAX = 4 << 20
#: the type byte of a *cell* in place of an extent item's (1 regular, 2 prealloc): a range of
#: the file and a digest of the extents it maps (:func:`bounded`)
CELL = 0x80
#: ``BTRFS_INODE_NODATACOW`` in FILEATTR encoding: written in place, items unchanged
NOCOW = 0x2
_BLOCK = 4096
#: read at most this much at a time
_PIECE = 1 << 20
_PARTS = b"btrdelta-parts\0"
_U64 = struct.Struct("<Q")
_PAIR = struct.Struct("<QQ")
#: a cell's digest input, each data range in it: start, end, then the key :func:`_spans`
#: gives (disk bytenr, disk length, generation, type, compression, where the extent starts in
#: the file: negative for a clone that put the extent's middle at the file's start)
_CELLSPAN = struct.Struct("<QQQQQBBq")
_CELLS = b"btrdelta-cells\0"
_CELLTYPE = bytes([0x80, 0])  # (CELL, then compression 0: a cell's last two bytes)
#: extent items cut to cells this many at a time (:class:`_Sums`)
_CUT_PIECE = 320 * EXTENT.size

#: each thread's buffer for :func:`~btrdelta.fs.btrfs.file_extent_batches` (one made per file: 64
#: KiB zeroed, ~5 M of the ~210 M instructions of an in-place round's 70 changed files)
_searching = threading.local()

#: (start, end, what the range reads as): an extent's identity and where the range starts
#: in it, or None for a hole (no item, or an item with disk_bytenr 0)
_Span = tuple[int, int, tuple[int, ...] | None]


def extents_of(fd: int, ino: int, size: int, flags: int, least: int = SEARCH_MIN,
               item_max: int = 0, most: int | None = None) -> bytes | None:
    """The extent items to record for open file ``fd`` (inode ``ino`` of ``size`` bytes,
    inode flags ``flags``), or None: below ``least`` (:data:`SEARCH_MIN`: the smaller files
    of a full send get theirs from :func:`from_sweep`), ``NOCOW``, items that cannot be
    compared (:func:`~btrdelta.fs.btrfs.file_extent_batches`), no right to search the tree (not
    root). However fragmented the file, its items are returned and recorded, up to ``most``
    bytes (None: :data:`EXTENT_MAX`) as they are and past it as cells (:func:`bounded`), cut
    as the searches give them (never all held): each covers at least a block, so they take
    at most 50 bytes a 4 KiB block (1.2 % of the size, less once the record is compressed),
    and a file without them is read whole when it changes (until session 29 items over 0.5 %
    of the size were not recorded: a SQLite database of 100 MiB written in ~2,500 pages a
    round lost them after three rounds and was read whole from then on). ``item_max``:
    :func:`~btrdelta.fs.btrfs.largest_item` of the filesystem, asked already."""
    if size < max(least, EXTENT_MIN) or flags & NOCOW:
        return None
    cut = _Cut(size, most)
    try:
        for batch in _searched(fd, ino, item_max):
            if batch is None:
                return None
            cut.add(batch)
    except OSError:
        return None
    return cut.result()


def _searched(fd: int, ino: int, item_max: int) -> Iterator[bytes | None]:
    """:func:`~btrdelta.fs.btrfs.file_extent_batches` with this thread's search buffer."""
    buf = getattr(_searching, "buf", None)
    if buf is None:
        buf = _searching.buf = bytearray(EXTENT_SEARCH)
    return file_extent_batches(fd, ino, item_max, buf)


def from_sweep(items: list[bytes | None] | None, size: int, flags: int) -> bytes | None:
    """:func:`extents_of` of a file from the items a sweep of its snapshot collected
    (:func:`~btrdelta.fs.btrfs.changed_inodes`' ``extents``: ``items`` its list, None for a
    file without any: all holes), for a file of :data:`EXTENT_MIN` up to
    :data:`SEARCH_MIN`; None for the others, as :func:`extents_of` would say."""
    if not EXTENT_MIN <= size < SEARCH_MIN or flags & NOCOW:
        return None
    if not items:
        return b""
    if None in items:
        return None
    return b"".join(items)  # type: ignore[arg-type]


def _spans(items: bytes | Iterable[bytes], limit: int) -> Iterator[_Span]:
    """The mapped ranges of packed extent ``items`` (or their batches, in file order) below
    ``limit`` (holes: key None), made one at a time (a file's items may be millions)."""
    for batch in _batches(items):
        for off, num, bytenr, disk, ext_off, gen, kind, comp in EXTENT.iter_unpack(batch):
            if off >= limit:
                return
            yield off, min(off + num, limit), \
                None if bytenr == 0 else (bytenr, disk, gen, kind, comp, off - ext_off)


def _inputs_py(items: bytes | bytearray | memoryview, bounds: array[int], k: int, final: bool
               ) -> tuple[bytes, bytes, int, int]:
    """The digest input of the cells from ``k`` on (edges ``bounds``, u64 each) that the
    extent ``items`` complete: ``(data, ends of each cell's input in it (u64 each), the
    first cell not completed, the index of the first item it needs)``. The reference of the
    ``cells`` C accelerator (``send/_cells.c``, which documents it; one call a batch)."""
    item, size, n = EXTENT.unpack_from, EXTENT.size, len(items) // EXTENT.size
    ncells = len(bounds) - 1

    def end_of(j: int) -> int:
        off, num = _PAIR.unpack_from(items, j * size)
        return off + num  # type: ignore[no-any-return]

    last = end_of(n - 1) if n else 0
    data, ends, i = bytearray(), bytearray(), 0
    while k < ncells:
        a, e = bounds[k], bounds[k + 1]
        if not final and last < e:
            break
        while i < n and end_of(i) <= a:
            i += 1
        data += _CELLS
        cur: list[int] | None = None
        for j in range(i, n):
            off, num, bytenr, disk, ext_off, gen, kind, comp = item(items, j * size)
            if off >= e:
                break
            s, t = max(off, a), min(off + num, e)
            if not bytenr or s >= t:
                continue
            key = [bytenr, disk, gen, kind, comp, off - ext_off]
            if cur is not None and cur[1] == s and cur[2:] == key:
                cur[1] = t
                continue
            if cur is not None:
                data += _CELLSPAN.pack(*cur)
            cur = [s, t, *key]
        if cur is not None:
            data += _CELLSPAN.pack(*cur)
        ends += _U64.pack(len(data))
        k += 1
    if k < ncells:
        while i < n and end_of(i) <= bounds[k]:
            i += 1
    else:
        i = n
    return bytes(data), bytes(ends), k, i


class _Sums:
    """A file's cells (edges ``bounds``, u64 each: cell j is ``[bounds[j], bounds[j + 1])``)
    as a record keeps them (:data:`~btrdelta.fs.btrfs.EXTENT` each, type :data:`CELL`, in
    :attr:`out`), from the file's extent items given batch by batch in file order
    (:meth:`add`): each cell once the items complete it; only the items that meet a cell
    not yet made are kept, so that however many items a file has, they are never all
    held."""

    __slots__ = ("_inputs", "bounds", "held", "k", "out")

    _inputs: Callable[[bytes | bytearray | memoryview, array[int], int, bool],
                      tuple[bytes, bytes, int, int]]

    def __init__(self, bounds: array[int]) -> None:
        native = _native.live("cells")
        self._inputs = _inputs_py if native is None else native.inputs
        self.bounds = bounds
        self.k = 0
        self.held = b""
        #: the cells made so far
        self.out = bytearray()

    def add(self, items: bytes | bytearray | memoryview, final: bool = False) -> None:
        """Take the next extent ``items`` (``final``: no more follow), a piece at a time
        (the input of a piece's cells: ~1.3 times its items)."""
        view = memoryview(items)
        for i in range(0, len(view), _CUT_PIECE):
            self._add(view[i:i + _CUT_PIECE], final and i + _CUT_PIECE >= len(view))
        if final and not view:
            self._add(view, True)

    def _add(self, items: bytes | bytearray | memoryview, final: bool) -> None:
        items = self.held + items if self.held else items
        k = self.k
        data, ends, self.k, keep = self._inputs(items, self.bounds, k, final)
        self.held = bytes(items[keep * EXTENT.size:])
        view, start, out, bounds = memoryview(data), 0, self.out, self.bounds
        for end in memoryview(ends).cast("Q"):
            at = len(out) + 16
            out += _PAIR.pack(bounds[k], bounds[k + 1] - bounds[k])
            out += blake3.blake3(view[start:end]).digest()
            out[at] |= 1  # (never a hole to a reader that does not know cells)
            out += _CELLTYPE
            start, k = end, k + 1

    def finish(self) -> bytearray:
        """The cells with every digest: the items have all been given."""
        self.add(b"", True)
        return self.out


def _grid(size: int, most: int) -> array[int] | None:
    """The edges of the cells a file of ``size`` bytes is recorded as past the bound
    ``most``: at most ``most // 50`` cells of one length, a multiple of 4 KiB (the last up
    to the size); None: not one cell fits the bound, or an empty file."""
    cap = most // EXTENT.size
    if cap < 1 or size <= 0:
        return None
    step = -(-size // cap)
    step = -(-step // _BLOCK) * _BLOCK
    edges = array("Q", range(0, size, step))  # (no list of ints: 40 bytes a cell)
    edges.append(size)
    return edges


class _Cut:
    """A file's extent items, given batch by batch (:meth:`add`), as a record keeps them
    (:func:`bounded`): held while they take at most ``most`` bytes, then cut to cells as
    they come (:class:`_Sums`, on :func:`_grid`): a send holds about twice the bound at
    most (the items up to it, then the cells), not all of a file's items (26 M, 1.3 GB, for
    a 100 GiB image in 4 KiB extents). ``given``: past the bound the cells are made
    elsewhere (by the comparison against a record of the same cells) and handed to
    :meth:`result`."""

    __slots__ = ("dropped", "given", "held", "most", "over", "size", "sums")

    def __init__(self, size: int, most: int | None = None) -> None:
        self.size, self.most = size, EXTENT_MAX if most is None else most
        self.held = bytearray()
        self.sums: _Sums | None = None
        self.dropped = self.given = self.over = False

    def add(self, items: bytes | bytearray) -> None:
        if self.dropped or (self.over and self.given):
            return
        if self.sums is None:
            if len(self.held) + len(items) <= self.most and not self.over:
                self.held += items
                return
            edges = _grid(self.size, self.most)
            if edges is None:
                self.dropped, self.held = True, bytearray()
                return
            self.over = True
            if self.given:
                self.held = bytearray()
                return
            self.sums = _Sums(edges)
            held, self.held = self.held, bytearray()
            self.sums.add(held)
            del held
        self.sums.add(items)

    def result(self, cells: bytearray | None = None) -> bytes | None:
        """The items (at most ``most`` bytes), else cells (``given``: ``cells``); None: not
        recorded."""
        if self.dropped:
            return None
        if not self.over:
            return bytes(self.held)
        if self.sums is not None:
            cells, self.sums = self.sums.finish(), None
        assert cells is not None
        return bytes(cells)


def is_cells(items: bytes | None) -> bool:
    """Whether recorded ``items`` are cells (:func:`bounded`), not extent items."""
    return bool(items) and items[EXTENT.size - 2] == CELL  # type: ignore[index]


def bounded(items: bytes | None, size: int, most: int | None = None) -> bytes | None:
    """The extent ``items`` of a file of ``size`` bytes as a record keeps them: themselves
    when they take at most ``most`` bytes; else at most ``most // 50`` *cells*, ranges of the
    file of one length (a multiple of 4 KiB; the last up to the size: :func:`_grid`), each
    with a digest of the data ranges it maps and their extents (packed as
    :data:`~btrdelta.fs.btrfs.EXTENT`: the range's start and length, the digest in place of
    disk bytenr, disk length, offset and generation, type :data:`CELL`). A send against the
    record proves a cell unchanged when the file's items now give it the same digest
    (:func:`same_in_cells`) and reads only the changed cells. Cells over ``most`` (a record
    made with a larger bound), or a bound below one cell: None (not recorded). ``most``
    None: :data:`EXTENT_MAX`. (:class:`_Cut` does the same with the items given in
    batches, as a send reads them.)"""
    most = EXTENT_MAX if most is None else most
    if items is None or len(items) <= most:
        return items
    if is_cells(items):
        return None
    cut = _Cut(size, most)
    cut.add(items)
    return cut.result()


def _batches(items: bytes | Iterable[bytes]) -> Iterable[bytes]:
    return (items,) if isinstance(items, bytes | bytearray) else items


def _edges(cells: bytes, limit: int) -> array[int]:
    """The edges of a record's ``cells`` that follow each other from 0 and end by
    ``limit``, up to the first that does not."""
    edges = array("Q", [0])  # (u64 each: not a list of ints, 40 bytes a cell)
    for off, num, *_d in EXTENT.iter_unpack(cells):
        if off != edges[-1] or not num or off + num > limit:
            break
        edges.append(off + num)
    return edges


def same_in_cells(cells: bytes, new: bytes | Iterable[bytes], limit: int
                  ) -> list[tuple[int, int]]:
    """As :func:`same_ranges`, against a record's ``cells`` (:func:`bounded`): the cells below
    ``limit`` whose digest the file's extent items ``new`` (or its batches, in file order)
    give again, merged, in order. Cells that do not follow each other from 0 (not
    :func:`bounded`'s) end the comparison. Any cells compare (until ext30's of session 30
    started at an item and held as many items each; they are now of one length)."""
    return _same_cells(cells, _edges(cells, limit), new)[0]


def _same_cells(cells: bytes, edges: array[int], new: bytes | Iterable[bytes]
                ) -> tuple[list[tuple[int, int]], bytearray]:
    """:func:`same_in_cells` of the cells with ``edges``, and those cells made of ``new``."""
    sums = _Sums(edges)
    for batch in _batches(new):
        sums.add(batch)
    got = sums.finish()
    out: list[tuple[int, int]] = []
    for j in range(len(edges) - 1):
        at = EXTENT.size * j
        if got[at + 16:at + 48] != cells[at + 16:at + 48]:
            continue
        a, b = edges[j], edges[j + 1]
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out, got


def same_ranges(old: bytes, new: bytes | Iterable[bytes], limit: int, most: int = 0
                ) -> list[tuple[int, int]]:
    """The ranges below ``limit`` that read the same through the extent items ``old`` and
    ``new`` (or its batches, in file order) of one inode: the same extent (disk bytenr and
    length, generation, type, compression) at the same place in it, or a hole on both
    sides; merged, in order. ``most``: at most so many ranges, the first (the others are
    read: a file of millions of items against a record of a few can have millions)."""
    a, b = _spans(old, limit), _spans(new, limit)
    sa, sb = next(a, None), next(b, None)
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < limit:
        while sa is not None and sa[1] <= pos:
            sa = next(a, None)
        while sb is not None and sb[1] <= pos:
            sb = next(b, None)
        # what each side holds at pos, and up to where
        ka, ea = (sa[2], sa[1]) if sa is not None and sa[0] <= pos else \
            (None, sa[0] if sa is not None else limit)
        kb, eb = (sb[2], sb[1]) if sb is not None and sb[0] <= pos else \
            (None, sb[0] if sb is not None else limit)
        end = min(ea, eb, limit)
        if ka == kb:
            if out and out[-1][1] == pos:
                out[-1] = (out[-1][0], end)
            elif most and len(out) >= most:
                break
            else:
                out.append((pos, end))
        pos = end
    return out


def parts_digests(size: int, segments: list[tuple[int, int]], blocks: bytes
                  ) -> tuple[bytes, bytes]:
    """The DIGESTS of a file hashed in parts: XXH3-128 and BLAKE3-256 of ``"btrdelta-parts\\0"``,
    u64 size, the data ranges (u64 pairs) and the block digests."""
    xxhash = need("xxhash", "make")
    head = b"".join([_PARTS, _U64.pack(size), *(_PAIR.pack(o, n) for o, n in segments)])
    x3, b3 = xxhash.xxh3_128(head), blake3.blake3(head)  # (the blocks not copied after it)
    x3.update(blocks)
    b3.update(blocks)
    return x3.digest(), b3.digest()


def first_blocks(segments: list[tuple[int, int]]) -> tuple[list[int], list[int], list[int]]:
    """Data segments' starts, ends and the index of each one's first block digest."""
    starts, ends, first = [], [], []
    k = 0
    for off, n in segments:
        starts.append(off)
        ends.append(off + n)
        first.append(k)
        k += -(-n // _BLOCK)
    return starts, ends, first


def _reusable(same: list[tuple[int, int]], old: RecordInode, size: int,
              segments: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Runs of whole blocks of the new data ``segments`` whose digests the record has:
    ``(start, end, index of the first digest in the record's blocks)``, in order. A block
    qualifies when it lies in a range that reads the same, in a data segment on both sides,
    and has the same length on both sides (the last block of a file of another size: not)."""
    assert old.segments is not None
    starts, ends, first = first_blocks(old.segments)
    # the ranges that read the same, within an old segment (each piece's digests are
    # consecutive in that segment's): two sorted lists walked together
    pieces: list[tuple[int, int, int]] = []
    i = j = 0
    while i < len(same) and j < len(starts):
        lo, hi = max(same[i][0], starts[j]), min(same[i][1], ends[j])
        if lo < hi:
            pieces.append((lo, hi, j))
        if same[i][1] <= ends[j]:
            i += 1
        else:
            j += 1
    # ... and within a new segment, whole blocks
    out: list[tuple[int, int, int]] = []
    i = k = 0
    while i < len(pieces) and k < len(segments):
        x, y, s = pieces[i]
        a, e = segments[k][0], segments[k][0] + segments[k][1]
        lo, hi = max(x, a), min(y, e)
        if lo < hi:
            bx = -(-lo // _BLOCK) * _BLOCK
            by = hi - hi % _BLOCK
            if hi == size == old.size and hi == e and hi == ends[s]:
                by = hi  # the file's last, short block: the same on both sides
            if by > bx:
                out.append((bx, by, first[s] + (bx - starts[s]) // _BLOCK))
        if y <= e:
            i += 1
        else:
            k += 1
    return out


class Planned:
    """A changed file's partial read, planned (:func:`plan_changed`): its file open, the
    reads of the blocks not proven unchanged asked of the device; :meth:`read` makes them."""

    __slots__ = ("fd", "flags", "new_ext", "node", "old", "ops", "path", "segs")

    def __init__(self, node: Node, path: bytes, old: RecordInode, fd: int, flags: int,
                 new_ext: bytes, segs: list[tuple[int, int]], ops: list[tuple[int, int]]
                 ) -> None:
        self.node, self.path, self.old, self.fd = node, path, old, fd
        self.flags, self.new_ext, self.segs, self.ops = flags, new_ext, segs, ops

    def read(self, seed: int, buf: bytearray | mmap.mmap, keep_open: bool = False) -> int:
        """Read and hash the planned blocks, fill in the node (its flags, data ranges, block
        digests, digests and extent items) and close the file (``keep_open``: unless it was
        read, for the caller to :meth:`detach`); the bytes read.

        Raises:
            BtrdeltaError: the file cannot be read or changed size while it was read.
        """
        xxhash = need("xxhash", "make")
        node, path, fd, old, size = self.node, self.path, self.fd, self.old, self.node.size
        try:
            # (the record's digests taken as views, not copied once more before the join)
            bhash, view, oblocks = xxhash.xxh3_128_digest, memoryview(buf), memoryview(old.blocks)
            pieces: list[bytes | memoryview] = []
            read = 0
            for pos, stop in self.ops:
                if pos < 0:
                    k = -1 - pos
                    pieces.append(oblocks[16 * k:16 * (k + stop)])
                    continue
                got = os.preadv(fd, [view[:stop - pos]], pos)
                if got != stop - pos:
                    raise BtrdeltaError("file changed while sending (short read)", path=path)
                pieces += [bhash(view[i:min(i + _BLOCK, got)], seed)
                           for i in range(0, got, _BLOCK)]
                read += got
            if has_byte_at(fd, size):
                raise BtrdeltaError("file changed while sending (size differs)", path=path)
        except BaseException:
            self.close()
            raise
        if not keep_open:
            self.close()
        blocks, segs = b"".join(pieces), self.segs
        if not read and size == old.size and segs == old.segments:
            node.digest, node.bdigest = old.digest, old.bdigest
        else:
            node.digest, node.bdigest = parts_digests(size, segs, blocks)
        node.flags, node.segments, node.blocks, node.extents = \
            self.flags, segs, blocks, self.new_ext
        node.read_ranges = [(pos, stop - pos) for pos, stop in self.ops if pos >= 0]
        return read

    def detach(self) -> int:
        """The open file, no longer closed by :meth:`close`."""
        fd, self.fd = self.fd, -1
        return fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def plan_changed(node: Node, path: bytes, old: RecordInode, item_max: int = 0,
                 most: int | None = None) -> Planned | None:
    """Plan the read of changed file ``node`` (at ``path``) where its blocks are not proven
    unchanged against its record ``old`` (the same inode): the blocks to read are asked of
    the device at once (``POSIX_FADV_WILLNEED``), so the reads of several files planned
    before the first is made overlap. None: the file is not eligible (see the module
    docstring) or nothing is proven unchanged; the caller hashes it whole. ``item_max``,
    ``most``: as :func:`extents_of`.

    Raises:
        BtrdeltaError: the file cannot be opened.
    """
    from .hashing import open_to_read

    if old.extents is None or old.segments is None or old.flags & NOCOW or \
            old.size < EXTENT_MIN or node.size < EXTENT_MIN:
        return None
    fd = open_to_read(path)
    try:
        plan = _plan(fd, node, old, item_max, most)
        if plan is None:
            return None
        flags, new_ext, segs, ops = plan
        # scattered reads of a file not in the page cache (a new snapshot's inode): asked
        # for all at once, so the device works on them together
        for pos, stop in ops:
            if pos >= 0:
                os.posix_fadvise(fd, pos, stop - pos, os.POSIX_FADV_WILLNEED)
        planned, fd = Planned(node, path, old, fd, flags, new_ext, segs, ops), -1
        return planned
    finally:
        if fd >= 0:
            os.close(fd)


def _plan(fd: int, node: Node, old: RecordInode, item_max: int = 0, most: int | None = None
          ) -> tuple[int, bytes, list[tuple[int, int]], list[tuple[int, int]]] | None:
    """(inode flags, extent items as the record keeps them (``most``: as :func:`bounded`),
    data segments, what to do in file order) of open file ``fd`` against its record
    ``old``; each thing to do is ``(-1 - first digest, blocks)`` taken from the record or
    ``(offset, end)`` to read. None: nothing proven unchanged."""
    from .onepass import block_segments, segment_max

    if os.fstat(fd).st_ino != node.st_ino:
        return None
    flags = get_fileattr(fd)
    size = node.size
    if size < EXTENT_MIN or flags & NOCOW:
        return None
    # the items compared as the searches give them, and cut to what the new record keeps
    # (:class:`_Cut`): a file's items are never all held
    cut = _Cut(size, most)
    searched = _searched(fd, node.st_ino, item_max)

    def batches() -> Iterator[bytes]:
        for batch in searched:
            if batch is None:
                cut.dropped = True
                return
            cut.add(batch)
            yield batch

    recorded, limit = old.extents or b"", min(size, old.size)
    given, cells = batches(), None
    try:
        if is_cells(recorded):
            edges = _edges(recorded, limit)
            # the record's cells those this record makes past the bound (the size and the
            # bound the same): made once, by the comparison
            cut.given = size == old.size and edges == _grid(size, cut.most)
            same, cells = _same_cells(recorded, edges, given)
            if not cut.given:
                cells = None
        else:
            same = same_ranges(recorded, given, limit, 2 * (cut.most // EXTENT.size) + 1)
        for _ in given:  # (the items past the comparison, for the record)
            pass
    except OSError:
        return None
    new_ext = cut.result(cells)
    del cells
    if new_ext is None or not same:
        return None
    segs = block_segments(iter_data_segments(fd, size), size, segment_max(cut.most))
    runs = _reusable(same, old, size, segs)
    if not runs:
        return None
    ops: list[tuple[int, int]] = []
    r = 0
    for a, n in segs:
        pos, end = a, a + n
        while pos < end:
            while r < len(runs) and runs[r][1] <= pos:
                r += 1
            if r < len(runs) and runs[r][0] <= pos:  # digests from the record
                stop = min(end, runs[r][1])
                ops.append((-1 - (runs[r][2] + (pos - runs[r][0]) // _BLOCK),
                            -(-(stop - pos) // _BLOCK)))
            else:
                stop = min(end, runs[r][0] if r < len(runs) else end, pos + _PIECE)
                ops.append((pos, stop))
            pos = stop
    return flags, new_ext, segs, ops


def hash_changed(node: Node, path: bytes, old: RecordInode, seed: int,
                 buf: bytearray | mmap.mmap) -> int | None:
    """Hash changed file ``node`` (at ``path``) reading only the blocks that are not proven
    unchanged against its record ``old`` (the same inode): fills in its flags, data ranges,
    block digests, digests and extent items; returns the bytes read. None (nothing filled
    in): the file is not eligible (see the module docstring) or nothing is proven unchanged;
    the caller hashes it whole. (:func:`plan_changed` then :meth:`Planned.read`.)

    Raises:
        BtrdeltaError: the file cannot be read or changed size while it was read.
    """
    planned = plan_changed(node, path, old)
    return None if planned is None else planned.read(seed, buf)
