"""A dumb HTTP proxy for the tests: absolute-form requests forwarded to their origin (one
request a connection, ``Connection: close``), ``CONNECT`` tunnels relayed byte for byte. It
checks nothing of what it relays (TLS stays end to end); it records each request line and
the ``Proxy-Authorization`` it came with, and asks for credentials if given some."""

from __future__ import annotations

import base64
import contextlib
import socket
import socketserver
import threading
from urllib.parse import urlsplit

from .hostile import Served


def _head(sock: socket.socket) -> tuple[bytes, bytes]:
    """The request head (up to its empty line) and the bytes read past it."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            return b"", b""
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _pipe(src: socket.socket, dst: socket.socket, counted: list[int]) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            counted[0] += len(data)  # (first: the peer may have it and be done before)
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


class _Handler(socketserver.BaseRequestHandler):
    server: Forwarder

    def handle(self) -> None:
        sock: socket.socket = self.request
        head, rest = _head(sock)
        if not head:
            return
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        fields = [line.partition(":") for line in lines[1:]]
        auth = next((v.strip() for k, _, v in fields if k.lower() == "proxy-authorization"),
                    None)
        with self.server.lock:
            self.server.seen.append((method, target, auth))
        if self.server.auth is not None and auth != self.server.auth:
            sock.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                         b"Proxy-Authenticate: Basic realm=\"test\"\r\n"
                         b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            return
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            try:
                origin = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
            except OSError:
                sock.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if rest:
                origin.sendall(rest)
        else:
            url = urlsplit(target)
            path = url.path + (f"?{url.query}" if url.query else "")
            kept = [f"{k}:{v}" for k, _, v in fields
                    if k.lower() not in ("proxy-authorization", "connection")]
            out = "\r\n".join([f"{method} {path} HTTP/1.1", *kept, "Connection: close"])
            origin = socket.create_connection((url.hostname, url.port or 80), timeout=10)
            origin.sendall(out.encode("latin-1") + b"\r\n\r\n" + rest)
        with origin:
            up = threading.Thread(target=_pipe, args=(sock, origin, self.server.up))
            up.start()
            _pipe(origin, sock, self.server.down)
            if method != "CONNECT":  # one request a connection: the reply ends it
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            up.join(10)


class Forwarder(Served):
    """The proxy on a loopback port (``url``); ``seen``: (method, target,
    Proxy-Authorization) of every request; ``down``: bytes relayed to the client."""

    def __init__(self, *, user: str | None = None, password: str = "") -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.auth = (None if user is None else
                     "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        self.seen: list[tuple[str, str, str | None]] = []
        self.up = [0]
        self.down = [0]
        self.lock = threading.Lock()
