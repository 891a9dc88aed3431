"""The sender's outbox and the receiver's inbox, threaded or not.

Outbox: a segment's bytes are written only after the ACK of the one before (at most one
segment unacknowledged on the wire) while the sender's thread goes on making the next one,
or with a window, while the bytes unacknowledged stay within it;
the threaded outbox writes the bytes the unthreaded one writes; an error of the writing
thread (a REFUSE instead of an ACK) reaches the sender's thread. Inbox: the same bytes and
acknowledgements threaded or not, a segment that does not match its CHECKPOINT raised in the
engine's thread. Oracle: a peer :class:`Connection` decoding the wire, and the other mode.
"""

from __future__ import annotations

import queue
import random
import threading
from typing import Any

import pytest

from btrdelta.errors import ProtocolError
from btrdelta.protocol import Ack, Checkpoint, Connection, Data, Refuse
from btrdelta.protocol.messages import segment_hasher
from btrdelta.update.channels import MessageIO, PeerClosed, PeerRefused
from btrdelta.update.inbox import Inbox, chain_next
from btrdelta.update.outbox import Outbox
from tests.protocol.test_machine import PLAN, _to_stream

ZERO = "00" * 32


class _Peer:
    """A channel to a receiving Connection: what is written is decoded and logged; each
    CHECKPOINT's ACK is read back once the test releases it (all at once unless gated)."""

    def __init__(self, r: Connection, *, gated: bool, refuse: bool = False) -> None:
        self.r, self.gated, self.refuse = r, gated, refuse
        self.wire = bytearray()
        self.log: list[tuple[str, int]] = []
        self.acks: queue.Queue[bytes] = queue.Queue()
        self.held: list[bytes] = []
        self.lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self.lock:
            self.wire += data
            self.r.receive_data(bytes(data))
            while isinstance(msg := self.r.next_event(), Data | Checkpoint):
                if isinstance(msg, Data):
                    self.log.append(("data", msg.offset))
                    continue
                self.log.append(("checkpoint", msg.index))
                reply = self.r.send(Refuse("failed", "no room") if self.refuse
                                    else Ack(msg.index, msg.offset))
                if self.gated:
                    self.held.append(reply)
                else:
                    self.acks.put(reply)

    def release(self) -> None:
        with self.lock:
            self.acks.put(self.held.pop(0))

    def read(self, n: int) -> bytes:
        return self.acks.get(timeout=30)

    def close(self) -> None:
        pass


def _segments(rng: random.Random) -> list[list[bytes]]:
    return [[rng.randbytes(rng.randrange(1, 200_000)) for _ in range(3)] for _ in range(3)]


def _produce(out: Outbox, segs: list[list[bytes]], made: list[int] | None = None) -> None:
    at = 0
    for index, seg in enumerate(segs):
        for piece in seg:
            out.data(at, [piece])
            at += len(piece)
        out.checkpoint(Checkpoint(index, at, "ab" * 16, "cd" * 32))
        if made is not None:
            made.append(index)


def _wait(cond: Any) -> None:
    for _ in range(3000):
        if cond():
            return
        threading.Event().wait(0.01)
    raise AssertionError("timed out")


def test_one_segment_unacknowledged_while_the_next_is_made() -> None:
    segs = _segments(random.Random(1))
    s, r = _to_stream()
    peer = _Peer(r, gated=True)
    out = Outbox(MessageIO(peer, s), threaded=True, ahead=1 << 20)
    made: list[int] = []
    producer = threading.Thread(target=_produce, args=(out, segs, made))
    producer.start()
    _wait(lambda: ("checkpoint", 0) in peer.log and len(made) >= 2)
    # segment 1 is made (its CHECKPOINT handed over) but none of its bytes written
    assert peer.log[-1] == ("checkpoint", 0)
    peer.release()
    _wait(lambda: ("checkpoint", 1) in peer.log)
    assert peer.log[-1] == ("checkpoint", 1)
    peer.release()
    _wait(lambda: ("checkpoint", 2) in peer.log)
    peer.release()
    producer.join()
    out.finish()
    assert out.sent == sum(len(p) for seg in segs for p in seg)
    # the same bytes as written without the thread
    s2, r2 = _to_stream()
    plain = _Peer(r2, gated=False)
    out2 = Outbox(MessageIO(plain, s2), threaded=False, ahead=1 << 20)
    _produce(out2, segs)
    assert bytes(plain.wire) == bytes(peer.wire)
    assert plain.log == peer.log


def test_a_window_lets_the_next_segment_out_before_the_last_is_acknowledged() -> None:
    # segments of 300,000 bytes and a window of two: segment 1 goes out while segment 0 is
    # not acknowledged, segment 2's first byte only after ACK 0 (the unacknowledged bytes
    # would be 700,000), segment 3's after ACK 1; finish() reads the ACKs still due
    segs = [[bytes([i]) * 100_000 for _ in range(3)] for i in range(4)]
    s, r = _to_stream()
    peer = _Peer(r, gated=True)
    out = Outbox(MessageIO(peer, s), threaded=True, ahead=1 << 20, window=600_000)
    producer = threading.Thread(target=_produce, args=(out, segs))
    producer.start()
    _wait(lambda: ("checkpoint", 1) in peer.log)
    threading.Event().wait(0.2)
    assert peer.log[-1] == ("checkpoint", 1)  # no byte of segment 2 without ACK 0
    peer.release()
    _wait(lambda: ("checkpoint", 2) in peer.log)
    threading.Event().wait(0.2)
    assert peer.log[-1] == ("checkpoint", 2)
    peer.release()
    _wait(lambda: ("checkpoint", 3) in peer.log)
    producer.join()
    finishing = threading.Thread(target=out.finish)
    finishing.start()
    threading.Event().wait(0.2)
    assert finishing.is_alive()  # ACKs 2 and 3 not there yet
    peer.release()
    peer.release()
    finishing.join(30)
    assert not finishing.is_alive()
    assert out.sent == 1_200_000
    # the same bytes without the thread
    s2, r2 = _to_stream()
    plain = _Peer(r2, gated=False)
    out2 = Outbox(MessageIO(plain, s2), threaded=False, ahead=1 << 20, window=600_000)
    _produce(out2, segs)
    out2.finish()
    assert bytes(plain.wire) == bytes(peer.wire)


@pytest.mark.parametrize("threaded", [True, False])
def test_a_refusal_instead_of_an_ack_reaches_the_sender(threaded: bool) -> None:
    s, r = _to_stream()
    out = Outbox(MessageIO(_Peer(r, gated=False, refuse=True), s), threaded=threaded,
                 ahead=1 << 20)

    def run() -> None:
        _produce(out, _segments(random.Random(2)))
        out.finish()

    with pytest.raises(PeerRefused, match="no room"):
        run()


def _stream_wire(segs: list[list[bytes]], *, bad: int = -1) -> bytes:
    """The sender's messages of ``segs`` (segment ``bad`` with a wrong digest), then the
    end of the connection."""
    s, _r = _to_stream()
    wire: list[Any] = []
    at, chain = 0, ZERO
    for index, seg in enumerate(segs):
        h = segment_hasher(1)
        for piece in seg:
            wire += s.send_data(at, [piece])
            h.update(piece)
            at += len(piece)
        digest = h.hexdigest() if index != bad else "ee" * 32
        chain = chain_next(chain, digest)
        wire.append(s.send(Checkpoint(index, at, digest, chain)))
    return b"".join(bytes(b) for b in wire)


class _Reader:
    """A channel reading ``wire`` (in pieces of 70,000 bytes at most)."""

    def __init__(self, wire: bytes) -> None:
        self.wire, self.pos = wire, 0

    def read(self, n: int) -> bytes:
        piece = self.wire[self.pos:self.pos + min(n, 70_000)]
        self.pos += len(piece)
        return piece

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


def _drain(wire: bytes, threaded: bool) -> tuple[bytes, list[int]]:
    """The bytes an inbox gives until the end of ``wire``, and the checkpoints it had
    acknowledged then."""
    _s, r = _to_stream()
    io = MessageIO(_Reader(wire), r)
    acked: list[int] = []

    def ack(cp: Checkpoint) -> None:
        acked.append(cp.index)
        io.send(Ack(cp.index, cp.offset))

    inbox = Inbox(io, PLAN, 1, 0, 0, ZERO, ack, threaded=threaded)
    inbox.start()
    got = bytearray()

    def take_all() -> None:
        while (data := inbox.take()) is not None:
            got.extend(data)

    try:
        with pytest.raises(PeerClosed):
            take_all()
    finally:
        inbox.stop()
    return bytes(got), acked


@pytest.mark.parametrize("threaded", [True, False])
def test_the_inbox_reads_the_same_stream_threaded_or_not(threaded: bool) -> None:
    segs = _segments(random.Random(3))
    wire = _stream_wire(segs)
    got, acked = _drain(wire, threaded)
    assert got == b"".join(p for seg in segs for p in seg)
    assert acked == [0, 1, 2]


@pytest.mark.parametrize("threaded", [True, False])
def test_a_segment_unlike_its_checkpoint_is_raised_to_the_engine(threaded: bool) -> None:
    wire = _stream_wire(_segments(random.Random(4)), bad=1)
    with pytest.raises(ProtocolError, match="segment 1 does not match its checkpoint"):
        _drain(wire, threaded)
