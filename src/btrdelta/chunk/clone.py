"""Clone an image from a chunk archive (local path or HTTP URL) into a chunk store.

Data flow::

    header + index  (2 range reads; signature checked first when a key is given)
      -> which chunks the store already holds
      -> which of the rest a seed holds (seed cut with the archive's chunker parameters)
      -> missing chunks: coalesced ranges, fetched in parallel, each decompressed with a
         size bound, hash-checked, then stored                (the store never holds a bad chunk)
      -> description written last (atomic)
      -> optional full image output: chunks a seed holds copied from the seed, chunks
         already at the right offset of an output that is a seed left alone, the rest
         read from the store; checked against the whole-image digest

An interrupted clone resumes: chunks already stored are not fetched again.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Container, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import blake3
import zstandard

from ..errors import ChecksumError, MissingBaseError, StreamFormatError
from ..transport.config import HttpConfig
from ..transport.http import FetchStats, RangeFetcher, RangesNotSupported
from ..transport.plan import Part, Span, coalesce
from ..trust import PublicKey
from .archive import (
    HEADER_SIZE,
    ArchiveHeader,
    ArchiveIndex,
    decode_header,
    decode_index,
    verify_signature,
)
from .chunker import ChunkerParams, chunk_digest, hash_chunks, map_file
from .store import ChunkStore, ImageReader

__all__ = [
    "ArchiveSource",
    "CloneReport",
    "FileSource",
    "HttpSource",
    "OutputReport",
    "SeedMap",
    "clone",
    "open_source",
    "scan_seeds",
    "write_output",
]


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
        """Bytes ``[start, end)`` (raises ``RangesNotSupported`` if the server ignores Range)."""
        return self.fetcher.get_range(start, end)

    def fetch(self, spans: Sequence[Span], on_span: Callable[[Span, memoryview], None]) -> None:
        """Fetch spans in parallel with retries."""
        self.fetcher.fetch_spans(spans, on_span)

    def close(self) -> None:
        """Close the HTTP client."""
        self.fetcher.close()


def open_source(location: str, config: HttpConfig | None = None) -> ArchiveSource:
    """A :class:`HttpSource` (with ``config``) for ``http(s)://`` locations, else a
    :class:`FileSource`."""
    if location.startswith(("http://", "https://")):
        return HttpSource(location, config=config)
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
    out_in_place: int = 0
    out_from_seeds: int = 0
    out_from_store: int = 0
    archive_size: int = 0


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


def clone(
    source: ArchiveSource,
    store: ChunkStore,
    name: str,
    *,
    seeds: Sequence[str] = (),
    output: str | None = None,
    dry_run: bool = False,
    public_key: PublicKey | None = None,
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
            archive's whole-image digest; seeds supply the chunks they hold, and an output
            that is itself a seed is updated in place.
        dry_run: stop after planning; the report says what would be fetched (the whole
            archive, ``full_download``, when the server ignores Range).
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
        except RangesNotSupported as refused:
            return _clone_full_download(source, store, name, refused, seeds=seeds, output=output,
                                        dry_run=dry_run, public_key=public_key,
                                        max_gap=max_gap, on_progress=on_progress)
    else:
        header, index, description = read_index(source, public_key=public_key)
    report.image_size = header.image_size
    report.archive_size = header.archive_size
    report.chunks = header.chunk_count
    report.index_bytes = len(description)
    wanted = {d: i for i, d in enumerate(index.digests)}
    missing = {d: i for d, i in wanted.items() if not store.has(d)}
    report.from_store = len(wanted) - len(missing)
    seed_map = None
    if seeds and (missing or (output is not None and not dry_run)):
        seed_map, report.from_seeds, report.seed_bytes = scan_seeds(
            seeds, header.params, wanted, missing, store, dry_run=dry_run,
            on_progress=on_progress)
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
        out = write_output(store, index, header, output, seeds=seed_map,
                           on_progress=on_progress)
        report.out_in_place, report.out_from_seeds = out.in_place, out.from_seeds
        report.out_from_store = out.from_store
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


@dataclass(slots=True)
class SeedMap:
    """Where the image's chunks sit in the seeds (found by cutting them like the archive).

    Attributes:
        paths: the seeds, in the order given.
        where: chunk id -> ``(seed number, offset)`` of its first occurrence.
        at: per seed, offset -> id of every wanted chunk found there.
    """

    paths: list[str] = field(default_factory=list)
    where: dict[bytes, tuple[int, int]] = field(default_factory=dict)
    at: list[dict[int, bytes]] = field(default_factory=list)


def scan_seeds(
    seeds: Sequence[str], params: ChunkerParams, wanted: Container[bytes],
    missing: dict[bytes, int], store: ChunkStore, *, dry_run: bool = False,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> tuple[SeedMap, int, int]:
    """Cut each seed like the archive; store the missing chunks it holds, map the wanted ones.

    Chunks found are removed from ``missing``.

    Returns:
        ``(seed map, chunks stored from seeds, their bytes)``.
    """
    seed_map = SeedMap()
    found = nbytes = 0
    with ThreadPoolExecutor(1, thread_name_prefix="blake3") as pool:
        for k, seed in enumerate(seeds):
            seed_map.paths.append(seed)
            at: dict[int, bytes] = {}
            seed_map.at.append(at)
            with map_file(seed) as view:
                for batch in hash_chunks(view, params, pool=pool):
                    for offset, data, digest in zip(
                        batch.offsets, batch.views, batch.digests, strict=True
                    ):
                        if digest not in wanted:
                            continue
                        at[offset] = digest
                        seed_map.where.setdefault(digest, (k, offset))
                        if digest in missing:
                            if not dry_run:
                                store.put(digest, data)
                            del missing[digest]
                            found += 1
                            nbytes += len(data)
                    if on_progress is not None:
                        on_progress("seed", batch.end, len(view))
                del batch  # no chunk view may outlive the map
    return seed_map, found, nbytes


@dataclass(slots=True)
class OutputReport:
    """Where :func:`write_output` took the image's bytes from.

    Attributes:
        in_place: bytes already right in an output written in place: not written.
        from_seeds: bytes written from seeds.
        from_store: bytes written from the chunk store.
    """

    in_place: int = 0
    from_seeds: int = 0
    from_store: int = 0


_COPY_BLOCK = 8 << 20


def _same_file(a: str, b: str) -> bool:
    """``a`` and ``b`` are the same file, or nodes of the same block device."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except FileNotFoundError:
        return False
    if stat.S_ISBLK(sa.st_mode) and stat.S_ISBLK(sb.st_mode):
        return sa.st_rdev == sb.st_rdev
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _pread_exact(fd: int, n: int, offset: int, name: str) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise MissingBaseError(f"seed shorter than when it was scanned ({offset} + {n})",
                               path=name, offset=offset + len(data))
    return data


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _copy_image(
    reader: ImageReader, out_fd: int, seeds: SeedMap | None, seed_fds: list[int],
    out_seed: int | None, *, in_place: bool, on_progress: Callable[[int, int], None] | None,
) -> tuple[bytes, OutputReport]:
    """Write every image position to ``out_fd``; returns (BLAKE3 of the image, report).

    A position whose chunk a seed holds is copied from the seed (neighbouring positions
    contiguous in the seed in one read); when the output is seed ``out_seed``, positions
    whose chunk is already at that offset are not written (their bytes are read back for the
    image digest), and chunks elsewhere in it come from other seeds or the store, since the
    output may already have overwritten them. With ``in_place``, any other chunk is compared
    with the bytes already at its offset and written only if they differ (a device is
    rewritten only where the image changed).
    """
    index = reader.index
    starts, order, digests = index.starts, index.order, index.digests
    hasher = blake3.blake3()
    report = OutputReport()
    # a run: (kind, fd, source offset, image start, image end); kind 0 store, 1 seed, 2 keep
    run: list[int] = []

    def put(data: bytes, start: int) -> bool:
        """Write ``data`` at ``start`` unless (in place) it is already there."""
        if in_place and os.pread(out_fd, len(data), start) == data:
            report.in_place += len(data)
            return False
        _pwrite_all(out_fd, data, start)
        return True

    def flush() -> None:
        if not run:
            return
        kind, fd, src, start, end = run
        run.clear()
        while start < end:
            n = min(_COPY_BLOCK, end - start)
            data = _pread_exact(fd, n, src, seeds.paths[fd_owner[fd]] if seeds else "")
            hasher.update(data)
            if kind == 1:
                if put(data, start):
                    report.from_seeds += n
            else:
                report.in_place += n
            start += n
            src += n

    fd_owner = {fd: k for k, fd in enumerate(seed_fds)}
    for pos, entry in enumerate(order):
        start, end = starts[pos], starts[pos + 1]
        digest = digests[entry]
        kind, fd, src = 0, -1, 0
        if seeds is not None:
            if out_seed is not None and seeds.at[out_seed].get(start) == digest:
                kind, fd, src = 2, seed_fds[out_seed], start
            else:
                loc = seeds.where.get(digest)
                if loc is not None and loc[0] != out_seed:
                    kind, fd, src = 1, seed_fds[loc[0]], loc[1]
        if run and (kind == 0 or run[0] != kind or run[1] != fd
                    or run[2] + run[4] - run[3] != src or run[4] != start):
            flush()
        if kind == 0:
            data = reader.read_chunk(entry, end - start)
            hasher.update(data)
            if put(data, start):
                report.from_store += end - start
        elif run:
            run[4] = end
        else:
            run.extend((kind, fd, src, start, end))
        if on_progress is not None and (kind == 0 or pos % 64 == 0):
            on_progress(end, reader.size)
    flush()
    return hasher.digest(), report


def write_output(
    store: ChunkStore, index: ArchiveIndex, header: ArchiveHeader, output: str, *,
    seeds: SeedMap | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> OutputReport:
    """Write the full image to ``output``, checked against the archive's image digest.

    A new regular file is written under a temporary name and renamed into place; a device,
    or a file that is one of the seeds, is written in place (then chunks already at the
    right offset are left alone). Chunks a seed holds are copied from it.

    Raises:
        ChecksumError: the bytes written do not hash to the image digest.
        MissingBaseError: a chunk is missing from the store.
    """
    out_seed = None
    if seeds is not None:
        out_seed = next((k for k, p in enumerate(seeds.paths) if _same_file(p, output)), None)
    is_device = os.path.exists(output) and not os.path.isfile(output)
    in_place = is_device or out_seed is not None
    progress = None if on_progress is None else (lambda d, t: on_progress("output", d, t))
    reader = ImageReader(store, index)
    seed_fds: list[int] = []
    tmp = None
    fd = -1
    try:
        if seeds is not None:
            for k, path in enumerate(seeds.paths):
                flags = os.O_RDWR if k == out_seed else os.O_RDONLY
                seed_fds.append(os.open(path, flags | os.O_CLOEXEC))
        if out_seed is not None:
            fd = os.dup(seed_fds[out_seed])
        elif is_device:
            fd = os.open(output, os.O_WRONLY | os.O_CLOEXEC)
        else:
            directory = os.path.dirname(os.path.abspath(output))
            fd, tmp = tempfile.mkstemp(prefix=".btrdelta-", dir=directory)
            os.ftruncate(fd, header.image_size)
        digest, report = _copy_image(reader, fd, seeds, seed_fds, out_seed,
                                     in_place=in_place, on_progress=progress)
        if in_place and not is_device:
            os.ftruncate(fd, header.image_size)
        if digest != header.image_digest:
            raise ChecksumError(
                "rebuilt image does not match the archive's image digest",
                expected=header.image_digest.hex(), actual=digest.hex(), path=output,
            )
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if tmp is not None:
            os.replace(tmp, output)
            tmp = None
        return report
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        for sfd in seed_fds:
            os.close(sfd)
        reader.close()


def _clone_full_download(
    source: HttpSource, store: ChunkStore, name: str, refused: RangesNotSupported,
    **kwargs: object,
) -> CloneReport:
    """The server ignores Range: download the whole archive once, clone from the file.

    With ``dry_run`` nothing is downloaded: the report says the whole archive would be
    (its size from the refused request's ``Content-Length``; 0 if the server sent none).
    """
    if kwargs.get("dry_run"):
        size = refused.size or 0
        return CloneReport(
            full_download=True, fetch_bytes=size, archive_size=size,
            requests=source.stats.requests, bytes_received=source.stats.bytes_received,
        )
    os.makedirs(store.root, exist_ok=True)
    with tempfile.NamedTemporaryFile(prefix=".tmp-download-", dir=store.root) as tmp:
        size = source.fetcher.download(tmp)  # type: ignore[arg-type]
        tmp.flush()
        local = FileSource(tmp.name)
        try:
            report = clone(local, store, name, **kwargs)  # type: ignore[arg-type]
        finally:
            local.close()
    report.full_download = True
    report.archive_size = size
    report.fetch_bytes = size
    report.requests = source.stats.requests
    report.bytes_received = source.stats.bytes_received
    return report
