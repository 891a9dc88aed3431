"""Reading a chunk archive: local file or HTTP(S) URL, header and index, chunks by entry.

This module owns how an archive's bytes are read and how the chunks a clone lacks are
fetched from it: entries -> coalesced byte ranges (:mod:`btrdelta.transport.plan`) ->
ranges fetched (several in flight over HTTP) -> each chunk's zstd frame decompressed with a
bound -> its BLAKE3 checked against its id -> handed to the caller. It never writes: where
the chunks go (store, output) is the clone workflow's business (``btrdelta.update.clone``).
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

import zstandard

from ..errors import BtrdeltaError, ChecksumError, StreamFormatError
from ..transport.config import HttpConfig
from ..transport.http import FetchStats, RangeFetcher
from ..transport.plan import Part, Span, coalesce
from ..trust import PublicKey
from .archive import (
    HEADER_SIZE,
    ArchiveHeader,
    ArchiveIndex,
    decode_chunk,
    decode_header,
    decode_index,
    verify_signature,
)
from .chunker import chunk_digest

__all__ = [
    "ArchiveChunks",
    "ArchiveSource",
    "FileSource",
    "HttpSource",
    "file_url_path",
    "is_url",
    "open_source",
    "read_index",
]


def is_url(location: str) -> bool:
    """``location`` is an ``http(s)://`` URL."""
    return location.startswith(("http://", "https://"))


def file_url_path(location: str) -> str:
    """The path a ``file://`` URL names (``location`` unchanged if it is none).

    Raises:
        BtrdeltaError: the URL names another host.
    """
    if not location.startswith("file://"):
        return location
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(location)
    if parts.netloc not in ("", "localhost"):
        raise BtrdeltaError(f"file URL names another host: {parts.netloc}", path=location)
    return unquote(parts.path) or "/"


class ArchiveSource(Protocol):
    """Where an archive's bytes come from."""

    name: str
    stats: FetchStats

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the archive."""
        ...

    def fetch(self, spans: Sequence[Span], on_span: Callable[[Span, memoryview], None]) -> None:
        """Deliver every span to ``on_span``."""
        ...

    def close(self) -> None:
        """Release resources."""
        ...


class FileSource:
    """An archive in a local file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.name = os.fspath(path)
        self._fd = os.open(self.name, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(self._fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            os.close(self._fd)
            raise BtrdeltaError("not a regular file or block device", path=self.name)
        self.size = os.lseek(self._fd, 0, os.SEEK_END)
        self.stats = FetchStats()

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``; short reads mean a truncated archive."""
        data = os.pread(self._fd, end - start, start)
        self.stats.requests += 1
        self.stats.bytes_received += len(data)
        return _whole(self, start, end, data)

    def fetch(self, spans: Sequence[Span], on_span: Callable[[Span, memoryview], None]) -> None:
        """Read each span and deliver it."""
        for span in spans:
            on_span(span, memoryview(self.read(span.start, span.end)))

    def close(self) -> None:
        """Close the file."""
        os.close(self._fd)


class HttpSource:
    """An archive behind an HTTP(S) URL, read with range requests."""

    def __init__(self, url: str, fetcher: RangeFetcher | None = None,
                 config: HttpConfig | None = None) -> None:
        self.name = url
        self.fetcher = fetcher or RangeFetcher(url, config)
        self.stats = self.fetcher.stats

    @property
    def size(self) -> int | None:
        """The archive's size as the server reported it (after the first read)."""
        return self.fetcher.size

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` (raises ``RangesNotSupported`` if the server ignores Range);
        a resource that ends before ``end`` is a truncated archive."""
        return _whole(self, start, end, self.fetcher.get_range(start, end))

    def fetch(self, spans: Sequence[Span], on_span: Callable[[Span, memoryview], None]) -> None:
        """Fetch spans in parallel with retries."""
        self.fetcher.fetch_spans(spans, on_span)

    def close(self) -> None:
        """Close the HTTP client."""
        self.fetcher.close()


def _whole(source: FileSource | HttpSource, start: int, end: int, data: bytes) -> bytes:
    """``data``, read as ``[start, end)`` of ``source``, unless it is short.

    Raises:
        StreamFormatError: the archive ends before ``end``.
    """
    if len(data) != end - start:
        raise StreamFormatError(
            f"archive truncated: wanted [{start}, {end}), file is {source.size} bytes",
            source=source.name, offset=source.size,
        )
    return data


def open_source(location: str, config: HttpConfig | None = None) -> ArchiveSource:
    """A :class:`HttpSource` (with ``config``) for ``http(s)://`` locations, else a
    :class:`FileSource`."""
    if is_url(location):
        return HttpSource(location, config=config)
    return FileSource(location)


#: Largest index read from an archive (~5M chunk positions: a 320 GiB image at 64 KiB
#: chunks). The signature covers header || index, so the index size from the header is
#: bounded, and checked against the archive's real size, before the index is read.
MAX_INDEX_SIZE = 256 << 20


def read_index(
    source: ArchiveSource, *, public_key: PublicKey | None = None,
    max_index_size: int = MAX_INDEX_SIZE,
) -> tuple[ArchiveHeader, ArchiveIndex, bytes]:
    """Read, check (sizes, then signature) and decode header and index.

    Returns:
        ``(header, index, description_bytes)``.
    """
    head = source.read(0, HEADER_SIZE)
    header = decode_header(head, source=source.name)
    size = getattr(source, "size", None)
    if size is not None and size != header.archive_size:
        raise StreamFormatError(
            f"archive is {size} bytes, its header says {header.archive_size}",
            source=source.name, offset=0)
    if header.index_size > max_index_size:
        raise StreamFormatError(
            f"index of {header.index_size} bytes exceeds the {max_index_size}-byte limit "
            "(not read)", source=source.name, offset=64)
    start = header.index_offset
    tail = source.read(start, start + header.index_size + header.sig_size)
    index_bytes = memoryview(tail)[: header.index_size]
    if public_key is not None:
        signature = memoryview(tail)[header.index_size :]
        verify_signature(public_key, header, head, index_bytes, signature, source=source.name)
    index = decode_index(header, index_bytes, source=source.name)
    return header, index, head + tail


class ArchiveChunks:
    """The chunks of one archive, fetched by dictionary entry.

    Args:
        source: the archive.
        index: its decoded index.
        max_gap: unneeded bytes accepted between two ranges to merge them.
    """

    def __init__(self, source: ArchiveSource, index: ArchiveIndex, *, max_gap: int = 0) -> None:
        self.source = source
        self.index = index
        self.max_gap = max_gap
        self.name = source.name
        self.stats = source.stats

    def spans(self, entries: Sequence[int]) -> list[Span]:
        """The coalesced byte ranges holding ``entries``."""
        index = self.index
        parts = [Part(e, index.offsets[e], index.comp_sizes[e]) for e in entries]
        return coalesce(parts, max_gap=self.max_gap)

    def cost(self, entries: Sequence[int]) -> tuple[int, int]:
        """``(bytes, ranges)`` fetching ``entries`` takes."""
        spans = self.spans(entries)
        return sum(s.length for s in spans), len(spans)

    def fetch(self, entries: Sequence[int], on_chunk: Callable[[int, bytes], None]) -> None:
        """Fetch, decompress and check each entry's chunk; ``on_chunk(entry, data)`` gets it
        (from worker threads).

        Raises:
            ChecksumError: a chunk not matching its id, a frame that does not decode
                included (nothing of it reaches ``on_chunk``).
        """
        index, name = self.index, self.source.name
        local = threading.local()

        def on_span(span: Span, data: memoryview) -> None:
            dctx = getattr(local, "dctx", None)
            if dctx is None:
                dctx = local.dctx = zstandard.ZstdDecompressor()
            for part in span.parts:
                entry = part.key
                blob = data[part.start - span.start : part.end - span.start]
                raw = decode_chunk(dctx, blob, index.raw_sizes[entry], entry,
                                   source=name, offset=index.offsets[entry])
                digest = index.digests[entry]
                if chunk_digest(raw) != digest:
                    raise ChecksumError(
                        f"chunk {entry} ({digest.hex()[:16]}…) does not match its id; "
                        "not used", source=name, offset=index.offsets[entry], index=entry,
                    )
                on_chunk(entry, raw)

        self.source.fetch(self.spans(entries), on_span)
