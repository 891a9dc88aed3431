"""Chunks fetched from an archive: damage anywhere in a chunk's bytes is one error."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from btrdelta.chunk.chunker import ChunkerParams
from btrdelta.chunk.compress import compress_image
from btrdelta.chunk.source import ArchiveChunks, open_source, read_index
from btrdelta.errors import ChecksumError

PARAMS = ChunkerParams(min_size=64, avg_size=256, max_size=1024)


def test_a_flipped_byte_anywhere_in_a_chunk_is_a_mismatch_of_its_id(tmp_path: Path) -> None:
    """Wherever the byte falls (the zstd frame's header, its compressed data, its checksum,
    the content), the chunk does not match its id (exit 5), never a malformed archive
    (exit 3) for some positions and a mismatch for others."""
    img = tmp_path / "img"
    rnd = random.Random(5)
    img.write_bytes(rnd.randbytes(2000) + b"text " * 400 + rnd.randbytes(1500))
    arc = tmp_path / "a.bdar"
    with arc.open("wb") as out:
        compress_image(img, out, params=PARAMS, threads=1)
    good = arc.read_bytes()
    source = open_source(str(arc))
    try:
        _, index, _ = read_index(source)
    finally:
        source.close()
    entry = max(range(len(index.offsets)), key=lambda e: index.comp_sizes[e])
    start, size = index.offsets[entry], index.comp_sizes[entry]
    for pos in range(start, start + size):
        bad = bytearray(good)
        bad[pos] ^= 0x40
        arc.write_bytes(bytes(bad))
        source = open_source(str(arc))
        try:
            with pytest.raises(ChecksumError, match=rf"chunk {entry}\b.* does not match its id"):
                ArchiveChunks(source, index).fetch([entry], lambda e, data: None)
        finally:
            source.close()
