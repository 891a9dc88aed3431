"""Per-request deadline and shared rate limit, enforced at the socket reads of :mod:`.client`.

Per-operation timeouts are not enough: a server that sends one byte every few seconds
never trips them, in the status line, the headers or the body. Every read of the calling
thread's current request is checked against its :class:`Deadline` (``timeout`` seconds
plus ``1/min_speed`` s per byte received, :func:`current`) and the socket timeout is
shortened to what remains; every byte received is paid for in one :class:`RateLimiter`
shared by all connections. It owns nothing else: no retries, no ranges, no settings (see
:mod:`.config`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

__all__ = ["Deadline", "RateLimiter", "current", "deadline"]


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

    def too_slow(self) -> str:
        """What to say of a request past its deadline."""
        took = time.monotonic() - self.start
        return (f"server too slow: {self.received} bytes in {took:.1f} s (a request gets "
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


def current() -> Deadline | None:
    """The calling thread's request deadline, if it is in a :func:`deadline` block."""
    return getattr(_current, "budget", None)
