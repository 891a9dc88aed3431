"""``delta make``'s input: commands with their raw bytes, on the shared framing."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

import blake3
import pytest

from btrdelta.delta import MakeOptions
from btrdelta.delta.commands import RawCommands
from btrdelta.delta.diffing import Group, canonical_write, diff_group, raw_commands
from btrdelta.delta.format import HashAlgo
from btrdelta.errors import ChecksumError, StreamFormatError
from btrdelta.stream import StreamReader, StreamWriter
from btrdelta.stream import records as R
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


def test_a_diffed_group_holds_its_content_once(tmp_path: Path) -> None:
    """While a file is diffed, its WRITEs keep only their headers and views of the joined
    content (a 35 MB library was held twice: 33 MiB more at the peak); the group's raw
    commands are still the ones read, byte for byte, when no patch is worth writing."""
    (tmp_path / "f").write_bytes(os.urandom(100_000))
    new = os.urandom(120_000)  # unrelated: no patch is smaller than the data
    out: list[bytes] = []
    w = StreamWriter(out.append, 1)
    w.write(R.Snapshot(b"B", uuid.UUID(int=1), 9, uuid.UUID(int=2), 8))
    for off in range(0, len(new), 49152):
        w.write(R.Write(b"f", off, new[off : off + 49152]))
    w.write(R.End())
    stream = b"".join(bytes(p) for p in out)
    _, raws, _ = _read_all(stream)
    group = Group(b"f", b"f", 1, True)
    group.old_size = 100_000
    reader = RawCommands(io.BytesIO(stream), "in", HashAlgo.BLAKE3)
    reader.header()
    while type((r := reader.command()).rec) is not End:
        if type(r.rec) is R.Write:
            assert canonical_write(r, 1)
            group.records.append(r)
    assert len(group.records) == 3
    assert diff_group(tmp_path, group, MakeOptions(min_file_size=1), None) is None
    assert group.held
    assert all(len(r.raw) < 100 for r in group.records)  # headers only
    views = {r.rec.data.obj for r in group.records}  # type: ignore[union-attr]
    assert len(views) == 1  # one content
    assert [bytes(b) for b in raw_commands(group)] == raws[2:5]
