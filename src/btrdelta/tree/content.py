"""The tree-sum-3 content digest of a file: work in proportion to its data, not its size.

tree-sum-2 hashed a file's whole apparent size with one BLAKE3, holes read as zeros:
BLAKE3's chaining values depend on the chunk counter, so a hole's zeros had to be hashed
(~3 min of CPU per TiB). tree-sum-3 splits the content at whole 4 KiB blocks of zeros and
hashes each maximal run of other blocks (a *segment*) with one BLAKE3 of its own::

    BLAKE3-256( "tree-sum-3 content\\0" ||
                items in file order:
                  0x00 || u64 k                 a maximal run of k blocks of zeros
                  0x01 || u64 n || BLAKE3-256   a maximal segment of n bytes of other blocks
                || u64 size )

Blocks are the 4 KiB blocks from offset 0, the last one shorter when the size is not a
multiple of 4096; a block is a block of zeros when all its bytes are zero, whether they are
a hole or written zeros (content, not layout: a hole and written zeros hash alike). A run of
holes costs O(1) (``SEEK_DATA`` gives it; :meth:`ContentDigest.zeros` takes it by length),
blocks of zeros inside data are found at memory speed (:func:`_zero_blocks`), and a dense
file is one segment: one BLAKE3 over all its bytes (SIMD over many chunks at once, as
tree-sum-2), the outer hash 41 bytes. Integers are little-endian. The alternative, one
BLAKE3 per 4 KiB block, would want a C loop and gives up BLAKE3's parallel chunks on dense
files (docs/formats/tree-sum.md).

:class:`ContentDigest` is sans-I/O (fed bytes and lengths of holes, in order);
:func:`file_content_digest` reads an open file with it.
"""

from __future__ import annotations

import errno
import os
import struct
import threading

import blake3

from ..fs.content import data_segments

__all__ = ["BLOCK", "ContentDigest", "Stopped", "content_digest", "file_content_digest",
           "no_zero_block"]

BLOCK = 4096
#: the largest file whose tree-sum-2 content digest is BLAKE3 of its whole content (1 TiB:
#: its holes' zeros hashed, ~2 min of CPU, 114 s measured on an idle core); a larger file's
#: is this module's (tree-sum-3's), in tree-sum-2 and a version-3 record alike
#: (docs/formats/tree-sum.md, "Files past 1 TiB")
WHOLE_MAX = 1 << 40
_ZERO_U64 = bytes(8)  # every block of zeros starts with one
_STEP = BLOCK // 8  # u64 words a block
_FEW = 16 * BLOCK
_ZERO_BLOCK = bytes(BLOCK)
_ZERO_VIEW = memoryview(_ZERO_BLOCK)
_HEAD = b"tree-sum-3 content\0"
_ZEROS_ITEM = struct.Struct("<BQ")
_U64 = struct.Struct("<Q")
_READ = 1 << 20


def _zero_blocks(buf: bytes | bytearray | memoryview, end: int) -> list[int]:
    """The offsets of the whole blocks of zeros in ``buf[:end]`` (``end`` a multiple of
    4096): each block's first 8 bytes picked at once (a strided copy, C speed), and only
    a block starting with 8 zeros compared whole (``find`` of a run of zeros through all
    the bytes ran at ~4 GB/s, slower than BLAKE3 itself)."""
    if isinstance(buf, memoryview):  # (no startswith: a candidate block is copied)
        view = buf

        def zero(off: int) -> bool:
            return view[off:off + BLOCK].tobytes() == _ZERO_BLOCK
    else:
        if end <= _FEW:  # (a loop costs less than the strided copy's set-up)
            return [off for off in range(0, end, BLOCK)
                    if buf.startswith(_ZERO_U64, off) and buf.startswith(_ZERO_BLOCK, off)]
        view = memoryview(buf)
        starts = buf.startswith

        def zero(off: int) -> bool:
            return starts(_ZERO_BLOCK, off)
    if not end:
        return []
    firsts = view[:end].cast("Q")[::_STEP].tobytes()
    out = []
    pos = firsts.find(_ZERO_U64)
    while pos != -1:
        if pos % 8:  # across two blocks' first words: look on from the next one
            pos = firsts.find(_ZERO_U64, pos - pos % 8 + 8)
            continue
        off = pos * _STEP
        if zero(off):
            out.append(off)
        pos = firsts.find(_ZERO_U64, pos + 8)
    return out


def no_zero_block(content: bytes) -> bool:
    """Whether no block of ``content`` (the last one may be shorter) is all zeros."""
    n = len(content)
    tail = n - n % BLOCK  # where a last, shorter block starts
    if _zero_blocks(content, tail):
        return False
    return tail == n or not content.endswith(_ZERO_VIEW[:n - tail])


class Stopped(Exception):
    """Told to stop (an event set) while hashing."""


class ContentDigest:
    """The tree-sum-3 content digest of bytes fed in order: :meth:`update` with data,
    :meth:`zeros` with a run of zeros (a hole) by its length, then :meth:`digest`."""

    __slots__ = ("_fed", "_outer", "_pending", "_run", "_seg", "_seg_len")

    def __init__(self) -> None:
        self._outer = blake3.blake3(_HEAD)
        self._fed = 0
        self._pending = bytearray()  # the start of a block not yet whole
        self._run = 0  # blocks of zeros in the current run
        self._seg: blake3.blake3 | None = None  # the current segment's hash
        self._seg_len = 0

    def _end_run(self) -> None:
        if self._run:
            self._outer.update(_ZEROS_ITEM.pack(0, self._run))
            self._run = 0

    def _end_segment(self) -> None:
        if self._seg is not None:
            self._outer.update(b"\x01" + _U64.pack(self._seg_len) + self._seg.digest())
            self._seg = None
            self._seg_len = 0

    def _zero_blocks(self, k: int) -> None:
        if k:
            self._end_segment()
            self._run += k

    def _data(self, view: memoryview) -> None:
        """Bytes of blocks none of which is all zeros (one segment, or part of one)."""
        if len(view):
            self._end_run()
            if self._seg is None:
                self._seg = blake3.blake3()
            self._seg.update(view)
            self._seg_len += len(view)

    def _blocks(self, buf: bytes | bytearray | memoryview, end: int) -> None:
        """The whole blocks ``buf[:end]`` (``end`` a multiple of 4096)."""
        view = memoryview(buf)
        start = 0  # the first block not yet taken
        for off in _zero_blocks(buf, end):
            self._data(view[start:off])
            self._zero_blocks(1)
            start = off + BLOCK
        self._data(view[start:end])

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """The next ``len(data)`` bytes of the content."""
        n = len(data)
        if not n:
            return
        self._fed += n
        if self._pending:
            take = min(n, BLOCK - len(self._pending))
            self._pending += data[:take]
            if len(self._pending) < BLOCK:
                return
            self._blocks(self._pending, BLOCK)
            self._pending.clear()
            data = data[take:]
            n -= take
        whole = n - n % BLOCK
        if whole:
            self._blocks(data, whole)
        if whole < n:
            self._pending += data[whole:]

    def zeros(self, n: int) -> None:
        """The next ``n`` bytes are zeros (a hole): O(1) for whole blocks."""
        if n <= 0:
            return
        if self._pending:
            take = min(n, BLOCK - len(self._pending))
            self.update(bytes(take))
            n -= take
        self._fed += n - n % BLOCK
        self._zero_blocks(n // BLOCK)
        if n % BLOCK:
            self.update(bytes(n % BLOCK))

    def digest(self, size: int) -> bytes:
        """The 32-byte digest of ``size`` bytes: those fed, then zeros (raises ValueError
        if more were fed)."""
        if self._fed > size:
            raise ValueError(f"content of {size} bytes fed {self._fed}")
        self.zeros(size - self._fed)
        if self._pending:  # the last, shorter block
            tail = bytes(self._pending)
            self._pending.clear()
            if tail == _ZERO_BLOCK[:len(tail)]:
                self._zero_blocks(1)
            else:
                self._data(memoryview(tail))
        self._end_run()
        self._end_segment()
        self._outer.update(_U64.pack(size))
        return self._outer.digest()


def content_digest(content: bytes, no_zeros: bool = False) -> bytes:
    """The tree-sum-3 content digest of ``content`` (a whole file in memory; ``no_zeros``:
    the caller found no block of zeros in it already)."""
    if not content:
        return blake3.blake3(_HEAD + _U64.pack(0)).digest()
    if no_zeros or no_zero_block(content):  # most files: one run, no ContentDigest
        n = _U64.pack(len(content))
        return blake3.blake3(b"".join((_HEAD, b"\x01", n, blake3.blake3(content).digest(),
                                       n))).digest()
    h = ContentDigest()
    h.update(content)
    return h.digest(len(content))


def file_content_digest(fd: int, size: int, stop: threading.Event | None = None,
                        path: bytes | str = b"") -> bytes:
    """The tree-sum-3 content digest of the first ``size`` bytes of the open file ``fd``:
    its data ranges read (``SEEK_DATA``, widened to whole blocks), its holes taken by
    length; ``stop`` set ends it within 1 MiB (:class:`Stopped`)."""
    segments = data_segments(fd, size)
    if segments == [(0, size)] and size <= _READ:  # most files: read at once, often one run
        content = os.pread(fd, size + 1, 0)
        if len(content) != size:
            raise OSError(errno.EIO, "file changed size while hashing", path)
        return content_digest(content)
    h = ContentDigest()
    pos = 0
    for data, length in segments:
        a = max(pos, data - data % BLOCK)
        b = min(size, -(-(data + length) // BLOCK) * BLOCK)
        h.zeros(a - pos)
        while a < b:
            if stop is not None and stop.is_set():
                raise Stopped
            chunk = os.pread(fd, min(_READ, b - a), a)
            if not chunk:
                raise OSError(errno.EIO, "file shrank while hashing", path)
            h.update(chunk)
            a += len(chunk)
        pos = b
    h.zeros(size - pos)
    return h.digest(size)
