"""Reading casync/desync indexes and chunk stores, from a local directory or over HTTP(S).

This module owns the I/O side of casync interop: loading a ``.caibx`` (bounded size) and
fetching a clone's missing chunks from one or more ``.castr`` stores, tried in the order
given (a local cache first, then a server), several chunks in flight. Each chunk file is
decompressed with a bound and checked against its id (:func:`casync.decode_chunk_file`)
before the caller gets it. The format itself is :mod:`btrdelta.chunk.casync`.
"""

from __future__ import annotations

import io
import os
import posixpath
import stat
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from .. import TYPE_CHECKING
from .._futures import ThreadPoolExecutor, cancel_all, wait_first_error
from ..errors import BtrdeltaError, MissingBaseError, StreamFormatError, TransportError
from ..transport.config import HttpConfig
from ..transport.http import FetchStats, RangeFetcher
from .casync import MAX_INDEX_SIZE, CasyncIndex, chunk_file_name, decode_caibx, decode_chunk_file
from .source import is_url

if TYPE_CHECKING:
    from ..transport.client import Client

__all__ = ["CastrChunks", "default_store", "read_caibx"]


class _Bounded(io.BytesIO):
    """A download buffer that refuses more than ``limit`` bytes (never buffered whole)."""

    def __init__(self, limit: int, url: str) -> None:
        super().__init__()
        self.limit = limit
        self.url = url

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data)
        if self.tell() + view.nbytes > self.limit:
            raise TransportError(f"reply larger than the {self.limit} bytes expected",
                                 url=self.url)
        return super().write(view)


def _http_get(url: str, max_size: int, config: HttpConfig | None,
              client: Client | None, stats: FetchStats) -> bytes | None:
    """The whole file at ``url`` (``None`` on 404/410), bounded, with the fetcher's retries
    and deadline; requests and bytes are added to ``stats``."""
    fetcher = RangeFetcher(url, config, client=client)
    buf = _Bounded(max_size, url)
    try:
        fetcher.download(buf)
    except TransportError as exc:
        if exc.status in (404, 410):
            return None
        raise
    finally:
        stats.requests += fetcher.stats.requests
        stats.bytes_received += fetcher.stats.bytes_received
        fetcher.close()
    return buf.getvalue()


def _read_local(path: str, max_size: int) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # (a directory's read said only "Is a directory")
            raise StreamFormatError("a chunk file that is not a regular file", source=path)
        size = st.st_size
        if size > max_size:
            raise StreamFormatError(f"{size} bytes, at most {max_size} expected", source=path)
        return os.read(fd, max_size + 1)
    finally:
        os.close(fd)


def read_caibx(location: str,
               config: HttpConfig | None = None) -> tuple[CasyncIndex, FetchStats]:
    """Load and decode the index at ``location`` (a path or an ``http(s)://`` URL)."""
    stats = FetchStats()
    if is_url(location):
        blob = _http_get(location, MAX_INDEX_SIZE, config, None, stats)
        if blob is None:
            raise MissingBaseError("no such casync index (HTTP 404)", source=location)
    else:
        if os.path.isdir(location):
            raise BtrdeltaError("a directory, not a casync index", path=location)
        blob = _read_local(location, MAX_INDEX_SIZE)
        if blob is None:
            raise MissingBaseError("no such casync index", path=location)
        stats.requests, stats.bytes_received = 1, len(blob)
    return decode_caibx(blob, source=location), stats


def default_store(index_location: str) -> str:
    """casync's default store for an index: ``default.castr`` next to it."""
    if is_url(index_location):
        return index_location.rpartition("/")[0] + "/default.castr"
    return os.path.join(os.path.dirname(os.path.abspath(index_location)), "default.castr")


class CastrChunks:
    """The chunks of a casync index, fetched from ``.castr`` stores by entry.

    Args:
        index: the decoded index.
        stores: local directories or ``http(s)://`` URLs, tried in order for each chunk.
        config: HTTP settings (``jobs`` chunks are fetched at once).
        guessed: ``stores`` is casync's default, not one the user named (a missing
            chunk then says to name the store).
    """

    def __init__(self, index: CasyncIndex, stores: Sequence[str], *,
                 config: HttpConfig | None = None, guessed: bool = False) -> None:
        if not stores:
            raise BtrdeltaError("a casync index needs a chunk store (--castr)")
        self.index = index
        #: the store is casync's default next to the index, not one the user named
        self.guessed = guessed
        self.stores = [s.rstrip("/") if is_url(s) else s for s in stores]
        self.name = ", ".join(self.stores)
        self.config = config or HttpConfig(jobs=8)
        self._client = self.config.client() if any(map(is_url, stores)) else None
        self._stats = FetchStats()
        self._lock = threading.Lock()

    @property
    def stats(self) -> FetchStats:
        """Requests and bytes received, over every store."""
        with self._lock:
            return FetchStats(self._stats.requests, self._stats.bytes_received)

    def close(self) -> None:
        """Close the HTTP client."""
        if self._client is not None:
            self._client.close()

    def cost(self, entries: Sequence[int]) -> tuple[int, int]:
        """``(uncompressed bytes, requests)`` for ``entries`` (a store lists no sizes)."""
        return sum(self.index.raw_sizes[e] for e in entries), len(entries)

    def _one(self, entry: int) -> bytes:
        index = self.index
        digest, raw_size = index.digests[entry], index.raw_sizes[entry]
        name = chunk_file_name(digest)
        limit = 2 * raw_size + 4096  # xz/gzip of incompressible data grow a little
        error: BtrdeltaError | None = None
        for store in self.stores:
            stats = FetchStats()
            if is_url(store):
                where = posixpath.join(store, name)
                blob = _http_get(where, limit, self.config, self._client, stats)
            else:
                where = os.path.join(store, name)
                blob = _read_local(where, limit)
                stats.requests, stats.bytes_received = 1, len(blob or b"")
            with self._lock:
                self._stats.requests += stats.requests
                self._stats.bytes_received += stats.bytes_received
            if blob is None:
                continue
            try:
                return decode_chunk_file(blob, digest, raw_size, index.hash_name, source=where)
            except StreamFormatError as exc:  # damaged in this store: try the next one
                error = exc
        if error is not None:
            raise error
        if self.guessed:  # casync make names its store DIR.castr unless told otherwise
            raise MissingBaseError(f"chunk {digest.hex()} is not in the default store "
                                   "(default.castr next to the index): name the index's "
                                   "store with --castr", source=self.name)
        absent = [s for s in self.stores if not is_url(s) and not os.path.isdir(s)]
        raise MissingBaseError(f"chunk {digest.hex()} is in none of the stores" + (
            f" ({', '.join(absent)}: no such directory)" if absent else ""), source=self.name)

    def fetch(self, entries: Sequence[int], on_chunk: Callable[[int, bytes], None]) -> None:
        """Fetch and check each entry's chunk; ``on_chunk(entry, data)`` gets it (from
        worker threads). The first failure stops the fetch and propagates."""
        def task(entry: int) -> None:
            on_chunk(entry, self._one(entry))

        with ThreadPoolExecutor(self.config.jobs, thread_name_prefix="castr") as pool:
            futures: list[Future[None]] = []
            try:  # (extend keeps each future as it is made)
                futures.extend(pool.submit(task, e) for e in entries)
                wait_first_error(futures)
            except BaseException:  # Ctrl-C: the chunks not yet begun are not fetched
                cancel_all(futures)
                raise
            cancel_all(futures)  # (after a failure: those not begun)
            for fut in futures:
                if fut.done() and not fut.cancelled():
                    fut.result()
