"""The full index of a release (``fulls/<blake3>.fidx``): its plain send stream as chunks
stored in the repository's packs (pure).

A release's *full* is its plain send stream cut into content-defined chunks, each chunk
compressed once (zstd) and stored once in the whole repository, in *pack* files
(``packs/<blake3>.pack``: zstd frames back to back). Packs are laid end to end in one
*pack space*: pack ``k`` occupies ``[base_k, base_k + length_k)``, the first starting at
160. A full index is

1. a chunk-archive *description* (``docs/formats/chunk-archive.md``: 160-byte header, then
   the index of dictionary and order; unsigned) whose chunk offsets are pack-space offsets:
   read as an archive, its data section *is* the pack space;
2. a pack table: magic ``BDPACKS\\n``, u32 count, then per pack used by the description
   32 bytes pack id (BLAKE3-256 of the pack file, so its name), u64 base, u64 length,
   sorted by base, not overlapping; every chunk lies inside one of them.

So the image tools' chunk store, seeds and range planning work on a full unchanged; only
the byte source differs (a range of the pack space is a range of one pack file).
"""

from __future__ import annotations

import bisect
import struct

from .._value import Value
from ..chunk.archive import HEADER_SIZE, ArchiveHeader, ArchiveIndex, decode_header, decode_index
from ..errors import StreamFormatError

__all__ = ["PACK_MAGIC", "FullIndex", "PackSlot", "decode_full_index", "encode_pack_table"]

PACK_MAGIC = b"BDPACKS\n"
_COUNT = struct.Struct("<I")
_SLOT = struct.Struct("<32sQQ")
_MAX_PACKS = 1 << 20


class PackSlot(Value, frozen=True):
    """One pack of the pack space: id (BLAKE3-256 of its bytes), base offset, length."""

    pack_id: bytes
    base: int
    length: int

    @property
    def end(self) -> int:
        return self.base + self.length

    @property
    def path(self) -> str:
        return f"packs/{self.pack_id.hex()}.pack"


class FullIndex(Value):
    """A decoded full index."""

    header: ArchiveHeader
    index: ArchiveIndex
    packs: list[PackSlot]
    #: the description bytes (header || index), as a chunk store keeps them
    description: bytes

    def pack_at(self, offset: int) -> PackSlot:
        """The pack holding pack-space ``offset``."""
        i = bisect.bisect_right([p.base for p in self.packs], offset) - 1
        if i < 0 or offset >= self.packs[i].end:
            raise KeyError(offset)
        return self.packs[i]

    def chunk_bytes(self) -> int:
        """Compressed bytes of all distinct chunks (a download from nothing)."""
        return sum(self.index.comp_sizes)


def encode_pack_table(packs: list[PackSlot]) -> bytes:
    """The pack table bytes (packs sorted by base)."""
    parts = [PACK_MAGIC, _COUNT.pack(len(packs))]
    parts += [_SLOT.pack(p.pack_id, p.base, p.length) for p in sorted(packs, key=lambda p: p.base)]
    return b"".join(parts)


def decode_full_index(buf: bytes, *, source: str) -> FullIndex:
    """Decode and check a full index; every failure is a one-line ``StreamFormatError``."""
    mv = memoryview(buf)
    header = decode_header(mv, source=source)
    if header.signed:
        raise StreamFormatError("a full index is never signed (flags bit 0 set)", source=source,
                                offset=10)
    end = HEADER_SIZE + header.index_size
    if len(mv) < end + len(PACK_MAGIC) + _COUNT.size:
        raise StreamFormatError(f"truncated: {len(mv)} bytes, the index alone needs {end}",
                                source=source, offset=len(mv))
    index = decode_index(header, mv[HEADER_SIZE:end], source=source, base=HEADER_SIZE,
                         data_end=header.index_offset)
    pos = end
    if mv[pos : pos + len(PACK_MAGIC)] != PACK_MAGIC:
        raise StreamFormatError("pack table magic missing", source=source, offset=pos)
    pos += len(PACK_MAGIC)
    (count,) = _COUNT.unpack_from(mv, pos)
    pos += _COUNT.size
    if count > _MAX_PACKS or len(mv) != pos + count * _SLOT.size:
        raise StreamFormatError(f"pack table of {count} packs does not fit the file",
                                source=source, offset=pos - _COUNT.size)
    packs: list[PackSlot] = []
    last_end = HEADER_SIZE
    for k in range(count):
        pid, base, length = _SLOT.unpack_from(mv, pos + k * _SLOT.size)
        if base < last_end or length == 0 or base + length > header.index_offset:
            raise StreamFormatError(f"pack {k} [{base}, {base + length}) out of order or "
                                    "outside the pack space", source=source,
                                    offset=pos + k * _SLOT.size)
        packs.append(PackSlot(bytes(pid), base, length))
        last_end = base + length
    full = FullIndex(header, index, packs, bytes(mv[:end]))
    bases = [p.base for p in packs]
    for entry, (off, size) in enumerate(zip(index.offsets, index.comp_sizes, strict=True)):
        i = bisect.bisect_right(bases, off) - 1
        if i < 0 or off + size > packs[i].end:
            raise StreamFormatError(f"chunk {entry} at pack-space {off} is in no listed pack",
                                    source=source, offset=HEADER_SIZE + 48 * entry)
    return full
