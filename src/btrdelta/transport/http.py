"""Fetching byte ranges over HTTP(S): bounded reads, retries, parallel requests.

Strategy: spans (from :mod:`.plan`) are grouped into requests of several ranges each; a
thread pool keeps ``config.jobs`` requests in flight on one pooled :class:`.client.Client` (built by
:class:`.config.HttpConfig`: TLS, headers, deadline, rate limit). Each response is checked
(status, ``Content-Range``, multipart parts, exact length) and every span it delivers goes
to the caller's ``on_span`` callback in the worker thread.

Every read is bounded by what was asked: a reply body may hold the bytes asked for plus a
little multipart framing, never more (a longer announced ``Content-Length`` is refused
before reading, a longer body is cut off); a request must also finish within its deadline
(:mod:`.pacing`), so a server that trickles bytes is cut off too.

Transient failures (connection refused, dropped or timed out, 5xx/429, truncated bodies,
ranges missing from a reply) are retried with exponential back-off and jitter,
``config.retries`` times (:meth:`RangeFetcher._retried`, a loop of its own: ``tenacity``'s
import cost every process that fetches ~4 ms); permanent ones (4xx, a certificate that
does not verify, a redirect loop, an oversized reply) fail at once. A server that answers
a multi-range request with the whole resource makes the fetcher fall back to one range per
request; one that ignores ``Range`` altogether is detected by
:meth:`RangeFetcher.get_range` (it raises :class:`RangesNotSupported`), so the caller can
download the whole resource instead.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import BinaryIO, TypeVar

from .._futures import ThreadPoolExecutor, cancel_all, wait_first_error
from .._value import Value
from ..errors import TransportError
from .client import (
    Client,
    ConnectError,
    Headers,
    HTTPError,
    InvalidURL,
    NetworkError,
    Response,
    TooManyRedirects,
    UnsupportedResponse,
)
from .config import HttpConfig
from .pacing import Deadline, deadline
from .plan import (
    BodyRegions,
    Part,
    Span,
    batch_spans,
    format_range_header,
    parse_content_range,
)

__all__ = ["FetchStats", "RangeFetcher", "RangesNotSupported", "describe_http_error"]

_T = TypeVar("_T")

_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
#: multipart framing allowed per part (boundary, Content-Type, Content-Range lines)
_PART_OVERHEAD = 512


class RangesNotSupported(TransportError):
    """The server answered a range request with the whole resource (status 200).

    Attributes:
        size: the resource's ``Content-Length`` when the server sent one, else ``None``.
    """

    size: int | None = None


class _Oversize(TransportError):
    """A reply longer than what was asked (refused, not retried)."""


class _Retry(Exception):
    """A transient failure of one request."""


class _Response(Value, frozen=True):
    """Status, headers and body of one finished request."""

    status_code: int
    headers: Headers
    content: bytes


class FetchStats(Value):
    """Counters over a fetcher's life: requests sent, body bytes received, retries."""

    requests: int = 0
    bytes_received: int = 0
    retries: int = 0


class RangeFetcher:
    """Fetch ranges of one URL.

    Args:
        url: the resource.
        config: TLS, headers, timeouts, retries, parallel requests, rate limit.
        client: a :class:`.client.Client` (shared by several fetchers); made from
            ``config`` if omitted.
        max_ranges: ranges per request (1 disables multi-range requests).
        max_request_bytes: bytes asked for in one request.
        log: called with one line per retry (default: standard error).

    Attributes:
        size: the resource's size as the server reported it in ``Content-Range``
            (``None`` until a range reply said).
    """

    def __init__(
        self,
        url: str,
        config: HttpConfig | None = None,
        *,
        client: Client | None = None,
        max_ranges: int = 16,
        max_request_bytes: int = 16 << 20,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.url = url
        self.config = config or HttpConfig()
        self._own_client = client is None
        self.client = client or self.config.client()
        self.max_ranges = max(1, max_ranges)
        self.max_request_bytes = max_request_bytes
        self.stats = FetchStats()
        self.size: int | None = None
        self._log = log or self._stderr
        self._lock = threading.Lock()
        self._multi = self.max_ranges > 1
        #: set by :meth:`cancel` (for good) or by a failed batch (that call only: each
        #: :meth:`fetch_spans` and :meth:`stream_spans` starts with a new one)
        self._cancel = threading.Event()
        self._cancelled = False  # :meth:`cancel` was called
        self._reading: set[Response] = set()  # bodies being read by fetch threads

    def close(self) -> None:
        """Close the client if this fetcher made it."""
        if self._own_client:
            self.client.close()

    def __enter__(self) -> RangeFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ---------------------------------------------------------------------------
    def _count(self, requests: int = 0, received: int = 0, retries: int = 0) -> None:
        with self._lock:
            self.stats.requests += requests
            self.stats.bytes_received += received
            self.stats.retries += retries

    def _retried(self, call: Callable[..., _T], *args: object) -> _T:
        """``call(*args)``, called again while it raises :class:`_Retry`, up to
        ``config.retries`` more times: before attempt ``n + 1`` a wait of ``backoff *
        2 ** (n - 1)`` seconds (at most ``retry_max_wait``) plus up to ``backoff`` more at
        random, said in one line; any other exception goes through at once.

        Raises:
            TransportError: the last attempt failed too ("giving up after N attempts: ...");
                the fetch was cancelled while waiting.
        """
        cfg = self.config
        attempts = cfg.retries + 1
        n = 1
        while True:
            try:
                return call(*args)
            except _Retry as exc:
                why = _one_line(exc)
                if self._cancel.is_set():  # (a read cut by the cancel: no retry, no line)
                    raise TransportError("cancelled", url=self.url) from exc
                if n >= attempts:
                    tried = f"giving up after {n} attempts" if n > 1 else \
                        "no retries asked (--retries 0)"
                    raise TransportError(f"{tried}: {why}", url=self.url) from exc
            import random  # (only when a request failed)

            wait = max(0.0, min(cfg.backoff * 2 ** (n - 1), cfg.retry_max_wait)) + \
                random.uniform(0, cfg.backoff)
            self._count(retries=1)
            self._log(f"{self.url}: {why}; attempt {n + 1} of {attempts} in {wait:.1f} s")
            self._sleep(wait)
            n += 1

    def _stderr(self, line: str) -> None:
        # one write: lines of threads retrying at once do not run into each other
        sys.stderr.write(f"{self.config.who}: {line}\n")
        sys.stderr.flush()

    def _sleep(self, seconds: float) -> None:
        if self._cancel.wait(seconds):
            raise TransportError("cancelled", url=self.url)

    def _begin(self, ranges: Sequence[tuple[int, int]]) -> tuple[dict[str, str], int, int]:
        """A range request about to be made (counted): its headers, the bytes asked for and
        the most its body may hold (multipart framing included).

        Raises:
            TransportError: the fetch was cancelled.
        """
        if self._cancel.is_set():
            raise TransportError("cancelled", url=self.url)
        asked = sum(b - a for a, b in ranges)
        limit = asked + _PART_OVERHEAD * (len(ranges) + 1) if len(ranges) > 1 else asked
        self._count(requests=1)
        return ({"Range": format_range_header(ranges), "Accept-Encoding": "identity"}, asked,
                limit)

    def _request(self, ranges: Sequence[tuple[int, int]]) -> _Response:
        """One GET; a 200 answer is not read (the caller decides), a 206 is read up to what
        was asked (plus multipart framing), others are not read.

        Raises:
            _Retry: a transient failure; TransportError: a permanent one.
        """
        headers, asked, limit = self._begin(ranges)
        cfg = self.config
        try:
            with deadline(cfg.timeout, cfg.deadline_speed), \
                    self.client.stream("GET", self.url, headers=headers) as resp:
                status = resp.status_code
                if status == 200:
                    return _Response(200, resp.headers, b"")
                content = b""
                if status == 206:
                    with self._body_read(resp):
                        content = self._read_bounded(resp, asked, limit)
        except HTTPError as exc:
            raise _classify(exc, self) from exc
        if status in _RETRY_STATUS:
            raise _Retry(f"HTTP {status}")
        if status != 206:
            raise TransportError(f"HTTP {_status(status)} for a range request",
                                 url=self.url, status=status)
        length = resp.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) != len(content):
            raise _Retry(f"body truncated ({len(content)} of {length} bytes)")
        return _Response(status, resp.headers, content)

    def _read_bounded(self, resp: Response, asked: int, limit: int) -> bytes:
        """The body, refused if the server announces or sends more than ``limit`` bytes."""
        length = resp.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise _Oversize(f"reply of {length} bytes announced for {asked} bytes asked; "
                            "refused", url=self.url)
        buf = bytearray()
        try:
            for block in resp.iter_raw():
                if self._cancel.is_set():  # another batch failed, or Ctrl-C
                    raise TransportError("cancelled", url=self.url)
                if len(buf) + len(block) > limit:
                    raise _Oversize(f"reply longer than the {asked} bytes asked; cut off",
                                    url=self.url)
                buf += block
        finally:
            self._count(received=len(buf))
        return bytes(buf)

    # -- public API ------------------------------------------------------------------------
    def get_range(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``, retrying transient failures; fewer when the resource
        ends before ``end`` (its ``Content-Range`` says so: a server answers a range past
        the end with what there is), as a read at the end of a file.

        Raises:
            RangesNotSupported: the server answered with the whole resource (not read).
            TransportError: permanent failure or retries exhausted.
        """
        return self._retried(self._get_range_once, start, end)

    def _get_range_once(self, start: int, end: int) -> bytes:
        resp = self._request([(start, end)])
        if resp.status_code == 200:
            exc = RangesNotSupported("server ignores Range requests", url=self.url, status=200)
            length = resp.headers.get("content-length", "")
            exc.size = int(length) if length.isdigit() else None
            raise exc
        first, data = self._single_part(resp)
        ends_there = self.size is not None and first + len(data) == self.size < end
        if first != start or (len(data) != end - start and not ends_there):
            raise _Retry("server sent a different range than asked")
        return bytes(data)

    def _single_part(self, resp: _Response) -> tuple[int, memoryview]:
        first, end = self._content_range(resp.headers)
        if end - first != len(resp.content):
            raise _Retry(f"body is {len(resp.content)} bytes, Content-Range says {end - first}")
        return first, memoryview(resp.content)

    def _content_range(self, headers: Headers) -> tuple[int, int]:
        """``[first, end)`` of a single-range 206 reply (the resource's size noted when
        given).

        Raises:
            _Retry: no or a malformed ``Content-Range``.
        """
        value = headers.get("content-range")
        if value is None:
            raise _Retry("206 response without Content-Range")
        try:
            first, end, total = parse_content_range(value)
        except TransportError as exc:
            raise _Retry(str(exc)) from exc
        if total is not None:
            self.size = total
        return first, end

    def download(self, out: BinaryIO, limit: int | None = None) -> int:
        """Stream the whole resource into ``out`` (for servers without Range support).

        The body goes to ``out`` (not memory); a server's ``Content-Length`` bounds it, and
        ``limit`` when given (a longer body is refused, not retried).
        """
        return self._retried(self._download_once, out, limit)

    def _download_once(self, out: BinaryIO, limit: int | None = None) -> int:
        out.seek(0)
        out.truncate()
        self._count(requests=1)
        n = 0
        cfg = self.config
        try:
            with contextlib.ExitStack() as stack:
                resp = self._whole(stack)
                for block in _paced(resp, cfg):
                    if limit is not None and n + len(block) > limit:
                        raise _Oversize(f"longer than the {limit} bytes expected; cut off",
                                        url=self.url)
                    out.write(block)
                    n += len(block)
                length = resp.headers.get("content-length")
                if length is not None and length.isdigit() and int(length) != n:
                    raise _Retry(f"body truncated ({n} of {length} bytes)")
                return n
        except HTTPError as exc:
            raise _classify(exc, self) from exc
        finally:
            self._count(received=n)

    def _whole(self, stack: contextlib.ExitStack[bool | None],
               headers: dict[str, str] | None = None) -> Response:
        """A GET of the whole resource, open in ``stack``: its response once it is a 200
        (a status worth a retry raises :class:`_Retry`, any other :class:`TransportError`)."""
        cfg = self.config
        with deadline(cfg.timeout, cfg.deadline_speed):
            resp = stack.enter_context(self.client.stream("GET", self.url, headers=headers))
        if resp.status_code in _RETRY_STATUS:
            raise _Retry(f"HTTP {resp.status_code}")
        if resp.status_code != 200:
            raise TransportError(f"HTTP {resp.status_code}", url=self.url,
                                 status=resp.status_code)
        return resp

    def stream_spans(
        self, spans: Sequence[Span], on_span: Callable[[Span, memoryview], None]
    ) -> None:
        """Deliver every span from one GET of the whole resource, for a server that ignores
        Range (``python3 -m http.server``): the body is read in order and each span is
        handed to ``on_span`` as soon as its bytes have passed; only the span being filled
        is held in memory, and the reading stops after the last one. A retry (a dropped
        connection) reads from the start again and delivers only what is still missing.

        ``spans`` must not overlap.

        Raises:
            TransportError: the resource could not be read after all retries.
        """
        todo = sorted(spans, key=lambda s: s.start)
        if not todo:
            return
        self._log(f"{self.url}: the server ignores Range requests: reading the whole file "
                  "for the parts wanted")
        self._new_call()
        done = [0]
        self._retried(self._stream_once, todo, done, on_span)

    def _stream_once(self, todo: list[Span], done: list[int],
                     on_span: Callable[[Span, memoryview], None]) -> None:
        self._count(requests=1)
        cfg = self.config
        i, pos, buf = done[0], 0, bytearray()
        try:
            with contextlib.ExitStack() as stack:
                resp = self._whole(stack, {"Accept-Encoding": "identity"})
                for block in _paced(resp, cfg):
                    if self._cancel.is_set():
                        raise TransportError("cancelled", url=self.url)
                    self._count(received=len(block))
                    first, pos = pos, pos + len(block)
                    while i < len(todo) and todo[i].start < pos:
                        span = todo[i]
                        lo, hi = max(span.start, first), min(span.end, pos)
                        if lo < hi:
                            buf += block[lo - first : hi - first]
                        if span.end > pos:
                            break
                        on_span(span, memoryview(bytes(buf)))
                        buf.clear()
                        i += 1
                        done[0] = i
                    if i == len(todo):
                        return
        except HTTPError as exc:
            raise _classify(exc, self) from exc
        raise _Retry(f"body ended at byte {pos}, before byte {todo[i].end}")

    def fetch_spans(
        self, spans: Sequence[Span], on_span: Callable[[Span, memoryview], None]
    ) -> None:
        """Fetch every span and hand it to ``on_span(span, data)`` (in a worker thread).

        Errors raised by ``on_span`` (a bad chunk) stop the fetch and propagate.

        Raises:
            TransportError: a span could not be fetched after all retries.
        """
        batches = batch_spans(spans, max_ranges=self.max_ranges if self._multi else 1,
                              max_bytes=self.max_request_bytes)
        self._new_call()
        with ThreadPoolExecutor(self.config.jobs, thread_name_prefix="fetch") as pool:
            futures: list[Future[None]] = []
            try:  # (a Ctrl-C while batches are still submitted cancels the started ones too:
                # extend keeps each future as it is made)
                futures.extend(pool.submit(self._fetch_batch, b, on_span) for b in batches)
                wait_first_error(futures)
                for fut in futures:
                    if fut.done():
                        fut.result()  # the first failure, if any, is raised here
            except BaseException:
                cancel_all(futures)
                self._cancel.set()  # (this call's batches only: a later call starts afresh)
                self._abort_reads()
                raise

    def _new_call(self) -> None:
        """A new cancel state for a fetch starting: one that a failed batch of an earlier
        call had set is left behind, one that :meth:`cancel` set is not (before, the start
        cleared it: a :meth:`cancel` just before the call was lost and the call ran)."""
        with self._lock:
            self._cancel = threading.Event()
            if self._cancelled:
                self._cancel.set()

    def cancel(self) -> None:
        """Stop this fetcher's work for good, from any thread: its requests fail at once
        ("cancelled", not retried nor said), the bodies its threads are reading are cut
        short (a stalled server's read would wait for ``config.timeout``), and a later
        :meth:`fetch_spans` or :meth:`stream_spans` fails the same way."""
        with self._lock:
            self._cancelled = True
            cancel = self._cancel
        cancel.set()
        self._abort_reads()

    @contextlib.contextmanager
    def _body_read(self, resp: Response) -> Iterator[None]:
        """``resp``'s body read in the block, which :meth:`cancel` cuts short: a fetch thread
        waiting for a stalled server's next byte held Ctrl-C for up to ``config.timeout``
        seconds (its socket's timeout)."""
        with self._lock:
            self._reading.add(resp)
        try:
            if self._cancel.is_set():  # (set before it was added)
                raise TransportError("cancelled", url=self.url)
            yield
        finally:
            with self._lock:
                self._reading.discard(resp)

    def _abort_reads(self) -> None:
        """End every body read in progress (:meth:`_body_read`)."""
        with self._lock:
            reading = list(self._reading)
        for resp in reading:
            resp.abort()

    def _fetch_batch(self, batch: list[Span], on_span: Callable[[Span, memoryview], None]
                     ) -> None:
        """Fetch ``batch`` (one request, retried for the parts still missing)."""
        wanted = _Wanted(batch)

        def attempt() -> None:
            pending = wanted.spans()
            if len(pending) > 1 and not self._multi:
                for span in pending:
                    self._fetch_batch([span], on_span)
                return
            multi = self._multi
            self._fetch_once(wanted, on_span)
            if multi and not self._multi and len(wanted.spans()) > 1:
                # the server answered several ranges otherwise: ask one by one now,
                # not after a retry's wait and warning
                for span in wanted.spans():
                    self._fetch_batch([span], on_span)
                return
            if wanted.spans():
                end = max(span.end for span in wanted.spans())
                if self.size is not None and end > self.size:  # (not a transient failure)
                    raise TransportError(f"the file is {self.size} bytes, shorter than the "
                                         f"ranges asked for (to byte {end})", url=self.url)
                raise _Retry("server did not send every range asked for")

        self._retried(attempt)

    def _fetch_once(self, wanted: _Wanted, on_span: Callable[[Span, memoryview], None]
                    ) -> None:
        """One request for the parts ``wanted`` still lacks, each delivered (and marked
        delivered) as soon as its bytes have arrived, not when the reply is complete."""
        batch = wanted.spans()
        ranges = [(s.start, s.end) for s in batch]
        headers, asked, limit = self._begin(ranges)
        cfg = self.config
        try:
            with deadline(cfg.timeout, cfg.deadline_speed) as budget, \
                    self.client.stream("GET", self.url, headers=headers) as resp:
                status = resp.status_code
                if status == 206:
                    regions = self._regions(resp, asked, limit)
                    with self._body_read(resp):
                        self._stream_body(resp, regions, wanted, limit, on_span, budget)
        except _Oversize:
            if len(batch) == 1:
                raise
            self._multi = False  # e.g. a server coalescing distant ranges: ask one by one
            return
        except HTTPError as exc:
            raise _classify(exc, self) from exc
        if status == 200:
            if len(batch) > 1:
                self._multi = False
                return
            raise RangesNotSupported("server ignores Range requests", url=self.url, status=200)
        if status in _RETRY_STATUS:
            raise _Retry(f"HTTP {status}")
        if status != 206:
            raise TransportError(f"HTTP {_status(status)} for a range request",
                                 url=self.url, status=status)
        if len(batch) > 1 and len(regions.regions) == 1 and wanted.spans():
            self._multi = False  # answered a multi-range request with one range

    def _regions(self, resp: Response, asked: int, limit: int) -> BodyRegions:
        """How the 206 reply ``resp`` lays out its ranges (from its headers)."""
        length = resp.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise _Oversize(f"reply of {length} bytes announced for {asked} bytes asked; "
                            "refused", url=self.url)
        ctype = resp.headers.get("content-type", "")
        if ctype.lower().startswith("multipart/byteranges"):
            return BodyRegions(_boundary(ctype))
        return BodyRegions(None, self._content_range(resp.headers))

    def _stream_body(self, resp: Response, regions: BodyRegions, wanted: _Wanted,
                     limit: int, on_span: Callable[[Span, memoryview], None],
                     budget: Deadline) -> None:
        """Read the body block by block; after each block, deliver every wanted part whose
        bytes are all in (the time ``on_span`` takes is not held against the deadline)."""
        received = 0
        for block in resp.iter_raw():
            if self._cancel.is_set():  # another batch failed, or Ctrl-C
                raise TransportError("cancelled", url=self.url)
            received += len(block)
            self._count(received=len(block))
            if received > limit:
                raise _Oversize(f"reply longer than the {limit} bytes asked; cut off",
                                url=self.url)
            try:
                regions.feed(block)
            except TransportError as exc:
                raise _Retry(str(exc)) from exc
            t0 = time.monotonic()
            wanted.deliver(regions, on_span, self._cancel, self.url)
            budget.start += time.monotonic() - t0
        length = resp.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) != received:
            raise _Retry(f"body truncated ({received} of {length} bytes)")
        try:
            regions.finish()
        except TransportError as exc:
            raise _Retry(str(exc)) from exc


class _Wanted:
    """The parts of one batch of spans not delivered yet."""

    def __init__(self, batch: list[Span]) -> None:
        self._left = [list(span.parts) for span in batch]
        self._spans = list(batch)

    def spans(self) -> list[Span]:
        """What is still wanted, one span per asked span that still lacks parts."""
        return self._spans

    def deliver(self, regions: BodyRegions, on_span: Callable[[Span, memoryview], None],
                cancel: threading.Event, url: str) -> None:
        """Hand ``on_span`` every wanted part whose bytes have all arrived, as a span of
        its own (parts of one span in order: a span is cut where its bytes stop)."""
        body = regions.body
        have = len(body)
        changed = False
        for parts in self._left:
            while parts:
                part = parts[0]
                at = _locate(regions.regions, part)
                if at is None or at + part.length > have:
                    break
                if cancel.is_set():
                    raise TransportError("cancelled", url=url)
                on_span(Span(part.start, part.end, (part,)),
                        memoryview(bytes(body[at : at + part.length])))
                parts.pop(0)
                changed = True
        if changed:
            self._spans = [Span(p[0].start, max(q.end for q in p), tuple(p))
                           for p in self._left if p]


def _locate(regions: list[tuple[int, int, int]], part: Part) -> int | None:
    """Body offset of ``part``'s bytes, if a region of the reply covers it."""
    for first, end, offset in reversed(regions):
        if first <= part.start and part.end <= end:
            return offset + part.start - first
    return None


def _paced(resp: Response, cfg: HttpConfig) -> Iterator[bytes]:
    """The raw body in blocks, each block read under the request deadline."""
    it = resp.iter_raw(1 << 20)
    while True:
        with deadline(cfg.timeout, cfg.deadline_speed):
            block = next(it, None)
        if block is None:
            return
        yield block


def describe_http_error(exc: BaseException) -> str:
    """One line for an HTTP client error: ``cannot connect: Connection refused`` (was
    ``ConnectError: [Errno 111] Connection refused``), else its class and text."""
    text = _one_line(exc)
    ssl = sys.modules.get("ssl")  # (imported for https:// only: no TLS error without it)
    cause: BaseException | None = exc
    while ssl is not None and cause is not None:  # https:// to a plain HTTP server
        if isinstance(cause, ssl.SSLError) and cause.reason == "WRONG_VERSION_NUMBER":
            return ("TLS: the server did not answer in TLS (WRONG_VERSION_NUMBER): a plain "
                    "HTTP server? (its URL is then http://)")
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, ConnectError):
        return "cannot connect: " + re.sub(r"^\[Errno -?\d+\] ", "", text)
    return f"{type(exc).__name__}: {text}"


def _classify(exc: HTTPError, fetcher: RangeFetcher) -> Exception:
    """A transient :class:`_Retry` or a permanent :class:`TransportError` for ``exc``."""
    if isinstance(exc, TooManyRedirects):
        return TransportError(
            f"more than {fetcher.config.max_redirects} redirects (a redirect loop?)",
            url=fetcher.url)
    if isinstance(exc, InvalidURL | UnsupportedResponse):
        return TransportError(_one_line(exc), url=fetcher.url)
    why = describe_http_error(exc)
    ssl = sys.modules.get("ssl")
    cause: BaseException | None = exc
    while ssl is not None and cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return TransportError(
                f"TLS: server certificate not trusted ({cause.verify_message or cause.reason}); "
                "is --ca-cert right?", url=fetcher.url)
        if isinstance(cause, ssl.SSLError) and cause.reason == "WRONG_VERSION_NUMBER":
            return TransportError(why, url=fetcher.url)  # (no retry: it will not change)
        if isinstance(cause, ssl.SSLError) and "ALERT" in str(cause.reason or ""):
            return TransportError(f"TLS: the server refused the handshake ({cause.reason})",
                                  url=fetcher.url)
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, NetworkError):
        return _Retry(why)
    return TransportError(why, url=fetcher.url)


def _status(code: int) -> str:
    """``404 Not Found``: the code and its reason phrase (the code alone if unknown)."""
    from http import HTTPStatus

    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return str(code)


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _boundary(content_type: str) -> bytes:
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary" and value:
            return value.strip('"').encode("latin-1")
    raise _Retry("multipart response without a boundary")
