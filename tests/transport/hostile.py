"""A hostile HTTP server for tests: answers every request in one chosen bad way."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from typing import Self

Reply = Callable[[socket.socket, str, dict[str, str]], None]


class _Handler(socketserver.BaseRequestHandler):
    server: HostileServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        self.server.connections.append(self.client_address)
        sock.settimeout(30)
        data = b""
        try:
            while True:
                while b"\r\n\r\n" not in data:
                    more = sock.recv(65536)
                    if not more:
                        return
                    data += more
                head, _, data = data.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {k.strip().lower(): v.strip()
                           for k, _, v in (line.partition(":") for line in lines[1:])}
                self.server.seen.append((path, headers))
                self.server.reply(sock, path, headers)
        except OSError:
            pass  # the client gave up on us: what the tests want


class Served(socketserver.ThreadingTCPServer):
    """A threaded test server on a loopback port: its ``url``, served while in ``running()``."""

    daemon_threads = True
    allow_reuse_address = True

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    @contextlib.contextmanager
    def running(self) -> Iterator[Self]:
        thread = threading.Thread(target=self.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.shutdown()
            thread.join()
            self.server_close()


class HostileServer(Served):
    """Calls ``reply(sock, path, headers)`` for each request; records what it saw (requests,
    connections)."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.connections: list[tuple[str, int]] = []
        super().__init__(("127.0.0.1", 0), _Handler)


def endless(sock: socket.socket, block: bytes = b"\0" * 65536, limit: float = 20.0) -> None:
    """Send ``block`` until the client closes (or ``limit`` seconds pass)."""
    stop = time.monotonic() + limit
    while time.monotonic() < stop:
        sock.sendall(block)


def trickle(sock: socket.socket, data: bytes, every: float, limit: float = 20.0) -> None:
    """Send ``data`` one byte every ``every`` seconds (then idle-trickle spaces)."""
    stop = time.monotonic() + limit
    pos = 0
    while time.monotonic() < stop:
        sock.sendall(data[pos : pos + 1] if pos < len(data) else b" ")
        pos += 1
        time.sleep(every)
