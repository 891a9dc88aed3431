"""Full indexes: a chunk-archive description over the pack space plus a pack table."""

from __future__ import annotations

from array import array

import blake3
import pytest
import zstandard

from btrdelta.chunk.archive import ArchiveHeader, encode_header, encode_index, with_index_digest
from btrdelta.chunk.chunker import ChunkerParams
from btrdelta.errors import StreamFormatError
from btrdelta.repo.fullindex import PackSlot, decode_full_index, encode_pack_table


def _fidx(chunks: list[bytes], split: int) -> tuple[bytes, list[bytes]]:
    frames = [zstandard.ZstdCompressor(write_content_size=True).compress(c) for c in chunks]
    packs = [b"".join(frames[:split]), b"".join(frames[split:])]
    offsets, pos = array("Q"), 160
    for f in frames:
        offsets.append(pos)
        pos += len(f)
    slots = [PackSlot(blake3.blake3(packs[0]).digest(), 160, len(packs[0])),
             PackSlot(blake3.blake3(packs[1]).digest(), 160 + len(packs[0]), len(packs[1]))]
    digests = [blake3.blake3(c).digest() for c in chunks]
    index = encode_index(digests, offsets, array("I", map(len, frames)),
                         array("I", map(len, chunks)), array("I", [0, 1, 2, 1]))
    image = chunks[0] + chunks[1] + chunks[2] + chunks[1]
    header = with_index_digest(ArchiveHeader(
        params=ChunkerParams.from_avg(1024), image_size=len(image), chunk_count=3,
        order_count=4, index_offset=pos, image_digest=blake3.blake3(image).digest()), index)
    return encode_header(header) + index + encode_pack_table(slots[::-1]), packs


def test_round_trip_and_pack_lookup() -> None:
    chunks = [bytes([i]) * (300 + i) for i in range(3)]
    data, packs = _fidx(chunks, 2)
    full = decode_full_index(data, source="f.fidx")
    assert [p.base for p in full.packs] == [160, 160 + len(packs[0])]
    assert full.pack_at(full.index.offsets[2]) == full.packs[1]
    assert full.pack_at(160) == full.packs[0]
    assert full.chunk_bytes() == sum(map(len, packs))
    assert full.header.image_size == sum(map(len, chunks)) + len(chunks[1])
    assert full.packs[0].path == f"packs/{blake3.blake3(packs[0]).hexdigest()}.pack"
    with pytest.raises(KeyError):
        full.pack_at(10)


def test_damage_is_refused_with_an_offset() -> None:
    data, _ = _fidx([b"a" * 400, b"b" * 500, b"c" * 600], 1)
    for cut in (100, 160 + 10, len(data) - 1):
        with pytest.raises(StreamFormatError):
            decode_full_index(data[:cut], source="f")
    bad = bytearray(data)
    bad[-1] ^= 0xFF  # the second pack's length: chunks leave the listed packs
    with pytest.raises(StreamFormatError, match="f: offset"):
        decode_full_index(bytes(bad), source="f")
    # drop the second pack from the table
    k = data.index(b"BDPACKS\n")
    short = data[:k] + b"BDPACKS\n" + (1).to_bytes(4, "little") + data[k + 12 : k + 12 + 48]
    with pytest.raises(StreamFormatError, match="in no listed pack"):
        decode_full_index(short, source="f")
