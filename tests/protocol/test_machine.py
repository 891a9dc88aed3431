"""The replication state machine, in memory: a whole conversation, and every way a peer can
break it (typed, located errors)."""

from __future__ import annotations

import struct
import uuid

import pytest

from btrdelta.errors import ProtocolError
from btrdelta.protocol import (
    EOF,
    NEED_DATA,
    Accept,
    Ack,
    Checkpoint,
    Commit,
    Committed,
    Connection,
    Data,
    Held,
    Hello,
    Holdings,
    Partial,
    Plan,
    Refuse,
)
from btrdelta.protocol.messages import decode, encode, encode_data, max_data
from btrdelta.protocol.plan import Known, choose
from btrdelta.stream.constants import CMD_HEADER_SIZE

U1, U2, U3 = uuid.UUID(int=1), uuid.UUID(int=2), uuid.UUID(int=3)
D = "ab" * 32
PLAN = Plan("incremental", "cd" * 16, "data.1", U2, 7, U1, D, 100, 1 << 20)


def _pipe(src: Connection, dst: Connection, msg: object) -> object:
    dst.receive_data(src.send(msg))  # type: ignore[arg-type]
    return dst.next_event()


def _to_stream() -> tuple[Connection, Connection]:
    s, r = Connection("sender"), Connection("receiver")
    assert _pipe(s, r, Hello("sender", (1,), (), "store", "/data")) == \
        Hello("sender", (1,), (), "store", "/data")
    _pipe(r, s, Hello("receiver", (1, 2), ("encoded",), "rid", "/dest"))
    assert s.version == 1
    held = Holdings((Held("data.0", U3, U1, 5, D),), Partial("cd" * 16, 0, 0, "00" * 32))
    assert _pipe(r, s, held) == held
    assert _pipe(s, r, PLAN) == PLAN
    _pipe(r, s, Accept(PLAN.session))
    return s, r


def test_a_whole_conversation() -> None:
    s, r = _to_stream()
    payload = bytes(range(256)) * 1000  # more than one TLV
    assert _pipe(s, r, Data(0, payload)) == Data(0, payload)
    _pipe(s, r, Checkpoint(0, len(payload), D, D))
    assert s.unacked == 1
    _pipe(r, s, Ack(0, len(payload)))
    assert s.unacked == 0
    _pipe(s, r, Commit(len(payload), D, D))
    assert _pipe(r, s, Committed("data.1", U2)) == Committed("data.1", U2)
    r.receive_data(b"")
    assert r.next_event() is EOF


def test_split_feeds_need_data() -> None:
    s, r = Connection("sender"), Connection("receiver")
    wire = s.send(Hello("sender", (1,), (), "x"))
    for i in range(len(wire) - 1):
        r.receive_data(wire[i:i + 1])
        assert r.next_event() is NEED_DATA
    r.receive_data(wire[-1:])
    assert isinstance(r.next_event(), Hello)


@pytest.mark.parametrize("bad", ["gap", "checkpoint", "ack", "commit", "order", "role"])
def test_order_and_offsets_are_enforced(bad: str) -> None:
    s, r = _to_stream()
    if bad == "gap":  # a DATA that skips bytes
        _pipe(s, r, Data(0, b"x" * 10))
        wire = Connection("sender")
        wire.phase, wire._offset, wire._header_sent = "stream", 20, True
        r.receive_data(wire.send(Data(20, b"y")))
        with pytest.raises(ProtocolError, match="DATA at offset 20, expected 10"):
            r.next_event()
        with pytest.raises(ProtocolError):  # the error sticks
            r.next_event()
        return
    if bad == "checkpoint":
        _pipe(s, r, Data(0, b"x" * 10))
        s._offset = 11  # a lying sender's checkpoint
        r.receive_data(s.send(Checkpoint(0, 11, D, D)))
        with pytest.raises(ProtocolError, match="CHECKPOINT 0 at 11"):
            r.next_event()
        return
    if bad == "ack":
        with pytest.raises(ProtocolError, match="ACK of checkpoint 0"):
            _pipe(r, s, Ack(0, 0))
        return
    if bad == "commit":
        _pipe(s, r, Data(0, b"x" * 10))
        with pytest.raises(ProtocolError, match="COMMIT of 10 bytes before"):
            s.send(Commit(10, D, D))
        return
    if bad == "order":
        with pytest.raises(ProtocolError, match="HOLDINGS is not allowed now"):
            _pipe(r, s, Holdings(()))
        return
    with pytest.raises(ProtocolError, match="comes from the receiver"):
        s.send(Ack(0, 0))


def test_malformed_bytes_are_located() -> None:
    s, r = Connection("sender", source="peer"), Connection("receiver", source="peer")
    wire = bytearray(s.send(Hello("sender", (1,), (), "x")))
    wire[-1] ^= 1
    r.receive_data(bytes(wire))
    with pytest.raises(ProtocolError, match=r"peer: offset 18, record 0.*CRC32C"):
        r.next_event()
    r2 = Connection("receiver")
    r2.receive_data(b"btrfs-stream\0\1\0\0\0\0")
    with pytest.raises(ProtocolError, match="not a btrdelta replication peer"):
        r2.next_event()
    r3 = Connection("receiver")
    from btrdelta.protocol.messages import header
    from btrdelta.stream.framing import encode_frame

    r3.receive_data(header() + encode_frame(77, []))
    with pytest.raises(ProtocolError, match="unknown message 77"):
        r3.next_event()
    r4 = Connection("receiver")
    r4.receive_data(header() + b"\xff\xff\xff\x7f" + bytes(6))
    with pytest.raises(ProtocolError, match="exceeds"):
        r4.next_event()
    r5 = Connection("receiver")
    r5.receive_data(header()[:5])
    r5.receive_data(b"")
    with pytest.raises(ProtocolError, match="closed before"):
        r5.next_event()


def test_versions_and_roles() -> None:
    s, r = Connection("sender"), Connection("receiver")
    _pipe(s, r, Hello("sender", (1,), (), "x"))
    with pytest.raises(ProtocolError, match="no common protocol version"):
        _pipe(r, s, Hello("receiver", (9,), (), "y"))
    r2 = Connection("receiver")
    with pytest.raises(ProtocolError, match="says it is a receiver"):
        _pipe(Connection("receiver"), r2, Hello("receiver", (1,), (), "x"))


def test_refusal_ends_the_conversation() -> None:
    s, r = Connection("sender"), Connection("receiver")
    _pipe(s, r, Hello("sender", (1,), (), "x"))
    _pipe(r, s, Hello("receiver", (1,), (), "y"))
    _pipe(r, s, Holdings(()))
    assert _pipe(s, r, Refuse("already-current", "nothing to do")) == \
        Refuse("already-current", "nothing to do")
    assert r.phase == "done"
    with pytest.raises(ProtocolError):
        r.send(Accept("00" * 16))


def test_every_message_round_trips() -> None:
    msgs = [Hello("sender", (1, 2), ("a", "b"), "id", "n"), Holdings(()), PLAN,
            Plan("full", "ee" * 16, "x", U1, 0, None, "", 0, 65536),
            Refuse("diverged", "text"), Accept("cd" * 16), Data(5, b"abc"),
            Checkpoint(3, 9, D, D), Ack(3, 9), Commit(9, D, ""), Committed("x", U1)]
    for m in msgs:
        frame = encode(m)
        got = decode(int.from_bytes(frame[4:6], "little"), memoryview(frame), CMD_HEADER_SIZE,
                     len(frame))
        assert got == m


def test_planning() -> None:
    k0, k1 = Known("00" * 32, U1, 1), Known("11" * 32, U2, 2)
    held = [Held("data.0", U3, U1, 1)]
    assert choose([k0, k1], held, name="data").kind == "incremental"
    assert choose([k0, k1], held, name="data").base == k0
    assert choose([], [], name="data").kind == "full"
    c = choose([k1], held, name="data")
    assert (c.kind, c.code) == ("refuse", "no-common-base")
    assert choose([k1], held, name="data", allow_full=True).kind == "full"
    c = choose([k0], [*held, Held("data.1", uuid.uuid4(), uuid.uuid4(), 9)], name="data")
    assert c.code == "diverged"
    assert choose([k0], held, name="data", current=k0.digest).code == "already-current"
    p = Partial("ab" * 16, 10, 1, D)
    assert choose([k0], held, name="data", partial=p, inflight_session="ab" * 16).kind == \
        "resume"
    assert choose([k0], held, name="data", partial=p, inflight_session="cd" * 16).kind == \
        "incremental"


@pytest.mark.parametrize("sizes", [[1], [10, 70_000, 3], [65535, 65535, 65536], [0, 5, 0],
                                   [262_144], [100] * 50, [131_072, 10, 131_062]])
def test_send_data_is_the_frame_of_the_joined_pieces(sizes: list[int]) -> None:
    pieces = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    s, r = _to_stream()
    s2, _ = _to_stream()
    joined = b"".join(pieces)
    views = [memoryview(p) if i % 2 else p for i, p in enumerate(pieces)]
    wire = s.send_data(0, views)
    assert b"".join(wire) == s2.send(Data(0, joined))  # byte for byte, CRC included
    # the pieces themselves (views of them), not copies
    assert {id(b.obj) for b in wire if isinstance(b, memoryview)} == {id(p) for p in pieces if p}
    r.receive_data(b"".join(wire))
    assert r.next_event() == Data(0, joined)
    with pytest.raises(ProtocolError, match=f"DATA at offset 0, expected {len(joined)}"):
        s.send_data(0, pieces)  # the same rules as send()
    with pytest.raises(ValueError, match="DATA of"):
        s.send_data(len(joined), [bytes(max_data(s.version) + 1)])
    fresh = Connection("sender")
    with pytest.raises(ProtocolError, match="not allowed now"):
        fresh.send_data(0, [b"x"])


def test_the_highest_version_both_list_and_its_segment_digest() -> None:
    import blake3
    import xxhash

    from btrdelta.protocol.messages import segment_hasher

    s, r = Connection("sender"), Connection("receiver")
    _pipe(s, r, Hello("sender", (1, 2), (), "x"))
    _pipe(r, s, Hello("receiver", (1, 2), (), "y"))
    assert s.version == r.version == 2
    s, r = Connection("sender"), Connection("receiver")
    _pipe(s, r, Hello("sender", (1, 2), (), "x"))
    _pipe(r, s, Hello("receiver", (1,), (), "y"))  # an older receiver
    assert s.version == r.version == 1
    data = bytes(range(256)) * 300
    for version, want in ((1, blake3.blake3(data).hexdigest()),
                          (2, xxhash.xxh3_128_hexdigest(data))):
        h = segment_hasher(version)
        h.update(data[:1000])
        h.update(data[1000:])
        assert h.hexdigest() == want
    # a CHECKPOINT carries either digest
    for d in ("ab" * 16, "ab" * 32):
        m = Checkpoint(1, 2, d, "cd" * 32)
        frame = encode(m)
        assert decode(7, memoryview(frame), CMD_HEADER_SIZE, len(frame)) == m


def _at_stream(version: int) -> tuple[Connection, Connection]:
    s, r = Connection("sender"), Connection("receiver")
    _pipe(s, r, Hello("sender", (version,), (), "x"))
    _pipe(r, s, Hello("receiver", (version,), (), "y"))
    _pipe(r, s, Holdings(()))
    plan = Plan("full", "cd" * 16, "data.1", U2, 7, None, "", 0, 1 << 20)
    _pipe(s, r, plan)
    _pipe(r, s, Accept(plan.session))
    return s, r


@pytest.mark.parametrize("version", [3, 4])
def test_data_carries_a_crc_before_version_4_only(version: int) -> None:
    """Version 4: DATA's CRC field is 0 and not checked (the stream's own CRCs and the
    segment digest cover its bytes); every other message keeps its CRC."""
    s, r = _at_stream(version)
    payload = bytes(range(256)) * 1000
    frame = bytearray(b"".join(bytes(b) for b in s.send_data(0, [payload])))
    stored = int.from_bytes(frame[6:10], "little")
    assert (stored == 0) == (version == 4)
    frame[6:10] = (0x12345678).to_bytes(4, "little")  # a CRC nobody computed
    r.receive_data(bytes(frame))
    if version == 3:
        with pytest.raises(ProtocolError, match="CRC32C"):
            r.next_event()
        return
    assert r.next_event() == Data(0, payload)
    # the same frame as send(Data) makes, and as encode_data without a CRC
    s2, _r2 = _at_stream(version)
    plain = b"".join(bytes(b) for b in encode_data(0, [payload], crc=False)[0])
    assert s2.send(Data(0, payload)) == plain
    # a CHECKPOINT's CRC is still checked
    cp = bytearray(s.send(Checkpoint(0, len(payload), "ab" * 16, "cd" * 32)))
    cp[-1] ^= 1
    r.receive_data(bytes(cp))
    with pytest.raises(ProtocolError, match="CRC32C"):
        r.next_event()


def test_data_in_version_5_is_one_piece_taken_as_a_view() -> None:
    """Version 5: DATA is its offset TLV, the bytes' type, then the bytes to the end of the
    message (no TLVs of 65535 bytes): the receiver's DATA is a view of the frame it read."""
    s, r = _at_stream(5)
    payload = bytes(range(256)) * 1000
    pieces = s.send_data(0, [payload[:1000], memoryview(payload)[1000:]])
    frame = bytearray(b"".join(bytes(b) for b in pieces))
    assert len(frame) == 10 + 14 + len(payload)
    assert int.from_bytes(frame[6:10], "little") == 0  # no CRC, as in version 4
    assert bytes(frame[10:24]) == struct.pack("<HHQH", 1, 8, 0, 2)
    assert bytes(frame[24:]) == payload
    r.receive_data(frame)
    got = r.next_event()
    assert isinstance(got, Data)
    assert got.offset == 0
    assert isinstance(got.data, memoryview)
    assert got.data.obj is frame
    assert got.data == payload
    # send(Data) makes the same frame; the next DATA follows it
    s2, _ = _at_stream(5)
    assert s2.send(Data(0, payload)) == bytes(frame)
    r.receive_data(b"".join(bytes(b) for b in s.send_data(len(payload), [b"xyz"])))
    assert r.next_event() == Data(len(payload), b"xyz")


@pytest.mark.parametrize(("body", "error"), [
    (b"", "without its offset"),
    (struct.pack("<HHQ", 1, 8, 0), "without its offset"),
    (struct.pack("<HHQH", 3, 8, 0, 2) + b"x", "without its offset"),
    (struct.pack("<HHQH", 1, 4, 0, 2) + b"x", "without its offset"),
    (struct.pack("<HHQH", 1, 8, 0, 7) + b"x", "without its bytes"),
    (struct.pack("<HHQH", 1, 8, 0, 2), "expected 0"),  # no bytes
    (struct.pack("<HHQH", 1, 8, 5, 2) + b"x", "expected 0"),  # not at the next offset
    (struct.pack("<HHQH", 1, 8, 0, 2) + bytes(max_data(5) + 1), "DATA of"),
])
def test_malformed_version_5_data_is_a_protocol_error(body: bytes, error: str) -> None:
    _s, r = _at_stream(5)
    r.receive_data(struct.pack("<IHI", len(body), 6, 0) + body)
    with pytest.raises(ProtocolError, match=error):
        r.next_event()
