"""Build a chunk archive from an image: chunk, hash, compress each distinct chunk once.

Strategy: the calling thread maps the image and cuts it (FastCDC, C, without the GIL); a
hashing thread computes each window's chunk ids (BLAKE3, GIL released) while the next
window is cut, and another hashes the whole image for its digest; each new chunk goes to
a thread pool that compresses it with zstd (``zstandard`` releases the GIL), so both cores
work. Compressed chunks are
written in first-seen order right after a placeholder header; the index follows the data
and the real header is written last, so the archive is produced in one pass without a
temporary copy.
"""

from __future__ import annotations

import os
import threading
from array import array
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import BinaryIO

import blake3
import zstandard

from ..trust import PrivateKey
from .archive import (
    HEADER_SIZE,
    ArchiveHeader,
    encode_header,
    encode_index,
    sign,
    with_index_digest,
)
from .chunker import ChunkBatch, ChunkerParams, hash_chunks, map_file

__all__ = ["DEFAULT_LEVEL", "CompressReport", "compress_image"]

#: zstd level: an archive is compressed once and fetched by every device, so a tighter
#: level pays. On the Debian minbase upgrade pair, level 6 fetches 3% fewer bytes for v2
#: than level 3 (9: 4%), at ~110 MB/s per core (9: ~75); a 2 GiB image takes ~27 CPU
#: seconds at 6, ~33 at 9, ~11 at 3.
DEFAULT_LEVEL = 6


@dataclass(frozen=True, slots=True)
class CompressReport:
    """What :func:`compress_image` produced."""

    header: ArchiveHeader
    archive_size: int
    distinct_bytes: int
    compressed_bytes: int


def _digest(view: memoryview) -> bytes:
    return blake3.blake3(view).digest()


class _ChunkWriter:
    """Compresses each new chunk on a pool and writes the frames in first-seen order."""

    def __init__(self, out: BinaryIO, pool: ThreadPoolExecutor, level: int, workers: int) -> None:
        self.out = out
        self.pool = pool
        self.level = level
        self.workers = workers
        self.local = threading.local()
        self.seen: dict[bytes, int] = {}
        self.digests: list[bytes] = []
        self.raw_sizes, self.comp_sizes = array("I"), array("I")
        self.offsets, self.order = array("Q"), array("I")
        self.pos = HEADER_SIZE
        self.pending: deque[Future[bytes]] = deque()

    def _compress(self, data: memoryview) -> bytes:
        cctx = getattr(self.local, "cctx", None)
        if cctx is None:
            cctx = self.local.cctx = zstandard.ZstdCompressor(level=self.level,
                                                              write_content_size=True)
        return cctx.compress(data)

    def drain(self, limit: int = 0) -> None:
        """Write finished frames until at most ``limit`` are pending."""
        while len(self.pending) > limit:
            blob = self.pending.popleft().result()
            self.out.write(blob)
            self.offsets.append(self.pos)
            self.comp_sizes.append(len(blob))
            self.pos += len(blob)

    def take(self, batch: ChunkBatch) -> None:
        """Record a batch's chunks in the order; compress the ones not seen before."""
        for data, digest in zip(batch.views, batch.digests, strict=True):
            entry = self.seen.get(digest)
            if entry is None:
                entry = self.seen[digest] = len(self.digests)
                self.digests.append(digest)
                self.raw_sizes.append(len(data))
                self.pending.append(self.pool.submit(self._compress, data))
                self.drain(4 * self.workers)
            self.order.append(entry)

    def index(self) -> bytes:
        """The index bytes (call after :meth:`drain`)."""
        return encode_index(self.digests, self.offsets, self.comp_sizes, self.raw_sizes,
                            self.order)


def compress_image(
    image: str | os.PathLike[str],
    out: BinaryIO,
    *,
    params: ChunkerParams,
    level: int = DEFAULT_LEVEL,
    key: PrivateKey | None = None,
    threads: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> CompressReport:
    """Chunk ``image`` and write a chunk archive to ``out`` (seekable, positioned at 0).

    Args:
        image: file or block device.
        out: the archive destination.
        params: chunker parameters.
        level: zstd level.
        key: sign header and index with this Ed25519 key.
        threads: compression workers (default: CPU count).
        on_progress: called with ``(bytes_chunked, image_size)``.
    """
    params.validate()
    workers = threads or os.cpu_count() or 1
    out.write(b"\0" * HEADER_SIZE)

    def cut_all(view: memoryview, writer: _ChunkWriter, hashers: ThreadPoolExecutor) -> None:
        # a function of its own so that no chunk view outlives it (and the map)
        for batch in hash_chunks(view, params, pool=hashers):
            writer.take(batch)
            if on_progress is not None:
                on_progress(batch.end, len(view))

    with (
        map_file(image) as view,
        ThreadPoolExecutor(workers, thread_name_prefix="zstd") as pool,
        ThreadPoolExecutor(2, thread_name_prefix="blake3") as hashers,
    ):
        size = len(view)
        writer = _ChunkWriter(out, pool, level, workers)
        # the whole-image digest is one more pass over the map, on its own thread
        image_digest = hashers.submit(_digest, view)
        cut_all(view, writer, hashers)
        writer.drain()
        image_hash = image_digest.result()
    index = writer.index()
    header = with_index_digest(
        ArchiveHeader(
            params=params, image_size=size, chunk_count=len(writer.digests),
            order_count=len(writer.order), index_offset=writer.pos, image_digest=image_hash,
            signed=key is not None,
        ),
        index,
    )
    header_bytes = encode_header(header)
    out.write(index)
    if key is not None:
        out.write(sign(key, header_bytes, index))
    out.seek(0)
    out.write(header_bytes)
    out.flush()
    return CompressReport(
        header=replace(header),
        archive_size=header.archive_size,
        distinct_bytes=sum(writer.raw_sizes),
        compressed_bytes=sum(writer.comp_sizes),
    )
