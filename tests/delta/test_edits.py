"""Formats 7 and 8: the ``edits`` / ``edits2`` patch codecs (5 / 6) with their short CPATCH,
implied inode numbers (format 8), and ``--carrier auto``.

Oracles: the expansion equals the stream byte for byte; the delta ``auto`` writes is byte
for byte the one the carrier it chose writes when named; HDiffPatch's uncompressed diff
(``hdiff-raw``, what these files got before format 7) for the size.
"""

from __future__ import annotations

import io
import random
import uuid
from pathlib import Path

import blake3
import pytest
import zstandard

from btrdelta import _native
from btrdelta.delta import MakeOptions, expand_to, make_delta, open_delta, writer
from btrdelta.delta.codecs import get_codec
from btrdelta.delta.codecs.edits import made_size
from btrdelta.delta.format import (
    CARRIER_LZMA2_X86,
    CARRIER_ZSTD,
    EDITS2_CODEC,
    EDITS_CODEC,
    NO_DIGEST,
    HashAlgo,
    Patch,
    ZCommands,
)
from btrdelta.delta.make import MakeStats
from btrdelta.delta.unpack import CarrierReader
from btrdelta.errors import ChecksumError, StreamFormatError
from btrdelta.stream import StreamWriter
from btrdelta.stream import records as R

from .conftest import delta_items, rebuilt_edit

EDITS = get_codec("edits")


def _text(rnd: random.Random, n: int) -> bytes:
    words = [bytes(rnd.choices(b"abcdefghijklmnopqrstuvwxyz_", k=rnd.randrange(2, 9)))
             for _ in range(300)]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rnd.choices(words, k=12)) + b"\n"
    return bytes(out[:n])


def test_a_few_edits_cost_their_bytes_and_positions() -> None:
    rnd = random.Random(1)
    old = _text(rnd, 40_000)
    new = rebuilt_edit(old, rnd)
    patch = EDITS.make(old, new)
    assert EDITS.apply(old, patch, new_size=len(new)) == new
    # 12 changed bytes, the 13-byte insertion, five positions: ~40 bytes; HDiffPatch's
    # uncompressed diff of the same files spends ~70
    assert len(patch) < 50 < len(get_codec("hdiff-raw").make(old, new))


@pytest.mark.parametrize(
    ("patch", "why"),
    [
        (b"\x80\x80", "inside a varint"),  # truncated varint
        (b"\x0b", "copies past the end"),  # copy of 11 bytes from a 10-byte old file
        (b"\x02\x03ab", "literal past its end"),
        (b"\x02\x00\x15\x02", "moves outside the old file"),  # jump -11
        (b"\x05\x00\x00\x05\x00", "bytes after its last"),  # 10 bytes made, one left
    ],
)
def test_hostile_edits_patches_are_refused(patch: bytes, why: str) -> None:
    with pytest.raises(StreamFormatError, match=why):
        EDITS.apply(b"0123456789", patch, new_size=10)


EDITS2 = get_codec("edits2")


def test_edits2_writes_one_operation_code_per_edit() -> None:
    """Format 8's ``edits2``: after each copy one varint says what follows (a
    substitution, an insertion, a deletion with its length, or a general literal + jump),
    where ``edits`` wrote a literal length and a jump: one byte less per edit here."""
    old = random.Random(2).randbytes(200)
    new = old[:10] + b"AB" + old[12:30] + b"XYZ" + old[30:50] + old[60:180] + b"QQQQ" + old[170:]
    patch = EDITS2.make(old, new)
    assert patch == (
        b"\x0a" + bytes([2 * 4]) + b"AB"  # copy 10, substitute 2 bytes
        + b"\x12" + bytes([3 * 4 + 1]) + b"XYZ"  # copy 18, insert 3 bytes
        + b"\x14" + bytes([10 * 4 + 2])  # copy 20, delete 10 bytes
        + b"\x78" + bytes([4 * 4 + 3]) + b"QQQQ" + bytes([2 * 14 - 1])  # 4 bytes, jump -14
        + b"\x1e"  # copy the last 30
    )
    assert EDITS2.apply(old, patch, new_size=len(new)) == new
    assert made_size(patch, packed=True) == len(new)
    assert len(patch) == len(EDITS.make(old, new)) - 3
    assert EDITS.apply(old, EDITS.make(old, new), new_size=len(new)) == new


@pytest.mark.parametrize(
    ("patch", "why"),
    [
        (b"\x80", "inside a varint"),  # truncated varint
        (b"\x0b", "copies past the end"),  # copy of 11 bytes from a 10-byte old file
        (b"\x02\x0cab", "literal past its end"),  # substitution of 3 bytes, 2 given
        (b"\x02\x2a\x01", "moves outside the old file"),  # deletion of 10 after 2
        (b"\x02\x03\x05", "moves outside the old file"),  # no literal, back 3 after 2
        (b"\x05\x02\x05\x00", "bytes after its last"),  # 10 bytes made, one left
        (b"\x02\x06", "inside a varint"),  # a deletion is not an end
    ],
)
def test_hostile_edits2_patches_are_refused(patch: bytes, why: str) -> None:
    with pytest.raises(StreamFormatError, match=why):
        EDITS2.apply(b"0123456789", patch, new_size=10)


def _stream(files: dict[bytes, bytes], *, encoded: bool = False) -> bytes:
    """A stream of new files: WRITEs (v1), or with ``encoded`` a v2 stream of zstd-compressed
    extents (``--compressed-data``)."""
    out: list[bytes] = []
    w = StreamWriter(out.append, 2 if encoded else 1)
    w.write(R.Snapshot(b"B", uuid.UUID(int=1), 9, uuid.UUID(int=2), 8))
    step = 128 << 10 if encoded else 49152
    for i, (path, data) in enumerate(files.items()):
        orphan = f"o{300 + i}-7-0".encode()
        w.write(R.Mkfile(orphan, 300 + i))
        w.write(R.Rename(orphan, path))
        for off in range(0, len(data), step):
            piece = data[off : off + step]
            if not encoded:
                w.write(R.Write(path, off, piece))
                continue
            packed = zstandard.ZstdCompressor(level=3).compress(piece)
            packed += bytes(-len(packed) % 4096)
            w.write(R.EncodedWrite(path, off, len(piece), len(piece), 0, 2, packed))
        w.write(R.Utimes(path, 1, 2, 3))
    w.write(R.End())
    return b"".join(bytes(p) for p in out)


def _make(stream: bytes, old: Path, **kw: object) -> tuple[bytes, MakeStats]:
    out: list[bytes] = []
    stats = make_delta(io.BufferedReader(io.BytesIO(stream)), old, out.append,
                       MakeOptions(jobs=2, **kw))
    return b"".join(bytes(p) for p in out), stats


def _expand(delta: bytes, old: Path) -> bytes:
    out: list[bytes] = []
    expand_to(open_delta(io.BytesIO(delta), source="t.delta"), old, out.append)
    return b"".join(bytes(p) for p in out)


def _carried_patches(delta: bytes) -> list[Patch]:
    reader = CarrierReader(None)
    out: list[Patch] = []
    for item in delta_items(delta):
        if isinstance(item, ZCommands):
            out += [s for s in reader.split(reader.inflate(item), 1) if isinstance(s, Patch)]
    return out


def _flip_a_bit(path: Path) -> None:
    """An old file edited after the delta was made (one bit of its 101st byte)."""
    body = bytearray(path.read_bytes())
    body[100] ^= 1
    path.write_bytes(body)


@pytest.fixture
def rebuilt(tmp_path: Path) -> tuple[Path, bytes]:
    """An old tree of 20 text files and a stream rewriting each with a few edits."""
    rnd = random.Random(7)
    old = tmp_path / "old"
    (old / "lib").mkdir(parents=True)
    files = {}
    for i in range(20):
        body = _text(rnd, rnd.randrange(5_000, 60_000))
        (old / "lib" / f"m{i}.py").write_bytes(body)
        files[f"lib/m{i}.py".encode()] = rebuilt_edit(body, rnd)
    return old, _stream(files)


def test_rebuilt_files_are_edits2_patches_from_format_8(rebuilt: tuple[Path, bytes]) -> None:
    old, stream = rebuilt
    delta, stats = _make(stream, old)
    assert delta[17:21] == (10).to_bytes(4, "little")
    assert stats.files_by_codec == {"edits2": 20}
    assert _expand(delta, old) == stream
    patches = _carried_patches(delta)
    assert len(patches) == 20
    for p in patches:  # CPATCH flag 64: a 4-byte old digest, no new-content digest
        assert (p.codec, p.hash_algo, len(p.old_digest), p.new_algo, p.new_digest) == (
            EDITS2_CODEC, HashAlgo.BLAKE3_32, 4, NO_DIGEST, b"")
    # format 7's codec (flag 32), still written on request and read in format 8: one
    # varint more per edit
    before7, stats7 = _make(stream, old, codec="edits")
    assert stats7.files_by_codec == {"edits": 20}
    assert {p.codec for p in _carried_patches(before7)} == {EDITS_CODEC}
    assert _expand(before7, old) == stream
    assert len(delta) < len(before7) - 20 * 2
    # what these files cost before format 7: HDiffPatch's diffs in the carrier
    before, before_stats = _make(stream, old, codec="hdiff-raw")
    assert before_stats.files_by_codec == {"hdiff-raw": 20}
    assert len(delta) < 0.8 * len(before)


def test_edits2_patches_of_compressed_extents_carry_their_new_digest_from_format_10(
    rebuilt: tuple[Path, bytes],
) -> None:
    """Format 10: where the new content goes out as regenerated compressed extents (a
    ``--compressed-data`` stream), a short ``edits2`` CPATCH carries its new content's
    4-byte digest instead of the old file's (flag 128; the same size); the expansion gives
    the stream back; a wrong old file is refused (the patched content differs, naming the
    file); format 9 refuses the flag."""
    old, _ = rebuilt
    rnd = random.Random(7)
    files = {}
    for i in range(20):  # the fixture's edits, sent as zstd-compressed extents
        body = (old / "lib" / f"m{i}.py").read_bytes()
        files[f"lib/m{i}.py".encode()] = rebuilt_edit(body, rnd)
    stream = _stream(files, encoded=True)
    delta, stats = _make(stream, old)
    assert delta[17:21] == (10).to_bytes(4, "little")
    assert stats.files_by_codec == {"edits2": 20}
    patches = _carried_patches(delta)
    assert len(patches) == 20
    for p, new in zip(patches, files.values(), strict=True):
        assert (p.codec, p.hash_algo, p.old_digest, p.new_algo) == (
            EDITS2_CODEC, NO_DIGEST, b"", HashAlgo.BLAKE3_32)
        assert p.new_digest == blake3.blake3(new).digest()[:4]
    assert _expand(delta, old) == stream
    with pytest.raises(StreamFormatError, match="new digest in a format-9 delta"):
        _expand(delta[:17] + (9).to_bytes(4, "little") + delta[21:], old)
    _flip_a_bit(old / "lib" / "m3.py")
    with pytest.raises(ChecksumError, match=r"lib/m3\.py.*patched content differs"):
        _expand(delta, old)


def test_a_one_write_file_gets_the_same_implied_chunk(rebuilt: tuple[Path, bytes]) -> None:
    """A CPATCH's implied PWRITE of a file sent in one WRITE names the same CHUNK for every
    such file (any CHUNK of at least its length gives the WRITE back), not its size: the
    size cost ~2 bytes a file in the carrier."""
    old, stream = rebuilt
    delta, _ = _make(stream, old)
    patches = _carried_patches(delta)
    assert any(p.new_size < 49152 for p in patches)
    assert {p.auto_chunk for p in patches} == {49152}
    assert _expand(delta, old) == stream


def test_an_edited_old_file_is_refused_naming_it(rebuilt: tuple[Path, bytes]) -> None:
    old, stream = rebuilt
    delta, _ = _make(stream, old)
    _flip_a_bit(old / "lib" / "m3.py")
    with pytest.raises(ChecksumError, match=r"lib/m3\.py"):
        _expand(delta, old)


def test_edits_patches_are_refused_before_their_format(rebuilt: tuple[Path, bytes]) -> None:
    old, stream = rebuilt
    delta, _ = _make(stream, old)
    with pytest.raises(StreamFormatError, match="patch codec 6 in a format-7 delta"):
        _expand(delta[:17] + (7).to_bytes(4, "little") + delta[21:], old)
    delta, _ = _make(stream, old, codec="edits")
    with pytest.raises(StreamFormatError, match="patch codec 5 in a format-6 delta"):
        _expand(delta[:17] + (6).to_bytes(4, "little") + delta[21:], old)


def test_consecutive_inode_numbers_are_implied_in_format_8(
    rebuilt: tuple[Path, bytes],
) -> None:
    """Files re-created one after the other get consecutive inode numbers: from the
    second one on, a carried creation names none (marker 0xfffa instead of 0xfffe + INO);
    the C and Python unfolding give the stream back, and format 7 refuses the marker."""
    old, stream = rebuilt
    delta, _ = _make(stream, old)
    raw = b"".join(
        bytes(CarrierReader(None).inflate(z)) for z in delta_items(delta)
        if isinstance(z, ZCommands))
    assert raw.count(b"\xfa\xff\x03\x007-0") == 19  # MKFILE o301-7-0 .. o319-7-0
    assert raw.count(b"\xfe\xff\x03\x007-0\x03\x00\x08\x00") == 1  # o300-7-0
    for backend in ("c", "python"):
        with _native.use_backend(backend, "unfold"):
            assert _expand(delta, old) == stream
    delta7, _ = _make(stream, old, codec="edits")  # codec 5: format 7 reads the patches
    with pytest.raises(StreamFormatError, match="implied inode number in a format-7 delta"):
        _expand(delta7[:17] + (7).to_bytes(4, "little") + delta7[21:], old)


def test_auto_carrier_is_the_named_carrier_it_chose(
    tmp_path: Path, rebuilt: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``auto`` holds its output until it has chosen, then writes exactly what the chosen
    carrier writes: zstd for a delta of a few patches; xz once enough new file data is
    carried (the threshold lowered to 64 KiB here), or zstd when too much was held
    before that."""
    old, stream = rebuilt
    auto, stats = _make(stream, old)
    assert stats.carrier == "zstd"
    assert auto == _make(stream, old, carrier="zstd")[0]
    rnd = random.Random(3)
    new = _stream({f"bin/new{i}".encode(): _text(rnd, 40_000) for i in range(4)})
    monkeypatch.setattr(writer, "AUTO_XZ_FROM", 64 << 10)
    auto, stats = _make(new, old)
    assert stats.carrier == "xz"
    assert auto == _make(new, old, carrier="xz")[0]
    assert {z.codec for z in delta_items(auto) if isinstance(z, ZCommands)} <= {
        2, CARRIER_LZMA2_X86}
    assert _expand(auto, old) == new
    monkeypatch.setattr(writer, "AUTO_XZ_FROM", 100 << 10)
    monkeypatch.setattr(writer, "AUTO_HOLD_MAX", 16 << 10)
    auto, stats = _make(new, old)
    assert stats.carrier == "zstd"
    assert auto == _make(new, old, carrier="zstd")[0]
    assert {z.codec for z in delta_items(auto) if isinstance(z, ZCommands)} == {CARRIER_ZSTD}
    assert _expand(auto, old) == new


def test_auto_carrier_takes_zstd_for_compressed_extents(
    rebuilt: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Carried ENCODED_WRITEs (a ``--compressed-data`` stream's new files) do not count
    towards ``auto``'s xz: their data is compressed already, and LZMA would only make the
    device inflate it slowly. The same files sent as WRITEs do."""
    old, _ = rebuilt
    rnd = random.Random(5)
    files = {f"bin/new{i}".encode(): _text(rnd, 300_000) for i in range(2)}
    monkeypatch.setattr(writer, "AUTO_XZ_FROM", 64 << 10)
    encoded = _stream(files, encoded=True)
    auto, stats = _make(encoded, old)
    assert stats.carrier == "zstd"
    assert auto == _make(encoded, old, carrier="zstd")[0]
    assert _expand(auto, old) == encoded
    assert _make(_stream(files), old)[1].carrier == "xz"
