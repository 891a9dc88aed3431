"""MessageIO over real pipes: each message read into one buffer of its size, DATA written
with writev from its pieces, the peer's end inside a message or between messages, and a
channel that has only read/write. Oracle: the messages as another Connection encodes them."""

from __future__ import annotations

import os
import struct
import threading
import uuid
from typing import Any

import pytest

from btrdelta.errors import ProtocolError
from btrdelta.protocol import (
    Accept,
    Checkpoint,
    Connection,
    Data,
    Hello,
    Holdings,
    Message,
    Plan,
)
from btrdelta.update.channels import MessageIO, PeerClosed, PipeChannel

PLAN = Plan("full", "cd" * 16, "data.1", uuid.UUID(int=2), 7, None, "", 0, 1 << 20)
HELLO_S, HELLO_R = Hello("sender", (1,), (), "x"), Hello("receiver", (1,), (), "y")


def _take(conn: Connection, wire: bytes) -> object:
    conn.receive_data(wire)
    return conn.next_event()


def _sender_wire(pieces: list[Any]) -> tuple[bytes, list[Message]]:
    """What a sender writes up to DATA (from ``pieces``), another DATA and a CHECKPOINT,
    and those messages."""
    s, peer = Connection("sender"), Connection("receiver")
    out: list[Any] = [s.send(HELLO_S)]
    _take(s, peer.send(HELLO_R))
    peer.phase = "holdings"  # (the peer never reads the sender's HELLO)
    _take(s, peer.send(Holdings(())))
    out.append(s.send(PLAN))
    peer.phase = "accept"
    _take(s, peer.send(Accept(PLAN.session)))
    joined = b"".join(bytes(p) for p in pieces)
    out += s.send_data(0, pieces)
    cp = Checkpoint(0, len(joined) + 4, "ab" * 32, "cd" * 32)
    out += [s.send(Data(len(joined), b"tail")), s.send(cp)]
    return b"".join(bytes(b) for b in out), [HELLO_S, PLAN, Data(0, joined),
                                              Data(len(joined), b"tail"), cp]


def _pipe_channel() -> tuple[PipeChannel, Any]:
    r, w = os.pipe()
    return (PipeChannel(os.fdopen(r, "rb", buffering=0), open(os.devnull, "wb")),
            os.fdopen(w, "wb", buffering=0))


def _feed(w: Any, wire: bytes, step: int) -> threading.Thread:
    def run() -> None:
        for i in range(0, len(wire), step):
            w.write(wire[i:i + step])
        w.close()

    t = threading.Thread(target=run)
    t.start()
    return t


def _receive(io: MessageIO, n: int) -> list[Message]:
    """Play the receiver through ``io``: its own messages sent in turn, ``n`` read."""
    r = io.conn
    r.send(HELLO_R)
    got = [io.next()]
    r.send(Holdings(()))
    got.append(io.next())
    r.send(Accept(PLAN.session))
    while len(got) < n:
        got.append(io.next())
    return got


@pytest.mark.parametrize("step", [1, 7, 4096, 100_000, 1 << 20])
def test_messages_in_any_cut_of_the_bytes(step: int) -> None:
    ch, w = _pipe_channel()
    wire, want = _sender_wire([os.urandom(70_000), b"x" * 10, memoryview(os.urandom(130_000))])
    io = MessageIO(ch, Connection("receiver"))
    t = _feed(w, wire, step)
    assert _receive(io, len(want)) == want
    with pytest.raises(PeerClosed):  # the end between messages
        io.next()
    t.join()
    ch.close()


@pytest.mark.parametrize("cut", [5, 21, -3, -200_000])
def test_the_end_inside_a_message_is_an_error(cut: int) -> None:
    ch, w = _pipe_channel()
    wire, want = _sender_wire([b"y" * 250_000])
    t = _feed(w, wire[:cut], 65536)
    io = MessageIO(ch, Connection("receiver"))
    with pytest.raises(ProtocolError, match=r"connection closed (before|inside)"):
        _receive(io, len(want))
    t.join()
    ch.close()


def test_a_huge_announced_length_is_refused_before_reading_it() -> None:
    ch, w = _pipe_channel()
    wire, _ = _sender_wire([b"z"])
    hello = len(Connection("sender").send(HELLO_S))
    t = _feed(w, wire[:hello] + b"\xff\xff\xff\x7f\x03\x00" + bytes(4), 1 << 20)
    io = MessageIO(ch, Connection("receiver"))
    with pytest.raises(ProtocolError, match="exceeds"):
        _receive(io, 3)
    t.join()
    ch.close()


class _Plain:
    """A channel with only read and write (as the tests' wrappers of a channel)."""

    def __init__(self, inner: PipeChannel) -> None:
        self.inner = inner
        self.written = bytearray()

    def read(self, n: int) -> bytes:
        return self.inner.read(n)

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.inner.close()


def test_a_channel_without_readinto_or_writev() -> None:
    ch, w = _pipe_channel()
    wire, want = _sender_wire([b"a" * 100_000, b"b" * 3])
    plain = _Plain(ch)
    t = _feed(w, wire, 50_000)
    assert _receive(MessageIO(plain, Connection("receiver")), len(want)) == want
    t.join()
    # DATA from pieces: the joined frame, written once
    s = Connection("sender")
    s._header_sent, s.phase = True, "stream"
    MessageIO(plain, s).send_data(0, [b"q" * 10, memoryview(b"r")])
    model = Connection("sender")
    model._header_sent, model.phase = True, "stream"
    assert bytes(plain.written) == model.send(Data(0, b"q" * 10 + b"r"))
    ch.close()


@pytest.mark.parametrize("vectored", [False, True])
def test_a_write_to_an_exited_peer_says_it_closed_the_connection(vectored: bool) -> None:
    """A peer that exits before our first write (a receiver refusing its DEST) is noticed
    by the write (EPIPE) or by the next read (EOF), by the timing of the two processes:
    either way the error is 'the peer closed the connection' (the write said 'went away
    (Broken pipe)', and `replicate`'s one line depended on which came first)."""
    r, w = os.pipe()
    os.close(r)
    rr, ww = os.pipe()
    ch = PipeChannel(os.fdopen(rr, "rb", buffering=0), os.fdopen(w, "wb"), name="receiver")
    try:
        send = (lambda: ch.writev([memoryview(b"hello")])) if vectored else \
            (lambda: ch.write(b"hello"))
        with pytest.raises(PeerClosed, match=r"^receiver: the peer closed the connection$"):
            send()
    finally:
        ch.close()
        os.close(ww)


@pytest.mark.parametrize("tls", [False, True])
def test_a_killed_peer_over_tcp_closed_the_connection(tls: bool) -> None:
    """A receiver killed mid-transfer (`kill -9` of `replicate --listen`): the sender's
    writes then fail with a reset connection, or under TLS with 'EOF occurred in violation
    of protocol (_ssl.c:2427)', which the sender printed as it came. It is now the pipe's
    'the peer closed the connection'."""
    import socket

    from btrdelta import trust
    from btrdelta.update.channels import SocketChannel, tls_client, tls_server

    server_key, client_key = trust.generate_key(), trust.generate_key()
    lsock = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def serve() -> None:
        sock, _ = lsock.accept()
        if tls:
            ch, _ = tls_server(sock, server_key, [client_key.public_key()], "sender")
            sock = ch.sock
        accepted.append(sock)

    t = threading.Thread(target=serve)
    t.start()
    sock = socket.create_connection(lsock.getsockname())
    ch = tls_client(sock, client_key, server_key.public_key(), "receiver") if tls else \
        SocketChannel(sock, "receiver")
    t.join()
    lsock.close()
    # the kernel closes a killed process's socket: unread bytes make it a reset
    accepted[0].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    accepted[0].close()

    def flood() -> None:
        for _ in range(1000):
            ch.write(b"x" * 65536)
            ch.writev([memoryview(b"y" * 65536)])

    try:
        with pytest.raises(PeerClosed, match=r"^receiver: the peer closed the connection$"):
            flood()
    finally:
        ch.close()
