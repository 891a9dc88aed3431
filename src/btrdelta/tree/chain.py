"""A whole sendshot record with its patch records applied: the view a send compares with.

A *patch record* (version 5, ``docs/formats/sendshot.md`` §2b) names its base record and
holds only what changed since: the rows of the base's view dropped, and its own rows, each
replacing a row of the base's view (the same inode, changed) or added after the last row.
Rows keep their number along a chain (no renumbering: a dropped row leaves a hole), so a
patch costs what changed to write, and applying it costs what it holds plus C-speed copies
of six small columns (inode numbers, modes, sizes, generations, flags, sequences) and of the
files' digests.

:class:`View` has the interface of :class:`~.columns.Columns` that a send uses (``row_of``,
``inos``, ``modes``, ``sizes``, ``fixed[C_GEN]``, ``[C_FLAGS]``, ``[C_SEQUENCE]``,
``file_rows``, ``digests``, ``children``, ``dentries``, ``inode``, ``rows``) and
:meth:`View.patched` makes the next record: a :class:`~.sendshot.Patch`, or a whole record
(*compaction*) once the chain has :data:`MAX_DEPTH` patches or its patches hold more than a
sixteenth of the rows (:data:`SPREAD`, plus :data:`SLACK`) or of the base's bytes of file
digests (plus :data:`BYTES_SLACK`).

Knows the column layout and the patch's meaning; reading files is :mod:`~.sendshot`'s and
finding the records of a chain the store's.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence

from .. import TYPE_CHECKING
from ..errors import StreamFormatError
from .columns import (
    Columns,
    Encoded,
    _copy,
    _Lookup,
    assemble,
    encode_rows,
    gaps,
    kept_rows,
    numbered,
    raw,
    row_index,
)
from .sendshot import (
    _DROP,
    _END,
    _SLOTS,
    C_FLAGS,
    C_GEN,
    C_INO,
    C_MODE,
    C_PARENT,
    C_SEQUENCE,
    C_SIZE,
    Patch,
    RecordInode,
)

if TYPE_CHECKING:
    from typing import Final

    from .columns import Ints, RowOf

__all__ = ["BYTES_SLACK", "MAX_DEPTH", "SLACK", "SPREAD", "View"]

#: a chain is compacted (a whole record written) when it would hold more patches than this
MAX_DEPTH: Final = 8
#: ... or when its patches hold more rows (dropped, replaced, added) than the tree's divided
#: by this, plus :data:`SLACK`. Costs measured (session 24, medians under load 6): a chain's
#: rows cost ~6.5 µs each to load (a patch read, checked, applied: ~5 ms for 7 patches of
#: 766 rows in all), a whole record ~0.45 µs a row of the tree to write (13 ms waited for
#: and 4.5 ms of patching on 42,402 rows; ~3 ms on 5,965): a chain pays while it holds
#: fewer rows than ~1/14 of the tree's
SPREAD: Final = 16
SLACK: Final = 64
#: ... or when its patches hold more bytes of file digests (BLOCKS and DIGESTS: most of a
#: record) than the base's divided by :data:`SPREAD`, plus this: a few large files changed
#: all over each round (a database) make patches as large as the whole record, and a chain
#: of them would grow the store by a whole record a round (SQLite's rounds in `benchmarks
#: sendshot`: a chain of 4 held 1.66 % of the data against 0.42 % for one whole record)
BYTES_SLACK: Final = 64 << 10
_FMT, _DIR, _REG = 0o170000, 0o040000, 0o100000
_D = 16  # bytes of a block digest


class View:
    """``base`` (a whole record's columns) with patches applied (:meth:`apply`).

    Args:
        base: the columns of the chain's whole record.
        patches: whether :meth:`patched` may make patch records (a version 3 base's lineage
            keeps whole records of version 3).
    """

    def __init__(self, base: Columns, patches: bool = True) -> None:
        self.base, self.patches = base, patches
        #: patches applied, rows they hold (replaced or added, and dropped)
        self.depth = self.held = 0
        #: bytes of file digests (BLOCKS, DIGESTS) the patches hold, and the base
        self.held_bytes, self.base_bytes = 0, len(base.blocks) + len(base.digests)
        #: rows (dropped ones included), and the rows dropped
        self.span = base.count
        self.dead: set[int] = set()
        #: rows replaced or added: the patch's rows and the row there (materialised when
        #: asked: a chain's patches hold a few thousand rows, a send reads few of them)
        self.ext: dict[int, tuple[Columns, int]] = {}
        self._row_of: RowOf | None = None
        self._children: dict[int, list[tuple[bytes, int]]] = {}
        self._ext_kids: dict[int, list[tuple[bytes, int]]] | None = None
        #: the digest of the whole record (``base``), when read from a store: a chain may
        #: then be squashed into one patch of it (:meth:`_squashed`)
        self.whole: str | None = None
        #: the columns a send reads whole (:meth:`_columns`), made again after a patch
        self._cols: tuple[dict[int, Ints], Ints, bytes | memoryview] | None = None

    @property
    def live(self) -> int:
        """The inodes of the view."""
        return self.span - len(self.dead)

    # -- applying a patch -------------------------------------------------------------------

    def apply(self, patch: Patch, source: str | None = None) -> None:
        """Apply a patch read from a record (``source``: its name in errors).

        Raises:
            StreamFormatError: the patch is not one of this view (a drop beyond it, a row
                that is not its inode, a directory that is not one or is dropped, counts
                that do not add up), naming the record and the offset.
        """
        def bad(message: str, record: int, index: int, size: int = 4) -> StreamFormatError:
            return StreamFormatError(message, source=source, offset=patch.at(record, index, size))

        span, dead, rows = self.span, self.dead, patch.rows
        drop = set(patch.drop)
        gone = drop | dead
        row_of = self.row_of()
        prev = 0
        for i, d in enumerate(patch.drop):
            if d <= prev or d >= span or d in dead:
                raise bad(f"DROP row {d} is not a row of its base's {span} (or not in order)",
                          _DROP, i)
            prev = d
        nxt, taken = span, set()
        for i, (s, ino) in enumerate(zip(patch.slots, rows.inos, strict=True)):
            if s == nxt:
                nxt += 1
                old = row_of.get(ino)
                if old is not None and old not in drop:
                    raise bad(f"SLOTS: inode {ino} added twice", _SLOTS, i)
            elif s >= span or s in gone or s in taken or self.ino(s) != ino:
                raise bad(f"SLOTS row {s} is neither a row of its base holding inode {ino} "
                          "nor the next new row", _SLOTS, i)
            taken.add(s)
        if nxt != patch.span or self.live - len(drop) + nxt - span != patch.live:
            raise StreamFormatError(f"END counts {patch.span} rows, {patch.live} inodes; the "
                                    f"patch makes {nxt} and {self.live - len(drop) + nxt - span}",
                                    source=source, offset=patch.where.get(_END))
        slot_of = dict(zip(patch.slots, range(len(patch.slots)), strict=True))
        for d, parent in enumerate(rows.parents):
            k = slot_of.get(parent)
            mode = rows.modes[k] if k is not None else \
                self._mode(parent) if parent < span and parent not in gone else 0
            if mode & _FMT != _DIR:
                raise bad(f"PARENT row {parent} is not a directory of the result",
                          C_PARENT, d)
        # a directory replaced by another type names nothing either (the root stays one)
        retyped = {s for k, s in enumerate(patch.slots)
                   if s < span and self._mode(s) & _FMT == _DIR and rows.modes[k] & _FMT != _DIR}
        if 0 in retyped:
            raise bad("SLOTS: the root is replaced by an inode that is not a directory",
                      _SLOTS, list(patch.slots).index(0))
        kept = self._kept(drop | retyped, taken)
        if kept is not None:
            d, said = kept
            raise bad(said, *((_DROP, list(patch.drop).index(d)) if d in drop
                              else (_SLOTS, list(patch.slots).index(d))))
        for d in drop:
            ino = self.ino(d)
            if row_of.get(ino) == d:
                del row_of[ino]
            dead.add(d)
            self.ext.pop(d, None)
        for k, s in enumerate(patch.slots):
            self.ext[s] = (rows, k)
            row_of[rows.inos[k]] = s
        self.span = nxt
        self.depth += 1
        self.held += len(drop) + len(patch.slots)
        self.held_bytes += len(rows.blocks) + len(rows.digests)
        self._children, self._ext_kids = {}, None
        self._cols = None

    def _kept(self, drop: set[int], taken: set[int]) -> tuple[int, str] | None:
        """A row kept as it is that stays named in a directory of ``drop`` (``taken``: the
        rows replaced): the directory's row and what is wrong, or None."""
        for d in drop:
            if self._mode(d) & _FMT == _DIR:
                for name, c in self.children(d):
                    if c not in drop and c not in taken:
                        return d, f"directory row {d} goes but its entry {name!r} is kept"
        return None

    def _mode(self, r: int) -> int:
        got = self.ext.get(r)
        return int(got[0].modes[got[1]] if got is not None else self.base.modes[r])

    def ino(self, r: int) -> int:
        """The inode number of row ``r``."""
        got = self.ext.get(r)
        return int(got[0].inos[got[1]]) if got is not None else int(self.base.inos[r]) \
            if r < self.base.count else 0

    @property
    def fixed(self) -> dict[int, Ints]:
        """Columns INO, MODE, SIZE and GEN of the view (the others: :meth:`inode`)."""
        return self._columns()[0]

    @property
    def inos(self) -> Ints:
        return self._columns()[0][C_INO]

    @property
    def modes(self) -> Ints:
        return self._columns()[0][C_MODE]

    @property
    def sizes(self) -> Ints:
        return self._columns()[0][C_SIZE]

    @property
    def file_rows(self) -> Ints:
        """The row of each regular file (in the order of :attr:`digests`)."""
        return self._columns()[1]

    @property
    def digests(self) -> bytes | memoryview:
        """DIGESTS of the files of :attr:`file_rows`."""
        return self._columns()[2]

    def _columns(self) -> tuple[dict[int, Ints], Ints, bytes | memoryview]:
        """The columns a send reads whole, of the view (copies of the base's, patched)."""
        if self._cols is None:
            self._cols = self._make_columns()
        return self._cols

    def _make_columns(self) -> tuple[dict[int, Ints], Ints, bytes | memoryview]:
        base, ext, dead = self.base, self.ext, self.dead
        if not ext and not dead:
            return base.fixed, base.file_rows, base.digests
        n, added = base.count, range(base.count, self.span)
        cols: dict[int, Ints] = {}
        for c in (C_INO, C_MODE, C_SIZE, C_GEN, C_FLAGS, C_SEQUENCE):
            col = _copy(base.fixed[c])
            col.extend(ext[r][0].fixed[c][ext[r][1]] if r in ext else 0 for r in added)
            for r, (got, k) in ext.items():
                if r < n:
                    col[r] = got.fixed[c][k]
            cols[c] = col
        # the base's files but those dropped or replaced, then the view's own
        stale = sorted(base.foff[r] for r in (dead | ext.keys()) if r < n
                       and base.modes[r] & _FMT == _REG)
        rows, digests = array("Q"), []
        start = 0
        for k in [*stale, len(base.file_rows)]:
            rows.frombytes(raw(base.file_rows[start:k]))
            digests.append(base.digests[48 * start:48 * k])
            start = k + 1
        for r in sorted(ext):
            cols_of, k = ext[r]
            if cols_of.modes[k] & _FMT == _REG:
                rows.append(r)
                f = cols_of.foff[k]
                digests.append(cols_of.digests[48 * f:48 * f + 48])
        return cols, rows, b"".join(digests)

    # -- the Columns interface ---------------------------------------------------------------

    def row_of(self) -> RowOf:
        """inode number -> row, of the live rows."""
        if self._row_of is None:  # (made once, from the base: patches keep it up to date)
            inos = self.inos
            if len(inos) != self.span:
                raise ValueError(f"{len(inos)} inode numbers for {self.span} rows")
            got = row_index(inos)
            for r in self.dead:
                ino = self.inos[r]
                if got.get(ino) == r:
                    del got[ino]
            self._row_of = got
        return self._row_of

    def dentries(self, r: int) -> list[tuple[int, bytes]]:
        """Row ``r``'s names as (row of the directory, name)."""
        got = self.ext.get(r)
        return got[0].dentries(got[1]) if got is not None else self.base.dentries(r)

    def children(self, r: int) -> list[tuple[bytes, int]]:
        """The entries of directory row ``r`` as (name, row)."""
        out = self._children.get(r)
        if out is None:
            ext, dead = self.ext, self.dead
            if self._ext_kids is None:  # (the rows of the patches, by directory: once)
                self._ext_kids = {}
                for c, (rows, k) in ext.items():
                    for p, name in rows.dentries(k):
                        self._ext_kids.setdefault(p, []).append((name, c))
            out = [] if r >= self.base.count else [
                (name, c) for name, c in self.base.children(r) if c not in ext and c not in dead]
            out += self._ext_kids.get(r, ())
            self._children[r] = out
        return out

    def children_of(self, rows: Iterable[int]) -> None:
        """Find the entries of the directory rows ``rows`` (for :meth:`children`) at once:
        the base's in one pass (:meth:`~.columns.Columns.children_of`)."""
        want = [r for r in rows if r not in self._children]
        n = self.base.count
        self.base.children_of(r for r in want if r < n)
        for r in want:
            self.children(r)

    def inode(self, r: int) -> RecordInode:
        """Row ``r`` whole (its names' directories as inode numbers)."""
        got = self.ext.get(r)
        if got is None:
            return self.base.inode(r)
        node = got[0].inode(got[1], by_row=True)
        node.dentries = [(self.ino(p), name) for p, name in node.dentries]
        return node

    def rows(self) -> Iterator[RecordInode]:
        """Every live row, in row order (the root first)."""
        dead = self.dead
        for r in range(self.span):
            if r not in dead:
                yield self.inode(r)

    # -- the next record ---------------------------------------------------------------------

    def patched(self, drop: Sequence[int], added: Sequence[RecordInode],
                root: RecordInode | None = None) -> Encoded | Patch:
        """The record of this view without the rows ``drop``, with ``root`` instead of row 0
        (None: kept) and ``added``: a :class:`~.sendshot.Patch` of this view; or, the chain
        long enough, one of its whole record that holds the chain's rows and these
        (:meth:`_squashed`), else (or a version 3 lineage) the whole record's columns.

        Raises:
            ValueError: an inode both kept and added, a kept inode named in a directory
                dropped, a name in a directory that is not in the result.
        """
        held = self.held + len(drop) + len(added) + (root is not None)
        nbytes = self.held_bytes + sum(len(r.blocks) + 48 * (r.segments is not None)
                                       for r in added)
        if not self.patches or (root is not None and root.ino != self.ino(0)):
            return self._whole(drop, added, root)
        if self.depth + 1 > MAX_DEPTH or held > self._rows_limit() or \
                nbytes > self._bytes_limit():
            return self._squashed(drop, added, root) or self._whole(drop, added, root)
        row_of = self.row_of()
        gone = set(drop)
        slots: list[int] = []
        rows: list[RecordInode] = []
        index: dict[int, int] = {}
        nxt = self.span
        for rec in ([root] if root is not None else []) + list(added):
            r = row_of.get(rec.ino)
            if r is not None and r not in gone and not (rec is root and r == 0):
                raise ValueError(f"inode {rec.ino} is both kept and added")
            if r is None:
                r, nxt = nxt, nxt + 1
            gone.discard(r)
            index[rec.ino] = r
            slots.append(r)
            rows.append(rec)
        kept = self._kept(gone, set(slots))
        if kept is not None:
            raise ValueError(kept[1])
        lookup = _Lookup(index, row_of, _Kept(gone))  # type: ignore[arg-type]
        encoded = encode_rows(rows, lookup)
        return Patch(sorted(gone), slots, encoded, nxt, self.live - len(gone) + nxt - self.span)

    def _rows_limit(self) -> int:
        return self.live // SPREAD + SLACK

    def _bytes_limit(self) -> int:
        return self.base_bytes // SPREAD + BYTES_SLACK

    def _carried(self, gone: set[int], root: RecordInode | None
                 ) -> list[tuple[Columns, list[tuple[int, int]]]]:
        """The rows of the patches still in the view (not in ``gone``; row 0 only when
        ``root`` is None), by patch: ``(its columns, [(its row, row of the view)])``, each
        sorted by its row."""
        by_patch: dict[int, tuple[Columns, list[tuple[int, int]]]] = {}
        for r, (cols, k) in self.ext.items():
            if r not in gone and (r or root is None):
                by_patch.setdefault(id(cols), (cols, []))[1].append((k, r))
        for _cols, rows in by_patch.values():
            rows.sort()
        return list(by_patch.values())

    def _squashed(self, drop: Sequence[int], added: Sequence[RecordInode],
                  root: RecordInode | None) -> Patch | None:
        """The record of :meth:`patched` as a patch of the chain's whole record (its
        ``base`` that record's digest, :attr:`whole`): the rows the chain's patches still
        hold (copied by column runs), ``root`` and ``added``; the rows the base's view
        dropped since. None when it would hold more than half of what a chain may (rows
        or bytes of digests: a chain that changed that much is compacted whole), or the
        whole record's digest is not known.

        A chain that changes the same rows each round (a file written all over, its
        directory) squashes to one patch the size of a round's, where a whole record
        costs what the tree holds to make, compress, hash and write (issue 15's large
        tree: ~5 MB, ~17 ms of CPU a compaction)."""
        if self.whole is None:
            return None
        n, span, ext, dead = self.base.count, self.span, self.ext, self.dead
        gone = set(drop)
        row_of = self.row_of()
        carried = self._carried(gone, root)
        # the rows of the result: the base's rows (< n) keep their number, the others are
        # numbered again from n in the order of the patch's rows
        new_row = kept_rows(span, [(0, n)])
        nxt, slots = n, [0] if root is not None else []
        nbytes = 0
        for cols, rows in carried:
            for k, r in rows:
                if r >= n:
                    new_row[r], nxt = nxt, nxt + 1
                slots.append(int(new_row[r]))
                if cols.modes[k] & _FMT == _REG:
                    f = cols.foff[k]
                    nbytes += 48 + _D * (cols.boff[f + 1] - cols.boff[f])
        index: dict[int, int] = {}
        if root is not None:
            index[root.ino] = 0
        again: set[int] = set()  # the rows of the view dropped and added again (changed)
        for rec in added:
            old = row_of.get(rec.ino)
            if old is not None and old not in gone:
                raise ValueError(f"inode {rec.ino} is both kept and added")
            r = old if old is not None and old < n else nxt
            if old is not None:
                again.add(old)
                new_row[old] = r
            if r == nxt:
                nxt += 1
            index[rec.ino] = r
            slots.append(r)
            nbytes += len(rec.blocks) + 48 * (rec.segments is not None)
        taken = set(slots)
        # the base's rows gone since (dropped, or changed and dropped now) and not taken again
        dropped = sorted(r for r in (gone | dead | ext.keys()) if 0 < r < n and r not in taken)
        if len(dropped) + len(slots) > self._rows_limit() // 2 or \
                nbytes > self._bytes_limit() // 2:
            return None
        kept = self._kept(gone - again, again)
        if kept is not None:
            raise ValueError(kept[1])
        for r in dropped:
            new_row[r] = -1
        encoded = assemble([(cols, _runs(k for k, _r in rows)) for cols, rows in carried],
                           new_row, [root] if root is not None else [], added, index, row_of)
        return Patch(dropped, slots, encoded, nxt, n - len(dropped) + nxt - n, base=self.whole)

    def _whole(self, drop: Sequence[int], added: Sequence[RecordInode],
               root: RecordInode | None) -> Encoded:
        """The whole record: the root, the base's rows kept, the rows of each patch kept
        (copied by column runs, as the base's: no :class:`~.sendshot.RecordInode` made of
        a row carried), then ``added``; rows renumbered."""
        base, ext, n = self.base, self.ext, self.base.count
        if not ext and not self.dead:
            return base.patched(drop, added, root)
        gone = set(drop)
        if root is None and 0 in ext:
            root = self.inode(0)
        head = [root] if root is not None else []
        skip = gone | self.dead | ext.keys() | ({0} if root is not None else set())
        runs = gaps(sorted(r for r in skip if r < n), n)
        new_row = kept_rows(self.span, runs, len(head))
        pos = len(head) + sum(b - a for a, b in runs)
        carried = self._carried(gone, root)
        for _cols, rows in carried:
            for _k, r in rows:
                new_row[r], pos = pos, pos + 1
        row_of = self.row_of()
        index = numbered(new_row, head, added, row_of, pos)
        return assemble([(base, runs)] + [(cols, _runs(k for k, _r in rows))
                                          for cols, rows in carried],
                        new_row, head, added, index, row_of)


def _runs(rows: Iterable[int]) -> list[tuple[int, int]]:
    """Increasing ``rows`` as runs ``[a, b)``."""
    out: list[tuple[int, int]] = []
    for r in rows:
        if out and out[-1][1] == r:
            out[-1] = (out[-1][0], r + 1)
        else:
            out.append((r, r + 1))
    return out


class _Kept:
    """The row of each row of a view in the result of a patch: the same, -1 if dropped."""

    def __init__(self, gone: set[int]) -> None:
        self.gone = gone

    def __getitem__(self, r: int) -> int:
        return -1 if r in self.gone else r
