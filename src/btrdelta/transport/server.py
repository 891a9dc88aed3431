"""A small static HTTP server with Range support (single and multi-range), for tests and demos.

It serves the regular files below one directory (never outside it: ``..``, NUL and symlinks
leaving the root are refused), answers ``Range`` with 206 (one range) or
``multipart/byteranges`` (several; overlapping or nearly adjacent ranges are coalesced, so a
reply is never longer than the file), 416 when nothing is satisfiable, and logs one line per
request with the body bytes sent. ``.html`` (a repository's page, also served for its
directory's URL ending in ``/``), ``.json``, ``.svg`` and ``.txt`` files carry their types,
so a browser shows them; the rest is ``application/octet-stream``. Data go out with
``sendfile`` on ``TCP_NODELAY`` sockets (no Nagle stall between headers and body on
kept-alive connections); a connection idle for ``idle_timeout`` seconds is closed; an
unexpected error in a handler is one log line, never a traceback. Production deployments
use any web server or CDN.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import BinaryIO

from ..errors import shown
from .listen import ListenAddress, bind_listener
from .plan import coalesce_ranges, parse_range_header

__all__ = ["StaticServer", "StaticRequestHandler"]

#: the types a browser must know to show a file (a repository's index.html was offered as
#: a download); everything else is bytes
_TYPES = {".html": "text/html; charset=utf-8", ".json": "application/json",
          ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8"}


def _content_type(name: object) -> str:
    return _TYPES.get(os.path.splitext(str(name))[1].lower(), "application/octet-stream")


class StaticRequestHandler(BaseHTTPRequestHandler):
    """Serve files of ``server.root`` with Range support."""

    server: StaticServer
    protocol_version = "HTTP/1.1"
    server_version = "btrdelta-serve"
    disable_nagle_algorithm = True  # headers and sendfile body are two writes

    def setup(self) -> None:
        """Apply the server's idle timeout to the connection."""
        super().setup()
        self.connection.settimeout(self.server.idle_timeout)

    def log_message(self, format: str, *args: object) -> None:
        """Route stdlib messages to the server's log."""
        self.server.log(f"{self.address_string()} {shown(format % args)}")

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Suppressed: :meth:`_done` logs each request with its byte count."""

    def _done(self, status: int, sent: int) -> None:
        self.server.count(sent)
        self.server.log(f"{self.address_string()} {self.command} {shown(self.path)} "
                        f"{status} {sent}")

    def _resolve(self) -> str | None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        if "\0" in path or any(part.startswith(".") for part in path.split("/")):
            return None  # (hidden files: a publisher's .btrdelta/, a .git, keys: 404)
        full = os.path.realpath(os.path.join(self.server.root, path.lstrip("/")))
        if os.path.commonpath([full, self.server.root]) != self.server.root:
            return None
        if path.endswith("/") and os.path.isdir(full):  # a repository's page, as nginx does
            full = os.path.join(full, "index.html")
        return full if os.path.isfile(full) else None

    def do_HEAD(self) -> None:
        """HEAD: headers only."""
        self._serve(body=False)

    def do_GET(self) -> None:
        """GET with optional Range."""
        self._serve(body=True)

    def _error(self, status: HTTPStatus, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self._done(status, 0)

    def _serve(self, *, body: bool) -> None:
        path = self._resolve()
        if path is None:
            self._error(HTTPStatus.NOT_FOUND)
            return
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header = self.headers.get("Range")
            ranges = parse_range_header(header, size) if header else None
            if ranges:
                ranges = coalesce_ranges(ranges)
            if ranges is None:
                self._send_whole(f, size, body)
            elif not ranges:
                self._error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
                            {"Content-Range": f"bytes */{size}"})
            elif len(ranges) == 1:
                self._send_one(f, size, ranges[0], body)
            else:
                self._send_multi(f, size, ranges, body)

    def _send_whole(self, f: BinaryIO, size: int, body: bool) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", _content_type(f.name))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        self._done(200, self._copy(f, 0, size) if body else 0)

    def _send_one(self, f: BinaryIO, size: int, rng: tuple[int, int], body: bool) -> None:
        start, end = rng
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", _content_type(f.name))
        self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        self._done(206, self._copy(f, start, end - start) if body else 0)

    def _send_multi(
        self, f: BinaryIO, size: int, ranges: list[tuple[int, int]], body: bool
    ) -> None:
        boundary = secrets.token_hex(12)
        heads = [
            (f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n"
             f"Content-Range: bytes {a}-{b - 1}/{size}\r\n\r\n").encode()
            for a, b in ranges
        ]
        tail = f"\r\n--{boundary}--\r\n".encode()
        length = sum(map(len, heads)) + sum(b - a for a, b in ranges) + len(tail)
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", f"multipart/byteranges; boundary={boundary}")
        self.send_header("Content-Length", str(length))
        self.end_headers()
        sent = 0
        if body:
            for head, (a, b) in zip(heads, ranges, strict=True):
                self.wfile.write(head)
                sent += len(head) + self._copy(f, a, b - a)
            self.wfile.write(tail)
            sent += len(tail)
        self._done(206, sent)

    def _copy(self, f: BinaryIO, offset: int, count: int) -> int:
        """Send ``count`` bytes of ``f`` at ``offset``; returns the bytes sent."""
        self.wfile.flush()
        try:
            return int(self.connection.sendfile(f, offset, count))
        except OSError:  # the client went away, or stopped reading for idle_timeout
            self.close_connection = True
            return 0


class StaticServer(ThreadingHTTPServer):
    """A threading static server over ``root``.

    Args:
        root: the directory to serve.
        address: ``(host, port)``; port 0 picks a free one.
        log: called with one line per request (default: discard).
        handler: the request handler class (tests subclass it to inject faults).
        idle_timeout: seconds a connection may stay silent (or not read) before it is closed.

    Raises:
        BtrdeltaError: the address is busy or unknown (one line naming it).
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        root: str | os.PathLike[str],
        address: tuple[str, int] = ("127.0.0.1", 0),
        *,
        log: Callable[[str], None] | None = None,
        handler: type[StaticRequestHandler] = StaticRequestHandler,
        idle_timeout: float = 60.0,
    ) -> None:
        self.root = os.path.realpath(root)
        self._log = log
        self._lock = threading.Lock()
        self.bytes_served = 0
        self.requests = 0
        self.idle_timeout = idle_timeout
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = bind_listener(ListenAddress(family, host=host, port=port))
        super().__init__(address, handler, bind_and_activate=False)
        self.socket.close()
        self.socket = listener
        self.server_address = listener.getsockname()[:2]

    def handle_error(self, request: object, client_address: object) -> None:
        """One log line instead of a traceback for a handler's unexpected error."""
        exc = sys.exc_info()[1]
        self.log(f"{client_address}: error in handler: {type(exc).__name__}: {exc}")

    @property
    def url(self) -> str:
        """``http://host:port`` of the listening socket."""
        host, port = self.server_address[:2]
        host = f"[{host!s}]" if ":" in str(host) else str(host)
        return f"http://{host}:{port}"

    def count(self, sent: int) -> None:
        """Add a request and its body bytes to the counters."""
        with self._lock:
            self.requests += 1
            self.bytes_served += sent

    def log(self, line: str) -> None:
        """Emit one log line."""
        if self._log is not None:
            self._log(line)

    @contextlib.contextmanager
    def running(self) -> Iterator[StaticServer]:
        """Serve in a background thread for the duration of the ``with`` block."""
        thread = threading.Thread(target=self.serve_forever, name="btrdelta-serve", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.shutdown()
            thread.join()
            self.server_close()
