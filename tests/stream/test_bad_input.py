"""Untrusted streams: every kind of damage gives StreamFormatError with offset and record."""

from __future__ import annotations

import io
import struct
import tracemalloc
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from btrdelta.errors import ChecksumError, StreamFormatError, UnsupportedVersionError
from btrdelta.stream import StreamParser, StreamReader, StreamWriter
from btrdelta.stream.codec import command_crc
from btrdelta.stream.records import End, Mkfile, Subvol, Write
from tests.conftest import committed_streams

# every test runs with the C accelerator and with pure Python (tests/stream/conftest.py)
pytestmark = pytest.mark.usefixtures("backend")

HDR = b"btrfs-stream\0" + struct.pack("<I", 2)


def _cmd(cmd: int, payload: bytes) -> bytes:
    return struct.pack("<IHI", len(payload), cmd, command_crc(len(payload), cmd, payload)) + payload


def _tlv(t: int, v: bytes) -> bytes:
    return struct.pack("<HH", t, len(v)) + v


def _subvol() -> bytes:
    return _cmd(1, _tlv(15, b"s") + _tlv(1, bytes(16)) + _tlv(2, struct.pack("<Q", 1)))


def _read(data: bytes) -> list[object]:
    return list(StreamReader(io.BytesIO(data), source="t"))


def _small_stream() -> bytes:
    out = io.BytesIO()
    w = StreamWriter(out.write, 2)
    w.write(Subvol(b"s", uuid.UUID(int=1), 7))
    w.write(Mkfile(b"o257-1-0", 257))
    w.write(Write(b"o257-1-0", 0, b"hello" * 100))
    w.write(End())
    return out.getvalue()


def test_truncation_anywhere_is_an_error_with_offset() -> None:
    data = _small_stream()
    for cut in range(len(data)):
        with pytest.raises(StreamFormatError) as err:
            _read(data[:cut])
        assert err.value.offset is not None
        assert "offset" in str(err.value)


@pytest.mark.parametrize(
    ("data", "match", "exc"),
    [
        (b"", "empty stream", StreamFormatError),
        (b"btrfs-streaX\0\x01\0\0\0", "bad magic", StreamFormatError),
        (b"btrfs-stream\0\x04\0\0\0", "unsupported stream version 4", UnsupportedVersionError),
        (b"btrfs-stream\0\0\0\0\0", "unsupported stream version 0", UnsupportedVersionError),
        (HDR + _cmd(99, b""), "unknown command number 99", StreamFormatError),
        (HDR + _cmd(0, b""), "unknown command number 0", StreamFormatError),
        (HDR + _subvol() + _cmd(3, _tlv(15, b"a") + struct.pack("<HH", 3, 50) + b"x" * 8),
         "INO .length 50. overruns", StreamFormatError),
        (HDR + _subvol() + _cmd(3, _tlv(15, b"a") + _tlv(3, b"\0" * 4)), "invalid size",
         StreamFormatError),
        (HDR + _subvol() + _cmd(3, _tlv(15, b"a") + _tlv(36, b"")), "invalid attribute type 36",
         StreamFormatError),
        (HDR + _subvol() + _cmd(3, _tlv(15, b"a")), "missing attribute INO", StreamFormatError),
        (HDR + _subvol() + _cmd(3, _tlv(15, b"a") + _tlv(15, b"b") + _tlv(3, bytes(8))),
         "duplicate attribute PATH", StreamFormatError),
        (HDR + _subvol() + _cmd(3, _tlv(15, b"a") + _tlv(3, bytes(8)) + _tlv(5, bytes(8))),
         "MODE is not valid for MKFILE", StreamFormatError),
        (HDR + _subvol() + struct.pack("<IHI", 0xFFFFFFFF, 15, 0), "exceeds the v2 limit",
         StreamFormatError),
        (HDR + _subvol(), "no END", StreamFormatError),
        (b"btrfs-stream\0\x01\0\0\0" + _cmd(25, b""), "ENCODED_WRITE does not exist",
         StreamFormatError),
        # a DATA attribute in v1 form (with a length) in a v2 stream, not last
        (HDR + _subvol() + _cmd(15, _tlv(15, b"f") + _tlv(19, b"abc") + _tlv(18, bytes(8))),
         "missing attribute FILE_OFFSET .*v1-form DATA", StreamFormatError),
    ],
)
def test_damage_is_named(data: bytes, match: str, exc: type[Exception]) -> None:
    with pytest.raises(exc, match=match) as err:
        _read(data)
    assert "offset" in str(err.value)
    if data[:13] == b"btrfs-stream\0" and len(data) > 17 + 10:
        assert err.value.index is not None  # type: ignore[attr-defined]


def test_crc_mismatch_names_offset_record_and_command() -> None:
    data = bytearray(_small_stream())
    data[-20] ^= 0x40  # inside the WRITE payload
    with pytest.raises(ChecksumError) as err:
        _read(bytes(data))
    assert err.value.index == 2
    assert err.value.command == "WRITE"
    text = str(err.value)
    assert text.startswith("t: offset ")
    assert "record 2 (WRITE)" in text
    assert "CRC32C mismatch" in text


def test_huge_length_field_allocates_nothing() -> None:
    data = HDR + _subvol() + struct.pack("<IHI", 0xFFFFFFF0, 15, 0) + b"x" * 100
    tracemalloc.start()
    try:
        with pytest.raises(StreamFormatError):
            _read(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def test_v1_stream_rejects_oversized_command() -> None:
    v1 = b"btrfs-stream\0\x01\0\0\0"
    with pytest.raises(StreamFormatError, match="v1 limit"):
        _read(v1 + struct.pack("<IHI", 70_000, 15, 0))


_CORPUS = [p.read_bytes() for p in committed_streams()[:12]] or [_small_stream()]


_OPS = st.lists(
    st.tuples(st.sampled_from(["flip", "cut", "insert", "delete"]), st.integers(0, 2**32),
              st.integers(1, 255), st.binary(min_size=1, max_size=16)),
    min_size=1, max_size=6,
)


def mutate(data: bytes, ops: list[tuple[str, int, int, bytes]]) -> bytearray:
    """Apply drawn damage (flip, cut, insert, delete) to a copy of ``data``."""
    buf = bytearray(data)
    for op, where, val, blob in ops:
        pos = where % (len(buf) + 1)
        if op == "flip" and pos < len(buf):
            buf[pos] ^= val
        elif op == "cut":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = blob
        else:
            del buf[pos : pos + val % 17]
    return buf


@given(st.integers(0, len(_CORPUS) - 1), _OPS)
def test_mutations_raise_only_our_error(which: int, ops: list[tuple[str, int, int, bytes]]) -> None:
    buf = mutate(_CORPUS[which], ops)
    for verify in (True, False):  # without CRCs the decoder itself is exercised
        parser = StreamParser(verify_crc=verify)
        if buf:
            parser.feed(bytes(buf))
        parser.feed(b"")
        try:
            list(parser)
        except StreamFormatError:
            pass


def test_cli_error_is_one_line_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from btrdelta.cli import main

    data = bytearray(_small_stream())
    data[-20] ^= 1
    bad = tmp_path / "bad.stream"
    bad.write_bytes(bytes(data))
    for cmd in ("dump", "verify", "stat"):
        code = main([cmd, "-f", str(bad)])
        err = capsys.readouterr().err
        assert code == 5
        assert err.count("\n") == 1
        assert "Traceback" not in err
        assert f"{bad}: offset" in err
        assert "record 2 (WRITE)" in err
    trunc = tmp_path / "trunc.stream"
    trunc.write_bytes(bytes(_small_stream())[:-5])
    assert main(["verify", "-f", str(trunc)]) == 3
    assert "truncated" in capsys.readouterr().err
