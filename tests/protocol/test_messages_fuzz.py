"""Any bytes a replication peer sends: a message, or one :class:`ProtocolError` (exit code 9,
one line), never another exception. Payloads are made of TLVs of the protocol's types with
values of the sizes its fields have (and of others, and random bytes), in every protocol
version (versions 1 to 4 carry DATA's bytes in TLVs; 5 in one piece); then whole
conversations: a sender's HELLO and PLAN, then such messages framed with their CRC32C
right, read by a receiver's :class:`Connection`."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from btrdelta.errors import ProtocolError
from btrdelta.protocol import EOF, NEED_DATA, Accept, Connection, Hello, Holdings
from btrdelta.protocol.messages import DATA, VERSIONS, decode
from btrdelta.stream import btrfs_crc32c

from .test_machine import PLAN

_VALUE = st.one_of(
    st.binary(min_size=0, max_size=0), st.binary(min_size=2, max_size=2),
    st.binary(min_size=8, max_size=8), st.binary(min_size=16, max_size=16),
    st.binary(min_size=32, max_size=32), st.binary(min_size=40, max_size=40),
    st.binary(min_size=64, max_size=64), st.binary(min_size=72, max_size=72),
    st.binary(max_size=90))


def _tlv(t: int, v: bytes, cut: int) -> bytes:
    """A TLV; ``cut`` > 0: its length field says ``cut`` bytes more (or fewer) than it has."""
    n = len(v) + cut if 0 <= len(v) + cut <= 0xFFFF else len(v)
    return struct.pack("<HH", t, n) + v


_TLVS = st.lists(st.tuples(st.integers(0, 24), _VALUE, st.sampled_from([0, 0, 0, 1, -1, 7])),
                 max_size=8).map(lambda ts: b"".join(_tlv(*t) for t in ts))
_PAYLOAD = st.tuples(_TLVS, st.binary(max_size=5)).map(lambda p: p[0] + p[1])


@settings(max_examples=1000, deadline=None)
@given(cmd=st.integers(0, 12), payload=_PAYLOAD, version=st.sampled_from((0, *VERSIONS)))
def test_any_payload_is_a_message_or_a_protocol_error(cmd: int, payload: bytes,
                                                      version: int) -> None:
    try:
        decode(cmd, memoryview(payload), 0, len(payload), version)
    except ProtocolError:
        pass


def test_a_data_message_whose_tlvs_run_past_its_end_is_a_protocol_error() -> None:
    """(was a StreamFormatError: exit code 3 and 'the stream cannot be applied', not a
    protocol error, from a peer speaking versions 1 to 4)"""
    good = struct.pack("<HHQ", 1, 8, 0) + _tlv(2, b"x" * 10, 0)
    assert decode(DATA, memoryview(good), 0, len(good), 1).data == b"x" * 10  # type: ignore[union-attr]
    for bad in (good + b"\x02\x00", good[:-1] + b"", struct.pack("<HHQ", 1, 8, 0)
                + _tlv(2, b"x" * 10, 1)):
        for version in (1, 2, 3, 4):
            with pytest.raises(ProtocolError, match=r"^DATA: "):
                decode(DATA, memoryview(bad), 0, len(bad), version)


def _frame(cmd: int, payload: bytes) -> bytes:
    head = struct.pack("<IHI", len(payload), cmd, 0)
    crc = btrfs_crc32c([head, payload])
    return struct.pack("<IHI", len(payload), cmd, crc) + payload


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(version=st.sampled_from(VERSIONS),
       frames=st.lists(st.tuples(st.sampled_from([DATA, DATA, 7, 9, 3, 4, 1, 0, 11]),
                                 _PAYLOAD), max_size=6),
       tail=st.binary(max_size=12))
def test_a_receiver_reads_any_conversation_as_messages_or_one_protocol_error(
        version: int, frames: list[tuple[int, bytes]], tail: bytes) -> None:
    """A receiver past HELLO and PLAN (in ``version``), given framed messages of any
    payload: each is a message or the conversation ends with one ProtocolError (and stays
    failed)."""
    r, s = Connection("receiver"), Connection("sender")
    r.receive_data(s.send(Hello("sender", (version,), (), "store", "/data")))
    assert isinstance(r.next_event(), Hello)
    s.receive_data(r.send(Hello("receiver", (version,), ("encoded",), "rid", "/dest")))
    s.receive_data(r.send(Holdings((), None)))
    assert isinstance(s.next_event(), Hello)
    assert s.next_event() == Holdings((), None)
    r.receive_data(s.send(PLAN))
    assert r.next_event() == PLAN
    r.send(Accept(PLAN.session))
    r.receive_data(b"".join(_frame(c, p) for c, p in frames) + tail)
    r.receive_data(b"")
    failed: ProtocolError | None = None
    for _ in range(len(frames) + 2):
        try:
            got = r.next_event()
        except ProtocolError as exc:
            failed = exc
            break
        if got is NEED_DATA or got is EOF:
            break
    if failed is not None:
        with pytest.raises(ProtocolError) as again:
            r.next_event()
        assert again.value is failed

