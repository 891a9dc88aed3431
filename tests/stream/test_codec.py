"""Codec properties: records drawn from the attribute table round-trip; writer refusals."""

from __future__ import annotations

import io
import struct
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from btrdelta.errors import StreamFormatError, UnsupportedVersionError
from btrdelta.stream import (
    EOF,
    NEED_DATA,
    Cmd,
    StreamParser,
    StreamReader,
    StreamWriter,
    btrfs_crc32c,
    encode_record,
)
from btrdelta.stream.constants import ATTR_KIND, COMMAND_SPECS, MAX_PAYLOAD, Kind
from btrdelta.stream.records import (
    RECORD_TYPES,
    EnableVerity,
    EncodedWrite,
    End,
    Fallocate,
    Mkfile,
    Subvol,
    Utimes,
    Write,
)

# every test runs with the C accelerator and with pure Python (tests/stream/conftest.py)
pytestmark = pytest.mark.usefixtures("backend")

_NS = 10**9
_KIND_STRATEGY: dict[Kind, st.SearchStrategy[Any]] = {
    Kind.U8: st.integers(0, 255),
    Kind.U32: st.integers(0, 2**32 - 1),
    Kind.U64: st.integers(0, 2**64 - 1),
    Kind.UUID: st.uuids(),
    Kind.TIMESPEC: st.builds(lambda s, n: s * _NS + n, st.integers(-(2**63), 2**63 - 1),
                             st.integers(0, _NS - 1)),
    Kind.BYTES: st.binary(max_size=300),
    Kind.DATA: st.binary(max_size=3000),
}


@st.composite
def records(draw: st.DrawFn, cmd: Cmd | None = None) -> Any:
    """Any record, drawn field by field from the command/attribute tables."""
    if cmd is None:
        cmd = draw(st.sampled_from(sorted(c for c in COMMAND_SPECS if c != Cmd.END)))
    spec = COMMAND_SPECS[cmd]
    kwargs = {}
    for f in spec.fields:
        strat = _KIND_STRATEGY[ATTR_KIND[f.attr]]
        kwargs[f.name] = draw(st.none() | strat) if f.optional else draw(strat)
    return RECORD_TYPES[cmd](**kwargs)


def _encode_stream(recs: list[Any], version: int) -> bytes:
    out = io.BytesIO()
    w = StreamWriter(out.write, version)
    for r in recs:
        w.write(r)
    w.write(End())
    return out.getvalue()


@given(st.lists(records(), min_size=1, max_size=8), st.sampled_from([1, 2, 3]))
def test_decode_encode_roundtrip(recs: list[Any], version: int) -> None:
    recs = [r for r in recs if COMMAND_SPECS[r.cmd].version <= version]
    data = _encode_stream(recs, version)
    got = list(StreamReader(io.BytesIO(data)))
    assert got == [*recs, End()]
    # and encode(decode(b)) == b
    assert _encode_stream(got[:-1], version) == data


@given(st.lists(records(), min_size=1, max_size=6), st.data())
def test_any_split_of_a_stream_gives_the_same_records(recs: list[Any], data: st.DataObject) -> None:
    raw = _encode_stream(recs, 3)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    parser = StreamParser()
    got: list[Any] = []
    prev = 0
    for cut in [*cuts, len(raw)]:
        if cut == prev:
            continue  # an empty feed means EOF
        parser.feed(raw[prev:cut])
        prev = cut
        got.extend(parser)
    parser.feed(b"")
    while (ev := parser.next_event()) not in (NEED_DATA, EOF):
        got.append(ev)
    assert [g for g in got if type(g).__name__ != "StreamHeader"] == [*recs, End()]


def test_end_command_crc_vector() -> None:
    header = encode_record(End(), 1)[0]
    assert bytes(header) == bytes.fromhex("00000000150050 6cc99d".replace(" ", ""))
    assert btrfs_crc32c([struct.pack("<IHI", 0, 21, 0)]) == 0x9DC96C50


def test_writer_refuses_what_the_version_cannot_express() -> None:
    enc = EncodedWrite(b"f", 0, 4096, 4096, 0, 2, b"\0" * 4096)
    with pytest.raises(StreamFormatError, match="version 1"):
        encode_record(enc, 1)
    with pytest.raises(StreamFormatError, match="version 1"):
        encode_record(Fallocate(b"f", 3, 0, 4096), 1)
    with pytest.raises(StreamFormatError, match="version 2"):
        encode_record(EnableVerity(b"f", 1, 4096, b"", b""), 2)
    with pytest.raises(StreamFormatError, match="v1 DATA"):
        encode_record(Write(b"f", 0, bytes(70_000)), 1)
    with pytest.raises(StreamFormatError, match="limit"):
        encode_record(Write(b"f", 0, bytes(MAX_PAYLOAD[2] + 1)), 2)
    with pytest.raises(StreamFormatError, match="bad value"):
        encode_record(Mkfile(b"f", -1), 1)
    with pytest.raises(StreamFormatError, match="longer than 65535"):
        encode_record(Mkfile(b"x" * 70_000, 1), 2)
    with pytest.raises(UnsupportedVersionError):
        StreamWriter(io.BytesIO().write, 4)


def test_v2_data_is_not_copied_and_v1_otime_is_optional() -> None:
    payload = bytes(range(256)) * 512
    raw = _encode_stream([Subvol(b"s", uuid.UUID(int=5), 9), Write(b"f", 0, payload),
                          Utimes(b"f", 1, 2, 3)], 2)
    buf = bytearray(raw)
    parser = StreamParser()
    parser.feed(buf)
    events = list(parser)
    write = next(e for e in events if type(e) is Write)
    assert isinstance(write.data, memoryview)
    assert write.data.obj is buf  # a view of the fed buffer, not a copy
    assert bytes(write.data) == payload
    utimes = next(e for e in events if type(e) is Utimes)
    assert utimes.otime is None


def test_dump_of_an_unrepresentable_time_is_our_error(tmp_path: Any) -> None:
    from btrdelta.stream import TextDumper

    dumper = TextDumper()
    dumper.render([Subvol(b"s", uuid.UUID(int=1), 1)])
    with pytest.raises(StreamFormatError, match="failed to convert time"):
        dumper.render([Utimes(b"f", (2**62) * 10**9, 0, 0)])
