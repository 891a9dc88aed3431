"""A lean HTTP/1.1 client on ``socket`` (``ssl`` only for ``https://``): pooled keep-alive
connections, redirects, and every socket read under the request's deadline and the rate
limit (:mod:`.pacing`).

Why not ``httpx``: importing it took 40-60 ms (``http.client``, ``email``,
``urllib.request``, ``http.cookiejar``, ``logging``, ``anyio``...), a third of a CLI
``update`` of a small release; this module imports nothing the CLI has not loaded already.
It does what the fetchers need and no more: ``GET`` (and ``PUT`` of a file), ``Range``
requests answered with ``Content-Length``, chunked or close-delimited bodies, redirects.

A response is untrusted input: its status line and headers are bounded (:data:`MAX_HEAD`
bytes, :data:`MAX_FIELDS` fields), ``Content-Length`` must be one decimal number,
``Transfer-Encoding`` other than ``chunked`` is refused, a chunk-size line is bounded, and a
body shorter than announced is an error (:class:`RemoteProtocolError`), never a short read.
The caller bounds what it reads of a body (:mod:`.http`).

Errors are :class:`HTTPError`; those worth a retry (connection refused or dropped, a
timeout, a malformed reply) are :class:`NetworkError`, the others (a bad URL, a redirect
loop, an unsupported framing) are permanent.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, BinaryIO, overload
from urllib.parse import quote, urljoin, urlsplit

from . import pacing, proxy

if TYPE_CHECKING:
    import ssl

__all__ = ["MAX_FIELDS", "MAX_HEAD", "Client", "ConnectError", "HTTPError", "Headers",
           "InvalidURL", "NetworkError", "ProxyRefused", "ReadTimeout", "RemoteProtocolError",
           "Response", "TooManyRedirects", "UnsupportedResponse"]

#: the most bytes a status line and its header fields may take
MAX_HEAD = 64 << 10
#: the most header fields a response may have
MAX_FIELDS = 128
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_STATUS = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: ([^\r\n]*))?")
_FIELD = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):([^\r\n\0]*)")  # (value stripped after:
# a lazy value before optional blanks backtracks quadratically on a long run of blanks)
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_RECV = 1 << 18
_SAFE = "/%:@!$&'()*+,;=-._~"

#: request header fields this client writes itself
_OURS = frozenset({"accept-encoding", "content-length", "transfer-encoding"})


class HTTPError(Exception):
    """A request failed without a usable response."""


class NetworkError(HTTPError):
    """A failure worth a retry: the connection, a timeout, a malformed reply."""


class ConnectError(NetworkError):
    """The connection (or its TLS handshake) could not be made."""


class ReadTimeout(NetworkError):
    """The server went quiet, or too slow for the request's deadline."""


class RemoteProtocolError(NetworkError):
    """The server broke HTTP/1.1: a malformed or cut-short reply."""


class InvalidURL(HTTPError):
    """Not an ``http(s)://host/...`` URL."""


class TooManyRedirects(HTTPError):
    """More redirects than allowed (a loop)."""


class UnsupportedResponse(HTTPError):
    """A reply framed in a way this client refuses (an unknown ``Transfer-Encoding``)."""


class ProxyRefused(HTTPError):
    """The proxy refused the request (a 4xx to ``CONNECT``, a 407 to any request)."""


class Headers:
    """Response header fields, by case-insensitive name (repeated fields joined by ``, ``)."""

    __slots__ = ("_fields",)

    def __init__(self, fields: dict[str, str]) -> None:
        self._fields = fields

    @overload
    def get(self, name: str) -> str | None: ...
    @overload
    def get(self, name: str, default: str) -> str: ...
    def get(self, name: str, default: str | None = None) -> str | None:
        return self._fields.get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return self._fields[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._fields

    def __repr__(self) -> str:
        return f"Headers({self._fields!r})"


class _Conn:
    """One connection: a socket, the bytes read ahead, the pool key it belongs to."""

    def __init__(self, sock: socket.socket, key: tuple[str, str, int], timeout: float,
                 limiter: pacing.RateLimiter | None) -> None:
        self.sock = sock
        self.key = key
        self.timeout = timeout
        self.limiter = limiter
        self.buf = b""
        self.answered = 0  # requests answered on it (kept since: may be closed by now)

    def recv(self) -> bytes:
        """What is read ahead, else one read of the socket (``b""``: closed), held to the
        thread's deadline and paid for in the rate limit."""
        if self.buf:
            data, self.buf = self.buf, b""
            return data
        budget, timeout = _budget(self.timeout)
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(_RECV)
        except TimeoutError:
            if budget is not None and budget.remaining() <= 0:
                raise ReadTimeout(budget.too_slow()) from None
            raise ReadTimeout("timed out") from None
        except OSError as exc:
            raise RemoteProtocolError(_os_text(exc)) from exc
        if budget is not None:
            budget.received += len(data)
        if self.limiter is not None and data:
            self.limiter.take(len(data))
        return data

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (``b""``: closed)."""
        data = self.recv()
        if len(data) > n:
            data, self.buf = data[:n], data[n:]
        return data

    def line(self, limit: int = 4096) -> bytes:
        """One line (without its end), at most ``limit`` bytes."""
        data = b""
        while (at := data.find(b"\n")) < 0:
            if len(data) > limit:
                raise RemoteProtocolError(f"a line of the reply longer than {limit} bytes")
            more = self.recv()
            if not more:
                raise RemoteProtocolError("the server closed the connection in a chunked body")
            data += more
        data, self.buf = data[:at], data[at + 1:] + self.buf
        return data.rstrip(b"\r")

    def send(self, data: bytes) -> None:
        _, timeout = _budget(self.timeout)
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise ReadTimeout("timed out sending the request") from None
        except OSError as exc:
            raise RemoteProtocolError(_os_text(exc)) from exc

    def idle_ok(self) -> bool:
        """A kept connection still open and silent (one the server closed reads as ready)."""
        import select

        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return not self.buf and not poller.poll(0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _budget(timeout: float) -> tuple[pacing.Deadline | None, float]:
    """The thread's request deadline (if any) and the socket timeout it leaves."""
    budget = pacing.current()
    if budget is None:
        return None, timeout
    left = budget.remaining()
    if left <= 0:
        raise ReadTimeout(budget.too_slow())
    return budget, min(timeout, left)


def _os_text(exc: OSError) -> str:
    return str(exc) or type(exc).__name__


class Response:
    """A response whose body is read on demand (:meth:`iter_raw`): its connection goes
    back to the pool once the body was read to its end, else it is closed."""

    def __init__(self, conn: _Conn, status: int, headers: Headers, *, keep: bool,
                 length: int | None, chunked: bool, release: Callable[[_Conn | None], None]
                 ) -> None:
        self.status_code = status
        self.headers = headers
        self._conn = conn
        self._keep = keep
        self._length = length  # None: chunked, or up to the connection's close
        self._chunked = chunked
        self._release: Callable[[_Conn | None], None] | None = release
        self._done = length == 0

    def iter_raw(self, chunk_size: int | None = None) -> Iterator[bytes]:
        """The body as it arrives, in blocks of at most ``chunk_size`` bytes (the bytes as
        sent: no content decoding)."""
        size = chunk_size or _RECV
        if self._done:
            return
        if self._chunked:
            yield from self._chunks(size)
        elif self._length is not None:
            left = self._length
            while left:
                data = self._conn.read(min(left, size))
                if not data:
                    raise RemoteProtocolError(
                        f"the server closed the connection {self._length - left} bytes into "
                        f"a body of {self._length}")
                left -= len(data)
                yield data
        else:
            while data := self._conn.read(size):
                yield data
        self._done = True

    def _chunks(self, size: int) -> Iterator[bytes]:
        conn = self._conn
        while True:
            text = conn.line().split(b";", 1)[0].strip()
            if not text or len(text) > 15 or text.strip(b"0123456789abcdefABCDEF"):
                raise RemoteProtocolError(f"bad chunk size {text[:20]!r} in a chunked body")
            left = int(text, 16)
            if left == 0:
                for _ in range(MAX_FIELDS):  # the trailer fields, up to an empty line
                    if not conn.line():
                        return
                raise RemoteProtocolError("a chunked body's trailer too long")
            while left:
                data = conn.read(min(left, size))
                if not data:
                    raise RemoteProtocolError("the server closed the connection in a chunk")
                left -= len(data)
                yield data
            if conn.line():
                raise RemoteProtocolError("a chunk not followed by its line end")

    def abort(self) -> None:
        """End the body's reading from another thread: a read blocked in it returns at
        once, the body cut short (the connection is shut down; closed by :meth:`close`)."""
        with contextlib.suppress(OSError):  # (the socket's own: not a TLS close_notify)
            socket.socket.shutdown(self._conn.sock, socket.SHUT_RDWR)

    def read(self, limit: int | None = None) -> bytes:
        """The whole body (:class:`UnsupportedResponse` past ``limit`` bytes)."""
        out = bytearray()
        for block in self.iter_raw():
            out += block
            if limit is not None and len(out) > limit:
                raise UnsupportedResponse(f"a reply longer than {limit} bytes")
        return bytes(out)

    def close(self) -> None:
        """Give the connection back (a body read to its end) or close it."""
        release, self._release = self._release, None
        if release is not None:
            release(self._conn if self._done and self._keep else None)
            if not (self._done and self._keep):
                self._conn.close()


class Client:
    """A pool of keep-alive connections to any ``http(s)://`` URL.

    Args:
        headers: sent with every request (``Authorization`` not to another origin after a
            redirect).
        timeout: seconds to connect, and the most a request may go without a byte.
        max_connections: connections open at once (a request waits for one at most
            ``timeout`` seconds); as many are kept open between requests.
        max_redirects: redirects followed before :class:`TooManyRedirects`.
        follow_redirects: ``False``: a redirect is the response.
        tls: the TLS context, or a function that makes it (called at the first
            ``https://`` connection: the default trust store takes 20-70 ms to load);
            ``None``: the system's trust store.
        limiter: the rate limit every byte received is paid in.
        proxies: the proxies to go through (:mod:`.proxy`); ``True``: the environment's
            (``http_proxy``, ``https_proxy``, ``all_proxy``, ``no_proxy``), read now;
            ``False``: none.

    Raises:
        InvalidURL: a proxy variable that cannot be used (naming it).
    """

    def __init__(self, *, headers: dict[str, str] | None = None, timeout: float = 30.0,
                 max_connections: int = 4, max_redirects: int = 10,
                 follow_redirects: bool = True,
                 tls: ssl.SSLContext | Callable[[], ssl.SSLContext] | None = None,
                 limiter: pacing.RateLimiter | None = None,
                 proxies: proxy.Proxies | bool = True) -> None:
        for name, value in (headers or {}).items():
            if any(c in f"{name}{value}" for c in "\r\n\0"):
                raise InvalidURL(f"header {name!r} with a line break or NUL")
            if not (name.isascii() and value.isprintable() and value.isascii()):
                raise InvalidURL(f"header {name!r}: not printable ASCII")
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.max_redirects = max_redirects
        self.follow_redirects = follow_redirects
        self._tls = tls
        self._limiter = limiter
        self._slots = threading.BoundedSemaphore(max_connections)
        self._max_idle = max_connections
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._proxies = proxy.from_environ() if proxies is True else (proxies or None)
        except proxy.InvalidProxy as exc:
            raise InvalidURL(str(exc)) from None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections kept open."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._closed = True
        for conn in idle:
            conn.close()

    @contextlib.contextmanager
    def stream(self, method: str, url: str, *, headers: dict[str, str] | None = None,
               content: BinaryIO | None = None) -> Iterator[Response]:
        """The response to one request (redirects followed), open while in the block."""
        fields = {**self.headers, **(headers or {})}
        resp = self._send(method, url, fields, content)
        hops = 0
        while (self.follow_redirects and resp.status_code in _REDIRECTS
               and resp.headers.get("location") is not None):
            if hops >= self.max_redirects:
                resp.close()
                raise TooManyRedirects(f"more than {self.max_redirects} redirects")
            try:
                target = urljoin(url, resp.headers["location"])
                _split(target)
            except (ValueError, InvalidURL):
                resp.close()
                raise RemoteProtocolError(
                    f"a redirect to a bad URL {resp.headers['location'][:80]!r}") from None
            with contextlib.suppress(HTTPError):
                resp.read(64 << 10)  # (its connection is kept for the next request)
            resp.close()
            if _origin(target) != _origin(url) and not _upgraded(url, target):
                fields = {k: v for k, v in fields.items() if k.lower() != "authorization"}
            if resp.status_code == 303 and method != "HEAD":
                method, content = "GET", None
            url, hops = target, hops + 1
            resp = self._send(method, url, fields, content)
        try:
            yield resp
        finally:
            resp.close()

    def get(self, url: str, *, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """Status and body of a ``GET`` (a small resource)."""
        with self.stream("GET", url, headers=headers) as resp:
            return resp.status_code, resp.read()

    # -- one request -------------------------------------------------------------------
    def _send(self, method: str, url: str, fields: dict[str, str],
              content: BinaryIO | None) -> Response:
        scheme, host, port, target, auth = _split(url)
        key = (scheme, host, port)
        via = None if self._proxies is None else self._proxies.for_url(scheme, host, port)
        if via is not None and scheme == "http":  # absolute form, the proxy's connections
            target, key = f"http://{_host_field(host, port, scheme)}{target}", \
                ("http", via.host, via.port)
        extra = {k: v for k, v in fields.items() if k.lower() not in _OURS}
        named = {k.lower() for k in extra}
        head = [f"{method} {target} HTTP/1.1", "Accept-Encoding: identity"]
        if "host" not in named:  # (a --header Host: one names a virtual host itself)
            head.insert(1, f"Host: {_host_field(host, port, scheme)}")
        if "user-agent" not in named:
            head.append("User-Agent: btrdelta")
        if auth and "authorization" not in named:
            head.append(f"Authorization: {auth}")
        head += [f"{k}: {v}" for k, v in extra.items()
                 if via is None or not via.auth or k.lower() != "proxy-authorization"]
        if via is not None and scheme == "http" and via.auth:
            head.append(f"Proxy-Authorization: {via.auth}")
        if content is not None:
            import os

            head.append(f"Content-Length: {os.fstat(content.fileno()).st_size - content.tell()}")
        request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        budget = pacing.current()
        if not self._slots.acquire(timeout=self.timeout if budget is None
                                   else max(0.0, budget.remaining())):
            raise ReadTimeout(f"no connection free in {self.timeout:g} s")
        try:
            while True:
                conn = self._connection(key, via)
                answered = conn.answered
                try:
                    conn.send(request)
                    if content is not None:
                        try:
                            while block := content.read(1 << 20):
                                conn.send(block)
                        except RemoteProtocolError:
                            resp = self._early_answer(conn, method)
                            if resp is None:
                                raise
                            return resp
                    resp = self._response(conn, method)
                    if via is not None and scheme == "http" and resp.status_code == 407:
                        raise ProxyRefused(_refused(via, "the request", 407))
                    return resp
                except (_Stale, RemoteProtocolError) as exc:
                    conn.close()
                    # a kept connection the server closed meanwhile: asked again on another
                    if answered and conn.answered == answered and content is None:
                        continue
                    if isinstance(exc, _Stale):
                        raise RemoteProtocolError(
                            "the server closed the connection without answering") from None
                    raise
                except BaseException:
                    conn.close()
                    raise
        except BaseException:
            self._slots.release()
            raise

    def _early_answer(self, conn: _Conn, method: str) -> Response | None:
        """The answer a server sent before the whole request body and closed the connection
        (a 405, 413 or 501: why it took no upload; RFC 9112: a client sending a body watches
        for an error response), where it came in time:
        it says more than the broken pipe. None: no answer came, or one that is not a
        refusal (a success or a redirect for a body the server did not read all of is
        not one: the broken pipe is what happened)."""
        try:
            resp = self._response(conn, method)
        except (HTTPError, _Stale):
            return None
        if resp.status_code < 400:
            return None  # (the caller closes the connection and gives its slot back)
        resp._keep = False  # (the connection is broken)
        return resp

    def _response(self, conn: _Conn, method: str) -> Response:
        for _ in range(8):  # informational replies (100 Continue) before the answer
            status, version, headers = _read_head(conn)
            if status >= 200:
                break
        else:
            raise RemoteProtocolError("too many informational (1xx) replies")
        conn.answered += 1
        connection = (headers.get("connection") or "").lower()
        keep = version == 1 and "close" not in connection
        te = headers.get("transfer-encoding")
        length: int | None = None
        chunked = False
        if method == "HEAD" or status in (204, 304):
            length = 0
        elif te is not None:
            if te.strip().lower() != "chunked":
                raise UnsupportedResponse(f"Transfer-Encoding {te!r} not supported")
            chunked = True
        elif (cl := headers.get("content-length")) is not None:
            values = {v.strip() for v in cl.split(",")}
            value = values.pop()
            if values or not (value.isascii() and value.isdigit()) or len(value) > 18:
                raise RemoteProtocolError(f"bad Content-Length {cl[:40]!r}")
            length = int(value)
        else:
            keep = False  # the body ends when the connection does
        return Response(conn, status, headers, keep=keep, length=length, chunked=chunked,
                        release=self._give_back)

    def _connection(self, key: tuple[str, str, int], via: proxy.Proxy | None) -> _Conn:
        """A connection for ``key``: a kept one, else a new one (through ``via``: to it for
        ``http://``, whose key is the proxy's; a ``CONNECT`` tunnel for ``https://``)."""
        while True:  # the connection kept last first (the likeliest to be open still)
            with self._lock:
                conn = next((c for c in reversed(self._idle) if c.key == key), None)
                if conn is None:
                    break
                self._idle.remove(conn)
            if conn.idle_ok():
                return conn
            conn.close()
        scheme, host, port = key
        to_host, to_port = (host, port) if via is None else (via.host, via.port)
        _, timeout = _budget(self.timeout)
        try:
            sock = socket.create_connection((to_host, to_port), timeout)
        except TimeoutError:
            raise ConnectError(f"timed out connecting to {to_host}:{to_port}"
                               + _through(via)) from None
        except OSError as exc:
            raise ConnectError(_os_text(exc) + _through(via)) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if via is not None and scheme == "https":
                self._connect(sock, via, host, port)
            if scheme == "https":
                _, timeout = _budget(self.timeout)
                sock.settimeout(timeout)
                try:
                    sock = self._context().wrap_socket(sock, server_hostname=host)
                except TimeoutError:
                    raise ConnectError(f"timed out in the TLS handshake with {host}:{port}") \
                        from None
                except OSError as exc:  # (ssl.SSLError too)
                    raise ConnectError(_os_text(exc)) from exc
        except BaseException:
            sock.close()
            raise
        return _Conn(sock, key, self.timeout, self._limiter)

    def _connect(self, sock: socket.socket, via: proxy.Proxy, host: str, port: int) -> None:
        """``CONNECT host:port`` through the proxy on ``sock``: a 2xx, and nothing more, or
        :class:`ProxyRefused` (4xx) or :class:`ConnectError` (else)."""
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        head = [f"CONNECT {where} HTTP/1.1", f"Host: {where}", "User-Agent: btrdelta"]
        if via.auth:
            head.append(f"Proxy-Authorization: {via.auth}")
        conn = _Conn(sock, ("http", via.host, via.port), self.timeout, self._limiter)
        conn.send(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        try:
            status, _, _ = _read_head(conn)
        except RemoteProtocolError as exc:
            raise ConnectError(f"the {via} answered CONNECT badly: {exc}") from None
        if not 200 <= status < 300:
            raise (ProxyRefused if 400 <= status < 500 else ConnectError)(
                _refused(via, f"CONNECT {where}", status))
        if conn.buf:
            raise ConnectError(f"the {via} sent bytes after its answer to CONNECT")

    def _context(self) -> ssl.SSLContext:
        with self._lock:
            tls = self._tls
            if tls is None or callable(tls):
                import ssl

                tls = self._tls = ssl.create_default_context() if tls is None else tls()
            return tls

    def _give_back(self, conn: _Conn | None) -> None:
        try:
            if conn is not None:
                with self._lock:
                    if not self._closed and len(self._idle) < self._max_idle:
                        self._idle.append(conn)
                        conn = None
                if conn is not None:
                    conn.close()
        finally:
            self._slots.release()


class _Stale(Exception):
    """A kept connection closed by the server before it answered (asked again)."""


def _read_head(conn: _Conn) -> tuple[int, int, Headers]:
    """Status, minor version and header fields of the next reply on ``conn``."""
    data = b""
    start = 0  # (where the end may begin: a slow server's bytes are not scanned again)
    while (end := _HEAD_END.search(data, start)) is None:
        if len(data) > MAX_HEAD:
            raise RemoteProtocolError(f"reply headers longer than {MAX_HEAD} bytes")
        more = conn.recv()
        if not more:
            if not data and conn.answered:
                raise _Stale
            raise RemoteProtocolError("the server closed the connection without answering"
                                      if not data else "the server closed the connection "
                                      "in the reply's headers")
        start = max(0, len(data) - 3)
        data += more
    if end.start() > MAX_HEAD:
        raise RemoteProtocolError(f"reply headers longer than {MAX_HEAD} bytes")
    conn.buf = data[end.end():] + conn.buf
    lines = data[: end.start()].split(b"\n")
    status = _STATUS.fullmatch(lines[0].rstrip(b"\r"))
    if status is None:
        raise RemoteProtocolError(f"not an HTTP/1.x status line: {lines[0][:60]!r}")
    if len(lines) > MAX_FIELDS + 1:
        raise RemoteProtocolError(f"more than {MAX_FIELDS} header fields in a reply")
    fields: dict[str, str] = {}
    for raw in lines[1:]:
        field = _FIELD.fullmatch(raw.rstrip(b"\r"))
        if field is None:
            raise RemoteProtocolError(f"malformed header field {raw[:60]!r}")
        name, value = field[1].decode().lower(), field[2].strip(b" \t").decode("latin-1")
        fields[name] = f"{fields[name]}, {value}" if name in fields else value
    return int(status[2]), int(status[1]), Headers(fields)


def _split(url: str) -> tuple[str, str, int, str, str | None]:
    """Scheme, host, port, request target and ``Authorization`` (from user:password@) of
    ``url``."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidURL(f"invalid URL {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InvalidURL(f"unsupported URL scheme {scheme + ':' if scheme else ''!r} "
                         "(http:// or https://)")
    host = parts.hostname
    if not host or any(c in url for c in "\r\n\0 \t"):
        raise InvalidURL(f"invalid URL {url!r}")
    if not host.isascii():  # an internationalised name: its ASCII (IDNA) form on the wire
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise InvalidURL(f"invalid host name in URL {url!r}") from None
    target = quote(parts.path or "/", safe=_SAFE)
    if parts.query:
        target += "?" + quote(parts.query, safe=_SAFE + "?")
    return scheme, host, port or (443 if scheme == "https" else 80), target, \
        proxy.basic_auth(parts)


def _through(via: proxy.Proxy | None) -> str:
    return "" if via is None else f"; through the {via}"


def _refused(via: proxy.Proxy, what: str, status: int) -> str:
    why = ("proxy credentials needed or wrong (user:password@ in the variable's URL)"
           if status == 407 else "refused")
    return f"the {via} answered {what} with {status}: {why}"


def _host_field(host: str, port: int, scheme: str) -> str:
    name = f"[{host}]" if ":" in host else host
    return name if port == (443 if scheme == "https" else 80) else f"{name}:{port}"


def _origin(url: str) -> tuple[str, str, int]:
    scheme, host, port, _, _ = _split(url)
    return scheme, host, port


def _upgraded(old: str, new: str) -> bool:
    """``http://host`` to ``https://host`` (default ports): credentials may follow."""
    a, b = _origin(old), _origin(new)
    return a[0] == "http" and b[0] == "https" and a[1] == b[1] and (a[2], b[2]) == (80, 443)
