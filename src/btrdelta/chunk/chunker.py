"""Content-defined chunking: FastCDC cut points (``pyfastcdc``, Cython) and BLAKE3 chunk ids.

This module owns the chunker parameters and how a buffer or a file becomes a sequence of
``(offset, length, digest)`` chunk references. It knows nothing of archives or stores.

Strategy: a file is ``mmap``-ed once (``MADV_SEQUENTIAL``) and cut window by window with
``FastCDC.cut_buf`` (the cut loop runs without the GIL); every chunk is a ``memoryview``
into the map, hashed by the C BLAKE3 implementation. No byte is copied in Python.
:func:`hash_chunks` hashes each chunk right after it is cut (while it is still in the CPU
cache) on one core, or hands each window's chunks to a worker thread (BLAKE3 releases the
GIL too), so cutting and hashing overlap on two cores. A window ends one chunk early and
the next window starts at that chunk, so windows cut exactly like the whole buffer. Block
devices work too (their size comes from ``lseek(SEEK_END)``).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, Protocol

import blake3

from .._optional import need
from .._value import Value
from ..errors import BtrdeltaError, StreamFormatError

if TYPE_CHECKING:  # pyfastcdc is optional ([image], [make]): imported when a cut starts
    from pyfastcdc.cy import FastCDC

__all__ = [
    "DIGEST_SIZE",
    "ChunkBatch",
    "ChunkRef",
    "ChunkerParams",
    "Chunking",
    "FastCdcChunking",
    "FileMap",
    "chunk_digest",
    "hash_chunks",
    "iter_chunks",
    "map_file",
    "open_map",
]

#: Bytes in a chunk id (BLAKE3-256).
DIGEST_SIZE = 32

#: Bytes cut per window by :func:`hash_chunks` (raised to at least 4 max-size chunks).
WINDOW_SIZE = 16 << 20

# pyfastcdc's accepted ranges (FastCDC 2020)
_MIN_RANGE = (64, 1 << 20)
_AVG_RANGE = (256, 4 << 20)
_MAX_RANGE = (1024, 16 << 20)


def chunk_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The id of a chunk: BLAKE3-256 of its uncompressed bytes."""
    return blake3.blake3(data).digest()


class ChunkerParams(Value, frozen=True):
    """FastCDC parameters; two parties find the same chunks only with equal parameters.

    Attributes:
        min_size: no cut before this many bytes (except at end of input).
        avg_size: the target (normal) chunk size.
        max_size: a cut is forced at this many bytes.
        normalization: FastCDC normalized-chunking level, 0..3.
        seed: gear-table seed (0: the paper's table).
    """

    min_size: int
    avg_size: int
    max_size: int
    normalization: int = 1
    seed: int = 0

    @classmethod
    def from_avg(cls, avg_size: int) -> ChunkerParams:
        """Parameters with ``min = avg/4`` and ``max = avg*4`` (FastCDC's defaults)."""
        params = cls(max(avg_size // 4, _MIN_RANGE[0]), avg_size, avg_size * 4)
        params.validate()
        return params

    def validate(self) -> None:
        """Raise :class:`StreamFormatError` if the parameters are out of the chunker's range."""
        checks = (
            ("min_size", self.min_size, _MIN_RANGE),
            ("avg_size", self.avg_size, _AVG_RANGE),
            ("max_size", self.max_size, _MAX_RANGE),
        )
        for name, value, (lo, hi) in checks:
            if not lo <= value <= hi:
                raise StreamFormatError(f"chunker {name} {value} outside [{lo}, {hi}]")
        if not self.min_size <= self.avg_size <= self.max_size:
            raise StreamFormatError(
                f"chunker sizes not ordered: min {self.min_size}, avg {self.avg_size}, "
                f"max {self.max_size}"
            )
        if not 0 <= self.normalization <= 3:
            raise StreamFormatError(f"chunker normalization {self.normalization} not in 0..3")
        if not 0 <= self.seed < 1 << 64:
            raise StreamFormatError(f"chunker seed {self.seed} out of range")

    def make(self) -> FastCDC:
        """A fresh (not thread-safe) FastCDC cutter.

        Raises:
            MissingDependencyError: ``pyfastcdc`` is not installed.
        """
        cutter: FastCDC = need("pyfastcdc.cy", "image").FastCDC(
            self.avg_size,
            min_size=self.min_size,
            max_size=self.max_size,
            normalized_chunking=self.normalization,
            seed=self.seed,
        )
        return cutter


class ChunkRef(Value, frozen=True):
    """One chunk of an input: where it is, how long, and its digest."""

    offset: int
    length: int
    digest: bytes


def iter_chunks(
    buf: bytes | bytearray | memoryview | mmap.mmap, params: ChunkerParams
) -> Iterator[tuple[int, memoryview]]:
    """Cut ``buf`` into content-defined chunks.

    Args:
        buf: the whole input.
        params: chunker parameters.

    Yields:
        ``(offset, data)`` with ``data`` a view into ``buf``; concatenated they are ``buf``.
    """
    if len(buf) == 0:
        return
    for chunk in params.make().cut_buf(buf):
        yield chunk.offset, chunk.data


class ChunkBatch(Value):
    """Consecutive chunks of one input, in input order.

    Attributes:
        offsets: input offset of each chunk.
        views: each chunk's bytes (views into the input: valid while it is).
        digests: each chunk's id (:func:`chunk_digest`).
    """

    offsets: list[int]
    views: list[memoryview]
    digests: list[bytes]

    @property
    def end(self) -> int:
        """Input offset just past the batch's last chunk."""
        return self.offsets[-1] + len(self.views[-1]) if self.offsets else 0


def _digests(views: list[memoryview]) -> list[bytes]:
    new = blake3.blake3
    return [new(v).digest() for v in views]


def hash_chunks(
    buf: bytes | bytearray | memoryview,
    params: ChunkerParams,
    *,
    pool: Executor | None = None,
    window: int = WINDOW_SIZE,
) -> Iterator[ChunkBatch]:
    """Cut ``buf`` into content-defined chunks and hash them, one window at a time.

    The chunks are exactly those of :func:`iter_chunks` on the whole buffer.

    Args:
        buf: the whole input (a :func:`map_file` view for files).
        params: chunker parameters.
        pool: when given, each window's chunks are hashed by a task on this executor while
            the calling thread cuts the next window (two cores); otherwise the calling
            thread hashes each chunk right after cutting it (one core).
        window: bytes cut per batch.

    Yields:
        Batches of consecutive chunks covering ``buf`` in order.
    """
    mv = memoryview(buf)
    size = len(mv)
    window = max(window, 4 * params.max_size)
    cutter = params.make()
    new = blake3.blake3
    pending: deque[tuple[list[int], list[memoryview], Future[list[bytes]]]] = deque()
    pos = 0
    while pos < size:
        end = min(size, pos + window)
        offsets: list[int] = []
        views: list[memoryview] = []
        digests: list[bytes] = []
        if pool is None:
            prev: memoryview | None = None
            for chunk in cutter.cut_buf(mv[pos:end]):
                if prev is not None:  # hash one behind: the last chunk may be re-cut
                    digests.append(new(prev).digest())
                prev = chunk.data
                offsets.append(pos + chunk.offset)
                views.append(prev)
            if end == size and prev is not None:
                digests.append(new(prev).digest())
        else:
            for chunk in cutter.cut_buf(mv[pos:end]):
                offsets.append(pos + chunk.offset)
                views.append(chunk.data)
        if end < size:  # the window's last cut is not content-defined: cut it again
            pos = offsets.pop()
            views.pop()
        else:
            pos = end
        if pool is None:
            yield ChunkBatch(offsets, views, digests)
            continue
        pending.append((offsets, views, pool.submit(_digests, views)))
        if len(pending) > 2:
            o, v, fut = pending.popleft()
            yield ChunkBatch(o, v, fut.result())
    while pending:
        o, v, fut = pending.popleft()
        yield ChunkBatch(o, v, fut.result())


class Chunking(Protocol):
    """How an input is cut and its chunks named: what a seed must be cut with to find an
    image's chunks (FastCDC + BLAKE3 here, buzhash + SHA-512/256 for casync indexes)."""

    def hash_chunks(self, view: memoryview, pool: Executor | None = None) -> Iterator[ChunkBatch]:
        """Batches of consecutive chunks of ``view`` with their ids."""
        ...

    def digest(self, data: bytes | bytearray | memoryview) -> bytes:
        """A chunk's id."""
        ...


class FastCdcChunking(Value, frozen=True):
    """:class:`Chunking` of btrdelta archives: FastCDC with ``params``, BLAKE3 ids."""

    params: ChunkerParams

    def hash_chunks(self, view: memoryview, pool: Executor | None = None) -> Iterator[ChunkBatch]:
        """See :func:`hash_chunks`."""
        return hash_chunks(view, self.params, pool=pool)

    def digest(self, data: bytes | bytearray | memoryview) -> bytes:
        """See :func:`chunk_digest`."""
        return chunk_digest(data)


#: bytes read per call by :meth:`FileMap.digest`
_DIGEST_BLOCK = 8 << 20


class FileMap:
    """A regular file or block device mapped read-only (:func:`open_map`).

    Attributes:
        view: all of it (empty for an empty input); must not outlive the map.
        fd: its descriptor (for reads beside the map, e.g. ``os.preadv``).
    """

    def __init__(self, fd: int, mm: mmap.mmap | None) -> None:
        self.fd, self._mm = fd, mm
        self.view = memoryview(mm) if mm is not None else memoryview(b"")
        self._dropped = 0

    def digest(self) -> bytes:
        """The BLAKE3 of the whole file, read with ``preadv`` beside the map (a pass over the
        map on its own thread would hold every page it read mapped, the whole input, however
        far behind it a reader's :meth:`drop` released them).

        Raises:
            BtrdeltaError: the file shrank while it was read.
        """
        h = blake3.blake3()
        size = len(self.view)
        buf = memoryview(bytearray(_DIGEST_BLOCK))
        pos = 0
        while pos < size:
            n = os.preadv(self.fd, [buf[:min(_DIGEST_BLOCK, size - pos)]], pos)
            if n == 0:
                raise BtrdeltaError(f"the input shrank to {pos} bytes while it was read "
                                    f"(it had {size})")
            h.update(buf[:n])
            pos += n
        return h.digest()

    def drop(self, end: int) -> None:
        """Unmap the pages before offset ``end`` from this process (``MADV_DONTNEED``;
        they stay in the page cache, and a later read of them maps them again from the
        file, so this is safe at any time): a sequential reader calls it behind its
        progress and its resident set stays the size of what it is working on instead of
        growing to the whole input."""
        end -= end % mmap.PAGESIZE
        if self._mm is not None and end > self._dropped:
            self._mm.madvise(mmap.MADV_DONTNEED, self._dropped, end - self._dropped)
            self._dropped = end


@contextlib.contextmanager
def open_map(path: str | os.PathLike[str]) -> Iterator[FileMap]:
    """Map a regular file or block device read-only (``MADV_SEQUENTIAL``).

    Raises:
        BtrdeltaError: ``path`` is neither a regular file nor a block device, or cannot be
            mapped whole.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if not (stat.S_ISREG(mode := os.fstat(fd).st_mode) or stat.S_ISBLK(mode)):
            what = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise BtrdeltaError(f"{what}: an image is a regular file or a block device",
                                path=os.fspath(path))
        size = os.lseek(fd, 0, os.SEEK_END)
        if size == 0:
            yield FileMap(fd, None)
            return
        try:
            mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        except OSError as exc:  # (a sparse file past the address space: 2^62 bytes)
            raise BtrdeltaError(f"cannot map its {size} bytes: {exc.strerror} (an image is "
                                "chunked whole, holes included)", path=os.fspath(path)) from exc
        mm.madvise(mmap.MADV_SEQUENTIAL)
        fm = FileMap(fd, mm)
        try:
            yield fm
        finally:
            fm.view.release()
            with contextlib.suppress(BufferError):
                mm.close()
    finally:
        os.close(fd)


@contextlib.contextmanager
def map_file(path: str | os.PathLike[str]) -> Iterator[memoryview]:
    """Map a regular file or block device read-only; yields a view of all of it.

    An empty input yields an empty view. The view must not outlive the context.

    Raises:
        BtrdeltaError: ``path`` is neither a regular file nor a block device.
    """
    with open_map(path) as fm:
        yield fm.view
