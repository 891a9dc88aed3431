"""The shared framing: the table of which record is legal where, and the sans-I/O framer."""

from __future__ import annotations

import struct
import subprocess
import sys
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from btrdelta.delta import parser as delta_parser
from btrdelta.delta.format import INNER_RECORDS
from btrdelta.errors import ChecksumError, StreamFormatError
from btrdelta.stream import EOF, NEED_DATA, Cmd, reader
from btrdelta.stream.codec import command_crc
from btrdelta.stream.constants import COMMAND_SPECS, MAX_PAYLOAD
from btrdelta.stream.decode import decode_payload
from btrdelta.stream.framing import (
    _LEGAL_AT,
    RECORDS,
    DCmd,
    Framer,
    Framing,
    Place,
    legal,
    max_command,
    send_place,
)


def _frame(cmd: int, payload: bytes, crc: int | None = None) -> bytes:
    value = command_crc(len(payload), cmd, payload) if crc is None else crc
    return struct.pack("<IHI", len(payload), cmd, value) + payload


#: a made-up format on the same framing, as the replication protocol will be
_TOY = Framing(
    eof="toy input ended before BYE", short_header="toy frame header cut",
    too_long="toy frame {length} > {limit}", truncated="toy frame cut at {avail}/{total}",
    names={1: "HELLO", 2: "BYE"}, max_payload=lambda cmd, version: 64 if cmd == 1 else 8,
)


def test_the_table_follows_the_send_stream_versions() -> None:
    for cmd, spec in COMMAND_SPECS.items():
        for v in (1, 2, 3):
            assert legal(cmd, send_place(v)) == (spec.version <= v), (cmd, v)
        # every btrfs command passes through a delta stream, raw or carried
        assert legal(cmd, Place.DELTA)
        assert legal(cmd, Place.CARRIER)
        assert legal(cmd, Place.SEND)
    assert [max_command(v) for v in (1, 2, 3)] == [Cmd.UPDATE_EXTENT, Cmd.ENCODED_WRITE,
                                                    Cmd.ENABLE_VERITY]
    # commands are added at the end of the numbering, never in between
    for v in (1, 2, 3):
        top = max_command(v)
        assert all(legal(cmd, send_place(v)) == (0 < cmd <= top) for cmd in range(300)), v
    for bad in (0, 27, 199, 208, 0xFFFF):
        assert not any(legal(bad, p) for p in Place)
        with pytest.raises(StreamFormatError, match=f"unknown command number {bad}"):
            decode_payload(bad, memoryview(b""), 0, 0, 3)


def test_the_start_up_tables_are_the_flags_and_no_decoder_is_made_ahead() -> None:
    """The table of each place is made from the flags' values read once (a flag's ``&``
    and ``.value`` run Python code: ~1.7 M instructions of every start-up, with the
    C accelerator's limits); it is what the flags' ``&`` says. The stream package, its
    writer and the encoder import no decoder (a send decodes nothing), and importing the
    decoder makes no decoding plan: a plan is made at a command's first decoding."""
    for place in Place:
        assert _LEGAL_AT[place] == frozenset(c for c, w in RECORDS.items() if w & place)
    code = ("import sys\nfrom btrdelta.stream import Cmd, codec, writer\n"
            "print('btrdelta.stream.decode' in sys.modules)\n"
            "from btrdelta.stream import decode\nprint(len(decode._DECODERS))\n"
            "from btrdelta.stream.records import Chmod\n"
            "payload = b''.join(codec.encode_record(Chmod(b'a', 0o644), 1)[1:])\n"
            "print(decode.decode_payload(Cmd.CHMOD, memoryview(payload), 0, len(payload), 1),"
            " sorted(decode._DECODERS) == [Cmd.CHMOD])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["False", "0", "Chmod(path=b'a', mode=420) True"]


def test_the_table_places_the_delta_records() -> None:
    top = {c for c in DCmd if legal(c, Place.DELTA)}
    assert top == set(DCmd) - {DCmd.CPATCH}
    assert INNER_RECORDS == {c for c in DCmd if legal(c, Place.CARRIER)} == {
        DCmd.PATCH, DCmd.PDATA, DCmd.PWRITE, DCmd.PENC, DCmd.CPATCH}
    assert not any(legal(c, Place.SEND) for c in DCmd)
    assert set(RECORDS) == {int(c) for c in COMMAND_SPECS} | set(DCmd)


def test_both_parsers_share_one_sentinel() -> None:
    assert reader.NEED_DATA is delta_parser.NEED_DATA is NEED_DATA
    assert reader.EOF is delta_parser.EOF is EOF
    assert NEED_DATA.__class__ is EOF.__class__


def _frames(data: bytes, cuts: list[int]) -> list[tuple[int, bytes]]:
    """Frames of ``data`` fed in pieces cut at ``cuts``, each taken as soon as it is whole."""
    fr = Framer(_TOY, source="toy")
    got: list[tuple[int, bytes]] = []
    pos = 0
    for cut in [*sorted(cuts), len(data)]:
        if cut > pos:
            fr.feed(data[pos:cut])
            pos = cut
        while (frame := fr.next_frame()) is not NEED_DATA:
            cmd, mv, start, length = frame
            got.append((cmd, bytes(mv[start + 10 : start + 10 + length])))
            fr.consume(10 + length)
    fr.feed(b"")
    assert fr.avail == 0
    assert fr.offset == len(data)
    assert fr.index == len(got)
    return got


@given(st.lists(st.tuples(st.sampled_from([1, 2]), st.binary(max_size=8)), max_size=6),
       st.lists(st.integers(0, 120), max_size=8))
def test_any_split_gives_the_same_frames(msgs: list[tuple[int, bytes]], cuts: list[int]) -> None:
    data = b"".join(_frame(c, p) for c, p in msgs)
    assert _frames(data, [c for c in cuts if c < len(data)]) == msgs


def test_a_frame_inside_one_buffer_is_a_view_and_a_split_one_is_copied_once() -> None:
    one, two = _frame(1, b"a" * 40), _frame(1, b"b" * 40)
    buf = bytearray(one + two[:20])
    fr = Framer(_TOY)
    fr.feed(buf)
    _cmd, mv, start, length = fr.next_frame()  # type: ignore[misc]
    assert mv.obj is buf
    assert start == 0
    fr.consume(10 + length)
    assert fr.next_frame() is NEED_DATA
    fr.feed(two[20:])
    _cmd, mv, start, length = fr.next_frame()  # type: ignore[misc]
    assert mv.obj is not buf
    assert len(mv) == len(two)
    assert bytes(mv[10:]) == b"b" * 40


def test_framing_errors_are_located_and_kept() -> None:
    fr = Framer(_TOY, source="toy")
    fr.feed(_frame(2, b"12345678") + _frame(2, b"123456789"))
    frame = fr.next_frame()
    assert frame is not NEED_DATA
    fr.consume(18)
    with pytest.raises(StreamFormatError, match="toy frame 9 > 8") as err:
        fr.next_frame()
    assert (err.value.offset, err.value.index, err.value.command) == (18, 1, "BYE")
    assert fr.failed is err.value
    assert "toy: offset 18" in str(err.value)


@pytest.mark.parametrize(("data", "match"), [
    (b"", "toy input ended before BYE"),
    (b"\x01\x00", "toy frame header cut"),
    (_frame(1, b"abc")[:-1], "toy frame cut at 12/13"),
])
def test_end_of_input_in_the_wrong_place(data: bytes, match: str) -> None:
    fr = Framer(_TOY)
    fr.feed(data)
    fr.feed(b"")
    with pytest.raises(StreamFormatError, match=match):
        fr.next_frame()


def test_crc_is_checked_before_a_frame_is_returned() -> None:
    data = bytearray(_frame(1, b"payload"))
    data[-1] ^= 1
    fr = Framer(_TOY)
    fr.feed(bytes(data))
    with pytest.raises(ChecksumError, match="CRC32C mismatch") as err:
        fr.next_frame()
    assert err.value.command == "HELLO"
    unchecked = Framer(_TOY, verify_crc=False)
    unchecked.feed(bytes(data))
    assert unchecked.next_frame() is not NEED_DATA


def test_a_huge_length_is_refused_before_any_allocation() -> None:
    fr = Framer(reader.SEND_FRAMING)
    fr.version = 1
    fr.feed(struct.pack("<IHI", 0xFFFFFFF0, 15, 0))
    tracemalloc.start()
    try:
        assert fr.needed() == MAX_PAYLOAD[1]  # a read hint is capped by the limit
        with pytest.raises(StreamFormatError, match="exceeds the v1 limit of 65526"):
            fr.next_frame()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 16
