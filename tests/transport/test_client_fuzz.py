"""Any bytes a server answers with: the client returns a response or raises one of its own
typed errors (:class:`btrdelta.transport.client.HTTPError`), never another exception and
never a hang. Replies are made of real HTTP/1.x pieces (status lines, framing headers,
chunked bodies, redirects, 1xx) and random bytes, in any order, then the connection is
closed."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from btrdelta.transport.client import Client, HTTPError

from .hostile import HostileServer


def _pieces(*known: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(st.sampled_from(known), st.sampled_from(known), st.binary(max_size=24))


_STATUS = _pieces(b"HTTP/1.1 200 OK\r\n", b"HTTP/1.0 206 Partial Content\r\n",
                  b"HTTP/1.1 204 x\r\n", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n",
                  b"HTTP/1.1 302 Found\r\nLocation: /again\r\n", b"HTTP/2 200\r\n",
                  b"HTTP/1.1 301 x\r\nLocation: http://[::1\r\n", b"HTTP/1.1 99 x\r\n",
                  b"HTTP/1.1 404 Not Found\r\n", b"")
_FIELD = _pieces(b"Content-Length: 5\r\n", b"Content-Length: 0\r\n",
                 b"Content-Length: 5, 6\r\n", b"Content-Length: 99999999999999999999\r\n",
                 b"Content-Length: -3\r\n", b"Transfer-Encoding: chunked\r\n",
                 b"Transfer-Encoding: gzip\r\n", b"Connection: close\r\n",
                 b"Connection: keep-alive\r\n", b" folded\r\n", b"\n", b"\r",
                 b"X: " + b" \t" * 200 + b"y\r\n", b"\xff\xfe: \x00\r\n", b"Host:\r\n")
_END = st.sampled_from([b"\r\n", b"\r\n", b"\n", b""])
_BODY = _pieces(b"hello", b"5\r\nhello\r\n", b"0\r\n\r\n", b"5;x=y\r\nhel", b"0\r\n",
                b"ffffffffffffffffff\r\n", b"zz\r\n", b"-1\r\n", b" 5 \r\nhello\r\n",
                b"X-Trailer: 1\r\n", b"\r\n", b"5\r\nhelloXX")
_REPLIES = st.tuples(_STATUS, st.lists(_FIELD, max_size=6), _END, st.lists(_BODY, max_size=5)
                     ).map(lambda r: r[0] + b"".join(r[1]) + r[2] + b"".join(r[3]))


class _Replies:
    """What the server answers: each reply in turn, the last one again (a redirect's next
    request)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queue: list[bytes] = [b""]

    def __call__(self, sock: socket.socket, path: str, headers: dict[str, str]) -> None:
        with self.lock:
            data = self.queue.pop(0) if len(self.queue) > 1 else self.queue[0]
        sock.sendall(data)
        sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[HostileServer, _Replies]]:
    replies = _Replies()
    with HostileServer(replies).running() as server:  # (one server: each stops in 0.5 s)
        yield server, replies


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(replies=st.lists(_REPLIES, min_size=1, max_size=3))
def test_any_reply_is_a_response_or_one_typed_error(
    served: tuple[HostileServer, _Replies], replies: list[bytes]
) -> None:
    server, answers = served
    with answers.lock:
        answers.queue = list(replies)
    with Client(timeout=5) as client:
        for path in ("/a", "/b"):  # (the second on a connection the first may have kept)
            try:
                with client.stream("GET", f"{server.url}{path}") as resp:
                    body = resp.read(1 << 20)
            except HTTPError:
                continue
            assert 200 <= resp.status_code <= 999
            assert len(body) <= 1 << 20
