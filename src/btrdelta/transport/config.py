"""HTTP client settings shared by every fetcher, and the :class:`.client.Client` built from them.

This module owns :class:`HttpConfig` (TLS trust and client certificate, extra headers,
timeouts and the per-request deadline, retry patience, parallel connections, rate limit,
redirects) and turns it into one :class:`.client.Client` whose socket reads obey the deadline and
the shared rate limit (:mod:`.pacing`). Every command that fetches takes one config; the CLI
builds it in one place (``cli/http_options.py``). It knows nothing of what is fetched
(:mod:`.http` fetches ranges, :mod:`.plan` decides which).
"""

from __future__ import annotations

import os
import re

from .. import TYPE_CHECKING
from .._value import Value
from ..errors import BtrdeltaError, UsageError
from .client import Client, InvalidURL
from .pacing import RateLimiter

if TYPE_CHECKING:
    import ssl

__all__ = ["HttpConfig", "parse_header"]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def parse_header(text: str) -> tuple[str, str]:
    """``"Name: value"`` -> ``("Name", "value")``.

    Raises:
        ValueError: no colon, a name that is not an HTTP token, or a CR/LF/NUL in the value.
    """
    name, sep, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not _TOKEN.fullmatch(name):
        raise ValueError(f"not an HTTP header 'Name: value': {text!r}")
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"header value with a line break or NUL: {text!r}")
    return name, value


class HttpConfig(Value, frozen=True):
    """How to talk HTTP(S): one object from the command line to the socket.

    Attributes:
        ca_cert: PEM file (or hashed directory) of the CAs a server certificate must chain
            to, instead of the default trust store.
        client_cert: PEM client certificate for servers that require one (mutual TLS).
        client_key: its private key (PEM); omit when ``client_cert`` holds both.
        headers: extra request headers, e.g. ``(("Authorization", "Bearer ..."),)``.
        timeout: seconds to connect, and the most a request may go without a byte.
        min_speed: after ``timeout`` seconds a request must have averaged this many bytes
            per second (each byte received buys ``1/min_speed`` s more): a server that
            trickles one byte at a time is cut off, whatever the size asked for.
        retries: attempts after the first for a transient failure (connection refused or
            dropped, timeout, 5xx, 429, truncated body).
        backoff: first wait before a retry in seconds; doubles each attempt, with jitter.
        retry_max_wait: the longest single wait between two attempts.
        jobs: requests in flight (parallel connections).
        rate_limit: bytes per second over all connections together (``None``: no limit).
        max_redirects: redirects followed before a request fails (a loop is an error).
        who: what starts each line said on standard error (a retry, a server ignoring
            ranges): the command (``btrdelta image clone``), as its error line does.
    """

    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    timeout: float = 30.0
    min_speed: int = 1024
    retries: int = 5
    backoff: float = 0.2
    retry_max_wait: float = 30.0
    jobs: int = 4
    rate_limit: int | None = None
    max_redirects: int = 10
    who: str = "btrdelta"

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.min_speed <= 0:
            raise BtrdeltaError("HTTP timeout and minimum speed must be positive")
        if self.retries < 0 or self.jobs < 1 or self.max_redirects < 0:
            raise BtrdeltaError("HTTP retries must be >= 0 and jobs >= 1")
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise BtrdeltaError("HTTP rate limit must be positive")
        if self.client_key and not self.client_cert:
            raise BtrdeltaError("a client key needs a client certificate (--client-cert)")

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context: the CA file (or the system's trust store, which ``SSL_CERT_FILE``
        and ``SSL_CERT_DIR`` can name) and the client cert.

        Raises:
            BtrdeltaError: a file that is missing or not PEM, naming which.
        """
        import ssl  # (only for https://: ~10 ms)

        try:
            if self.ca_cert is None:
                ctx = ssl.create_default_context()
            elif os.path.isdir(self.ca_cert):
                ctx = ssl.create_default_context(capath=self.ca_cert)
            else:
                ctx = ssl.create_default_context(cafile=self.ca_cert)
        except (OSError, ssl.SSLError) as exc:
            raise BtrdeltaError(f"CA certificates not loaded: {_why(exc)}",
                                path=self.ca_cert) from None
        if self.client_cert is not None:
            try:
                ctx.load_cert_chain(self.client_cert, self.client_key)
            except (OSError, ssl.SSLError) as exc:
                raise BtrdeltaError(f"client certificate/key not loaded: {_why(exc)}",
                                    path=self.client_cert) from None
        return ctx

    def client(self) -> Client:
        """A pooled client: ``jobs`` connections, the deadline and the rate limit applied.
        With the default trust store, the TLS context is made at the first HTTPS
        connection (loading it costs 20-70 ms, which a client of plain-HTTP mirrors never
        needs to pay); a CA file or a client certificate is loaded now, so a bad one is
        named before anything is fetched. The environment's proxies (``https_proxy``...,
        :mod:`.proxy`) are read now too.

        Raises:
            UsageError: a proxy variable that cannot be used, naming it.
        """
        tls = self.ssl_context() if self.ca_cert or self.client_cert else self.ssl_context
        try:
            return Client(
                headers=dict(self.headers),
                timeout=self.timeout,
                max_connections=self.jobs,
                max_redirects=self.max_redirects,
                tls=tls,
                limiter=RateLimiter(self.rate_limit) if self.rate_limit else None,
            )
        except InvalidURL as exc:
            raise UsageError(str(exc)) from None

    @property
    def deadline_speed(self) -> float:
        """The minimum speed a request is held to: ``min_speed``, or less under a rate limit
        (a quarter of one connection's share, so the limit itself never trips it)."""
        if self.rate_limit is None:
            return float(self.min_speed)
        return min(float(self.min_speed), self.rate_limit / self.jobs / 4)


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
