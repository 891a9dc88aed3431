"""Fetching byte ranges over HTTP(S) with ``httpx``: several requests in flight, retries.

Strategy: spans (from :mod:`.plan`) are grouped into requests of several ranges each; a
thread pool keeps a few requests in flight on one pooled ``httpx.Client``. Each response is
checked (status, ``Content-Range``, multipart parts, exact length) and every span it
delivers goes to the caller's ``on_span`` callback in the worker thread. Spans not
delivered are queued again. Connection drops, 5xx/429 and truncated bodies are retried with
exponential back-off; a server that answers a multi-range request with a single range or
the whole resource makes the fetcher fall back to one range per request. A server that
ignores ``Range`` altogether is detected by :meth:`RangeFetcher.get_range` (it raises
:class:`RangesNotSupported`), so the caller can download the whole resource instead.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import BinaryIO

import httpx

from ..errors import TransportError
from .plan import (
    Span,
    batch_spans,
    format_range_header,
    parse_content_range,
    parse_multipart_byteranges,
)

__all__ = ["FetchStats", "RangeFetcher", "RangesNotSupported"]

_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class RangesNotSupported(TransportError):
    """The server answered a range request with the whole resource (status 200).

    Attributes:
        size: the resource's ``Content-Length`` when the server sent one, else ``None``.
    """

    size: int | None = None


class _Retry(Exception):
    """A transient failure of one request."""


@dataclass(frozen=True, slots=True)
class _Response:
    """Status, headers and body of one finished request."""

    status_code: int
    headers: httpx.Headers
    content: bytes


@dataclass(slots=True)
class FetchStats:
    """Counters over a fetcher's life: requests sent, body bytes received, retries."""

    requests: int = 0
    bytes_received: int = 0
    retries: int = 0


class RangeFetcher:
    """Fetch ranges of one URL.

    Args:
        url: the resource.
        client: an ``httpx.Client`` (tests inject transports); one is made if omitted.
        parallel: requests in flight.
        retries: attempts per range after the first, before giving up.
        backoff: first back-off delay in seconds (doubles each attempt, with jitter).
        max_ranges: ranges per request (1 disables multi-range requests).
        max_request_bytes: bytes asked for in one request.
    """

    def __init__(
        self,
        url: str,
        *,
        client: httpx.Client | None = None,
        parallel: int = 4,
        retries: int = 5,
        backoff: float = 0.2,
        max_ranges: int = 16,
        max_request_bytes: int = 16 << 20,
        timeout: float = 30.0,
    ) -> None:
        self.url = url
        self._own_client = client is None
        self.client = client or httpx.Client(
            timeout=timeout,
            limits=httpx.Limits(max_connections=parallel, max_keepalive_connections=parallel),
            follow_redirects=True,
        )
        self.parallel = max(1, parallel)
        self.retries = retries
        self.backoff = backoff
        self.max_ranges = max(1, max_ranges)
        self.max_request_bytes = max_request_bytes
        self.stats = FetchStats()
        self._lock = threading.Lock()

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

    def _sleep(self, attempt: int) -> None:
        time.sleep(self.backoff * (2**attempt) * (0.5 + random.random() / 2))

    def _request(self, ranges: Sequence[tuple[int, int]]) -> _Response:
        """One GET; a 200 answer is not read (the caller decides), others are read fully.

        Raises:
            _Retry: a transient failure; TransportError: a permanent one.
        """
        headers = {"Range": format_range_header(ranges), "Accept-Encoding": "identity"}
        self._count(requests=1)
        try:
            with self.client.stream("GET", self.url, headers=headers) as resp:
                status = resp.status_code
                if status == 200:
                    return _Response(200, resp.headers, b"")
                content = resp.read() if status == 206 else b""
        except httpx.TransportError as exc:  # drops, resets, truncated bodies, timeouts
            raise _Retry(f"{type(exc).__name__}: {exc}") from exc
        self._count(received=len(content))
        if status in _RETRY_STATUS:
            raise _Retry(f"HTTP {status}")
        if status != 206:
            raise TransportError(f"HTTP {status} for a range request", url=self.url,
                                 status=status)
        length = resp.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) != len(content):
            raise _Retry(f"body truncated ({len(content)} of {length} bytes)")
        return _Response(status, resp.headers, content)

    # -- public API ------------------------------------------------------------------------
    def get_range(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``, retrying transient failures.

        Raises:
            RangesNotSupported: the server answered with the whole resource (not read).
            TransportError: permanent failure or retries exhausted.
        """
        attempt = 0
        while True:
            try:
                resp = self._request([(start, end)])
                if resp.status_code == 200:
                    exc = RangesNotSupported("server ignores Range requests", url=self.url,
                                             status=200)
                    length = resp.headers.get("content-length", "")
                    exc.size = int(length) if length.isdigit() else None
                    raise exc
                got = self._single_part(resp)
                if got[0] > start or got[0] + len(got[1]) < end:
                    raise _Retry("server sent a different range than asked")
                return bytes(got[1][start - got[0] : end - got[0]])
            except _Retry as exc:
                attempt = self._retry_or_fail(attempt, str(exc))

    def _retry_or_fail(self, attempt: int, why: str) -> int:
        if attempt >= self.retries:
            raise TransportError(f"giving up after {attempt + 1} attempts: {why}", url=self.url)
        self._count(retries=1)
        self._sleep(attempt)
        return attempt + 1

    def _single_part(self, resp: _Response) -> tuple[int, memoryview]:
        value = resp.headers.get("content-range")
        if value is None:
            raise _Retry("206 response without Content-Range")
        try:
            first, end, _ = parse_content_range(value)
        except TransportError as exc:
            raise _Retry(str(exc)) from exc
        if end - first != len(resp.content):
            raise _Retry(f"body is {len(resp.content)} bytes, Content-Range says {end - first}")
        return first, memoryview(resp.content)

    def download(self, out: BinaryIO) -> int:
        """Stream the whole resource into ``out`` (for servers without Range support)."""
        attempt = 0
        while True:
            out.seek(0)
            out.truncate()
            self._count(requests=1)
            try:
                with self.client.stream("GET", self.url) as resp:
                    if resp.status_code in _RETRY_STATUS:
                        raise _Retry(f"HTTP {resp.status_code}")
                    if resp.status_code != 200:
                        raise TransportError(f"HTTP {resp.status_code}", url=self.url,
                                             status=resp.status_code)
                    n = 0
                    for block in resp.iter_raw(1 << 20):
                        out.write(block)
                        n += len(block)
                    self._count(received=n)
                    length = resp.headers.get("content-length")
                    if length is not None and length.isdigit() and int(length) != n:
                        raise _Retry(f"body truncated ({n} of {length} bytes)")
                    return n
            except httpx.TransportError as exc:
                attempt = self._retry_or_fail(attempt, f"{type(exc).__name__}: {exc}")
            except _Retry as exc:
                attempt = self._retry_or_fail(attempt, str(exc))

    def fetch_spans(
        self, spans: Sequence[Span], on_span: Callable[[Span, memoryview], None]
    ) -> None:
        """Fetch every span and hand it to ``on_span(span, data)`` (in a worker thread).

        Errors raised by ``on_span`` (a bad chunk) stop the fetch and propagate.

        Raises:
            TransportError: a span could not be fetched after all retries.
        """
        attempts: dict[tuple[int, int], int] = {}
        queue = list(spans)
        multi = self.max_ranges > 1
        with ThreadPoolExecutor(self.parallel, thread_name_prefix="fetch") as pool:
            running: dict[Future[tuple[list[Span], bool]], list[Span]] = {}
            try:
                while queue or running:
                    while queue and len(running) < self.parallel:
                        per = self.max_ranges if multi else 1
                        take = batch_spans(queue, max_ranges=per,
                                           max_bytes=self.max_request_bytes)[0]
                        del queue[: len(take)]
                        running[pool.submit(self._fetch_batch, take, on_span)] = take
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for fut in done:
                        batch = running.pop(fut)
                        try:
                            leftover, refused_multi = fut.result()
                        except _Retry as exc:
                            leftover, refused_multi = batch, False
                            why = str(exc)
                        else:
                            why = "server did not send every range asked for"
                        if refused_multi:
                            multi = False
                        for span in leftover:
                            key = (span.start, span.end)
                            n = attempts.get(key, 0)
                            if not refused_multi:
                                self._retry_or_fail(n, why)
                                attempts[key] = n + 1
                            queue.append(span)
                        queue.sort(key=lambda s: s.start)
            except BaseException:
                for fut in running:
                    fut.cancel()
                raise

    def _fetch_batch(
        self, batch: list[Span], on_span: Callable[[Span, memoryview], None]
    ) -> tuple[list[Span], bool]:
        """One request for ``batch``; returns (spans not delivered, server refused multi)."""
        resp = self._request([(s.start, s.end) for s in batch])
        if resp.status_code == 200:
            if len(batch) > 1:
                return batch, True
            raise RangesNotSupported("server ignores Range requests", url=self.url, status=200)
        ctype = resp.headers.get("content-type", "")
        if ctype.lower().startswith("multipart/byteranges"):
            boundary = _boundary(ctype)
            try:
                parts = parse_multipart_byteranges(resp.content, boundary)
            except TransportError as exc:
                raise _Retry(str(exc)) from exc
        else:
            parts = [self._single_part(resp)]
        leftover = []
        for span in batch:
            for first, data in parts:
                if first <= span.start and first + len(data) >= span.end:
                    on_span(span, data[span.start - first : span.end - first])
                    break
            else:
                leftover.append(span)
        return leftover, bool(leftover) and len(batch) > 1 and len(parts) == 1


def _boundary(content_type: str) -> bytes:
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary" and value:
            return value.strip('"').encode("latin-1")
    raise _Retry("multipart response without a boundary")

