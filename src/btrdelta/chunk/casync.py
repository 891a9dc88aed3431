"""casync/desync interop (sans-I/O): blob indexes (``.caibx``), chunk files (``.cacnk``), and
seeds cut the way casync cuts.

This module owns the bytes of ``docs/formats/casync.md`` (written from casync's format
description, for reading only): it decodes an index from a buffer, names a chunk's place in
a ``.castr`` store, decompresses and checks one chunk file, and cuts and hashes a seed like
casync (:class:`CasyncChunking`). It never opens a file or a URL: the clone workflow does.
Any malformed input raises :class:`StreamFormatError` (or :class:`ChecksumError`) naming
the offset or the chunk.

Index layout (all integers little-endian u64)::

    [0, 48)          INDEX: size 48, type, feature flags, chunk size min / avg / max
    [48, 64)         TABLE header: size 2^64-1, type
    [64, 64 + 40n)   n items: end offset of the chunk in the blob, 32-byte chunk id
    [.., + 40)       tail: 0, 0, 48 (offset of INDEX from TABLE), table size, marker
"""

from __future__ import annotations

import hashlib
import lzma
import struct
import zlib
from array import array
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, Future
from io import BytesIO
from itertools import accumulate

import zstandard

from .._value import Value, field
from ..errors import ChecksumError, StreamFormatError
from .buzhash import WINDOW, cuts, discriminator
from .chunker import WINDOW_SIZE, ChunkBatch

__all__ = [
    "CA_FORMAT_SHA512_256",
    "INDEX_SUFFIX",
    "MAX_INDEX_SIZE",
    "CasyncChunking",
    "CasyncIndex",
    "chunk_file_name",
    "decode_caibx",
    "decode_chunk_file",
    "is_caibx",
]

CA_FORMAT_INDEX = 0x96824D9C7B129FF9
CA_FORMAT_TABLE = 0xE75B9E112F17417D
CA_FORMAT_TABLE_TAIL_MARKER = 0x4B4F050E5549ECD1
#: feature flag: chunk ids are SHA-512/256 (else SHA-256)
CA_FORMAT_SHA512_256 = 0x2000000000000000
INDEX_SUFFIX = ".caibx"
CHUNK_SUFFIX = ".cacnk"
#: casync's chunk size limits
CHUNK_LIMIT_MIN, CHUNK_LIMIT_MAX = 1, 128 << 20
#: Largest index a reader loads (about 6.7 million chunks: a 400 GiB image at 64 KiB).
MAX_INDEX_SIZE = 256 << 20

_HEAD = struct.Struct("<QQQQQQ QQ")
_ITEM = struct.Struct("<Q32s")
_TAIL = struct.Struct("<QQQQQ")
_HEAD_SIZE, _ITEM_SIZE = _HEAD.size, _ITEM.size  # 64, 40
_XZ, _GZIP, _ZSTD = b"\xfd7zXZ\x00", b"\x1f\x8b", b"\x28\xb5\x2f\xfd"


def is_caibx(buf: bytes | memoryview) -> bool:
    """The bytes start like a casync index."""
    return len(buf) >= 16 and struct.unpack_from("<QQ", buf) == (48, CA_FORMAT_INDEX)


class CasyncIndex(Value):
    """A decoded blob index, shaped like :class:`~btrdelta.chunk.archive.ArchiveIndex`
    (what the clone and output code read: ``digests``, ``raw_sizes``, ``order``,
    ``starts``).

    Attributes:
        feature_flags: the index's flags (only :data:`CA_FORMAT_SHA512_256` matters here).
        min_size, avg_size, max_size: the chunker sizes the blob was cut with.
        digests: chunk id per distinct chunk (first-use order).
        raw_sizes: size per distinct chunk.
        order: distinct-chunk number per position.
        starts: blob offset of each position, plus the blob size at the end.
    """

    feature_flags: int
    min_size: int
    avg_size: int
    max_size: int
    digests: list[bytes] = field(default_factory=list)
    raw_sizes: array[int] = field(default_factory=lambda: array("I"))
    order: array[int] = field(default_factory=lambda: array("I"))
    starts: array[int] = field(default_factory=lambda: array("Q", [0]))

    @property
    def hash_name(self) -> str:
        """``hashlib`` name of the chunk-id hash."""
        return "sha512_256" if self.feature_flags & CA_FORMAT_SHA512_256 else "sha256"

    @property
    def image_size(self) -> int:
        """Bytes in the blob."""
        return self.starts[-1]

    def chunking(self) -> CasyncChunking:
        """How to cut and hash a seed to find this index's chunks."""
        return CasyncChunking(self.min_size, self.avg_size, self.max_size, self.hash_name)


def decode_caibx(buf: bytes | bytearray | memoryview, *, source: str | None = None) -> CasyncIndex:
    """Decode and check a casync blob index.

    Raises:
        StreamFormatError: not an index, truncated, or inconsistent.
    """
    mv = memoryview(buf)

    def bad(what: str, offset: int) -> StreamFormatError:
        return StreamFormatError(what, source=source, offset=offset)

    if len(mv) < _HEAD_SIZE + _TAIL.size:
        raise bad(f"casync index truncated ({len(mv)} bytes)", 0)
    size, kind, flags, cmin, cavg, cmax, tsize, tkind = _HEAD.unpack_from(mv)
    if (size, kind) != (48, CA_FORMAT_INDEX):
        raise bad("not a casync index (bad INDEX header)", 0)
    for what, value, off in (("min", cmin, 24), ("avg", cavg, 32), ("max", cmax, 40)):
        if not CHUNK_LIMIT_MIN <= value <= CHUNK_LIMIT_MAX:
            raise bad(f"chunk size {what} {value} out of range", off)
    if not cmin <= cavg <= cmax:
        raise bad(f"chunk sizes not ordered: {cmin} / {cavg} / {cmax}", 24)
    if (tsize, tkind) != (2**64 - 1, CA_FORMAT_TABLE):
        raise bad("bad TABLE header", 48)
    body = len(mv) - _HEAD_SIZE - _TAIL.size
    if body % _ITEM_SIZE:
        raise bad(f"table is not a whole number of items ({body} bytes)", _HEAD_SIZE)
    tail_at = len(mv) - _TAIL.size
    zero1, zero2, index_offset, table_size, marker = _TAIL.unpack_from(mv, tail_at)
    if (zero1, zero2, index_offset, marker) != (0, 0, 48, CA_FORMAT_TABLE_TAIL_MARKER) \
            or table_size != len(mv) - 48:
        raise bad("bad table tail", tail_at)
    index = CasyncIndex(flags, cmin, cavg, cmax)
    seen: dict[bytes, int] = {}
    prev = 0
    for i, (end, digest) in enumerate(_ITEM.iter_unpack(mv[_HEAD_SIZE:tail_at])):
        if not 0 < end - prev <= cmax:
            raise StreamFormatError(
                f"chunk {i}: end offset {end} after {prev} (sizes must be 1..{cmax})",
                source=source, offset=_HEAD_SIZE + i * _ITEM_SIZE, index=i)
        entry = seen.get(digest)
        if entry is None:
            entry = seen[digest] = len(index.digests)
            index.digests.append(digest)
            index.raw_sizes.append(end - prev)
        elif index.raw_sizes[entry] != end - prev:
            raise StreamFormatError(
                f"chunk {i}: id {digest.hex()[:16]}… used with two sizes", source=source,
                offset=_HEAD_SIZE + i * _ITEM_SIZE, index=i)
        index.order.append(entry)
        prev = end
    index.starts.extend(accumulate(index.raw_sizes[e] for e in index.order))
    return index


def chunk_file_name(digest: bytes) -> str:
    """A chunk's path inside a ``.castr`` store: ``<4 hex digits>/<64 hex digits>.cacnk``."""
    hexd = digest.hex()
    return f"{hexd[:4]}/{hexd}{CHUNK_SUFFIX}"


def _bounded(blob: memoryview, limit: int) -> bytes:
    """Decompress one chunk file, reading at most ``limit`` output bytes."""
    head = bytes(blob[:6])
    if head.startswith(_ZSTD):
        with zstandard.ZstdDecompressor().stream_reader(BytesIO(blob)) as reader:
            return reader.read(limit)
    if head.startswith(_XZ):
        return lzma.LZMADecompressor().decompress(blob, max_length=limit)
    if head.startswith(_GZIP):
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(blob, limit)
    raise StreamFormatError("chunk file is not zstd, xz or gzip compressed")


def decode_chunk_file(
    blob: bytes | memoryview, digest: bytes, raw_size: int, hash_name: str, *,
    source: str | None = None,
) -> bytes:
    """The chunk in a ``.cacnk`` file, decompressed (bounded by ``raw_size``) and checked.

    Raises:
        ChecksumError: the file is not the chunk its name and ``digest`` say: not compressed
            data, not decodable, of another size, or content not hashing to ``digest`` (a
            damaged byte gives this one error wherever it falls).
    """
    prefix = f"chunk {digest.hex()[:16]}… does not match its id"
    try:
        raw = _bounded(memoryview(blob), raw_size + 1)
    except (zstandard.ZstdError, lzma.LZMAError, zlib.error) as exc:
        raise ChecksumError(f"{prefix} (bad compressed data: {exc})", source=source) from exc
    except StreamFormatError as exc:
        raise ChecksumError(f"{prefix} ({exc.message})", source=source) from None
    if len(raw) != raw_size:
        raise ChecksumError(
            f"{prefix} ({'more than ' if len(raw) > raw_size else ''}"
            f"{min(len(raw), raw_size + 1) - (len(raw) > raw_size)} bytes, index says "
            f"{raw_size})", source=source)
    actual = hashlib.new(hash_name, raw).digest()
    if actual != digest:
        raise ChecksumError(prefix, expected=digest.hex(), actual=actual.hex(), source=source)
    return raw


class CasyncChunking(Value, frozen=True):
    """Cut and hash an input like casync: buzhash cut points, SHA-512/256 (or SHA-256) ids.

    Attributes:
        min_size, avg_size, max_size: the index's chunk sizes.
        hash_name: ``hashlib`` name of the id hash.
    """

    min_size: int
    avg_size: int
    max_size: int
    hash_name: str = "sha512_256"

    @property
    def discriminator(self) -> int:
        """casync's discriminator, clamped to ``[min, max]``."""
        return min(max(discriminator(self.avg_size), self.min_size), self.max_size)

    def digest(self, data: bytes | bytearray | memoryview) -> bytes:
        """A chunk's id."""
        return hashlib.new(self.hash_name, data).digest()

    def _digests(self, views: list[memoryview]) -> list[bytes]:
        new = hashlib.new
        name = self.hash_name
        return [new(name, v).digest() for v in views]

    def cut(self, buf: bytes | bytearray | memoryview) -> list[int]:
        """End offsets of every chunk of ``buf``."""
        return cuts(buf, 0, len(buf), self.min_size, self.max_size, self.discriminator)

    def hash_chunks(self, view: memoryview, pool: Executor | None = None) -> Iterator[ChunkBatch]:
        """Cut ``view`` and hash its chunks, in batches of about 16 MiB (hashed on ``pool``
        while the next batch is cut, when given)."""
        if self.max_size < WINDOW:
            raise StreamFormatError(f"casync chunk size max {self.max_size} < {WINDOW}: "
                                    "cannot cut seeds with it")
        size, d = len(view), self.discriminator
        pending: deque[tuple[list[int], list[memoryview], Future[list[bytes]] | None]] = deque()
        pos = 0
        while pos < size:
            ends = cuts(view, pos, pos + WINDOW_SIZE, self.min_size, self.max_size, d)
            offsets = [pos, *ends[:-1]]
            views = [view[a:b] for a, b in zip(offsets, ends, strict=True)]
            pos = ends[-1]
            if pool is None:
                yield ChunkBatch(offsets, views, self._digests(views))
                continue
            pending.append((offsets, views, pool.submit(self._digests, views)))
            if len(pending) > 2:
                yield _done(pending.popleft())
        while pending:
            yield _done(pending.popleft())


def _done(item: tuple[list[int], list[memoryview], Future[list[bytes]] | None]) -> ChunkBatch:
    offsets, views, fut = item
    assert fut is not None
    return ChunkBatch(offsets, views, fut.result())

