"""Per-request deadline and shared rate limit, enforced at the socket reads under ``httpx``.

``httpx`` has per-operation timeouts only: a server that sends one byte every few seconds
never trips them, in the status line, the headers or the body. This module wraps httpcore's
network backend so that every read of the calling thread's current request is checked
against a :class:`Deadline` (``timeout`` seconds plus ``1/min_speed`` s per byte received)
and the socket timeout is shortened to what remains, and so that every byte received is
paid for in one :class:`RateLimiter` shared by all connections. It owns nothing else: no
retries, no ranges, no settings (see :mod:`.config`).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .. import TYPE_CHECKING

if TYPE_CHECKING:
    import httpcore
    import httpx

__all__ = ["Deadline", "RateLimiter", "deadline", "paced_transport"]


class RateLimiter:
    """A token bucket in bytes per second, shared by threads (debt is slept off)."""

    def __init__(self, rate: int) -> None:
        self.rate = float(rate)
        self.burst = max(self.rate / 8, 16384.0)
        self._tokens = self.burst
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        """Account for ``n`` bytes received; sleep while the bucket is in debt."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            debt = -self._tokens
        if debt > 0:
            time.sleep(debt / self.rate)


class Deadline:
    """A request's time budget: ``timeout`` s, plus ``1/min_speed`` s per byte received."""

    def __init__(self, timeout: float, min_speed: float) -> None:
        self.start = time.monotonic()
        self.timeout = timeout
        self.min_speed = min_speed
        self.received = 0

    def remaining(self) -> float:
        """Seconds left (may be negative)."""
        allowed = self.timeout + self.received / self.min_speed
        return allowed - (time.monotonic() - self.start)

    def expired(self) -> httpcore.ReadTimeout:
        """The error for a request past its deadline."""
        import httpcore

        took = time.monotonic() - self.start
        return httpcore.ReadTimeout(
            f"server too slow: {self.received} bytes in {took:.1f} s (a request gets "
            f"{self.timeout:g} s plus 1 s per {self.min_speed:.0f} bytes)")


_current = threading.local()


@contextlib.contextmanager
def deadline(timeout: float, min_speed: float) -> Iterator[Deadline]:
    """Hold this thread's requests (connect, headers, body) to one :class:`Deadline`."""
    budget = Deadline(timeout, min_speed)
    previous = getattr(_current, "budget", None)
    _current.budget = budget
    try:
        yield budget
    finally:
        _current.budget = previous


def _budget(timeout: float | None) -> tuple[Deadline | None, float | None]:
    """This thread's request budget (if any) and the socket timeout it leaves of
    ``timeout``; raises the budget's error once it is spent."""
    budget: Deadline | None = getattr(_current, "budget", None)
    if budget is not None:
        left = budget.remaining()
        if left <= 0:
            raise budget.expired()
        timeout = left if timeout is None else min(timeout, left)
    return budget, timeout


def paced_transport(*, verify: Any, limits: httpx.Limits,
                    limiter: RateLimiter | None) -> httpx.HTTPTransport:
    """An ``httpx.HTTPTransport`` whose connections use the paced backend. Its classes are
    made at the first call: they subclass httpx's and httpcore's, and httpx takes 40-60 ms
    to import, which a command that fetches nothing over HTTP never pays."""
    return _transport_class()(verify=verify, limits=limits, limiter=limiter)


@functools.cache
def _backend_class() -> Callable[..., httpcore.NetworkBackend]:
    import httpcore

    class _PacedStream(httpcore.NetworkStream):
        def __init__(self, inner: httpcore.NetworkStream, limiter: RateLimiter | None) -> None:
            self._inner = inner
            self._limiter = limiter

        def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            budget, timeout = _budget(timeout)
            try:
                data = self._inner.read(max_bytes, timeout)
            except httpcore.ReadTimeout:
                if budget is not None and budget.remaining() <= 0:
                    raise budget.expired() from None
                raise
            if budget is not None:
                budget.received += len(data)
            if self._limiter is not None and data:
                self._limiter.take(len(data))
            return data

        def write(self, buffer: bytes, timeout: float | None = None) -> None:
            self._inner.write(buffer, timeout)

        def close(self) -> None:
            self._inner.close()

        def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                      timeout: float | None = None) -> httpcore.NetworkStream:
            return _PacedStream(self._inner.start_tls(ssl_context, server_hostname, timeout),
                                self._limiter)

        def get_extra_info(self, info: str) -> Any:
            return self._inner.get_extra_info(info)

    class _PacedBackend(httpcore.NetworkBackend):
        def __init__(self, limiter: RateLimiter | None) -> None:
            self._inner = httpcore.SyncBackend()
            self._limiter = limiter

        def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                        local_address: str | None = None,
                        socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
            _, timeout = _budget(timeout)
            stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
            return _PacedStream(stream, self._limiter)

        def connect_unix_socket(self, path: str, timeout: float | None = None,
                                socket_options: Iterable[Any] | None = None
                                ) -> httpcore.NetworkStream:
            return _PacedStream(self._inner.connect_unix_socket(path, timeout, socket_options),
                                self._limiter)

        def sleep(self, seconds: float) -> None:
            self._inner.sleep(seconds)

    return _PacedBackend


@functools.cache
def _transport_class() -> Callable[..., httpx.HTTPTransport]:
    import httpcore
    import httpx

    paced_backend = _backend_class()

    class PacedTransport(httpx.HTTPTransport):
        """``httpx.HTTPTransport`` whose connections use the paced backend.

        Args:
            verify: the TLS context (any object with its methods: see
                :class:`~btrdelta.transport.config.LazyTLS`).
            limits: connection pool limits.
            limiter: the shared rate limit, if any.
        """

        def __init__(self, *, verify: Any, limits: httpx.Limits,
                     limiter: RateLimiter | None) -> None:
            super().__init__(verify=False, limits=limits)  # its pool is replaced below
            pool = getattr(self, "_pool", None)
            if not isinstance(pool, httpcore.ConnectionPool):  # pragma: no cover - httpx changed
                raise RuntimeError("httpx.HTTPTransport no longer keeps an httpcore pool in _pool")
            self._pool = httpcore.ConnectionPool(
                ssl_context=verify,
                max_connections=limits.max_connections,
                max_keepalive_connections=limits.max_keepalive_connections,
                keepalive_expiry=limits.keepalive_expiry,
                network_backend=paced_backend(limiter),
            )
            pool.close()

    return PacedTransport
