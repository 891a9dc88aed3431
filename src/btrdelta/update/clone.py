"""The image clone workflow: a chunked image into a chunk store, onto an output, or both.

Sources: a btrdelta chunk archive (path or URL) or a casync/desync blob index (``.caibx``)
with its ``.castr`` chunk stores. Plan first, then execute::

    open the source: header + index (signature checked first when a key is given)
    [store]  lock it (shared), check the chunks it holds (size + hash): damaged ones dropped
    scan the seeds, and the output's old content, for the image's chunks (cut like the image)
    [output] plan every position: KEEP / SEED / STORE / MOVE / FETCH  (chunk.output)
    -> what to fetch, and what it costs                      (--dry-run stops here)
    [store]  fetch into the store, re-check every chunk, write the description (and where
             it came from, for ``verify --repair``)
    [output] moves in a safe order, seed and store copies, then fetched chunks; read back
             and check the whole output; a new file is renamed into place only then

Without a store (``--output`` only) fetched chunks go straight to the output, as bita and
desync do. Nothing here parses arguments or prints: that is ``btrdelta.cli``.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from .._value import Value, field
from ..chunk.archive import ArchiveHeader
from ..chunk.castr import CastrChunks, default_store, read_caibx
from ..chunk.casync import INDEX_SUFFIX, is_caibx
from ..chunk.chunker import Chunking, FastCdcChunking
from ..chunk.output import Layout, OutputPlan, OutputWriter, plan_output
from ..chunk.seed import SeedMap, scan_seeds
from ..chunk.source import (
    ArchiveChunks,
    ArchiveSource,
    HttpSource,
    is_url,
    open_source,
    read_index,
)
from ..chunk.store import ChunkStore, split_store_name
from ..errors import BtrdeltaError, MissingBaseError, UsageError
from ..fs.atomic import atomic_output
from ..transport.config import HttpConfig
from ..transport.http import FetchStats, RangesNotSupported
from ..trust import PublicKey

__all__ = ["CloneReport", "OpenImage", "clone_image", "fetch_into_store", "open_image"]

Progress = Callable[[str, int, int], None]


class ChunkFetcher(Protocol):
    """Where an image's missing chunks are fetched from (archive ranges or a ``.castr``)."""

    name: str

    @property
    def stats(self) -> FetchStats:
        """Requests and bytes so far."""
        ...

    def cost(self, entries: Sequence[int]) -> tuple[int, int]:
        """``(bytes, requests or ranges)`` fetching ``entries`` takes."""
        ...

    def fetch(self, entries: Sequence[int], on_chunk: Callable[[int, bytes], None]) -> None:
        """Fetch and check each entry; ``on_chunk(entry, data)`` gets it."""
        ...


class OpenImage(Value):
    """An image source, opened: what it is made of and where its chunks come from.

    Attributes:
        kind: ``"archive"`` or ``"casync"``.
        location: the path or URL given.
        layout: chunk ids, sizes and order.
        chunking: how seeds are cut to find its chunks.
        chunks: fetches missing chunks.
        image_digest: BLAKE3 of the whole image (archives), else ``None``.
        description: what a store keeps for it (archives), else ``None``.
        archive_size: bytes of the whole archive (0 when unknown).
        index_bytes: bytes read before any chunk.
        header: the archive's header (archives), else ``None``.
    """

    kind: str
    location: str
    layout: Layout
    chunking: Chunking
    chunks: ChunkFetcher
    image_digest: bytes | None
    description: bytes | None
    archive_size: int
    index_bytes: int
    header: ArchiveHeader | None = None
    closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def image_size(self) -> int:
        """Bytes in the image."""
        return self.layout.starts[-1]

    def close(self) -> None:
        """Release files and HTTP clients."""
        for close in self.closers:
            close()


def _is_casync(location: str) -> bool:
    if location.endswith(INDEX_SUFFIX):
        return True
    if is_url(location) or not os.path.isfile(location):
        return False
    with open(location, "rb") as f:
        return is_caibx(f.read(16))


def open_image(
    location: str | ArchiveSource, *, castr: Sequence[str] = (),
    public_key: PublicKey | None = None, max_gap: int = 0, config: HttpConfig | None = None,
) -> OpenImage:
    """Open a chunk archive or a casync index (``castr``: its stores; default
    ``default.castr`` next to the index). ``location`` may be an open
    :class:`~btrdelta.chunk.source.ArchiveSource` (then the caller closes it); ``config``
    is used for every HTTP request.

    Raises:
        RangesNotSupported: an archive's server ignores Range (the caller may download it).
    """
    if not isinstance(location, str):
        header, index, description = read_index(location, public_key=public_key)
        return OpenImage("archive", location.name, index, FastCdcChunking(header.params),
                         ArchiveChunks(location, index, max_gap=max_gap), header.image_digest,
                         description, header.archive_size, len(description), header)
    if _is_casync(location):
        if public_key is not None:
            raise UsageError("casync indexes are not signed: --key applies to btrdelta "
                             "archives only", source=location)
        caibx, stats = read_caibx(location, config)
        chunks = CastrChunks(caibx, list(castr) or [default_store(location)], config=config,
                             guessed=not castr)
        return OpenImage("casync", location, caibx, caibx.chunking(), chunks, None, None, 0,
                         stats.bytes_received, closers=[chunks.close])
    if castr:
        raise UsageError("--castr is for casync indexes (.caibx)", source=location)
    source = open_source(location, config)
    try:
        header, index, description = read_index(source, public_key=public_key)
    except BaseException:
        source.close()
        raise
    return OpenImage("archive", location, index, FastCdcChunking(header.params),
                     ArchiveChunks(source, index, max_gap=max_gap), header.image_digest,
                     description, header.archive_size, len(description), header,
                     closers=[source.close])


class CloneReport(Value):
    """What a clone did (``fetch_bytes`` is what was, or with ``dry_run`` would be, fetched;
    for casync sources it counts uncompressed bytes, a store lists no compressed sizes)."""

    kind: str = "archive"
    image_size: int = 0
    chunks: int = 0
    from_store: int = 0
    damaged: int = 0
    from_seeds: int = 0
    fetched: int = 0
    fetch_chunks: int = 0
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
    out_moved: int = 0
    out_fetched: int = 0
    archive_size: int = 0


class _Output(Value):
    """Where and how the output is written."""

    path: str
    in_place: bool
    is_device: bool
    seeds: list[str]  # every seed, the output's old content included
    out_seed: int | None  # its number among them when written in place


def _same_file(a: str, b: str) -> bool:
    """``a`` and ``b`` are the same file, or nodes of the same block device."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except FileNotFoundError:
        return False
    if stat.S_ISBLK(sa.st_mode) and stat.S_ISBLK(sb.st_mode):
        return sa.st_rdev == sb.st_rdev
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _mounted(rdev: int) -> str | None:
    """Where the block device ``rdev`` is mounted, if it is."""
    want = f"{os.major(rdev)}:{os.minor(rdev)}"
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[2] == want:
                return fields[4]
    return None


def _resolve_output(output: str | None, seeds: Sequence[str], in_place: bool | None,
                    image_size: int) -> tuple[_Output | None, list[str]]:
    """Decide how the output is written; the seed list gains the output's old content."""
    seeds = [s for i, s in enumerate(seeds) if not any(_same_file(s, t) for t in seeds[:i])]
    if output is None:
        return None, seeds
    try:
        st = os.stat(output)
    except FileNotFoundError:
        return _Output(output, False, False, seeds, None), seeds
    if stat.S_ISDIR(st.st_mode):
        raise BtrdeltaError("is a directory; --output is an image file or a block device",
                            path=output)
    is_device = stat.S_ISBLK(st.st_mode)
    if not (is_device or stat.S_ISREG(st.st_mode)):
        raise BtrdeltaError("--output must be a regular file or a block device", path=output)
    if is_device:
        where = _mounted(st.st_rdev)
        if where is not None:
            raise BtrdeltaError(f"device is mounted on {where}: refusing to write the image "
                                "over a mounted file system", path=output)
        with open(output, "rb") as f:
            size = f.seek(0, os.SEEK_END)
        if size < image_size:
            raise BtrdeltaError(f"device holds {size} bytes, the image needs {image_size}",
                                path=output)
    out_seed = next((k for k, s in enumerate(seeds) if _same_file(s, output)), None)
    place = is_device or out_seed is not None or bool(in_place)
    if out_seed is None and (is_device or st.st_size):
        seeds.append(output)
        out_seed = len(seeds) - 1
    return _Output(output, place, is_device, seeds, out_seed if place else None), seeds


def _check_store_place(root: str) -> None:
    """Refuse, before anything is fetched, a store that is a file, or that would be made in
    a directory that does not exist (a mistyped path: no store is made there)."""
    if os.path.isdir(root):
        return
    if os.path.lexists(root):
        raise BtrdeltaError("chunk store is not a directory (STORE/NAME: the store, then the "
                            "image's name)", path=root)
    parent = os.path.dirname(root)
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.lexists(parent) else "does not exist"
        raise BtrdeltaError(f"no chunk store here, and its directory {parent} {what} (a new "
                            "store is made only inside an existing directory)", path=root)


def _check_output_place(output: str) -> None:
    """Refuse, before anything is fetched, an output in a directory that does not exist."""
    if os.path.lexists(output):
        return
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.lexists(parent) else "does not exist"
        raise BtrdeltaError(f"--output: its directory {parent} {what}", path=output)


def _check_not_the_store(location: str | ArchiveSource, target: str) -> None:
    """STORE/NAME given as the store alone (``/var/lib/images`` that exists, or
    ``.../images/``): a usage error naming the image in it, not a description file made
    in its parent (the trailing slash) or 'is a directory, not a file to write'.

    Raises:
        UsageError: see above.
    """
    if not (target.endswith("/") or os.path.isdir(target)):
        return
    import shlex

    where = location if isinstance(location, str) else location.name
    stem = where.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".bdar", ".cba", ".caibx"):
        stem = stem.removesuffix(suffix)
    meant = f"{target.rstrip('/')}/{stem or 'NAME'}"
    raise UsageError(f"STORE/NAME {target} is " + (
        "a directory" if os.path.isdir(target) else "a directory's name (ends with /)")
        + f": give the image's name in the store too: btrdelta image clone "
        f"{shlex.quote(where)} {shlex.quote(meant)}")


def clone_image(
    location: str | ArchiveSource, *, target: str | None = None, output: str | None = None,
    seeds: Sequence[str] = (), castr: Sequence[str] = (), dry_run: bool = False,
    public_key: PublicKey | None = None, in_place: bool | None = None,
    wait: float = 0.0, max_gap: int = 0, on_progress: Progress | None = None,
    record_as: str | None = None, config: HttpConfig | None = None,
) -> CloneReport:
    """Clone the image at ``location`` into ``target`` (``STORE/NAME``) and/or ``output``.

    Args:
        location: archive path or URL, or ``.caibx`` path or URL (or an open archive
            source, which the caller closes).
        target: the store and the image's name in it; ``None`` writes ``output`` only.
        output: file or block device receiving the image. A device, an output named among
            ``seeds``, or any existing file with ``in_place`` is written in place (only
            where it differs); otherwise a new file replaces it once complete. Its old
            content is reused like a seed's.
        seeds: files or devices that may hold some chunks.
        castr: casync stores for a ``.caibx`` (default ``default.castr`` next to it).
        dry_run: stop after planning; the report says what would be fetched.
        public_key: require a valid signature (archives) before trusting the index.
        in_place: write an existing regular-file output in place.
        wait: seconds to wait for the store's lock.
        max_gap: unneeded bytes accepted between two archive ranges to merge them.
        on_progress: ``(phase, done, total)``: ``check``: chunks of the store looked at;
            ``fetch``: bytes of the image fetched; ``output`` and ``verify``: bytes of the
            image.
        record_as: the location recorded in the store (default ``location``).
        config: HTTP settings (TLS, headers, timeouts, retries, jobs, rate limit).

    Raises:
        ChecksumError: a chunk, the signature or the written image does not check.
        MissingBaseError: a chunk is in no source.
        StoreBusyError: the store's lock could not be had.
        TransportError: the source could not be fetched.
    """
    if target is None and output is None:
        raise UsageError("nothing to clone into: give STORE/NAME, --output, or both")
    store, name = None, ""
    if target is not None:
        if not os.path.dirname(target.rstrip("/")):  # (the working directory made a store)
            raise UsageError(f"{target}: give STORE/NAME, a chunk store directory and the "
                             f"image's name in it (./{target.rstrip('/')}: this directory "
                             f"is the store), or --output {target} to write the image there")
        store_dir, name = split_store_name(target)
        _check_not_the_store(location, target)
        store = ChunkStore(store_dir)
        _check_store_place(store.root)
    if output is not None:
        _check_output_place(output)
    try:
        image = open_image(location, castr=castr, public_key=public_key, max_gap=max_gap,
                           config=config)
    except RangesNotSupported as refused:
        return _clone_downloaded(location, refused, store, target=target, output=output,
                                 seeds=seeds, dry_run=dry_run, public_key=public_key,
                                 in_place=in_place, wait=wait, on_progress=on_progress,
                                 config=config)
    try:
        if store is not None and image.description is None:
            raise UsageError("a casync index is cloned to --output only (its chunk store "
                             "is the .castr)", source=image.location)
        lock: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if store is not None and (not dry_run or os.path.isdir(store.root)):
            lock = store.locked(wait=wait, create=not dry_run)
        writing: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        if store is not None and not dry_run:
            writing = store.writing()  # chunks named in batches, all durable at the end
        with lock, writing:
            return _clone(image, store, name, output, seeds, dry_run=dry_run,
                          in_place=in_place, on_progress=on_progress,
                          record_as=record_as or image.location)
    finally:
        image.close()


def _clone(
    image: OpenImage, store: ChunkStore | None, name: str, output: str | None,
    seeds: Sequence[str], *, dry_run: bool, in_place: bool | None,
    on_progress: Progress | None, record_as: str,
) -> CloneReport:
    layout = image.layout
    report = CloneReport(kind=image.kind, image_size=image.image_size,
                         chunks=len(layout.digests), index_bytes=image.index_bytes,
                         archive_size=image.archive_size)
    sizes = dict(zip(layout.digests, layout.raw_sizes, strict=True))
    entry_of = {d: e for e, d in enumerate(layout.digests)}
    have: set[bytes] = set()
    if store is not None and os.path.isdir(store.root):
        found = store.check(sizes, on_progress=_phase(on_progress, "check"))
        have, report.damaged = found.ok, len(found.damaged)
        if not dry_run:
            for digest in found.damaged:
                store.drop(digest)
    report.from_store = len(have)
    missing = {d: e for d, e in entry_of.items() if d not in have}
    out, seed_paths = _resolve_output(output, seeds, in_place, image.image_size)
    seed_map = _scan(image, seed_paths, sizes, missing, store, report, dry_run=dry_run,
                     scan=bool(missing) or out is not None, on_progress=on_progress)
    plan = None
    if out is not None:
        plan = plan_output(layout, seed_map, out_seed=out.out_seed,
                           in_store=None if store is None else (lambda d: True))
    fetch = sorted(missing.values()) if store is not None else sorted(plan.fetch if plan else ())
    report.fetch_chunks = len(fetch)
    report.fetch_bytes, report.spans = image.chunks.cost(fetch)
    report.missing_bytes = sum(layout.raw_sizes[e] for e in fetch)
    if dry_run:
        return _finish(report, image)
    if store is not None:
        fetch_into_store(image, store, fetch, on_progress=on_progress)
        report.fetched = len(fetch)
        store.write_description(name, image.description or b"")
        store.set_source(name, record_as)
    if out is not None and plan is not None:
        report.fetched += _write_output(image, out, plan, store, report,
                                        on_progress=on_progress)
    return _finish(report, image)


def _finish(report: CloneReport, image: OpenImage) -> CloneReport:
    stats = image.chunks.stats
    report.requests = stats.requests + (1 if image.kind == "casync" else 0)
    report.bytes_received = stats.bytes_received + (
        image.index_bytes if image.kind == "casync" else 0)
    return report


def _phase(on_progress: Progress | None, phase: str) -> Callable[[int, int], None] | None:
    if on_progress is None:
        return None
    return lambda done, total: on_progress(phase, done, total)


def _scan(
    image: OpenImage, seed_paths: list[str], sizes: dict[bytes, int],
    missing: dict[bytes, int], store: ChunkStore | None, report: CloneReport, *,
    dry_run: bool, scan: bool, on_progress: Progress | None,
) -> SeedMap | None:
    """Scan the seeds; missing chunks found go into the store (and leave ``missing``)."""
    if not seed_paths or not scan:
        return None
    found: list[bytes] = []

    def on_new(digest: bytes, data: memoryview) -> None:
        if digest in missing:
            if store is not None and not dry_run:
                store.put(digest, data)
            found.append(digest)
            report.seed_bytes += len(data)

    seed_map = scan_seeds(seed_paths, image.chunking, sizes, on_new=on_new,
                          on_progress=on_progress)
    if store is not None:
        for digest in found:
            del missing[digest]
    report.from_seeds = len(found)
    return seed_map


def fetch_into_store(image: OpenImage, store: ChunkStore, entries: Sequence[int], *,
                     on_progress: Progress | None = None) -> None:
    """Fetch ``entries`` into ``store``, then check every chunk the image needs is there with
    its size (a chunk that vanished, e.g. removed by hand, is fetched once more).

    Raises:
        MissingBaseError: a chunk is still absent after the second fetch.
    """
    layout = image.layout
    done = [0]
    total = sum(layout.raw_sizes[e] for e in entries)
    lock = threading.Lock()

    def on_chunk(entry: int, data: bytes) -> None:  # as each chunk arrives (fetch threads)
        store.put(layout.digests[entry], data)
        with lock:
            done[0] += layout.raw_sizes[entry]
            if on_progress is not None:
                on_progress("fetch", done[0], total)

    image.chunks.fetch(entries, on_chunk)
    store.flush()
    for attempt in range(2):
        gone = [e for e, d in enumerate(layout.digests) if not _stored(store, d,
                                                                       layout.raw_sizes[e])]
        if not gone:
            store.sync()
            return
        if attempt:
            raise MissingBaseError(f"{len(gone)} chunk(s) vanished from the store while "
                                   "cloning", path=store.chunk_path(layout.digests[gone[0]]))
        for e in gone:
            store.drop(layout.digests[e])
        image.chunks.fetch(gone, on_chunk)
        store.flush()


def _stored(store: ChunkStore, digest: bytes, size: int) -> bool:
    try:
        return os.lstat(store.chunk_path(digest)).st_size == size
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _output_fd(out: _Output, size: int) -> Iterator[int]:
    """The output's descriptor: the file or device itself in place, else a new file that
    replaces ``out.path`` when the block succeeds."""
    if out.in_place:
        fd = os.open(out.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            yield fd
            if not out.is_device:
                os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    with atomic_output(out.path) as f:
        f.truncate(size)
        yield f.fileno()


def _write_output(
    image: OpenImage, out: _Output, plan: OutputPlan, store: ChunkStore | None,
    report: CloneReport, *, on_progress: Progress | None,
) -> int:
    """Write the output following ``plan``; returns how many chunks were fetched for it."""
    layout = image.layout
    fetched = 0
    with contextlib.ExitStack() as stack, _output_fd(out, image.image_size) as fd:
        seeds = []
        for k, path in enumerate(out.seeds):
            if k == out.out_seed:
                seeds.append((fd, path))
            else:
                seed_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                stack.callback(os.close, seed_fd)
                seeds.append((seed_fd, path))
        writer = OutputWriter(fd, out.path, layout, plan, digest=image.chunking.digest,
                              in_place=out.in_place)
        writer.write_local(seeds, store, on_progress=_phase(on_progress, "output"))
        if plan.fetch:
            entries = sorted(plan.fetch)
            done = [0]
            total = sum(layout.raw_sizes[e] for e in entries)
            lock = threading.Lock()

            def on_chunk(entry: int, data: bytes) -> None:
                if store is not None:
                    store.put(layout.digests[entry], data)
                writer.put_fetched(entry, data)
                with lock:
                    done[0] += layout.raw_sizes[entry]
                    if on_progress is not None:
                        on_progress("fetch", done[0], total)

            image.chunks.fetch(entries, on_chunk)
            fetched = len(entries)
        writer.verify(image.image_digest, on_progress=_phase(on_progress, "verify"))
    r = writer.report
    report.out_in_place, report.out_from_seeds, report.out_from_store = (
        r.in_place, r.from_seeds, r.from_store)
    report.out_moved, report.out_fetched = r.moved, r.fetched
    return fetched


def _clone_downloaded(
    location: str | ArchiveSource, refused: RangesNotSupported, store: ChunkStore | None, *,
    dry_run: bool, on_progress: Progress | None, **kwargs: object,
) -> CloneReport:
    """The server ignores Range: download the whole archive once, clone from the file.

    With ``dry_run`` nothing is downloaded: the report says the whole archive would be
    (its size from the refused request's ``Content-Length``; 0 if the server sent none).
    """
    if dry_run:
        size = refused.size or 0
        return CloneReport(full_download=True, fetch_bytes=size, archive_size=size,
                           requests=1)
    import tempfile  # (this rare path only: not on every update's start)

    if store is not None:
        os.makedirs(store.root, exist_ok=True)
        where = store.root
    else:
        out = kwargs.get("output")
        where = tempfile.gettempdir()
        if isinstance(out, str) and (not os.path.exists(out) or os.path.isfile(out)):
            where = os.path.dirname(os.path.abspath(out))
    config = kwargs.get("config")
    http = location if isinstance(location, HttpSource) else HttpSource(
        str(location), config=config if isinstance(config, HttpConfig) else None)
    try:
        with tempfile.NamedTemporaryFile(prefix=".tmp-download-", dir=where) as tmp:
            size = http.fetcher.download(tmp)  # type: ignore[arg-type]
            tmp.flush()
            try:
                report = clone_image(tmp.name, record_as=http.name, dry_run=False,
                                     on_progress=on_progress, **kwargs)  # type: ignore[arg-type]
            except BtrdeltaError as exc:  # name the URL, not the temporary file
                if exc.source == tmp.name:
                    exc.source = f"{http.name} (downloaded whole: the server ignores Range)"
                raise
    finally:
        if http is not location:
            http.close()
    report.full_download = True
    report.archive_size = report.fetch_bytes = size
    report.requests = http.stats.requests
    report.bytes_received = http.stats.bytes_received
    return report

