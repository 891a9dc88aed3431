"""Archive format: round trip, hostile bytes raise only StreamFormatError, signatures."""

from __future__ import annotations

import io
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from btrdelta.chunk.archive import (
    HEADER_SIZE,
    decode_description,
    decode_header,
    decode_index,
    verify_signature,
)
from btrdelta.chunk.chunker import ChunkerParams, chunk_digest
from btrdelta.errors import ChecksumError, StreamFormatError, UnsupportedVersionError

PARAMS = ChunkerParams(min_size=64, avg_size=256, max_size=1024)
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def _archive(tmp_path, data: bytes, key: Ed25519PrivateKey | None = None) -> bytes:  # type: ignore[no-untyped-def]
    from btrdelta.chunk.compress import compress_image

    img = tmp_path / "img"
    img.write_bytes(data)
    out = io.BytesIO()
    compress_image(img, out, params=PARAMS, key=key, threads=2)
    return out.getvalue()


def _sample() -> bytes:
    rnd = random.Random(3)
    block = rnd.randbytes(3000)
    return block + rnd.randbytes(5000) + block + bytes(4000) + block


def _description(arc: bytes) -> bytes:
    h = decode_header(arc)
    return arc[:HEADER_SIZE] + arc[h.index_offset : h.archive_size]


def test_round_trip_rebuilds_image(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import zstandard

    data = _sample()
    arc = _archive(tmp_path, data)
    h = decode_header(arc)
    assert h.image_size == len(data)
    assert len(arc) == h.archive_size
    index = decode_index(h, arc[h.index_offset : h.index_offset + h.index_size])
    assert h.chunk_count < h.order_count  # the repeated block is stored once
    pieces = []
    for entry in index.order:
        blob = arc[index.offsets[entry] : index.offsets[entry] + index.comp_sizes[entry]]
        raw = zstandard.ZstdDecompressor().decompress(blob)
        assert chunk_digest(raw) == index.digests[entry]
        pieces.append(raw)
    assert b"".join(pieces) == data
    hdr, idx = decode_description(_description(arc))
    assert hdr == h
    assert list(idx.order) == list(index.order)


def test_empty_image(tmp_path) -> None:  # type: ignore[no-untyped-def]
    arc = _archive(tmp_path, b"")
    h, idx = decode_description(_description(arc))
    assert h.image_size == 0
    assert len(idx.order) == 0


@given(st.data())
def test_mutated_description_raises_only_format_errors(tmp_path_factory, data) -> None:  # type: ignore[no-untyped-def]
    desc = bytearray(_DESC)
    kind = data.draw(st.sampled_from(["flip", "truncate", "splice"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            pos = data.draw(st.integers(0, len(desc) - 1))
            desc[pos] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del desc[data.draw(st.integers(0, len(desc) - 1)) :]
    else:
        pos = data.draw(st.integers(0, len(desc)))
        desc[pos:pos] = data.draw(st.binary(min_size=1, max_size=64))
    try:
        decode_description(bytes(desc))
    except StreamFormatError:
        return
    # a mutation that still decodes must have changed nothing the checks cover
    assert bytes(desc) == _DESC


def test_header_checks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    desc = bytearray(_description(_archive(tmp_path, _sample())))
    bad_crc = bytearray(desc)
    bad_crc[40] ^= 1
    with pytest.raises(ChecksumError, match="CRC32C"):
        decode_header(bad_crc)
    with pytest.raises(StreamFormatError, match="magic"):
        decode_header(b"X" * HEADER_SIZE)
    with pytest.raises(StreamFormatError, match="truncated"):
        decode_header(desc[:100])
    # a future version with a valid CRC
    import crc32c

    future = bytearray(desc[:HEADER_SIZE])
    future[8] = 2
    future[156:160] = crc32c.crc32c(bytes(future[:156])).to_bytes(4, "little")
    with pytest.raises(UnsupportedVersionError):
        decode_header(future)


def test_signature_verifies_and_tamper_fails(tmp_path) -> None:  # type: ignore[no-untyped-def]
    arc = _archive(tmp_path, _sample(), key=KEY)
    desc = _description(arc)
    h, _ = decode_description(desc, public_key=KEY.public_key())
    assert h.signed
    other = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
    with pytest.raises(ChecksumError, match="signature"):
        decode_description(desc, public_key=other.public_key())
    # tamper with the order and fix up the index digest so only the signature can notice
    import blake3
    import crc32c

    tampered = bytearray(desc)
    end = HEADER_SIZE + h.index_size
    last, prev = tampered[end - 4 : end], tampered[end - 8 : end - 4]
    tampered[end - 8 : end] = last + prev
    tampered[112:144] = blake3.blake3(bytes(tampered[HEADER_SIZE:end])).digest()
    tampered[156:160] = crc32c.crc32c(bytes(tampered[:156])).to_bytes(4, "little")
    decode_description(bytes(tampered))  # structurally valid ...
    with pytest.raises(ChecksumError, match="signature"):  # ... but not what was signed
        decode_description(bytes(tampered), public_key=KEY.public_key())
    unsigned = _description(_archive(tmp_path, _sample()))
    hu = decode_header(unsigned)
    with pytest.raises(ChecksumError, match="not signed"):
        verify_signature(KEY.public_key(), hu, unsigned[:HEADER_SIZE], unsigned[HEADER_SIZE:], b"")


def _make_desc() -> bytes:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        return _description(_archive(Path(d), _sample()))


_DESC = _make_desc()


_PEAK = """
import sys
from btrdelta.chunk.chunker import ChunkerParams
from btrdelta.chunk.compress import compress_image
with open(sys.argv[2], "wb") as f:
    compress_image(sys.argv[1], f, params=ChunkerParams.from_avg(64 << 10), threads=2)
status = open("/proc/self/status").read()
print(next(int(line.split()[1]) for line in status.splitlines()
           if line.startswith("VmHWM:")) << 10)
"""


def test_compress_keeps_a_bounded_resident_set(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The pages behind the cut are unmapped as it goes, and the whole-image digest reads
    beside the map: the peak RSS of a 384 MiB image stays far below the image (it was the
    image and more: every page the three passes read stayed mapped; session 11: 465 MB for
    400 MiB; 1,102 MB before, 130 MB after for 1 GiB). A sparse image: its page cache is
    made of zeros, nothing written to disk."""
    import subprocess
    import sys

    import blake3

    from btrdelta.chunk.archive import decode_header

    image = tmp_path / "sparse.img"
    with open(image, "wb") as f:
        f.truncate(384 << 20)
        f.write(random.Random(5).randbytes(1 << 20))  # (not only zeros)
    out = tmp_path / "out.bdar"
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(image), str(out)],
                          capture_output=True, text=True, check=True)
    peak = int(proc.stdout)
    assert peak < 200 << 20, f"peak RSS {peak >> 20} MiB for a 384 MiB image"
    with open(out, "rb") as f:
        header = decode_header(f.read(4096))
    assert header.image_size == 384 << 20
    # the digest read beside the map is the image's
    assert header.image_digest == blake3.blake3(image.read_bytes()).digest()
