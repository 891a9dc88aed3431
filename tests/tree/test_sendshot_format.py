"""The sendshot record format: round trip, digest, damaged records (located errors), and
records of version 1 (a file made by the btrdelta that wrote version 1) still read."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

import pytest
import zstandard

from btrdelta._value import replace
from btrdelta.errors import StreamFormatError, UnsupportedVersionError
from btrdelta.send.store import StoredSendshot, parse_grid, plan_prune
from btrdelta.tree.sendshot import VERSION, RecordInode, RecordReader, SendshotHead, write_record

HEAD = SendshotHead(stream_uuid=uuid.UUID(int=5), stream_ctransid=9, name=b"data",
                    created_ns=1_700_000_000 * 10**9, subvol_uuid=uuid.UUID(int=7),
                    parent="ab" * 32, source=b"/mnt/data", generation=42, seed=3,
                    tree_digest=b"t" * 32)


def _inodes() -> list[RecordInode]:
    root = RecordInode(256, 0o40755, 0, 0, 0, 1, 2, 3, [], generation=5, transid=6)
    big = RecordInode(257, 0o100644, 1000, 1000, 70_000 * 4096, 1, 2, 3, [(256, b"big")],
                      segments=[(0, 70_000 * 4096)], digest=b"x" * 16, bdigest=b"y" * 32,
                      blocks=bytes(range(256)) * (70_000 * 16 // 256),
                      xattrs={b"user.a": b"1", b"security.capability": b"\x01" * 20})
    link = RecordInode(258, 0o120777, 0, 0, 0, 1, 2, 3, [(256, b"ln"), (256, b"ln2")],
                       target=b"big", rdev=0)
    sub = RecordInode(259, 0o40700, 5, 6, 0, 1, 2, 3, [(256, b"sub")], flags=16)
    # a hole, a short last block; a hard link named in a directory that comes later
    holey = RecordInode(260, 0o100600, 0, 0, 3 * 4096 + 10, 1, 2, 3,
                        [(256, b"holey"), (259, b"again")], segments=[(0, 4096),
                                                                      (8192, 4106)],
                        digest=b"h" * 16, bdigest=b"H" * 32, blocks=bytes(range(48)))
    small = RecordInode(261, 0o100644, 0, 0, 100, 1, 2, 3, [(259, b"small")],
                        segments=[(0, 100)], digest=b"s" * 16, bdigest=b"S" * 32)
    empty = RecordInode(262, 0o100644, 0, 0, 0, 1, 2, 3, [(259, b"empty")], segments=[],
                        digest=b"e" * 16, bdigest=b"E" * 32)
    dev = RecordInode(263, 0o20644, 0, 0, 0, 1, 2, 3, [(259, b"dev")], rdev=0x801)
    return [root, big, link, sub, holey, small, empty, dev]


def _encode(version: int = VERSION) -> tuple[bytes, str]:
    out = io.BytesIO()
    digest, n = write_record(out.write, replace(HEAD, version=version), iter(_inodes()))
    assert n == 8
    return out.getvalue(), digest


def test_round_trip_and_digest() -> None:
    data, digest = _encode()
    reader = RecordReader(io.BytesIO(data), source="r")
    assert reader.head == HEAD
    assert reader.version == VERSION
    assert reader.head.content3
    got = list(reader.inodes())
    want = _inodes()
    want[5].blocks = b""  # below a block: none kept
    assert got == want
    assert reader.digest == digest
    assert _encode()[1] == digest  # deterministic
    assert len(data) < 70_000 * 16 + 4096  # block digests do not compress; the rest does


def _plain(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompressobj().decompress(data[22:])


def _repack(data: bytes, body: bytes) -> bytes:
    return data[:22] + zstandard.ZstdCompressor().compress(body)


def test_a_record_says_its_size_and_is_decoded_at_once(tmp_path: Path) -> None:
    """A record written now declares its size in its zstd frame: the reader decompresses
    it at once into one buffer (from a file or a buffer) and decodes what the stream decoder
    decodes of a record that does not say it (written before session 13) or of one in two
    zstd frames (the format allows several), with the same digest."""
    data, digest = _encode()
    body = _plain(data)
    assert zstandard.frame_content_size(data[22:]) == len(body)
    (tmp_path / "r").write_bytes(data)
    for whole in (False, True):  # (the head read alone first, or the record at once)
        with open(tmp_path / "r", "rb") as f:
            reader = RecordReader(f, source="r", whole=whole)
            want = list(reader.inodes())
        assert reader._reader is None  # one buffer, no stream
        assert reader.digest == digest
    half = len(body) // 2
    older = data[:22] + zstandard.ZstdCompressor(write_content_size=False).compress(body)
    two = data[:22] + zstandard.ZstdCompressor().compress(body[:half]) + \
        zstandard.ZstdCompressor().compress(body[half:])
    for other in (data, older, two):
        reader = RecordReader(io.BytesIO(other), source="r")
        assert list(reader.inodes()) == want
        assert (reader._reader is None) == (other is data)
        assert reader.digest == digest


@pytest.mark.parametrize("declared", ["+1", "4 GiB"])
def test_a_wrong_declared_size_is_a_damaged_record(declared: str) -> None:
    """A frame whose declared size is not its content's (one more byte; more than the data
    could hold, which is not allocated up front) is a located one-line error."""
    data, _ = _encode()
    frame = bytearray(data[22:])
    fhd = frame[4]  # zstd's frame header descriptor: where the size is, and its width
    single = fhd >> 5 & 1
    at = 5 + (not single) + (0, 1, 2, 4)[fhd & 3]
    width = (single, 2, 4, 8)[fhd >> 6]
    assert width == 4
    size = int.from_bytes(frame[at:at + 4], "little")
    frame[at:at + 4] = (size + 1 if declared == "+1" else 0xFFFFFFFF).to_bytes(4, "little")
    with pytest.raises(StreamFormatError, match=r"r: .*corrupt compressed record"):
        list(RecordReader(io.BytesIO(data[:22] + bytes(frame)), source="r").inodes())


def test_version_1_is_still_read() -> None:
    """A record made by the btrdelta that wrote version 1 (tests/tree/data)."""
    data = (Path(__file__).parent / "data" / "sendshot-v1.record").read_bytes()
    reader = RecordReader(io.BytesIO(data), source="v1")
    assert reader.version == 1
    assert reader.head == replace(HEAD, version=1)
    assert not reader.head.content3
    got = list(reader.inodes())
    assert [(n.ino, n.dentries, n.segments, n.blocks, n.xattrs, n.target) for n in got] == [
        (256, [], None, b"", None, b""),
        (257, [(256, b"f")], [(0, 4096), (8192, 4106)], bytes(range(48)), {b"user.a": b"1"},
         b""),
        (258, [(256, b"ln"), (256, b"ln2")], None, b"", None, b"f"),
    ]
    assert reader.digest == "76d06b87405d45fc7e4b4d3ab6e21a620eec381e5d997a97202b6b6f9e32e22c"


def test_smaller_than_version_1() -> None:
    """Many small files: the columns compress better than one record per inode, and a file
    smaller than a block keeps no block digest."""
    t = 1_700_000_000_000_000_000
    files = [RecordInode(256, 0o40755, 0, 0, 0, 1, 2, 3, [])] + [RecordInode(
        300 + i, 0o100644, 1000, 1000, 1000 + i, t + i * 7919, t + i * 7919, t + i * 7919,
        [(256, f"file-{i:05d}.txt".encode())], generation=5, transid=6,
        segments=[(0, 1000 + i)], digest=i.to_bytes(16, "big"),
        bdigest=i.to_bytes(32, "big"), blocks=i.to_bytes(16, "little")) for i in range(2000)]
    out = io.BytesIO()
    write_record(out.write, HEAD, iter(files))
    # version 1 took 84 + 48 + 16 + ~40 bytes of framing a file before compression
    assert len(out.getvalue()) < 2000 * 60
    got = list(RecordReader(io.BytesIO(out.getvalue())).inodes())
    for f in files:
        f.blocks = b""
    assert got == files


@pytest.mark.parametrize("where", [40, 300, 2000])
def test_flipped_byte_is_located(where: int) -> None:
    data, _ = _encode()
    body = bytearray(_plain(data))
    body[where] ^= 0x40
    with pytest.raises(StreamFormatError) as err:
        list(RecordReader(io.BytesIO(_repack(data, bytes(body))), source="r").inodes())
    assert "r: offset" in str(err.value)


@pytest.mark.parametrize("number", [16, 4])  # the first column, END
def test_a_bad_tlv_with_its_crc_fixed_is_located(number: int) -> None:
    """A TLV length that runs past its record (the record's CRC32C made right again) in a
    column (of a version 4 record: version 6's are not TLVs) or in END: the error names the
    source, the offset and the record, as every other damage's (`make fuzz`'s sendshot
    mutations found it said only 'TLV 1 of ... bytes runs past the record's end')."""
    from btrdelta.stream import btrfs_crc32c

    data, _ = _encode(4)
    body = bytearray(_plain(data))
    off = 0
    while int.from_bytes(body[off + 4:off + 6], "little") != number:
        off += 10 + int.from_bytes(body[off:off + 4], "little")
    body[off + 12:off + 14] = b"\xff\xff"
    body[off + 6:off + 10] = bytes(4)
    length = int.from_bytes(body[off:off + 4], "little")
    body[off + 6:off + 10] = btrfs_crc32c([bytes(body[off:off + 10 + length])]).to_bytes(
        4, "little")
    with pytest.raises(StreamFormatError, match="runs past") as err:
        list(RecordReader(io.BytesIO(_repack(data, bytes(body))), source="r").inodes())
    assert str(err.value).startswith(f"r: offset {off}, record "), str(err.value)


def test_truncated_and_foreign_input() -> None:
    data, _ = _encode()
    body = _plain(data)
    with pytest.raises(StreamFormatError, match="truncated"):
        list(RecordReader(io.BytesIO(_repack(data, body[:-30]))).inodes())
    with pytest.raises(StreamFormatError, match="bad magic"):
        RecordReader(io.BytesIO(b"btrfs-stream\0" + bytes(20)))
    with pytest.raises(UnsupportedVersionError):
        RecordReader(io.BytesIO(data[:18] + b"\x09\0\0\0" + data[22:]))
    with pytest.raises(StreamFormatError, match="after the record's END"):
        list(RecordReader(io.BytesIO(_repack(data, body + body[:40]))).inodes())


def _s(digest: str, t: float) -> StoredSendshot:
    return StoredSendshot(digest, SendshotHead(uuid.UUID(int=1), 1, b"n", int(t * 1e9)), 1, "")


def test_retention_plans() -> None:
    every = [_s(f"{i:02d}", 1000.0 + i * 600) for i in range(20)]  # every 10 min
    now = 1000.0 + 19 * 600
    assert plan_prune(every, set()) == []  # no rule: nothing goes
    kept = {s.digest for s in every} - {s.digest for s in plan_prune(every, {"03"}, keep=2)}
    assert kept == {"03", "18", "19"}  # the newest two and what a receiver holds
    grid = parse_grid("1h:2")
    kept = {s.digest for s in every} - {s.digest for s in plan_prune(every, set(), grid=grid,
                                                                        now=now)}
    assert kept == {"19", "13"}  # the newest in each of the last two hours
    assert plan_prune(every, set(), keep=0)[-1].digest == "18"  # the newest always stays
    with pytest.raises(Exception, match="bad retention grid"):
        parse_grid("1x:3")


def test_version_3_is_written_for_its_lineage_and_read_as_such() -> None:
    """A head of version 3 (a send against a version 3 record) writes a version 3 record,
    read back with its version; other versions are not written."""
    out = io.BytesIO()
    digest, _n = write_record(out.write, replace(HEAD, version=3), iter(_inodes()))
    data = out.getvalue()
    assert int.from_bytes(data[18:22], "little") == 3
    reader = RecordReader(io.BytesIO(data), source="r")
    assert (reader.version, reader.head.version, reader.head.content3) == (3, 3, False)
    assert list(reader.inodes())[1] == _inodes()[1]
    assert reader.digest == digest != _encode()[1]
    for version in (1, 2, 10):
        with pytest.raises(ValueError, match=f"version {version} are not written"):
            write_record(io.BytesIO().write, replace(HEAD, version=version), iter(_inodes()))
    with pytest.raises(ValueError, match="a patch record is version 5"):  # (a Patch's)
        write_record(io.BytesIO().write, replace(HEAD, version=5), iter(_inodes()))


def test_a_large_record_finds_its_copies_beyond_64_kib() -> None:
    """A record whose body is 4 MiB or more is compressed with a 4 MiB zstd window (64 KiB
    below): the block digests of a copy of a file, 2.2 MB after the first copy's in the
    BLOCKS column, cost next to nothing, and the record reads back the same (session 31:
    the sendshot benchmark's large tree, four copies of one Debian tree, 5.23 -> 1.72 MB,
    read again every round)."""
    nblk = 140_000  # 2.24 MB of block digests a copy: the body is over 4 MiB
    blocks = os.urandom(16 * nblk)
    root = RecordInode(256, 0o40755, 0, 0, 0, 1, 2, 3, [], generation=5, transid=6)
    copies = [RecordInode(257 + k, 0o100644, 0, 0, nblk * 4096, 1, 2, 3,
                          [(256, b"copy%d" % k)], segments=[(0, nblk * 4096)],
                          digest=b"x" * 16, bdigest=b"y" * 32, blocks=blocks)
              for k in range(2)]
    out = io.BytesIO()
    digest, _n = write_record(out.write, HEAD, iter([root, *copies]))
    data = out.getvalue()
    assert len(_plain(data)) >= 2 * 16 * nblk >= 4 << 20
    assert len(data) < 16 * nblk * 1.1  # the second copy's digests: found in the window
    reader = RecordReader(io.BytesIO(data), source="r", whole=True)
    assert list(reader.inodes()) == [root, *copies]
    assert reader.digest == digest
    # a body below 4 MiB keeps the 64 KiB window: its copies 1.1 MB apart are not found
    half = copies[0].blocks[:8 * nblk]
    small = [replace(c, size=nblk // 2 * 4096, segments=[(0, nblk // 2 * 4096)], blocks=half)
             for c in copies]
    out = io.BytesIO()
    write_record(out.write, HEAD, iter([root, *small]))
    assert len(out.getvalue()) > 2 * 8 * nblk * 0.99
