"""Mirror access: the same file from several mirrors, verified, resumable (floor 3, I/O).

Every file of a repository except ``timestamp.json`` is immutable and named by what it is
(a content hash, or an index version whose hash the timestamp names), so any mirror can
serve any of them and a file is only trusted once its length and BLAKE3 match. A
:class:`Mirrors` tries the mirrors in order for each file: on a connection failure, an HTTP
error (404 included), a truncated body or wrong bytes it moves to the next one, and a mirror
that failed is tried last from then on, until it serves a file again. Only when every
mirror failed does the fetch fail: with :class:`~btrdelta.errors.ChecksumError` (exit 5)
if some mirror served wrong bytes, else :class:`~btrdelta.errors.TransportError` (exit 7),
one line naming the file and what each mirror did.

:meth:`Mirrors.download` writes an artifact to ``<path>.part`` in pieces of
:data:`PIECE` bytes (ranges), so an interrupted download resumes where it stopped; the file
is renamed to its final name only after its BLAKE3 checked. Each piece but the last is
``fsync``-ed (kept over a power cut); the last needs none: it ends the file, which is hashed
whole before it is used (``download`` hashes a file it finds under the final name again), so
a power cut costs at most that piece, fetched again. An artifact of one piece (a short
path's deltas) is then written with no ``fsync`` at all: that one was on the critical path
of an update's first hop.

A mirror is an ``http(s)://`` URL, a ``file://`` URL or a plain directory: every path
(whole files, downloads, the chunk ranges of a full) reads the local ones with ``pread``.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import blake3

from ..chunk.source import file_url_path
from ..errors import BtrdeltaError, ChecksumError, StreamFormatError, TransportError
from ..transport.client import Client, HTTPError, NetworkError, RemoteProtocolError, Response
from ..transport.config import HttpConfig
from ..transport.http import FetchStats, RangeFetcher, RangesNotSupported, describe_http_error
from ..transport.pacing import deadline
from ..transport.plan import Span

__all__ = ["PIECE", "Mirrors", "local_path"]

#: bytes fetched per range request of a download (and lost at most by an interruption)
PIECE = 4 << 20
_T = TypeVar("_T")


def local_path(location: str) -> str | None:
    """The directory a mirror location names (a plain path or a ``file://`` URL), or None
    for an ``http(s)://`` URL."""
    if location.startswith(("http://", "https://")):
        return None
    return file_url_path(location)


class _FileRanges:
    """:meth:`RangeFetcher.fetch_spans` over a local file (a mirror that is a directory)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.stats = FetchStats()

    def fetch_spans(self, spans: Sequence[Span],
                    on_span: Callable[[Span, memoryview], None]) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:  # (no such file: a server's 404, the mirror is not dead)
            raise TransportError(f"{exc.strerror}", url=self.path,
                                 status=404 if isinstance(exc, FileNotFoundError) else None
                                 ) from None
        try:
            for span in spans:
                try:
                    data = os.pread(fd, span.end - span.start, span.start)
                except OSError as exc:  # (a directory under the file's name: EISDIR)
                    raise TransportError(f"{exc.strerror}", url=self.path) from None
                self.stats.requests += 1
                self.stats.bytes_received += len(data)
                if len(data) != span.end - span.start:
                    raise TransportError(f"range [{span.start}, {span.end}) past the end "
                                         f"({span.start + len(data)} bytes)", url=self.path)
                on_span(span, memoryview(data))
        finally:
            os.close(fd)


class _WrongBytes(Exception):
    """A mirror served bytes that do not check."""


class Mirrors:
    """Several base URLs (or local directories) of one repository.

    Args:
        urls: mirror base URLs (``http(s)://…``) or directories, in order of preference.
        config: HTTP settings (TLS, headers, timeouts, retries per request and mirror,
            rate limit); default: 2 retries, then the next mirror.
        client: a :class:`~btrdelta.transport.client.Client`; made from ``config`` if
            omitted.
        on_bytes: called with the number of body bytes each time some arrive.
    """

    def __init__(self, urls: Sequence[str], *, config: HttpConfig | None = None,
                 client: Client | None = None,
                 on_bytes: Callable[[int], None] | None = None) -> None:
        if not urls:
            raise BtrdeltaError("no mirror given")
        self.urls = [u.rstrip("/") or "/" for u in urls]
        self._local = {u: local_path(u) for u in self.urls}
        self.config = config or HttpConfig(retries=2)
        self._own = client is None
        self._client = client
        self.retries = self.config.retries
        self.on_bytes = on_bytes
        self.stats = FetchStats()
        #: how each mirror failed last: 1 a file it lacks or serves wrong (a 404, as for the
        #: next root that no mirror has), 2 dead or silent (refused, timed out, 5xx)
        self._failed: dict[str, int] = {}
        self._lock = threading.Lock()
        self._nested = threading.local()  # in an attempt of :meth:`each` (this thread)
        self._fetchers: weakref.WeakSet[RangeFetcher] = weakref.WeakSet()
        self._stopped = False

    @property
    def client(self) -> Client:
        """The HTTP client, made at its first use (mirrors that are directories need none)."""
        with self._lock:
            if self._client is None:
                self._client = self.config.client()
            return self._client

    def close(self) -> None:
        if self._own and self._client is not None:
            self._client.close()

    def stop(self) -> None:
        """End the downloads in progress, from any thread (those of threads beside a failed
        or interrupted update: a delta of up to 4 MiB on a slow link held its Ctrl-C until
        it was whole): each fails at once, and no line says so. For good: the mirrors are
        not used after it."""
        with self._lock:
            self._stopped = True
            fetchers = list(self._fetchers)
        for fetcher in fetchers:
            fetcher.cancel()

    def _range_fetcher(self, url: str) -> RangeFetcher:
        """A :class:`RangeFetcher` of ``url`` on this client, which :meth:`stop` cancels."""
        fetcher = RangeFetcher(url, self.config, client=self.client)
        with self._lock:
            self._fetchers.add(fetcher)
            stopped = self._stopped
        if stopped:
            fetcher.cancel()
        return fetcher

    def order(self) -> list[str]:
        """Mirrors to try: those that failed before last, a dead or silent one after one
        that only lacked a file (a silent first mirror cost each file its timeout: the
        next root's 404 on every mirror had ranked them all alike)."""
        with self._lock:
            return sorted(self.urls, key=lambda u: self._failed.get(u, 0))

    def _mark_failed(self, url: str, dead: bool) -> None:
        with self._lock:
            self._failed[url] = 2 if dead else 1

    def _say(self, line: str) -> None:
        # one write, as the HTTP retries' lines (threads fetching at once)
        sys.stderr.write(f"{self.config.who}: {line}\n")
        sys.stderr.flush()

    def _count(self, n: int) -> None:
        with self._lock:
            self.stats.bytes_received += n
            self.stats.requests += 1
        if self.on_bytes is not None and n:
            self.on_bytes(n)

    def each(self, path: str, attempt: Callable[[str], _T]) -> _T:
        """``attempt(mirror)`` on each mirror until one succeeds (see the module docstring).

        ``attempt`` raises :class:`TransportError` or :class:`ChecksumError` (or any
        :class:`StreamFormatError`) to move to the next mirror.
        """
        problems: list[str] = []
        where: list[tuple[str, str]] = []  # (the failure's URL or the mirror's, why)
        wrong = None

        def failed(url: str, why: str, at: str | None = None) -> None:
            problems.append(f"{url}: {why.removeprefix(f'{path}: ')}")  # the file once, first
            where.append((at or f"{url}/{path}", why))

        order = self.order()
        outer = not getattr(self._nested, "on", False)  # (an attempt may fetch: the index)
        said: set[int] = set()  # failures said already: a mirror found dead, at once
        missing = 0  # mirrors that lacked the file (HTTP 404, no such file)
        for n, url in enumerate(order):
            if self._stopped:
                raise TransportError(f"{path}: stopped", url=url)
            try:
                self._nested.on = True
                result = attempt(url)
            except (ChecksumError, StreamFormatError, _WrongBytes) as exc:
                wrong = wrong or exc
                failed(url, str(exc))
                dead = False
            except TransportError as exc:
                failed(url, exc.message, exc.url)
                dead = exc.status is None or exc.status >= 500
                missing += exc.status == 404
            except HTTPError as exc:
                failed(url, describe_http_error(exc))
                dead = True
            else:
                # the mirrors that failed before it are said, as a retry is (a broken
                # mirror went unnoticed); not a file that no mirror has (the next root),
                # nor a file fetched inside an attempt (its outcome is the attempt's)
                for i, (mirror, (at, why)) in enumerate(zip(order, where if outer else [],
                                                             strict=False)):
                    if i not in said:
                        at, why = _where(mirror, at, why)
                        self._say(f"{at}: {why}; the next mirror, {url}, served it")
                # it serves: first again (a file no mirror has, such as the next root of
                # a chain that did not rotate, marks every one failed)
                with self._lock:
                    self._failed.pop(url, None)
                return result
            finally:
                self._nested.on = not outer
            if dead and n + 1 < len(order) and self._failed.get(url) != 2 and not self._stopped:
                # dead or silent: said once, whatever the file (it is tried last from now
                # on, and the next root's lookup, which no mirror answers, would hide it)
                at, why = _where(url, *where[-1])
                self._say(f"{at}: {why}; trying the next mirror, {order[n + 1]}")
                said.add(len(where) - 1)
            self._mark_failed(url, dead)
        if len(self.urls) == 1:  # one mirror: its error alone, where it was
            source, text = _where(self.urls[0], *where[0])
        else:
            source, text = path, f"every mirror failed: {'; '.join(problems)}"
        if isinstance(wrong, StreamFormatError):  # signatures, freshness, a file that is
            raise type(wrong)(text, source=source)  # not JSON (exit 3): keep the class
        if wrong is not None:
            raise ChecksumError(text, source=source)
        # the path first even when a reason names it again (`repo sign` writes timestamp.json);
        # missing everywhere is a 404 still (the index a timestamp names, fetched inside an
        # attempt: its mirror is not dead)
        raise TransportError(f"{source}: {text}", url=source,
                             status=404 if missing == len(order) else None)

    # -- whole small files -------------------------------------------------------------

    def get(self, url: str, path: str, max_size: int) -> bytes:
        """The whole file ``path`` from mirror ``url`` (at most ``max_size`` bytes)."""
        local = self._local.get(url, local_path(url))
        if local is not None:
            try:
                with open(os.path.join(local, path), "rb") as f:
                    data = f.read(max_size + 1)
            except OSError as exc:
                if isinstance(exc, (FileNotFoundError, NotADirectoryError)) \
                        and not os.path.isdir(local):  # no repository, signed or not
                    raise TransportError("no such directory" if not os.path.exists(local)
                                         else "not a directory", url=url) from None
                missing = isinstance(exc, FileNotFoundError)  # a server's 404
                raise TransportError(f"{path}: {exc.strerror}", url=url,
                                     status=404 if missing else None) from None
        else:
            data = self._http_get(f"{url}/{path}", max_size)
        if len(data) > max_size:
            raise _WrongBytes(f"{path}: larger than {max_size} bytes")
        self._count(len(data))
        return data

    def _http_get(self, full: str, max_size: int) -> bytes:
        last = ""
        for _ in range(self.retries + 1):
            try:
                with deadline(self.config.timeout, self.config.deadline_speed), \
                        self.client.stream("GET", full,
                                           headers={"Accept-Encoding": "identity"}) as resp:
                    if resp.status_code != 200:
                        _drain(resp)
                        raise TransportError(f"HTTP {resp.status_code}", url=full,
                                             status=resp.status_code)
                    chunks, n = [], 0
                    for block in resp.iter_raw(1 << 16):
                        chunks.append(block)
                        n += len(block)
                        if n > max_size:
                            break
                    data = b"".join(chunks)
                    length = resp.headers.get("content-length")
                    if n <= max_size and length is not None and length.isdigit() \
                            and int(length) != n:
                        raise RemoteProtocolError(f"body truncated ({n} of {length} bytes)")
                    return data
            except NetworkError as exc:
                last = describe_http_error(exc)
        raise TransportError(last, url=full)

    def fetch(self, path: str, *, length: int, digest: str) -> bytes:
        """An immutable file whose length and BLAKE3 (hex) are known."""

        def attempt(url: str) -> bytes:
            data = self.get(url, path, length)
            if len(data) != length or blake3.blake3(data).hexdigest() != digest:
                raise _WrongBytes(f"wrong bytes ({len(data)} bytes, expected {length} with "
                                  f"BLAKE3 {digest[:16]}…)")
            return data

        return self.each(path, attempt)

    # -- artifacts ----------------------------------------------------------------------

    def download(self, path: str, out: Path, *, length: int, digest: str) -> Path:
        """Download artifact ``path`` to ``out`` (resuming ``out.part``); returns ``out``.

        An existing ``out`` is trusted only if it hashes right (then nothing is fetched).
        """
        if out.exists():
            if _file_blake3(out) == digest:
                return out
            out.unlink()
        part = out.with_name(out.name + ".part")

        def attempt(url: str) -> Path:
            try:
                self._fill(url, path, part, length)
                if _file_blake3(part) != digest:
                    raise _WrongBytes(f"wrong bytes (BLAKE3 is not {digest[:16]}…)")
            except _WrongBytes:
                part.unlink(missing_ok=True)
                raise
            os.replace(part, out)
            return out

        return self.each(path, attempt)

    def _fill(self, url: str, path: str, part: Path, length: int) -> None:
        have = part.stat().st_size if part.exists() else 0
        if have > length:
            part.unlink()
            have = 0
        local = self._local.get(url, local_path(url))
        if local is not None:
            try:
                f = open(os.path.join(local, path), "rb")  # noqa: SIM115
            except OSError as exc:
                raise TransportError(f"{path}: {exc.strerror}", url=url) from None
            with f, open(part, "ab") as out:
                f.seek(have)
                while have < length:
                    data = f.read(min(PIECE, length - have))
                    if not data:
                        raise _WrongBytes(f"{path}: shorter than {length} bytes")
                    out.write(data)
                    have += len(data)
                    self._count(len(data))
            return
        fetcher = self._range_fetcher(f"{url}/{path}")
        with open(part, "ab") as out:
            while have < length:
                end = min(length, have + PIECE)
                try:
                    data = fetcher.get_range(have, end)
                except RangesNotSupported:
                    # a static server without Range (python3 -m http.server): the whole
                    # file, from its start (no resuming from such a server)
                    self._download_whole(fetcher, part, length)
                    return
                if len(data) != end - have:
                    raise _WrongBytes(f"range [{have}, {end}) came back short")
                out.write(data)
                if end < length:  # (the last piece: see the module docstring)
                    out.flush()
                    os.fsync(out.fileno())
                have = end
                self._count(len(data))

    def _download_whole(self, fetcher: RangeFetcher, part: Path, length: int) -> None:
        with open(part, "wb") as out:  # (not fsync-ed: fetched whole again, never resumed)
            n = fetcher.download(out, length)
        self._count(n)
        if n != length:
            raise _WrongBytes(f"{n} bytes, expected {length}")

    def fetcher(self, url: str, path: str) -> RangeFetcher | _FileRanges:
        """A range fetcher for ``path`` on mirror ``url`` (sharing this client; a local
        mirror's file is read directly)."""
        local = self._local.get(url, local_path(url))
        if local is not None:
            return _FileRanges(os.path.join(local, path))
        return self._range_fetcher(f"{url}/{path}")

    def note_bytes(self, n: int) -> None:
        """Count ``n`` bytes received by a caller's own fetcher."""
        self._count(n)


#: a repository's file named at the start of a reason (``index/1.json: not signed ...``)
_FILE = re.compile(r"[\w.-]+(?:/[\w.-]+)*\.[a-z]+")


def _where(mirror: str, at: str, why: str) -> tuple[str, str]:
    """The error line's place and reason when the only mirror failed (not "FILE: every
    mirror failed: MIRROR: ..."): the file under the mirror when the reason starts with
    its name, else where it failed (the file's URL, or the mirror itself when that is
    missing). A reason that starts with its place (a fetch nested in the attempt, such as
    the index a timestamp names, failed on every mirror already) is not named twice."""
    if why.startswith(f"{at}: "):
        return at, why[len(at) + 2:]
    name, sep, rest = why.partition(": ")
    if sep and name.startswith(f"{mirror}/"):  # placed under the mirror already: not twice
        return name, rest
    if sep and at.startswith(mirror) and _FILE.fullmatch(name):
        return f"{mirror}/{name}", rest
    return at, why


def _drain(resp: Response, limit: int = 1 << 16) -> None:
    """Read the body of a refused request (a 404 page: the next root of a chain that did
    not rotate, asked by every update) so that its connection is kept for the next
    request, not closed and made again (one more connection, and nginx's accept, before
    the timestamp); a body over ``limit`` bytes, or one that fails, is dropped with its
    connection."""
    n = 0
    with contextlib.suppress(HTTPError):
        for block in resp.iter_raw(1 << 14):
            n += len(block)
            if n > limit:
                return


def _file_blake3(path: Path) -> str:
    h = blake3.blake3()
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return str(h.hexdigest())
