"""Version 2 and 3 sendshot records in memory as columns: decoding, rows, and patching.

A version 2 or 3 record stores its inodes as columns (``docs/formats/sendshot.md`` §2;
version 3 adds the file extent items of each file, a version 2 record has none).
:class:`Columns` keeps them decoded (tuples of integers, byte strings) with the prefix sums
that locate each row's names, target, xattrs, segments and block digests, so that:

* the columns are kept as typed ``memoryview`` s of the record's inflated body (a version
  6 or 7 record's columns lie 8-aligned there: no join, no copy; an older record's are
  views of its TLVs joined), or ``array.array`` (a big-endian machine's swapped values):
  loading a record makes no Python object per inode and value (the ~40 k integers of a
  6,000-inode record as tuples cost 2 ms and ~800 page faults), and since session 27 no
  copy of the record's ~10 MB of columns (the large tree of issue 15: copies and their
  page faults were most of the ~11 ms its load took beside zstd and BLAKE3);
* :meth:`Columns.inode` materialises one row (:class:`~.sendshot.RecordInode`) and
  :meth:`Columns.rows` all of them (a full load);
* :meth:`Columns.patched` encodes the next record from this one: some rows dropped (inodes
  changed or gone), new rows appended (their new versions), the root replaced or kept. Rows
  kept are copied as runs of column slices (no Python work per unchanged inode but renumbering
  the directory index of each name), so an incremental send's record costs what changed plus
  C-speed copies;
* :func:`encode_rows` encodes a whole record from its inodes (a full send).

Knows the column layout only; the file format around it (frames, head, compression, digest)
is :mod:`~.sendshot`'s.
"""

from __future__ import annotations

import struct
import sys
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import accumulate, compress
from operator import mul

from .. import TYPE_CHECKING, _native
from ..errors import StreamFormatError
from .sendshot import (
    BLOCK,
    C_ATIME,
    C_BLOCKS,
    C_CTIME,
    C_DIGESTS,
    C_EXTENTS,
    C_FLAGS,
    C_GEN,
    C_GID,
    C_INO,
    C_MODE,
    C_MTIME,
    C_NAMELEN,
    C_NAMES,
    C_NEXTENTS,
    C_NNAMES,
    C_NSEGS,
    C_NXATTRS,
    C_PARENT,
    C_RDEV,
    C_SEGMENTS,
    C_SEQUENCE,
    C_SIZE,
    C_TARGETLEN,
    C_TARGETS,
    C_TRANSID,
    C_UID,
    C_XATTRS,
    COLUMNS,
    PER_INODE,
    WHOLE,
    RecordInode,
)

if TYPE_CHECKING:
    from typing import Any, Final, Protocol, TypeAlias

    #: a column of integers: a typed view of a record's bytes, or an array
    Ints: TypeAlias = array[int] | memoryview

    class RowOf(Protocol):
        """inode number -> row (:func:`row_index`): a dict, or the columns accelerator's
        ``Index``."""

        def get(self, key: int, /) -> int | None: ...
        def __getitem__(self, key: int, /) -> int: ...
        def __setitem__(self, key: int, value: int, /) -> None: ...
        def __delitem__(self, key: int, /) -> None: ...
        def __contains__(self, key: object, /) -> bool: ...
        def __len__(self) -> int: ...

__all__ = ["Columns", "assemble", "encode_rows", "gaps", "kept_rows", "numbered", "raw",
           "row_index", "u32s"]

_D = 16  # bytes per block digest
#: bytes per extent item (``btrdelta.fs.btrfs.EXTENT``)
EXTENT_SIZE: Final = 50
#: NEXTENTS value: the file's extent items are not recorded
NO_EXTENTS: Final = 0xFFFFFFFF
_XHEAD = struct.Struct("<HI")
_U32 = struct.Struct("<I")
_REG = 0o100000
_FMT = 0o170000
_ALL = 0xFFFFFFFF
#: the columns' values are little-endian (swapped on a big-endian machine)
_SWAP = sys.byteorder == "big"
if [array(c).itemsize for c in "QqIH"] != [8, 8, 4, 2]:  # as on every Linux platform
    raise ImportError("btrdelta.tree.columns needs 4-byte 'I' and 2-byte 'H' arrays")
#: the fixed per-inode columns and the RecordInode field each holds
_FIELDS: Final = ((C_INO, "ino"), (C_GEN, "generation"), (C_TRANSID, "transid"),
                  (C_MODE, "mode"), (C_UID, "uid"), (C_GID, "gid"), (C_RDEV, "rdev"),
                  (C_SIZE, "size"), (C_ATIME, "atime_ns"), (C_MTIME, "mtime_ns"),
                  (C_CTIME, "ctime_ns"), (C_FLAGS, "flags"), (C_SEQUENCE, "sequence"))
#: result of an encoding: the columns (record number, bytes) and the END counts (inodes,
#: regular files, their bytes, block digests)
Encoded = tuple[list[tuple[int, bytes | memoryview]], tuple[int, int, int, int]]


def _prefix(values: Iterable[int]) -> Ints:
    """The running sums of ``values`` from 0: the reference of the ``columns``
    accelerator's ``prefix`` (``tree/_columns.c``)."""
    return array("Q", accumulate(values, initial=0))


#: a time column holds its ns wrapped into int64 (a file stamped past 2262 is then sent
#: its times again by every --from-sendshot, never refused)
_I64 = 1 << 63


def _q(raw: bytes) -> Ints:
    """The native u64 values in ``raw`` (what ``_columns.c`` returns), in place."""
    return memoryview(raw).cast("Q")


def _new(code: str) -> array[int]:
    """An empty column of the struct type ``code``."""
    return array(code)


def _unpack(data: memoryview | bytes, code: str, count: int, name: int) -> Ints:
    if len(data) != count * struct.calcsize("<" + code):
        raise StreamFormatError(f"column {COLUMNS[name]} holds {len(data)} bytes, not {count} "
                                f"values")
    return _cast(data, code)


def _cast(data: memoryview | bytes, code: str) -> Ints:
    """The little-endian values of ``data`` (a whole number of them): a view of it, not a
    copy (a swapped copy on a big-endian machine)."""
    if not _SWAP:
        return memoryview(data).cast(code)  # type: ignore[call-overload,no-any-return]
    out = _new(code)
    out.frombytes(data)
    out.byteswap()
    return out


def _column(cols: dict[int, memoryview | bytes], c: int, count: int) -> memoryview | bytes:
    """Column ``c`` of ``cols``; SEQUENCE, of a record before version 8: every value unknown
    (all ones)."""
    return cols[c] if c in cols or c != C_SEQUENCE else b"\xff" * (8 * count)


def u32s(data: memoryview | bytes) -> Ints:
    """The u32 values of ``data`` (a patch record's DROP or SLOTS), in place."""
    return _cast(data, "I")


def _kept(data: memoryview | bytes) -> bytes | memoryview:
    """A column of bytes kept as it is (a view of the record), or copied if its buffer
    could change (a frame assembled from pieces): its slices can then be dict keys."""
    return data if isinstance(data, bytes) or data.readonly else bytes(data)


def _copy(values: Ints) -> array[int]:
    """An array holding ``values`` (copied whole: one ``memcpy``)."""
    out = _new(values.typecode if isinstance(values, array) else values.format)
    out.frombytes(raw(values))
    return out


def raw(values: Ints) -> memoryview:
    """The bytes of ``values`` (a view: what ``array.frombytes`` takes)."""
    return memoryview(values).cast("B")


def _pack(values: Ints) -> bytes | memoryview:
    """The column's bytes: a view of ``values`` (not a copy, on a little-endian machine)."""
    if _SWAP:
        swapped = _copy(values)
        swapped.byteswap()
        return swapped.tobytes()
    return memoryview(values).cast("B")


def _blocks_of(size: int, lengths: Iterable[int]) -> int:
    """Block digests of a file of ``size`` whose segments have ``lengths``."""
    if size < BLOCK:
        return 0
    return sum(-(-n // BLOCK) for n in lengths)


class _Out:
    """Columns being assembled: lists of values and byte pieces, packed at the end."""

    def __init__(self) -> None:
        self.fixed = {c: _new(code) for c, code in PER_INODE}
        self.parents, self.namelens = _new("I"), _new("H")
        self.nsegs, self.segs = _new("I"), _new("Q")
        self.nexts = _new("I")
        self.nbytes = 0
        self.pieces: dict[int, list[bytes | memoryview]] = {
            C_NAMES: [], C_TARGETS: [], C_XATTRS: [], C_DIGESTS: [], C_BLOCKS: [],
            C_EXTENTS: []}
        self.count = 0

    def add(self, rows: Sequence[RecordInode], index: dict[int, int]) -> None:
        """Append ``rows``; ``index``: inode number -> row of the record being made."""
        fixed = self.fixed
        for c, field in _FIELDS:
            col, n = fixed[c], len(fixed[c])
            try:
                col.extend([getattr(r, field) for r in rows])
            except OverflowError:  # a time before 1677 or after 2262: its ns past int64
                del col[n:]
                col.extend([(getattr(r, field) + _I64) % (2 * _I64) - _I64 for r in rows])
        fixed[C_NNAMES].extend([len(r.dentries) for r in rows])
        fixed[C_TARGETLEN].extend([len(r.target) for r in rows])
        fixed[C_NXATTRS].extend([len(r.xattrs) if r.xattrs else 0 for r in rows])
        self.nbytes += sum(r.size for r in rows)
        names, targets, xattrs = (self.pieces[c] for c in (C_NAMES, C_TARGETS, C_XATTRS))
        digests, blocks = self.pieces[C_DIGESTS], self.pieces[C_BLOCKS]
        extents = self.pieces[C_EXTENTS]
        for r in rows:
            for parent, name in r.dentries:
                where = index.get(parent)
                if where is None:
                    raise ValueError(f"inode {r.ino}: its directory {parent} is not recorded")
                self.parents.append(where)
                self.namelens.append(len(name))
                names.append(name)
            targets.append(r.target)
            if r.xattrs:
                xattrs += [_XHEAD.pack(len(k), len(v)) + k + v for k, v in sorted(r.xattrs.items())]
            if r.mode & _FMT != _REG:
                continue
            segments = r.segments or []
            if segments == [(0, r.size)] and r.size:
                self.nsegs.append(WHOLE)
            else:
                self.nsegs.append(len(segments))
                for off, length in segments:
                    self.segs.extend((off, length))
            digests.append(r.digest + r.bdigest)
            if r.size >= BLOCK:
                blocks.append(r.blocks)
            if r.extents is None:
                self.nexts.append(NO_EXTENTS)
            else:
                if len(r.extents) % EXTENT_SIZE:
                    raise ValueError(f"inode {r.ino}: extents of {len(r.extents)} bytes")
                self.nexts.append(len(r.extents) // EXTENT_SIZE)
                extents.append(r.extents)
        self.count += len(rows)

    def encoded(self) -> Encoded:
        """The packed columns, in record-number order, and the END counts."""
        cols = [(c, _pack(self.fixed[c])) for c, _code in PER_INODE]
        cols += [(C_PARENT, _pack(self.parents)), (C_NAMELEN, _pack(self.namelens)),
                 (C_NSEGS, _pack(self.nsegs)), (C_SEGMENTS, _pack(self.segs)),
                 (C_NEXTENTS, _pack(self.nexts))]
        cols += [(c, b"".join(p)) for c, p in self.pieces.items()]
        cols.sort()
        nblocks = len(dict(cols)[C_BLOCKS]) // _D
        return cols, (self.count, len(self.nsegs), self.nbytes, nblocks)


def encode_rows(inodes: Iterable[RecordInode], index: dict[int, int] | None = None
                ) -> Encoded:
    """The columns of ``inodes`` (the root first) and the END counts. ``index``: the row of
    each directory named (inode number -> row; default: the rows of ``inodes``).

    Raises:
        ValueError: a name in a directory that is not among ``inodes`` (``index``).
    """
    rows = list(inodes)
    out = _Out()
    out.add(rows, {r.ino: i for i, r in enumerate(rows)} if index is None else index)
    return out.encoded()


class Columns:
    """The decoded columns of a version 2 or 3 record (``count`` inodes, ``nblk`` block
    digests; without columns NEXTENTS and EXTENTS, a version 2 record's: no extents), in
    place (views of ``cols``: a row's digests, blocks and extents are copied out by
    :meth:`inode`).
    ``span``: the rows of a patch record, whose PARENT values are rows of its result (of
    ``span`` rows; :mod:`.chain` checks the rest).

    Raises:
        StreamFormatError: a column of the wrong length, a parent that is not an inode of
            the record, names, targets, xattrs, segments or block digests that do not add up.
    """

    def __init__(self, cols: dict[int, memoryview | bytes], count: int, nblk: int, *,
                 span: int | None = None) -> None:
        self.count, self.fixed = count, (f := {c: _unpack(_column(cols, c, count), code, count, c)
                                              for c, code in PER_INODE})
        self.inos, self.modes, self.sizes = f[C_INO], f[C_MODE], f[C_SIZE]
        # (C-level loops over the columns: no Python code per row; with the columns
        # accelerator no Python object per value either)
        native = _native.live("columns")
        prefix = _prefix if native is None else lambda v: _q(native.prefix(v, 1, None))
        # where each row's names and target start
        self.doff = prefix(f[C_NNAMES])
        nd = self.doff[-1]
        self.parents = _unpack(cols[C_PARENT], "I", nd, C_PARENT)
        #: the PARENT column as stored (u32 little-endian), searched by children() without
        #: the accelerator (copied to bytes then), and the accelerator's search of the column
        self._parent_bytes: bytes | memoryview = cols[C_PARENT]
        self._members = None if native is None else native.members
        self._children: dict[int, list[tuple[bytes, int]]] = {}
        self._names: dict[int, list[tuple[int, bytes]]] = {}  # (dentries())
        self.namelens = _unpack(cols[C_NAMELEN], "H", nd, C_NAMELEN)
        self.names, self.targets = bytes(cols[C_NAMES]), bytes(cols[C_TARGETS])
        self.xattrs = bytes(cols[C_XATTRS])
        self.noff, self.toff = prefix(self.namelens), prefix(f[C_TARGETLEN])
        if self.noff[-1] != len(self.names) or self.toff[-1] != len(self.targets):
            raise StreamFormatError("columns NAMES or TARGETS do not match their lengths")
        limit = count if span is None else span
        if nd and (max(self.parents) if native is None else native.most(self.parents)) >= limit:
            raise StreamFormatError(f"a dentry names a parent beyond the {limit} inodes")
        if native is not None:
            rows, foff = native.where(self.modes, _FMT, _REG, True)
            #: row -> its file index (regular files), and the rows of the files
            self.file_rows, self.foff = _q(rows), _q(foff)
        else:
            is_reg = list(map(_REG.__eq__, map(_FMT.__and__, self.modes)))
            self.file_rows = array("Q", compress(range(count), is_reg))
            self.foff = _prefix(is_reg)
        files = len(self.file_rows)
        self.nsegs = _unpack(cols[C_NSEGS], "I", files, C_NSEGS)
        if native is not None:
            self.soff = _q(native.prefix(self.nsegs, 2, WHOLE))
            holed = list(_q(native.where(self.nsegs, _ALL, WHOLE, False)[0]))
        else:
            holed = list(compress(range(files), map(WHOLE.__ne__, self.nsegs)))
            segs2 = [0] * files
            for k in holed:
                segs2[k] = 2 * self.nsegs[k]
            self.soff = _prefix(segs2)
        self.segs = _unpack(cols[C_SEGMENTS], "Q", self.soff[-1], C_SEGMENTS)
        self.digests, self.blocks = _kept(cols[C_DIGESTS]), _kept(cols[C_BLOCKS])
        if len(self.digests) != 48 * files or len(self.blocks) != _D * nblk:
            raise StreamFormatError("columns DIGESTS or BLOCKS do not match the files")
        # where each file's segments and block digests start
        counts: list[int] | Ints
        if native is not None:
            counts = _q(native.blocks(self.sizes, self.file_rows, BLOCK))
            counts = _copy(counts) if holed else counts  # (changed below)
        else:
            sizes = list(map(self.sizes.__getitem__, self.file_rows))
            counts = [(s + BLOCK - 1) // BLOCK if s >= BLOCK else 0 for s in sizes]
        for k in holed:  # a file with holes (rare): its segments' blocks
            counts[k] = _blocks_of(self.sizes[self.file_rows[k]],
                                   self.segs[self.soff[k] + 1:self.soff[k + 1]:2])
        self.boff = prefix(counts)
        if self.boff[-1] != nblk:
            raise StreamFormatError("column BLOCKS does not match the files' segments")
        self.xoff = self._xattr_offsets(prefix, None if native is None else native.where)
        if C_NEXTENTS in cols:
            self.nexts = _unpack(cols[C_NEXTENTS], "I", files, C_NEXTENTS)
            self.exts = _kept(cols[C_EXTENTS])
        else:
            self.nexts, self.exts = array("I", [NO_EXTENTS]) * files, b""
        #: where each file's extent items start (bytes)
        if native is not None:
            self.eoff = _q(native.prefix(self.nexts, EXTENT_SIZE, NO_EXTENTS))
        else:
            self.eoff = _prefix(map(EXTENT_SIZE.__mul__, map(
                mul, self.nexts, map(NO_EXTENTS.__ne__, self.nexts))))  # (C loops, no Python)
        if self.eoff[-1] != len(self.exts):
            raise StreamFormatError("column EXTENTS does not match NEXTENTS")
        self._row_of: RowOf | None = None

    def _xattr_offsets(self, prefix: Callable[[Ints], Ints], where: Any = None) -> Ints:
        """Where each row's xattrs start; ``where``: the accelerator's, which finds the rows
        that have any (a Python int per row otherwise, ~0.4-0.9 ms for 42,000 rows)."""
        v, pos = self.xattrs, 0
        nxattrs = self.fixed[C_NXATTRS]
        rows: Iterable[int] = compress(range(self.count), nxattrs) if where is None else \
            _q(where(nxattrs, _ALL, 0, False)[0])
        if not v and where is not None and not rows:  # (none: most trees)
            return _q(bytes(8 * (self.count + 1)))
        lengths = array("Q", bytes(8 * self.count))
        for r in rows:
            nx = nxattrs[r]
            start = pos
            for _ in range(nx):
                if pos + _XHEAD.size > len(v):
                    raise StreamFormatError("column XATTRS is truncated")
                k, n = _XHEAD.unpack_from(v, pos)
                pos += _XHEAD.size + k + n
            if pos > len(v):
                raise StreamFormatError("column XATTRS is truncated")
            lengths[r] = pos - start
        if pos != len(v):
            raise StreamFormatError("column XATTRS holds more than the inodes")
        return prefix(lengths)

    def row_of(self) -> RowOf:
        """inode number -> row."""
        if self._row_of is None:
            self._row_of = row_index(self.inos)
        return self._row_of

    def dentries(self, r: int) -> list[tuple[int, bytes]]:
        """Row ``r``'s names as (row of the directory, name): the same list again for the
        same ``r`` (not to be changed; a send asks ~5 times for each row it visits: an
        in-place round of the sendshot benchmark's small tree, ~950 calls for ~200 rows)."""
        got = self._names.get(r)
        if got is None:
            got = self._names[r] = self._dentries(r)
        return got

    def _dentries(self, r: int) -> list[tuple[int, bytes]]:
        names, noff, parents = self.names, self.noff, self.parents
        return [(parents[d], names[noff[d]:noff[d + 1]])
                for d in range(self.doff[r], self.doff[r + 1])]

    def children(self, r: int) -> list[tuple[bytes, int]]:
        """The entries of directory row ``r`` as (name, row), in the record's order; the
        same list again for the same ``r`` (a send asks twice for each directory it lists:
        to list it and to find what was deleted). No index of every directory is built:
        the columns accelerator's ``members`` finds the entries and their rows in one pass
        over the PARENT and dentry-count columns; without it, ``bytes.find`` of ``r`` in
        the stored PARENT column (a C loop) and a bisection for each entry's row (a
        directory of the 6,000-inode tree of issue 15: ~460,000 instructions a call, the
        accelerator ~30,000)."""
        out = self._children.get(r)
        if out is None:
            out = self._children[r] = self._find_children(r)
        return out

    def children_of(self, rows: Iterable[int]) -> None:
        """Find the entries of the directory rows ``rows`` (for :meth:`children`) in one
        pass of the columns accelerator over the PARENT column, not one a directory (a
        send lists every changed directory: 36 passes of a 42,000-inode record's column in
        an in-place round)."""
        todo = array("Q", sorted({r for r in rows if r not in self._children}))
        if len(todo) < 2 or self._members is None:
            for r in todo:
                self.children(r)
            return
        names, noff, parents = self.names, self.noff, self.parents
        found: dict[int, list[tuple[bytes, int]]] = {r: [] for r in todo}
        pairs = _q(self._members(parents, self.doff, todo))
        for d, row in zip(pairs[::2], pairs[1::2], strict=True):
            found[parents[d]].append((names[noff[d]:noff[d + 1]], row))
        self._children.update(found)

    def _find_children(self, r: int) -> list[tuple[bytes, int]]:
        names, noff, doff = self.names, self.noff, self.doff
        if self._members is not None:
            pairs = _q(self._members(self.parents, doff, r))
            return [(names[noff[d]:noff[d + 1]], row)
                    for d, row in zip(pairs[::2], pairs[1::2], strict=True)]
        out: list[tuple[bytes, int]] = []
        raw = self._parent_bytes
        if not isinstance(raw, bytes):
            raw = self._parent_bytes = bytes(raw)
        want = _U32.pack(r)
        pos = raw.find(want)
        while pos >= 0:
            if pos & 3:  # inside two values: not an entry
                pos = raw.find(want, pos + 1)
                continue
            d = pos >> 2
            out.append((names[noff[d]:noff[d + 1]], bisect_right(doff, d) - 1))
            pos = raw.find(want, pos + 4)
        return out

    def inode(self, r: int, by_row: bool = False) -> RecordInode:
        """Row ``r`` whole (``by_row``: its names' directories as rows, not inode numbers:
        a patch record's rows, whose directories are rows of its result)."""
        f, inos = self.fixed, self.inos
        # (the names asked for already, else read: every row read whole, rows(), is not kept)
        names = self._names.get(r) or self._dentries(r)
        node = RecordInode(
            inos[r], self.modes[r], f[C_UID][r], f[C_GID][r], self.sizes[r], f[C_ATIME][r],
            f[C_MTIME][r], f[C_CTIME][r],
            list(names) if by_row else [(inos[p], n) for p, n in names],
            f[C_GEN][r], f[C_TRANSID][r], f[C_RDEV][r], f[C_FLAGS][r],
            self.targets[self.toff[r]:self.toff[r + 1]], sequence=f[C_SEQUENCE][r])
        if self.xoff[r] != self.xoff[r + 1]:
            node.xattrs = _parse_xattrs(self.xattrs, self.xoff[r], self.xoff[r + 1])
        if node.mode & _FMT == _REG:
            k = self.foff[r]
            n = self.nsegs[k]
            if n == WHOLE:
                node.segments = [(0, node.size)]
            else:
                s = self.segs
                node.segments = [(s[j], s[j + 1]) for j in range(self.soff[k], self.soff[k + 1], 2)]
            node.digest = bytes(self.digests[48 * k:48 * k + 16])
            node.bdigest = bytes(self.digests[48 * k + 16:48 * k + 48])
            node.blocks = bytes(self.blocks[_D * self.boff[k]:_D * self.boff[k + 1]])
            if self.nexts[k] != NO_EXTENTS:
                node.extents = bytes(self.exts[self.eoff[k]:self.eoff[k + 1]])
        return node

    def rows(self) -> Iterator[RecordInode]:
        """Every row, in record order."""
        for r in range(self.count):
            yield self.inode(r)

    def patched(self, drop: Iterable[int], added: Sequence[RecordInode],
                root: RecordInode | None = None) -> Encoded:
        """The columns of the record made of this one without the rows ``drop``, with
        ``root`` instead of row 0 (None: row 0 kept) and ``added`` appended, and its END
        counts. Kept rows keep their order; their names are renumbered.

        Raises:
            ValueError: a kept or added name in a directory that is not in the result, or an
                inode number twice.
        """
        n = self.count
        runs = gaps(sorted(set(drop) | ({0} if root is not None else set())), n)
        head = [root] if root is not None else []
        new_row, row_of = kept_rows(n, runs, len(head)), self.row_of()
        index = numbered(new_row, head, added, row_of, len(head) + sum(b - a for a, b in runs))
        return assemble([(self, runs)], new_row, head, added, index, row_of)

    def _copy_runs(self, out: _Out, runs: list[tuple[int, int]], new_row: array[int]) -> None:
        """Append the rows of ``runs`` (column slices) to ``out``."""
        native = _native.live("columns")
        if native is not None:
            self._copy_runs_c(native, out, runs, new_row)
            return
        f, doff, noff, foff = self.fixed, self.doff, self.noff, self.foff
        for a, b in runs:
            for c, _code in PER_INODE:
                out.fixed[c].frombytes(raw(f[c][a:b]))
            out.nbytes += sum(self.sizes[a:b])
            da, db = doff[a], doff[b]
            parents = list(map(new_row.__getitem__, self.parents[da:db]))
            if parents and min(parents) < 0:
                bad = self.inos[self.parents[da + parents.index(min(parents))]]
                raise ValueError(f"a kept inode is named in directory {bad}, which is not")
            out.parents.extend(parents)
            out.namelens.frombytes(raw(self.namelens[da:db]))
            out.pieces[C_NAMES].append(self.names[noff[da]:noff[db]])
            out.pieces[C_TARGETS].append(self.targets[self.toff[a]:self.toff[b]])
            out.pieces[C_XATTRS].append(self.xattrs[self.xoff[a]:self.xoff[b]])
            fa, fb = foff[a], foff[b]
            out.nsegs.frombytes(raw(self.nsegs[fa:fb]))
            out.segs.frombytes(raw(self.segs[self.soff[fa]:self.soff[fb]]))
            out.pieces[C_DIGESTS].append(self.digests[48 * fa:48 * fb])
            out.pieces[C_BLOCKS].append(self.blocks[_D * self.boff[fa]:_D * self.boff[fb]])
            out.nexts.frombytes(raw(self.nexts[fa:fb]))
            out.pieces[C_EXTENTS].append(self.exts[self.eoff[fa]:self.eoff[fb]])
            out.count += b - a

    def _copy_runs_c(self, native: Any, out: _Out, runs: list[tuple[int, int]],
                     new_row: array[int]) -> None:
        """:meth:`_copy_runs` with the columns accelerator: each column's runs copied and
        the names' directories renumbered in one C call (not ~12 slices a run)."""
        rows = array("Q", [x for run in runs for x in run])

        def via(offsets: Ints, spans: Ints) -> array[int]:
            return array("Q", map(offsets.__getitem__, spans))

        for c, _code in PER_INODE:
            col = self.fixed[c]
            out.fixed[c].frombytes(native.gather(col, rows, col.itemsize))
        out.nbytes += sum(sum(self.sizes[a:b]) for a, b in runs)
        names = via(self.doff, rows)
        parents, bad = native.remap(self.parents, names, new_row)
        if bad >= 0:
            raise ValueError(f"a kept inode is named in directory "
                             f"{self.inos[self.parents[bad]]}, which is not")
        out.parents.frombytes(parents)
        out.namelens.frombytes(native.gather(self.namelens, names, 2))
        out.pieces[C_NAMES].append(native.gather(self.names, via(self.noff, names), 1))
        out.pieces[C_TARGETS].append(native.gather(self.targets, via(self.toff, rows), 1))
        out.pieces[C_XATTRS].append(native.gather(self.xattrs, via(self.xoff, rows), 1))
        files = via(self.foff, rows)
        out.nsegs.frombytes(native.gather(self.nsegs, files, 4))
        out.segs.frombytes(native.gather(self.segs, via(self.soff, files), 8))
        out.pieces[C_DIGESTS].append(native.gather(self.digests, files, 48))
        out.pieces[C_BLOCKS].append(native.gather(self.blocks, via(self.boff, files), _D))
        out.nexts.frombytes(native.gather(self.nexts, files, 4))
        out.pieces[C_EXTENTS].append(native.gather(self.exts, via(self.eoff, files), 1))
        out.count += sum(b - a for a, b in runs)


def gaps(skip: Iterable[int], n: int) -> list[tuple[int, int]]:
    """The runs ``[a, b)`` of the rows below ``n`` that are not in ``skip`` (increasing)."""
    runs: list[tuple[int, int]] = []
    start = 0
    for r in skip:
        if r > start:
            runs.append((start, r))
        start = r + 1
    if start < n:
        runs.append((start, n))
    return runs


def kept_rows(span: int, runs: Sequence[tuple[int, int]], first: int = 0) -> array[int]:
    """The new row of each of ``span`` old rows: those of ``runs`` ``[a, b)`` (in order,
    not overlapping) numbered from ``first`` in order, the others -1 (dropped)."""
    native = _native.live("columns")
    if native is None:
        new_row = array("q", [-1]) * span
        pos = first
        for a, b in runs:
            new_row[a:b] = array("q", range(pos, pos + b - a))
            pos += b - a
        return new_row
    # the running count of the rows kept, after ``first`` (one C pass, no Python int per
    # row); the others made -1 by run
    kept = bytearray(b"\x01" * first) + bytearray(span)
    for a, b in runs:
        kept[first + a:first + b] = b"\x01" * (b - a)
    new_row = array("q")
    new_row.frombytes(memoryview(native.prefix(kept, 1, None))[8 * first:8 * (first + span)])
    start = 0
    for a, b in [*runs, (span, span)]:
        if a > start:
            new_row[start:a] = array("q", [-1]) * (a - start)
        start = b
    return new_row


def numbered(new_row: array[int], head: Sequence[RecordInode], added: Sequence[RecordInode],
             row_of: RowOf, pos: int) -> dict[int, int]:
    """The row of each inode of ``head`` (from 0) and ``added`` (from ``pos``) in a whole
    record; ``new_row`` (of the old rows) gets the new row of each old row they replace.

    Raises:
        ValueError: an inode both kept (``new_row``) and added.
    """
    index = {r.ino: i for i, r in enumerate(head)}
    index.update((r.ino, pos + i) for i, r in enumerate(added))
    for ino, i in index.items():
        old = row_of.get(ino)
        if old is not None:
            if new_row[old] != -1:
                raise ValueError(f"inode {ino} is both kept and added")
            new_row[old] = i
    return index


def assemble(sources: Sequence[tuple[Columns, list[tuple[int, int]]]], new_row: array[int],
             head: Sequence[RecordInode], added: Sequence[RecordInode], index: dict[int, int],
             row_of: RowOf) -> Encoded:
    """The columns of ``head``, the rows of ``sources`` (columns and their runs of rows
    ``[a, b)``, copied as they are: no :class:`RecordInode` made) and ``added``, in that
    order, and the END counts.

    The PARENT values of every source are rows of one numbering (a whole record's rows, or
    the view of a chain of patches: :mod:`.chain`); ``new_row`` gives the row of the result
    of each of them (-1: not in it), ``row_of`` the row of each inode number in that
    numbering and ``index`` the row of the result of each inode of ``head`` and ``added``.

    Raises:
        ValueError: a name in a directory that is not in the result.
    """
    lookup = _Lookup(index, row_of, new_row)
    out = _Out()
    out.add(head, lookup)
    for cols, runs in sources:
        cols._copy_runs(out, runs, new_row)
    out.add(added, lookup)
    return out.encoded()


def row_index(inos: Ints) -> RowOf:
    """Each inode number of ``inos`` -> its row (the last one, should one repeat): the
    columns accelerator's ``index`` (a table of u64 keys: no Python int per row, ~0.5 ms
    for the 42,000 inodes of issue 15's large tree), else a dict (~2.8 ms)."""
    make = getattr(_native.live("columns"), "index", None)
    if make is not None:
        got: RowOf = make(inos)
        return got
    return dict(zip(inos, range(len(inos)), strict=True))


class _Lookup(dict[int, int]):
    """inode number -> new row, for names of new rows: new inodes first, then kept rows
    (``new_row``: the new row of each old one, -1 for one dropped)."""

    def __init__(self, index: dict[int, int], row_of: RowOf,
                 new_row: Sequence[int]) -> None:
        super().__init__(index)
        self.row_of, self.new_row = row_of, new_row

    def get(self, ino: int, default: int | None = None) -> int | None:  # type: ignore[override]
        got = super().get(ino)
        if got is not None:
            return got
        old = self.row_of.get(ino)
        if old is None or self.new_row[old] < 0:
            return default
        return self.new_row[old]


def _parse_xattrs(v: bytes, pos: int, end: int) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    while pos < end:
        k, n = _XHEAD.unpack_from(v, pos)
        pos += _XHEAD.size
        out[v[pos:pos + k]] = v[pos + k:pos + k + n]
        pos += k + n
    return out
