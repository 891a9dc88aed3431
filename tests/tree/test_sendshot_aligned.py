"""Sendshot records of versions 6 and 7, and 8 and 9 (the same with column SEQUENCE)
(``docs/formats/sendshot.md`` §2c, §2d): each column one record of the column's bytes at an
8-aligned offset of the body, read where they lie (no join, no copy); the same rows as
version 4's; hostile records refused with the record and the offset named, and one line
from the CLI."""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import pytest
import zstandard

from btrdelta._value import replace
from btrdelta.cli import main
from btrdelta.errors import ChecksumError, StreamFormatError, UnsupportedVersionError
from btrdelta.stream import btrfs_crc32c
from btrdelta.tree.sendshot import (
    C_SEQUENCE,
    COLUMNS,
    NO_SEQUENCE,
    VERSION,
    VERSION_COLUMNS,
    RecordReader,
    write_record,
)

from .test_sendshot_format import HEAD, _inodes

_FRAME = struct.Struct("<IHI")


def _rows() -> list:  # type: ignore[type-arg]
    """The rows of ``_inodes`` with a sequence each (a version 8 record keeps them)."""
    return [replace(r, sequence=(7 << 40) + i) for i, r in enumerate(_inodes())]


def _record(version: int) -> bytes:
    out = io.BytesIO()
    write_record(out.write, replace(HEAD, version=version), iter(_rows()))
    return out.getvalue()


def _body(data: bytes) -> bytearray:
    return bytearray(zstandard.ZstdDecompressor().decompressobj().decompress(data[22:]))


def _pack(data: bytes, body: bytes | bytearray) -> bytes:
    return data[:22] + zstandard.ZstdCompressor().compress(bytes(body))


def _frames(body: bytes | bytearray) -> list[tuple[int, int, int]]:
    """(offset, record number, payload length) of each frame, read independently of the
    reader."""
    out, off = [], 0
    while off < len(body):
        length, cmd, _crc = _FRAME.unpack_from(body, off)
        out.append((off, cmd, length))
        off += 10 + length
    assert off == len(body)
    return out


def _tlv_values(payload: bytes | bytearray) -> bytes:
    """A version 4 column's TLVs of type 1, joined."""
    out, pos = [], 0
    while pos < len(payload):
        typ, n = struct.unpack_from("<HH", payload, pos)
        assert typ == 1
        out.append(bytes(payload[pos + 4:pos + 4 + n]))
        pos += 4 + n
    return b"".join(out)


def _recrc(body: bytearray, off: int) -> None:
    """Make the CRC32C of the frame at ``off`` right again."""
    length = _FRAME.unpack_from(body, off)[0]
    body[off + 6:off + 10] = bytes(4)
    body[off + 6:off + 10] = btrfs_crc32c([bytes(body[off:off + 10 + length])]).to_bytes(
        4, "little")


def _frame_of(body: bytearray, number: int) -> tuple[int, int]:
    return next((off, length) for off, cmd, length in _frames(body) if cmd == number)


def test_columns_lie_aligned_and_hold_version_4s_bytes() -> None:
    """Each column of a version 6 record is its payload after zeros up to an 8-aligned
    offset of the body, the bytes a version 4 record of the same rows joins from its TLVs;
    the reader gives the same rows, its integer columns views of the inflated body."""
    v4, v6 = _record(4), _record(6)
    b4, b6 = _body(v4), _body(v6)
    cols4 = {cmd: _tlv_values(b4[off + 10:off + 10 + n]) for off, cmd, n in _frames(b4)
             if cmd in COLUMNS}
    seen = []
    for off, cmd, n in _frames(b6):
        if cmd not in COLUMNS:
            continue
        start = off + 10 + -(off + 10) % 8
        assert start % 8 == 0
        assert not any(b6[off + 10:start])
        assert bytes(b6[start:off + 10 + n]) == cols4[cmd], COLUMNS[cmd]
        seen.append(cmd)
    assert seen == sorted(VERSION_COLUMNS[6]) == sorted(set(COLUMNS) - {C_SEQUENCE})
    rows = {}
    for data in (v4, v6):
        reader = RecordReader(io.BytesIO(data), source="r", whole=True)
        cols = reader.columns()
        rows[reader.version] = list(cols.rows())
        if reader.version == 6:  # (in place: a view of the body, not a copy)
            for col in (cols.inos, cols.sizes, cols.parents, cols.segs):
                assert isinstance(col, memoryview)
                assert isinstance(col.obj, bytes)
                assert len(col.obj) == len(b6)
    assert rows[4] == rows[6]
    assert len(rows[4]) == 8


def test_version_8_is_version_6_and_a_sequence_column() -> None:
    """A version 8 record's frames are version 6's (the same bytes) and SEQUENCE last: u64
    per row, 8-aligned, read back into each row's ``sequence``; a version 6 record's rows
    read with every sequence unknown (``NO_SEQUENCE``)."""
    def payloads(body: bytearray) -> dict[int, bytes]:
        out = {}
        for off, cmd, n in _frames(body):
            start = off + 10 + -(off + 10) % 8 if cmd in COLUMNS else off + 10
            assert not any(body[off + 10:start])
            out[cmd] = bytes(body[start:off + 10 + n])
        return out

    six, eight = payloads(_body(_record(6))), payloads(_body(_record(VERSION)))
    assert list(eight) == [1, *sorted(COLUMNS), 4]
    for cmd in set(COLUMNS) - {C_SEQUENCE}:
        assert eight[cmd] == six[cmd], COLUMNS[cmd]
    want = _rows()
    assert bytes(eight[C_SEQUENCE]) == struct.pack(f"<{len(want)}Q",
                                                   *(r.sequence for r in want))
    got = list(RecordReader(io.BytesIO(_record(VERSION)), source="r").inodes())
    assert got == want
    old = list(RecordReader(io.BytesIO(_record(6)), source="r").inodes())
    assert [r.sequence for r in old] == [NO_SEQUENCE] * len(want)
    assert old == [replace(r, sequence=NO_SEQUENCE) for r in want]


def test_a_reader_of_versions_up_to_5_would_refuse_it() -> None:
    """The versions read, and the words of a reader that does not read one (what readers of
    earlier releases say of versions 6 and 8: "a newer btrdelta made it")."""
    data = _record(VERSION)
    assert int.from_bytes(data[18:22], "little") == 8
    with pytest.raises(UnsupportedVersionError, match="a newer btrdelta made it"):
        RecordReader(io.BytesIO(data[:18] + b"\x0a\0\0\0" + data[22:]))


def _damaged(how: str) -> bytes:
    data = _record(VERSION)
    body = _body(data)
    # INO: 8 values, its payload padded by 7 bytes (or SEQUENCE's, version 8's own)
    off, n = _frame_of(body, C_SEQUENCE if "SEQUENCE" in how else 16)
    pad = -(off + 10) % 8
    assert pad or "SEQUENCE" in how
    if how == "a flipped byte":
        body[off + 10 + pad + 3] ^= 0x40
        return _pack(data, body)
    if how == "padding not zeros":
        body[off + 10] = 1
    elif how.startswith(("a column too", "SEQUENCE too")):
        delta = -8 if how.endswith("short") else 8
        at = off + 10 + n
        body[at:at] = bytes(8) if delta > 0 else b""
        if delta < 0:
            del body[at - 8:at]
        body[off:off + 4] = (n + delta).to_bytes(4, "little")
    elif how == "misaligned (no padding)":
        del body[off + 10:off + 10 + pad]
        body[off:off + 4] = (n - pad).to_bytes(4, "little")
    elif how == "a count that overflows":
        off, n = _frame_of(body, 4)  # END: INODES, a u64
        body[off + 14:off + 22] = b"\xff" * 8
    elif how == "truncated":
        return _pack(data, body[:-9])
    _recrc(body, off)
    return _pack(data, body)


HOSTILE = {
    "a flipped byte": ("CRC32C mismatch", "(INO)"),
    "padding not zeros": ("padding is not 7 zero bytes", "(INO)"),
    "a column too short": ("column INO holds 56 bytes, not 8 values", ""),
    "a column too long": ("column INO holds 72 bytes, not 8 values", ""),
    "SEQUENCE too short": ("column SEQUENCE holds 56 bytes, not 8 values", ""),
    "SEQUENCE too long": ("column SEQUENCE holds 72 bytes, not 8 values", ""),
    "misaligned (no padding)": ("", ""),
    "a count that overflows": ("holds", ""),
    "truncated": ("truncated", ""),
}


@pytest.mark.parametrize("how", sorted(HOSTILE))
def test_a_hostile_record_is_refused_naming_it_and_where(how: str) -> None:
    data = _damaged(how)
    says, record = HOSTILE[how]
    for whole in (True, False):  # (read at once, or as a stream)
        with pytest.raises(StreamFormatError) as err:
            RecordReader(io.BytesIO(data), source="r", whole=whole).columns()
        text = str(err.value)
        assert text.startswith("r: offset "), text
        assert says in text, text
        assert record in text, text
        assert "\n" not in text
        if how == "a flipped byte":
            assert isinstance(err.value, ChecksumError)


def _tree(root: Path) -> None:
    (root / "d").mkdir(parents=True)
    for i in range(40):
        (root / "d" / f"f{i}").write_bytes(os.urandom(5000 + i))
    os.symlink("d/f1", root / "ln")


def _recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]
              ) -> tuple[Path, Path, str, Path, bytes]:
    """``_tree`` at ``tmp_path/src`` sent with ``--record`` into ``tmp_path/store``: the
    source, the store, the record's digest, its file and its bytes."""
    src, store = tmp_path / "src", tmp_path / "store"
    _tree(src)
    assert main(["send", str(src), "-o", str(tmp_path / "s0"), "--record", "--store",
                 str(store), "--json"]) == 0
    digest = json.loads(capsys.readouterr().out)["sendshot"]
    path = store / "records" / f"{digest}.sendshot"
    return src, store, digest, path, path.read_bytes()


@pytest.mark.parametrize("how", ["a flipped byte", "a column too long"])
def test_the_cli_says_one_line_of_a_hostile_record(
        tmp_path: Path, how: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``send --record`` writes version 6; damaged (its CRC, or a column's length with the
    CRC made right), ``sendshot show`` and ``send --from-sendshot`` of it are one line
    naming the record, exit 5 (a CRC) or 3."""
    src, store, digest, path, data = _recorded(tmp_path, capsys)
    assert int.from_bytes(data[18:22], "little") == VERSION
    body = _body(data)
    off, n = _frame_of(body, 23)  # SIZE
    if how == "a flipped byte":
        body[off + 10 + n - 1] ^= 1
    else:
        body[off + 10 + n:off + 10 + n] = bytes(8)
        body[off:off + 4] = (n + 8).to_bytes(4, "little")
        _recrc(body, off)
    path.write_bytes(_pack(data, body))
    for words in (["sendshot", "show", digest], ["send", str(src), "-o",
                                                  str(tmp_path / "s1"), "--from-sendshot",
                                                  digest]):
        capsys.readouterr()
        assert main([*words, "--store", str(store)]) == (5 if how == "a flipped byte" else 3)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert digest in err[0]
        assert ("CRC32C" if how == "a flipped byte" else "column SIZE holds") in err[0]


def test_a_lineage_of_version_4_moves_to_version_6(tmp_path: Path) -> None:
    """A send against a version 4 record (the lineage of an earlier release) of a plain
    directory (walked whole: a whole record) writes a version 6 record, whose rows are the
    tree's (a full send's record of it: the oracle). (Version 7 patches of version 4 and 5
    records on btrfs: ``tests/send/test_sendshot_patch.py``, ``test_sendshot_chain.py``.)"""
    from btrdelta.send.sendshot import send_with_sendshots
    from btrdelta.send.store import SendshotStore

    src, store = tmp_path / "src", tmp_path / "store"
    _tree(src)
    assert main(["send", str(src), "-o", str(tmp_path / "s0"), "--record", "--store",
                 str(store)]) == 0
    st = SendshotStore(store)
    (rec,) = st.records_list()
    old = list(st.view(rec).rows())
    v4 = st.save(replace(rec.head, version=4), iter(old))
    os.unlink(rec.path)
    (src / "d" / "f3").write_bytes(b"changed")
    (src / "d" / "new").write_bytes(b"new")
    with open(tmp_path / "s1", "wb") as f:
        res = send_with_sendshots(f.write, src, store=st, from_sendshot=v4.digest,
                                  name=b"r1")
    assert res.recorded is not None
    assert (res.recorded.head.version, res.recorded.head.parent) == (VERSION, v4.digest)
    got = {r.ino: r for r in st.view(res.recorded).rows()}
    assert main(["send", str(src), "-o", str(tmp_path / "s2"), "--record", "--store",
                 str(store)]) == 0
    whole = max(st.records_list(), key=lambda r: r.head.created_ns)
    assert whole.head.version == VERSION
    want = {r.ino: r for r in st.view(whole).rows()}
    assert got.keys() == want.keys()
    for ino, r in want.items():
        assert (got[ino].size, got[ino].digest, got[ino].blocks, sorted(got[ino].dentries)) \
            == (r.size, r.digest, r.blocks, sorted(r.dentries)), ino


def test_a_record_named_by_its_digest_has_its_crcs_left_unchecked(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A record read whole is hashed before its frames are decoded: named by that digest,
    every byte is the one written and its frames' CRC32Cs are not computed again (~0.7 ms
    of every send against a 42,000-inode record); a record whose digest is not its name
    has them checked, which say where it is damaged. The oracle: one frame's CRC field
    alone made wrong; read with no name, or under its old name (one line naming the CRC and
    the record, exit 5), it is refused; named by its new digest, the rows of the intact
    record, and a send against it."""
    import blake3

    from btrdelta.send.store import SendshotStore

    src, store, digest, path, data = _recorded(tmp_path, capsys)
    st = SendshotStore(store)
    want = list(st.view(next(s for s in st.records_list() if s.digest == digest)).rows())
    body = _body(data)
    off, _n = _frame_of(body, 23)  # SIZE
    body[off + 6] ^= 0xFF  # its CRC field, not a byte it covers
    path.write_bytes(_pack(data, body))
    with pytest.raises(ChecksumError, match="CRC32C"):  # (no name to compare with: checked)
        RecordReader(io.BytesIO(path.read_bytes()), whole=True).columns()
    assert main(["sendshot", "show", digest, "--store", str(store)]) == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "CRC32C" in err[0]
    assert digest in err[0]
    new = blake3.blake3(data[:22] + bytes(body)).hexdigest()
    path.rename(store / "records" / f"{new}.sendshot")
    st = SendshotStore(store)
    assert list(st.view(next(s for s in st.records_list() if s.digest == new)).rows()) == want
    assert main(["sendshot", "show", new, "--store", str(store)]) == 0
    assert main(["send", str(src), "-o", str(tmp_path / "s1"), "--from-sendshot", new,
                 "--store", str(store)]) == 0
