"""Comparing the contents of a file and its old version: equal or not, the blocks that differ
(:func:`changed_ranges`, :func:`compare_files`), holes punched since (:func:`punched`), and
those changed blocks found in an old file at a block-aligned shift (:func:`shifted_clones`).

A send from a sendshot record compares digests, not files: it imports this module only for
the changed files it reads against an old tree on disk (a send with a parent snapshot).
"""

from __future__ import annotations

import bisect
import contextlib
import os
from collections.abc import Iterator

from .. import TYPE_CHECKING
from .._optional import need
from .._value import Value
from ..errors import BtrdeltaError
from ..fs.btrfs import get_fileattr
from ..fs.content import data_segments, has_byte_at
from .scan import open_file, open_to_read

if TYPE_CHECKING:
    import threading
    from typing import Any

if TYPE_CHECKING:  # pyfastcdc and xxhash come with [make]: imported when a send starts
    from pyfastcdc.cy import FastCDC

__all__ = [
    "BLOCK",
    "Compared",
    "changed_ranges",
    "compare_files",
    "files_equal",
    "punched",
    "shifted_clones",
]

#: granularity of in-place diffs (the btrfs sector size)
BLOCK = 4096
_READ = 1 << 20


def files_equal(a: bytes, b: bytes, size: int) -> bool:
    """True if the two files (both of ``size`` bytes) have the same content (early exit).
    Only where either has data is read: a range that is a hole in both reads as zeros in
    both (two sparse files of 1 TiB compare in their data's time, not in minutes)."""
    if size == 0:
        return True
    with _both(a, b) as (fa, fb):
        for start, end in _regions(data_segments(fa, size), data_segments(fb, size), size):
            pos = start
            while pos < end:
                x = os.pread(fa, min(_READ, end - pos), pos)
                if not x or x != os.pread(fb, len(x), pos):
                    return False
                pos += len(x)
        return all(has_byte_at(f, size - 1) and not has_byte_at(f, size)  # (both: size)
                   for f in (fa, fb))


@contextlib.contextmanager
def _both(a: bytes, b: bytes) -> Iterator[tuple[int, int]]:
    """Files ``a`` and ``b`` open for reading, closed after (``a`` too where ``b`` cannot be
    opened: a file deleted under a send of a live tree)."""
    fa = open_file(a)
    try:
        fb = open_file(b)
    except BaseException:
        os.close(fa)
        raise
    try:
        yield fa, fb
    finally:
        os.close(fa)
        os.close(fb)


def _overlap(
    segs: list[tuple[int, int]], start: int, end: int
) -> Iterator[tuple[int, int]]:
    for off, length in segs:
        a, b = max(off, start), min(off + length, end)
        if a < b:
            yield a, b - a


def changed_ranges(
    old_path: bytes, new_path: bytes, old_size: int, new_size: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Where a changed file differs from its old version.

    Returns:
        ``(writes, holes)``: byte ranges ``(offset, length)`` of the new file's data that
        differ from the old content (block aligned, except at EOF), and ranges that are holes
        in the new file but data in the old one (to punch), both below ``new_size``.
    """
    with _both(old_path, new_path) as (fo, fn):
        new_segs = data_segments(fn, new_size)
        old_segs = data_segments(fo, old_size)
        writes: list[tuple[int, int]] = []

        def add(a: int, b: int) -> None:
            if writes and writes[-1][0] + writes[-1][1] == a:
                writes[-1] = (writes[-1][0], b - writes[-1][0])
            else:
                writes.append((a, b - a))

        for off, length in new_segs:
            # compare in reads aligned to BLOCK so that write ranges are block aligned
            pos = off - off % BLOCK
            end = off + length
            while pos < end:
                want = min(_READ, end - pos)
                y = os.pread(fn, want, pos)
                if not y:
                    break
                x = os.pread(fo, len(y), pos) if pos < old_size else b""
                if x != y:
                    n = len(y)
                    for b0 in range(0, n, BLOCK):
                        b1 = min(b0 + BLOCK, n)
                        if x[b0:b1] != y[b0:b1]:
                            add(pos + b0, pos + b1)
                pos += len(y)
        return writes, punched(new_segs, old_segs, old_size, new_size)


def punched(new_segs: list[tuple[int, int]], old_segs: list[tuple[int, int]], old_size: int,
            new_size: int) -> list[tuple[int, int]]:
    """Ranges that are holes in the new file (data ranges ``new_segs``) but data in the old
    one (``old_segs``), below both sizes: the holes to punch."""
    holes: list[tuple[int, int]] = []
    limit = min(old_size, new_size)
    pos = 0
    gaps: list[tuple[int, int]] = []
    for off, length in [*new_segs, (limit, 0)]:
        if off > pos:
            gaps.append((pos, min(off, limit) - pos))
        pos = max(pos, off + length)
        if pos >= limit:
            break
    for g_off, g_len in gaps:
        if g_len > 0:
            holes.extend(_overlap(old_segs, g_off, g_off + g_len))
    return holes


class Compared(Value):
    """Two versions of a file read side by side (:func:`compare_files`)."""

    old_digest: bytes
    old_flags: int
    new_digest: bytes
    new_flags: int
    #: as :func:`changed_ranges` gives them (empty when the contents are equal)
    writes: list[tuple[int, int]]
    holes: list[tuple[int, int]]
    #: the new file's content, when both files were read whole (up to 1 MiB) and differ
    data: bytes | None = None


def _regions(a: list[tuple[int, int]], b: list[tuple[int, int]], size: int
             ) -> list[tuple[int, int]]:
    """``(start, end)`` of the data ranges of two files, widened to whole blocks, merged."""
    out: list[tuple[int, int]] = []
    for off, length in sorted(a + b):
        start, end = off - off % BLOCK, min(size, -(-(off + length) // BLOCK) * BLOCK)
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _read_at(fd: int, pos: int, n: int, size: int, path: bytes) -> bytes:
    """``n`` bytes at ``pos`` of a file of ``size`` bytes (fewer at its end)."""
    want = max(0, min(n, size - pos))
    data = os.pread(fd, want, pos) if want else b""
    if len(data) != want:
        raise BtrdeltaError("file changed while sending (short read)", path=path)
    return data


def compare_files(old_path: bytes, new_path: bytes, old_size: int, new_size: int,
                  stop: threading.Event | None = None) -> Compared:
    """Read an old and a new version of a file once each, side by side: their content
    digests (XXH3-128, holes hashed as the zeros they read as, as
    :func:`~.scan.hash_contents` does), their inode flags, and where the new one differs.
    ``stop`` set ends the reading of files over 1 MiB within a MiB (:class:`.onepass.Stopped`).

    Raises:
        BtrdeltaError: a file cannot be read or changed size while it was read.
    """
    xxhash = need("xxhash", "make")
    fo = open_to_read(old_path)
    try:
        fn = open_to_read(new_path)
        try:
            return _compare(fo, fn, old_path, new_path, old_size, new_size, xxhash, stop)
        finally:
            os.close(fn)
    finally:
        os.close(fo)


def _compare_small(fo: int, fn: int, old_path: bytes, new_path: bytes, old_size: int,
                   new_size: int, xxhash: Any) -> Compared:
    """:func:`compare_files` of two files of at most 1 MiB: one read each (holes read as
    the zeros they are)."""
    oflags, nflags = get_fileattr(fo), get_fileattr(fn)
    x = os.pread(fo, old_size + 1, 0)
    if len(x) != old_size:
        raise BtrdeltaError("file changed while sending (size differs)", path=old_path)
    y = os.pread(fn, new_size + 1, 0)
    if len(y) != new_size:
        raise BtrdeltaError("file changed while sending (size differs)", path=new_path)
    ndig = xxhash.xxh3_128_digest(y)
    if x == y:
        return Compared(ndig, oflags, ndig, nflags, [], [])
    osegs, nsegs = data_segments(fo, old_size), data_segments(fn, new_size)
    writes: list[tuple[int, int]] = []
    _differing(writes, nsegs, 0, x, y)
    return Compared(xxhash.xxh3_128_digest(x), oflags, ndig, nflags, writes,
                    punched(nsegs, osegs, old_size, new_size), y)


def _compare(fo: int, fn: int, old_path: bytes, new_path: bytes, old_size: int,
             new_size: int, xxhash: Any, stop: threading.Event | None) -> Compared:
    if old_size <= _READ and new_size <= _READ:
        return _compare_small(fo, fn, old_path, new_path, old_size, new_size, xxhash)
    oflags, nflags = get_fileattr(fo), get_fileattr(fn)
    osegs, nsegs = data_segments(fo, old_size), data_segments(fn, new_size)
    from .onepass import Stopped, content_hasher  # (not at import: send20's import graph)

    odata, ndata = sum(n for _o, n in osegs), sum(n for _o, n in nsegs)
    ho = content_hasher(old_size - odata, odata)
    hn = content_hasher(new_size - ndata, ndata)
    hashed = [0, 0]
    writes: list[tuple[int, int]] = []

    def zeros(h: Any, i: int, upto: int) -> None:  # a hole: XXH3 by its length
        if hashed[i] < upto:
            h.zeros(upto - hashed[i])
            hashed[i] = upto

    for start, end in _regions(osegs, nsegs, max(old_size, new_size)):
        pos = start
        while pos < end:
            if stop is not None and stop.is_set():
                raise Stopped("reading stopped", path=new_path)
            n = min(_READ, end - pos)
            x = _read_at(fo, pos, n, old_size, old_path)
            y = _read_at(fn, pos, n, new_size, new_path)
            if x:
                zeros(ho, 0, pos)
                ho.update(x)
                hashed[0] = pos + len(x)
            if y:
                zeros(hn, 1, pos)
                hn.update(y)
                hashed[1] = pos + len(y)
                if x != y:
                    _differing(writes, nsegs, pos, x, y)
            pos += n
    zeros(ho, 0, old_size)
    zeros(hn, 1, new_size)
    if has_byte_at(fo, old_size):
        raise BtrdeltaError("file changed while sending (size differs)", path=old_path)
    if has_byte_at(fn, new_size):
        raise BtrdeltaError("file changed while sending (size differs)", path=new_path)
    odig, ndig = ho.digest(), hn.digest()
    if odig == ndig and old_size == new_size:
        return Compared(odig, oflags, ndig, nflags, [], [])
    return Compared(odig, oflags, ndig, nflags, writes,
                    punched(nsegs, osegs, old_size, new_size))


def _differing(writes: list[tuple[int, int]], nsegs: list[tuple[int, int]], pos: int,
               x: bytes, y: bytes) -> None:
    """Add the blocks of the new file's data in ``y`` (read at ``pos``) that differ from the
    old file's bytes ``x`` there (merged with the last range when adjacent)."""
    end = pos + len(y)
    for off, length in _overlap(nsegs, pos, end):
        b0 = off - off % BLOCK
        stop = off + length
        while b0 < stop:
            b1 = min(b0 - b0 % BLOCK + BLOCK, stop)
            if x[b0 - pos:b1 - pos] != y[b0 - pos:b1 - pos]:
                a = max(b0, pos)
                if writes and writes[-1][0] + writes[-1][1] == a:
                    writes[-1] = (writes[-1][0], b1 - writes[-1][0])
                else:
                    writes.append((a, b1 - a))
            b0 = b1


#: FastCDC average chunk size for finding moved data in a file: 8 KiB, larger for files of
#: more than _CDC_CHUNKS * 8 KiB so the chunk index stays small (memory bounded per file)
_CDC_AVG, _CDC_AVG_MAX, _CDC_CHUNKS = 8192, 1 << 20, 32768


def _cdc_for(size: int) -> FastCDC:
    avg = _CDC_AVG
    while avg < _CDC_AVG_MAX and size // avg > _CDC_CHUNKS:
        avg *= 2
    cdc: FastCDC = need("pyfastcdc.cy", "make").FastCDC(avg, min_size=avg // 4,
                                                        max_size=avg * 8)
    return cdc


#: files are cut into chunks in windows of this many bytes (bounded memory)
_WINDOW = 16 << 20


def _cut(
    fd: int, ranges: list[tuple[int, int]], cdc: FastCDC, path: bytes
) -> Iterator[tuple[int, memoryview]]:
    """``(offset, data)`` of the content-defined chunks of ``ranges`` of an open file, read
    in windows with ``pread`` (holes outside the ranges are never read or mapped)."""
    for start, length in ranges:
        end = start + length
        pos = start
        while pos < end:
            n = min(_WINDOW, end - pos)
            buf = os.pread(fd, n, pos)
            if len(buf) != n:
                raise BtrdeltaError("file changed while sending (short read)", path=path)
            chunks = list(cdc.cut_buf(buf))
            if pos + n < end and len(chunks) > 1:
                chunks.pop()  # cut at the window's end, not by content: redo it next time
            for c in chunks:
                yield pos + c.offset, c.data
            pos += chunks[-1].offset + chunks[-1].length


def shifted_clones(
    old_path: bytes,
    new_path: bytes,
    old_size: int,
    new_size: int,
    writes: list[tuple[int, int]],
    *,
    min_len: int = 16384,
) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
    """Find data of a new file's ``writes`` in an old file (its old version, or another).

    Both files are cut into content-defined chunks (FastCDC); a chunk of the new file that
    overlaps a write range and is found (XXH3, then byte comparison) in the old file at an
    offset that differs by a multiple of 4 KiB (0 included) can be *cloned* from the old
    file, because the kernel clones only block-aligned ranges. Runs of such chunks with the
    same shift are merged and trimmed to whole blocks; pieces of at least ``min_len`` bytes
    become clones.

    Args:
        old_path: the old file (in the parent tree).
        new_path: the new file.
        old_size: old size in bytes.
        new_size: new size in bytes.
        writes: block-aligned ranges of the new file to look for (e.g. the ranges that
            differ at equal offsets, from :func:`changed_ranges`, or all its data).
        min_len: the shortest clone worth a record.

    Returns:
        ``(clones, writes)``: ``(offset, length, old_offset)`` ranges to clone from the old
        file, and what is left of ``writes``; together they cover ``writes`` exactly.
    """
    if old_size < min_len or sum(n for _o, n in writes) < min_len:
        return [], writes
    cdc = _cdc_for(max(old_size, new_size))
    with _both(old_path, new_path) as (fo, fn):
        runs = _shifted_runs(fo, fn, old_path, new_path, old_size,
                             _around(writes, new_size, 2 * cdc.max_size), writes, cdc)
    aligned = [
        (a, b, sh)
        for a0, b0, sh in runs
        for a, b in [(-(-a0 // BLOCK) * BLOCK, b0 // BLOCK * BLOCK)]
        if b - a >= min_len
    ]
    if not aligned:
        return [], writes
    return _split_writes(writes, aligned, min_len)


def _around(writes: list[tuple[int, int]], size: int, margin: int) -> list[tuple[int, int]]:
    """The ranges ``(offset, length)`` of a file around its write ranges (CDC cut points
    resynchronise within a couple of chunks), merged."""
    around: list[tuple[int, int]] = []
    for off, n in writes:
        a, b = max(0, off - margin), min(size, off + n + margin)
        if around and a <= around[-1][1]:
            around[-1] = (around[-1][0], max(around[-1][1], b))
        else:
            around.append((a, b))
    return [(a, b - a) for a, b in around]


def _shifted_runs(fo: int, fn: int, old_path: bytes, new_path: bytes, old_size: int,
                  ranges: list[tuple[int, int]], writes: list[tuple[int, int]], cdc: FastCDC
                  ) -> list[list[int]]:
    """``[start, end, shift]`` runs of new-file chunks overlapping ``writes`` found in the old
    file at a 4 KiB-aligned shift (confirmed byte by byte)."""
    xxhash = need("xxhash", "make")
    where: dict[int, int] = {}
    for off, data in _cut(fo, data_segments(fo, old_size), cdc, old_path):
        where.setdefault(xxhash.xxh3_64_intdigest(data), off)
    runs: list[list[int]] = []
    if not where:
        return runs
    starts = [o for o, _n in writes]
    for off, data in _cut(fn, ranges, cdc, new_path):
        n = len(data)
        i = bisect.bisect_right(starts, off + n - 1) - 1
        if i < 0 or writes[i][0] + writes[i][1] <= off:
            continue  # overlaps no write range (they are sorted and disjoint)
        src = where.get(xxhash.xxh3_64_intdigest(data))
        if src is None or (off - src) % BLOCK or os.pread(fo, n, src) != bytes(data):
            continue  # not there, not at an aligned shift, or a hash collision
        shift = off - src
        if runs and runs[-1][1] == off and runs[-1][2] == shift:
            runs[-1][1] = off + n
        else:
            runs.append([off, off + n, shift])
    return runs


def _split_writes(writes: list[tuple[int, int]], aligned: list[tuple[int, int, int]],
                  min_len: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
    """``writes`` cut into clones (where ``aligned`` runs cover at least ``min_len``) and
    what is left to write."""
    clones: list[tuple[int, int, int]] = []
    rest: list[tuple[int, int]] = []
    j = 0
    for w0, wn in writes:
        w1 = w0 + wn
        pos = w0
        while j < len(aligned) and aligned[j][1] <= w0:
            j += 1
        for a, b, sh in aligned[j:]:
            if a >= w1:
                break
            x0, x1 = max(a, pos), min(b, w1)
            if x1 - x0 < min_len:
                continue
            if x0 > pos:
                rest.append((pos, x0 - pos))
            clones.append((x0, x1 - x0, x0 - sh))
            pos = x1
        if pos < w1:
            rest.append((pos, w1 - pos))
    return clones, rest
