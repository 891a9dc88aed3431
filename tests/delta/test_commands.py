"""``delta make``'s input: commands with their raw bytes, on the shared framing."""

from __future__ import annotations

import io
from pathlib import Path

import blake3
import pytest

from btrdelta.delta.commands import RawCommands
from btrdelta.delta.format import HashAlgo
from btrdelta.errors import ChecksumError, StreamFormatError
from btrdelta.stream import StreamReader
from btrdelta.stream.records import End
from tests.conftest import committed_streams


def _read_all(data: bytes) -> tuple[RawCommands, list[bytes], list[object]]:
    reader = RawCommands(io.BytesIO(data), "in", HashAlgo.BLAKE3)
    raws: list[bytes] = []
    recs: list[object] = []
    while reader.header() is not None:
        raws.append(bytes(data[reader.offset - 17 : reader.offset]))
        while True:
            r = reader.command()
            raws.append(bytes(r.raw))
            recs.append(r.rec)
            if type(r.rec) is End:
                break
    return reader, raws, recs


@pytest.mark.parametrize("path", committed_streams(), ids=lambda p: p.name)
def test_every_byte_once_and_the_records_of_the_stream(path: Path) -> None:
    data = path.read_bytes()
    reader, raws, recs = _read_all(data)
    assert b"".join(raws) == data
    assert recs == list(StreamReader(io.BytesIO(data)))
    assert (reader.offset, reader.index) == (len(data), len(recs))
    assert bytes(reader.hash.digest()) == blake3.blake3(data).digest()


def test_damaged_input_is_named() -> None:
    data = next(p for p in committed_streams() if p.name.startswith("xattrs.A.v2")).read_bytes()
    with pytest.raises(StreamFormatError, match="empty stream"):
        _read_all(b"")
    for cut in (5, 17, 20, len(data) - 3):
        with pytest.raises(StreamFormatError) as err:
            _read_all(data[:cut])
        assert err.value.offset is not None
        assert str(err.value).startswith("in: offset ")
    bad = bytearray(data)
    bad[40] ^= 1  # inside the first command (SUBVOL)
    with pytest.raises(ChecksumError) as crc:
        _read_all(bytes(bad))
    assert (crc.value.offset, crc.value.index, crc.value.command) == (17, 0, "SUBVOL")
