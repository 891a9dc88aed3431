"""casync interop: indexes and chunk files made by Debian's casync, our chunker against its cuts."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from btrdelta.chunk import buzhash
from btrdelta.chunk.casync import (
    CasyncChunking,
    chunk_file_name,
    decode_caibx,
    decode_chunk_file,
)
from btrdelta.errors import ChecksumError, StreamFormatError


def _casync() -> str:
    path = shutil.which("casync")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("casync is required under CI (scripts/sysdeps.sh installs it)")
        pytest.skip("casync not installed")
    return path


def casync_make(blob: Path, out: Path, *extra: str) -> tuple[Path, Path]:
    """``casync make`` of a blob: (index, store)."""
    index, store = out / f"{blob.name}.caibx", out / f"{blob.name}.castr"
    subprocess.run([_casync(), "make", f"--store={store}", *extra, str(index), str(blob)],
                   check=True, capture_output=True)
    return index, store


def _blob(path: Path, seed: int, size: int) -> Path:
    """Data with runs and repeats (so that chunks repeat), like a file system image."""
    rnd = random.Random(seed)
    parts, total = [], 0
    while total < size:
        piece = rnd.randbytes(rnd.randint(100, 40_000)) if rnd.random() < 0.7 else \
            bytes([rnd.randint(0, 2)]) * rnd.randint(1, 30_000)
        parts.append(piece)
        total += len(piece)
    data = b"".join(parts)
    path.write_bytes(data[:size] + data[: size // 3])  # a repeated third: duplicate chunks
    return path


@pytest.mark.parametrize(("extra", "hash_name"), [
    ((), "sha512_256"),
    (("--chunk-size=4096", "--digest=sha256", "--compression=xz"), "sha256"),
    (("--chunk-size=1024:16384:65536", "--compression=gzip"), "sha512_256"),
])
def test_index_and_chunks_match_casync(tmp_path: Path, extra: tuple[str, ...],
                                       hash_name: str) -> None:
    blob = _blob(tmp_path / "blob", 1, 3_000_000)
    index_path, store = casync_make(blob, tmp_path, *extra)
    index = decode_caibx(index_path.read_bytes(), source=str(index_path))
    data = blob.read_bytes()
    assert index.hash_name == hash_name
    assert index.image_size == len(data)
    assert len(index.digests) < len(index.order)  # the repeated third shares chunks
    # our chunker cuts where casync did (the oracle: its index), on C and Python paths
    chunking = index.chunking()
    assert chunking.cut(data) == list(index.starts[1:])
    prefix = data[:300_000]  # the Python reference is slow: a prefix, its tail chunk aside
    ends = buzhash.cuts_py(prefix, 0, len(prefix), chunking.min_size, chunking.max_size,
                           chunking.discriminator)[:-1]
    assert ends == list(index.starts[1 : len(ends) + 1])
    for pos, entry in enumerate(index.order):
        piece = data[index.starts[pos] : index.starts[pos + 1]]
        assert hashlib.new(hash_name, piece).digest() == index.digests[entry]
    # every chunk file decodes to its chunk
    batches = list(chunking.hash_chunks(memoryview(data)))
    assert [d for b in batches for d in b.digests] == [index.digests[e] for e in index.order]
    for entry, digest in enumerate(index.digests):
        blob_file = (store / chunk_file_name(digest)).read_bytes()
        raw = decode_chunk_file(blob_file, digest, index.raw_sizes[entry], hash_name)
        assert hashlib.new(hash_name, raw).digest() == digest


@given(st.binary(min_size=0, max_size=40_000), st.sampled_from([(64, 256, 1024), (1, 300, 900),
                                                                 (256, 256, 256)]))
def test_c_chunker_matches_the_python_reference(data: bytes, sizes: tuple[int, int, int]) -> None:
    mn, avg, mx = sizes
    chunking = CasyncChunking(mn, avg, mx)
    expected = buzhash.cuts_py(data, 0, len(data), mn, mx, chunking.discriminator)
    assert chunking.cut(data) == expected
    assert not data or expected[-1] == len(data)


def _index(items: list[tuple[int, bytes]], flags: int = 1 << 61) -> bytes:
    head = struct.pack("<QQQQQQQQ", 48, 0x96824D9C7B129FF9, flags, 16, 64, 256, 2**64 - 1,
                       0xE75B9E112F17417D)
    body = b"".join(struct.pack("<Q32s", end, d) for end, d in items)
    tail = struct.pack("<QQQQQ", 0, 0, 48, 16 + 40 * len(items) + 40, 0x4B4F050E5549ECD1)
    return head + body + tail


def test_malformed_indexes_are_refused_with_their_offset() -> None:
    a, b = b"a" * 32, b"b" * 32
    good = _index([(100, a), (200, b), (300, a)])
    assert decode_caibx(good).order.tolist() == [0, 1, 0]
    cases = {
        "truncated": good[:50],
        "bad INDEX": b"\x31" + good[1:],
        "tail": good[:-1] + b"\x00",
        "whole number": good[:-40] + b"\0" + good[-40:],
        "end offset": _index([(100, a), (100, b)]),
        "sizes must be": _index([(300, a)]),  # larger than max
        "two sizes": _index([(100, a), (150, a)]),
    }
    for what, blob in cases.items():
        with pytest.raises(StreamFormatError, match=what) as info:
            decode_caibx(blob, source="x.caibx")
        assert info.value.offset is not None
    with pytest.raises(StreamFormatError, match="ordered"):
        decode_caibx(good[:24] + struct.pack("<QQQ", 64, 16, 256) + good[48:])


def test_chunk_files_are_bounded_and_checked() -> None:
    raw = os.urandom(1000)
    digest = hashlib.new("sha512_256", raw).digest()
    frame = zstandard.ZstdCompressor().compress(raw)
    assert decode_chunk_file(frame, digest, 1000, "sha512_256") == raw
    with pytest.raises(ChecksumError):
        decode_chunk_file(frame, b"\0" * 32, 1000, "sha512_256")
    bomb = zstandard.ZstdCompressor().compress(bytes(50 << 20))  # 50 MiB of zeros
    with pytest.raises(StreamFormatError, match="more than"):
        decode_chunk_file(bomb, digest, 1000, "sha512_256")
    with pytest.raises(StreamFormatError, match="not zstd"):
        decode_chunk_file(raw, digest, 1000, "sha512_256")


def test_a_flipped_byte_anywhere_in_a_chunk_file_is_a_mismatch_of_its_id() -> None:
    """Magic, frame header, compressed data or checksum: one error (exit 5) wherever the
    damage falls, so a clone tries the next store and a user sees one cause."""
    raw = random.Random(7).randbytes(700) + b"text " * 200
    digest = hashlib.new("sha512_256", raw).digest()
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(raw)
    errors = []
    for pos in range(len(frame)):
        bad = bytearray(frame)
        bad[pos] ^= 0x10
        try:  # (a bit the decoder does not need may flip: then the content is still right)
            assert decode_chunk_file(bytes(bad), digest, len(raw), "sha512_256") == raw
        except ChecksumError as exc:
            errors.append(str(exc))
    assert len(errors) >= len(frame) - 4
    assert all("does not match its id" in e for e in errors)
