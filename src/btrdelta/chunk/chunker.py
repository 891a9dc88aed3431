"""Content-defined chunking: FastCDC cut points (``pyfastcdc``, Cython) and BLAKE3 chunk ids.

This module owns the chunker parameters and how a buffer or a file becomes a sequence of
``(offset, length, digest)`` chunk references. It knows nothing of archives or stores.

Strategy: a file is ``mmap``-ed once and cut with ``FastCDC.cut_buf``; every chunk is a
``memoryview`` into the map, hashed by the C BLAKE3 implementation. No byte is copied in
Python. Block devices work too (their size comes from ``lseek(SEEK_END)``).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass

import blake3
from pyfastcdc.cy import FastCDC

from ..errors import StreamFormatError

__all__ = [
    "DIGEST_SIZE",
    "ChunkRef",
    "ChunkerParams",
    "chunk_digest",
    "iter_chunks",
    "map_file",
]

#: Bytes in a chunk id (BLAKE3-256).
DIGEST_SIZE = 32

# pyfastcdc's accepted ranges (FastCDC 2020)
_MIN_RANGE = (64, 1 << 20)
_AVG_RANGE = (256, 4 << 20)
_MAX_RANGE = (1024, 16 << 20)


def chunk_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The id of a chunk: BLAKE3-256 of its uncompressed bytes."""
    return blake3.blake3(data).digest()


@dataclass(frozen=True, slots=True)
class ChunkerParams:
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
        """A fresh (not thread-safe) FastCDC cutter."""
        return FastCDC(
            self.avg_size,
            min_size=self.min_size,
            max_size=self.max_size,
            normalized_chunking=self.normalization,
            seed=self.seed,
        )


@dataclass(frozen=True, slots=True)
class ChunkRef:
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


@contextlib.contextmanager
def map_file(path: str | os.PathLike[str]) -> Iterator[memoryview]:
    """Map a regular file or block device read-only; yields a view of all of it.

    An empty input yields an empty view. The view must not outlive the context.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if size == 0:
            yield memoryview(b"")
            return
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        mm.madvise(mmap.MADV_SEQUENTIAL)
        view = memoryview(mm)
        try:
            yield view
        finally:
            view.release()
            with contextlib.suppress(BufferError):
                mm.close()
    finally:
        os.close(fd)
