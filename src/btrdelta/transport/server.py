"""A small static HTTP server with Range support (single and multi-range), for tests and demos.

It serves the regular files below one directory (never outside it: ``..`` and symlinks
leaving the root are refused), answers ``Range`` with 206 (one range) or
``multipart/byteranges`` (several), 416 when nothing is satisfiable, and logs one line per
request with the body bytes sent. Data go out with ``sendfile``. Production deployments use
any web server or CDN.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import BinaryIO

from .plan import parse_range_header

__all__ = ["StaticServer", "StaticRequestHandler"]


class StaticRequestHandler(BaseHTTPRequestHandler):
    """Serve files of ``server.root`` with Range support."""

    server: StaticServer
    protocol_version = "HTTP/1.1"
    server_version = "btrdelta-serve"

    def log_message(self, format: str, *args: object) -> None:
        """Route stdlib messages to the server's log."""
        self.server.log(f"{self.address_string()} {format % args}")

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Suppressed: :meth:`_done` logs each request with its byte count."""

    def _done(self, status: int, sent: int) -> None:
        self.server.count(sent)
        self.server.log(f"{self.address_string()} {self.command} {self.path} {status} {sent}")

    def _resolve(self) -> str | None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        full = os.path.realpath(os.path.join(self.server.root, path.lstrip("/")))
        if os.path.commonpath([full, self.server.root]) != self.server.root:
            return None
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
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        self._done(200, self._copy(f, 0, size) if body else 0)

    def _send_one(self, f: BinaryIO, size: int, rng: tuple[int, int], body: bool) -> None:
        start, end = rng
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", "application/octet-stream")
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
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return 0


class StaticServer(ThreadingHTTPServer):
    """A threading static server over ``root``.

    Args:
        root: the directory to serve.
        address: ``(host, port)``; port 0 picks a free one.
        log: called with one line per request (default: discard).
        handler: the request handler class (tests subclass it to inject faults).
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
    ) -> None:
        self.root = os.path.realpath(root)
        self._log = log
        self._lock = threading.Lock()
        self.bytes_served = 0
        self.requests = 0
        super().__init__(address, handler)

    @property
    def url(self) -> str:
        """``http://host:port`` of the listening socket."""
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

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
