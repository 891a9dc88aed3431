"""Clone an image from a chunk archive (local path or HTTP URL) into a chunk store.

Data flow::

    header + index  (2 range reads; signature checked first when a key is given)
      -> which chunks the store already holds
      -> which of the rest a seed holds (seed cut with the archive's chunker parameters)
      -> missing chunks: coalesced ranges, fetched in parallel, each decompressed with a
         size bound, hash-checked, then stored                (the store never holds a bad chunk)
      -> description written last (atomic)                    -> optional full image output

An interrupted clone resumes: chunks already stored are not fetched again.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..errors import BtrdeltaError, ChecksumError, StreamFormatError
from ..transport.http import FetchStats, RangeFetcher, RangesNotSupported
from ..transport.plan import Part, Span, coalesce
from .archive import (
    HEADER_SIZE,
    ArchiveHeader,
    ArchiveIndex,
    decode_header,
    decode_index,
    verify_signature,
)
from .chunker import chunk_digest, iter_chunks, map_file
from .store import ChunkStore, ImageReader

__all__ = ["ArchiveSource", "CloneReport", "FileSource", "HttpSource", "clone", "open_source"]


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
        self.size = os.fstat(self._fd).st_size
        self.stats = FetchStats()

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``; short reads mean a truncated archive."""
        data = os.pread(self._fd, end - start, start)
        self.stats.requests += 1
        self.stats.bytes_received += len(data)
        if len(data) != end - start:
            raise StreamFormatError(
                f"archive truncated: wanted [{start}, {end}), file is {self.size} bytes",
                source=self.name, offset=self.size,
            )
        return data

    def fetch(self, spans: Sequence[Span], on_span: Callable[[Span, memoryview], None]) -> None:
        """Read each span and deliver it."""
        for span in spans:
            on_span(span, memoryview(self.read(span.start, span.end)))

    def close(self) -> None:
        """Close the file."""
        os.close(self._fd)


class HttpSource:
    """An archive behind an HTTP(S) URL, read with range requests."""

    def __init__(self, url: str, fetcher: RangeFetcher | None = None) -> None:
        self.name = url
        self.fetcher = fetcher or RangeFetcher(url)
        self.stats = self.fetcher.stats

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` (raises ``RangesNotSupported`` if the server ignores Range)."""
        return self.fetcher.get_range(start, end)

    def fetch(self, spans: Sequence[Span], on_span: Callable[[Span, memoryview], None]) -> None:
        """Fetch spans in parallel with retries."""
        self.fetcher.fetch_spans(spans, on_span)

    def close(self) -> None:
        """Close the HTTP client."""
        self.fetcher.close()


def open_source(location: str) -> ArchiveSource:
    """A :class:`HttpSource` for ``http(s)://`` locations, else a :class:`FileSource`."""
    if location.startswith(("http://", "https://")):
        return HttpSource(location)
    return FileSource(location)


@dataclass(slots=True)
class CloneReport:
    """What a clone did (``fetch_bytes`` is what was, or with ``dry_run`` would be, fetched)."""

    image_size: int = 0
    chunks: int = 0
    from_store: int = 0
    from_seeds: int = 0
    fetched: int = 0
    fetch_bytes: int = 0
    index_bytes: int = 0
    requests: int = 0
    bytes_received: int = 0
    full_download: bool = False
    seed_bytes: int = 0
    missing_bytes: int = 0
    spans: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def read_index(
    source: ArchiveSource, *, public_key: Ed25519PublicKey | None = None
) -> tuple[ArchiveHeader, ArchiveIndex, bytes]:
    """Read, check (signature first) and decode header and index.

    Returns:
        ``(header, index, description_bytes)``.
    """
    head = source.read(0, HEADER_SIZE)
    header = decode_header(head, source=source.name)
    start = header.index_offset
    tail = source.read(start, start + header.index_size + header.sig_size)
    index_bytes = memoryview(tail)[: header.index_size]
    if public_key is not None:
        signature = memoryview(tail)[header.index_size :]
        verify_signature(public_key, header, head, index_bytes, signature, source=source.name)
    index = decode_index(header, index_bytes, source=source.name)
    return header, index, head + tail


def clone(
    source: ArchiveSource,
    store: ChunkStore,
    name: str,
    *,
    seeds: Sequence[str] = (),
    output: str | None = None,
    dry_run: bool = False,
    public_key: Ed25519PublicKey | None = None,
    max_gap: int = 0,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> CloneReport:
    """Clone the archive at ``source`` into ``store`` as ``name``.

    Args:
        source: the archive.
        store: the local chunk store.
        name: the description's name in the store.
        seeds: files or devices that may hold some chunks (an older image, the A partition).
        output: also write the full image here (file or device), checked against the
            archive's whole-image digest.
        dry_run: stop after planning; the report says what would be fetched.
        public_key: require a valid Ed25519 signature before trusting the index.
        max_gap: unneeded bytes accepted between two ranges to merge them.
        on_progress: ``(phase, done, total)`` callback.

    Raises:
        ChecksumError: a fetched chunk, the signature, or the rebuilt image does not check.
        TransportError: the archive could not be fetched.
    """
    report = CloneReport()
    if isinstance(source, HttpSource):
        try:
            header, index, description = read_index(source, public_key=public_key)
        except RangesNotSupported:
            return _clone_full_download(source, store, name, seeds=seeds, output=output,
                                        dry_run=dry_run, public_key=public_key,
                                        max_gap=max_gap, on_progress=on_progress)
    else:
        header, index, description = read_index(source, public_key=public_key)
    report.image_size = header.image_size
    report.chunks = header.chunk_count
    report.index_bytes = len(description)
    wanted = {d: i for i, d in enumerate(index.digests)}
    missing = {d: i for d, i in wanted.items() if not store.has(d)}
    report.from_store = len(wanted) - len(missing)
    if missing and seeds:
        report.from_seeds, report.seed_bytes = _take_from_seeds(
            seeds, header, index, missing, store, dry_run=dry_run, on_progress=on_progress)
    parts = [Part(i, index.offsets[i], index.comp_sizes[i]) for i in missing.values()]
    spans = coalesce(parts, max_gap=max_gap)
    report.spans = len(spans)
    report.fetch_bytes = sum(s.length for s in spans)
    report.missing_bytes = sum(index.raw_sizes[i] for i in missing.values())
    if dry_run:
        report.requests, report.bytes_received = source.stats.requests, source.stats.bytes_received
        return report
    done = [0]
    lock = threading.Lock()
    dctx_local = threading.local()

    def on_span(span: Span, data: memoryview) -> None:
        dctx = getattr(dctx_local, "dctx", None)
        if dctx is None:
            dctx = dctx_local.dctx = zstandard.ZstdDecompressor()
        for part in span.parts:
            entry = part.key
            blob = data[part.start - span.start : part.end - span.start]
            raw = _decompress(dctx, blob, index.raw_sizes[entry], entry, index.offsets[entry],
                              source.name)
            digest = index.digests[entry]
            if chunk_digest(raw) != digest:
                raise ChecksumError(
                    f"chunk {entry} ({digest.hex()[:16]}…) does not match its id; "
                    "not stored", source=source.name, offset=index.offsets[entry], index=entry,
                )
            store.put(digest, raw)
            with lock:
                done[0] += 1
                if on_progress is not None:
                    on_progress("fetch", done[0], len(missing))

    source.fetch(spans, on_span)
    report.fetched = len(missing)
    store.write_description(name, description)
    if output is not None:
        write_output(store, index, header, output, on_progress=on_progress)
    report.requests, report.bytes_received = source.stats.requests, source.stats.bytes_received
    return report


def _decompress(
    dctx: zstandard.ZstdDecompressor, blob: memoryview, raw_size: int, entry: int,
    offset: int, source: str,
) -> bytes:
    try:
        params = zstandard.get_frame_parameters(blob)
        if params.content_size != raw_size:
            raise StreamFormatError(
                f"chunk {entry}: frame declares {params.content_size} bytes, index {raw_size}",
                source=source, offset=offset, index=entry)
        raw = dctx.decompress(blob, max_output_size=raw_size)
    except zstandard.ZstdError as exc:
        raise StreamFormatError(f"chunk {entry}: bad zstd frame ({exc})", source=source,
                                offset=offset, index=entry) from exc
    if len(raw) != raw_size:
        raise StreamFormatError(f"chunk {entry}: {len(raw)} bytes, index says {raw_size}",
                                source=source, offset=offset, index=entry)
    return raw


def _take_from_seeds(
    seeds: Sequence[str], header: ArchiveHeader, index: ArchiveIndex,
    missing: dict[bytes, int], store: ChunkStore, *, dry_run: bool,
    on_progress: Callable[[str, int, int], None] | None,
) -> tuple[int, int]:
    """Cut each seed like the archive, store the chunks it has; returns (count, bytes)."""
    found = nbytes = 0
    for seed in seeds:
        with map_file(seed) as view:
            data = memoryview(b"")
            for offset, data in iter_chunks(view, header.params):
                digest = chunk_digest(data)
                if digest in missing:
                    if not dry_run:
                        store.put(digest, data)
                    del missing[digest]
                    found += 1
                    nbytes += len(data)
                if on_progress is not None:
                    on_progress("seed", offset + len(data), len(view))
            del data
        if not missing:
            break
    return found, nbytes


def write_output(
    store: ChunkStore, index: ArchiveIndex, header: ArchiveHeader, output: str, *,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> None:
    """Write the full image to ``output`` (file: atomically; device: in place)."""
    is_device = os.path.exists(output) and not os.path.isfile(output)
    reader = ImageReader(store, index)
    progress = None if on_progress is None else (lambda d, t: on_progress("output", d, t))
    try:
        if is_device:
            fd = os.open(output, os.O_WRONLY | os.O_CLOEXEC)
            try:
                reader.write_image(fd, image_digest=header.image_digest, on_progress=progress)
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        directory = os.path.dirname(os.path.abspath(output))
        fd, tmp = tempfile.mkstemp(prefix=".btrdelta-", dir=directory)
        try:
            os.ftruncate(fd, header.image_size)
            reader.write_image(fd, image_digest=header.image_digest, on_progress=progress)
            os.close(fd)
            fd = -1
            os.replace(tmp, output)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    finally:
        reader.close()


def _clone_full_download(
    source: HttpSource, store: ChunkStore, name: str, **kwargs: object
) -> CloneReport:
    """The server ignores Range: download the whole archive once, clone from the file."""
    os.makedirs(store.root, exist_ok=True)
    with tempfile.NamedTemporaryFile(prefix=".tmp-download-", dir=store.root) as tmp:
        if kwargs.get("dry_run"):
            raise BtrdeltaError(
                "server ignores Range requests: a clone would download the whole archive",
            )
        source.fetcher.download(tmp)  # type: ignore[arg-type]
        tmp.flush()
        local = FileSource(tmp.name)
        try:
            report = clone(local, store, name, **kwargs)  # type: ignore[arg-type]
        finally:
            local.close()
    report.full_download = True
    report.requests = source.stats.requests
    report.bytes_received = source.stats.bytes_received
    return report
