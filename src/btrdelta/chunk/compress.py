"""Build a chunk archive from an image: chunk, hash, compress each distinct chunk once.

Strategy: the calling thread maps the image and cuts it (FastCDC + BLAKE3, both C, the
GIL released for large buffers); each new chunk is handed to a thread pool that compresses
it with zstd (``zstandard`` releases the GIL), so both cores work. Compressed chunks are
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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .archive import (
    HEADER_SIZE,
    ArchiveHeader,
    encode_header,
    encode_index,
    sign,
    with_index_digest,
)
from .chunker import ChunkerParams, chunk_digest, iter_chunks, map_file

__all__ = ["CompressReport", "compress_image"]


@dataclass(frozen=True, slots=True)
class CompressReport:
    """What :func:`compress_image` produced."""

    header: ArchiveHeader
    archive_size: int
    distinct_bytes: int
    compressed_bytes: int


def compress_image(
    image: str | os.PathLike[str],
    out: BinaryIO,
    *,
    params: ChunkerParams,
    level: int = 3,
    key: Ed25519PrivateKey | None = None,
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
    local = threading.local()

    def compress(data: memoryview) -> bytes:
        cctx = getattr(local, "cctx", None)
        if cctx is None:
            cctx = local.cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
        return cctx.compress(data)

    seen: dict[bytes, int] = {}
    digests: list[bytes] = []
    raw_sizes, comp_sizes, offsets, order = array("I"), array("I"), array("Q"), array("I")
    image_hash = blake3.blake3()
    out.write(b"\0" * HEADER_SIZE)
    pos = HEADER_SIZE
    pending: deque[Future[bytes]] = deque()

    def drain(limit: int) -> None:
        nonlocal pos
        while len(pending) > limit:
            blob = pending.popleft().result()
            out.write(blob)
            offsets.append(pos)
            comp_sizes.append(len(blob))
            pos += len(blob)

    with map_file(image) as view, ThreadPoolExecutor(workers) as pool:
        size = len(view)
        data = memoryview(b"")
        for offset, data in iter_chunks(view, params):
            image_hash.update(data)
            digest = chunk_digest(data)
            entry = seen.get(digest)
            if entry is None:
                entry = seen[digest] = len(digests)
                digests.append(digest)
                raw_sizes.append(len(data))
                pending.append(pool.submit(compress, data))
                drain(4 * workers)
            order.append(entry)
            if on_progress is not None:
                on_progress(offset + len(data), size)
        drain(0)
        del data  # the last chunk view must not outlive the map
    index = encode_index(digests, offsets, comp_sizes, raw_sizes, order)
    header = with_index_digest(
        ArchiveHeader(
            params=params, image_size=size, chunk_count=len(digests), order_count=len(order),
            index_offset=pos, image_digest=image_hash.digest(), signed=key is not None,
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
        distinct_bytes=sum(raw_sizes),
        compressed_bytes=sum(comp_sizes),
    )
