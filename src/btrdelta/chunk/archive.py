"""The chunk archive format (sans-I/O): header, chunk dictionary, rebuild order, signature.

This module owns the bytes of ``docs/formats/chunk-archive.md`` and nothing else: it encodes
and decodes them from buffers, checks every size, checksum and signature, and never opens a
file. Any malformed input raises :class:`StreamFormatError` (or its subclasses) naming the
offset; no other exception escapes the decoders.

Layout (all integers little-endian)::

    [0, 160)                 header (fixed size, CRC32C-protected)
    [160, index_offset)      chunk data: each distinct chunk, zstd-compressed, once
    [index_offset, +size)    index: chunk dictionary (48 B/entry), then order (4 B/entry)
    [.., +sig_size)          optional Ed25519 signature over header || index

A store *description* (``docs/formats/chunk-store.md``) is header || index || signature,
the same bytes without the data section.
"""

from __future__ import annotations

import struct
from array import array
from itertools import accumulate

import blake3

from .. import TYPE_CHECKING, _native
from .._value import Value, field, replace
from ..errors import ChecksumError, SignatureError, StreamFormatError, UnsupportedVersionError
from ..trust import PrivateKey, PublicKey, sign_message, verify_message
from .chunker import ChunkerParams

if TYPE_CHECKING:
    import zstandard

__all__ = [
    "ENTRY_SIZE",
    "FORMAT_VERSION",
    "HASH_BLAKE3",
    "HEADER_SIZE",
    "MAGIC",
    "ORDER_ENTRY_SIZE",
    "SIGNATURE_SIZE",
    "ArchiveHeader",
    "ArchiveIndex",
    "decode_chunk",
    "decode_description",
    "decode_header",
    "decode_index",
    "encode_header",
    "encode_index",
    "max_compressed_size",
    "sign",
    "verify_signature",
]

MAGIC = b"BDCHUNK\n"
FORMAT_VERSION = 1
HEADER_SIZE = 160
ENTRY_SIZE = 48
ORDER_ENTRY_SIZE = 4
SIGNATURE_SIZE = 64
HASH_BLAKE3 = 1
COMPRESSION_ZSTD = 1
CHUNKER_FASTCDC = 1
FLAG_SIGNED = 1

_HEADER = struct.Struct("<8sHHBBBB4I Q QQQ QQ 32s 32s I 8x")
_CRC = struct.Struct("<I")
_ENTRY = struct.Struct("<32sQII")
assert _HEADER.size + _CRC.size == HEADER_SIZE
assert _ENTRY.size == ENTRY_SIZE

#: Largest image a decoder accepts (1 PiB): keeps every derived size bounded.
MAX_IMAGE_SIZE = 1 << 50


def max_compressed_size(raw_size: int) -> int:
    """Upper bound on a zstd frame for ``raw_size`` input bytes (ZSTD_COMPRESSBOUND + slack)."""
    return raw_size + (raw_size >> 8) + 512


class ArchiveHeader(Value, frozen=True):
    """The fixed 160-byte archive header.

    Attributes:
        params: chunker parameters the image was cut with (seeds must be cut alike).
        image_size: bytes in the rebuilt image.
        chunk_count: distinct chunks in the dictionary.
        order_count: chunk references that rebuild the image, in order.
        index_offset: where the index starts in the archive.
        image_digest: BLAKE3-256 of the whole image.
        index_digest: BLAKE3-256 of the index bytes.
        signed: an Ed25519 signature follows the index.
    """

    params: ChunkerParams
    image_size: int
    chunk_count: int
    order_count: int
    index_offset: int
    image_digest: bytes
    index_digest: bytes = b"\0" * 32
    signed: bool = False
    version: int = FORMAT_VERSION

    @property
    def index_size(self) -> int:
        """Bytes in the index (dictionary + order)."""
        return self.chunk_count * ENTRY_SIZE + self.order_count * ORDER_ENTRY_SIZE

    @property
    def sig_size(self) -> int:
        """Bytes of signature after the index (0 or 64)."""
        return SIGNATURE_SIZE if self.signed else 0

    @property
    def archive_size(self) -> int:
        """Total size of the archive this header describes."""
        return self.index_offset + self.index_size + self.sig_size


class ArchiveIndex(Value):
    """The decoded dictionary and order, with derived image offsets.

    Attributes:
        digests: chunk id per dictionary entry.
        offsets: archive offset of each entry's compressed bytes.
        comp_sizes: compressed size per entry.
        raw_sizes: uncompressed size per entry.
        order: dictionary entry per image position.
        starts: image offset of each position, plus the image size at the end.
    """

    digests: list[bytes]
    offsets: array[int]
    comp_sizes: array[int]
    raw_sizes: array[int]
    order: array[int]
    starts: array[int] = field(default_factory=lambda: array("Q"))

    def entry_of(self, digest: bytes) -> int:
        """Dictionary entry number of ``digest`` (``KeyError`` if absent)."""
        return self.digests.index(digest)


#: magics of files people give instead of an archive, and what to tell them
_OTHER_MAGICS = (
    (b"\x28\xb5\x2f\xfd", "this is zstd-compressed: an archive is not compressed as a whole "
     "(its chunks are); decompress it first (zstd -d)"),
    (b"\xfd7zXZ\x00", "this is xz-compressed: decompress it first (xz -d)"),
    (b"\x1f\x8b", "this is gzip-compressed: decompress it first (gzip -d)"),
    (b"\x30\x00\x00\x00\x00\x00\x00\x00", "this looks like a casync index (.caibx): "
     "name it with its .caibx suffix"),
    (b"btrfs-stream\x00", "this is a btrfs send stream (btrdelta receive, dump and stat read "
     "it; image compress makes an archive of a disk image)"),
    (b"btrdelta-dstream\x00", "this is a btrdelta delta stream (btrdelta receive and delta expand "
     "read it)"),
)


def _not_an_archive(head: bytes) -> str:
    for magic, what in _OTHER_MAGICS:
        if head.startswith(magic):
            return f"not a btrdelta chunk archive: {what}"
    return "not a btrdelta chunk archive (bad magic)"


def _crc32c(data: bytes | memoryview) -> int:
    """CRC-32C of ``data``: the C accelerator's where the CPU has the instruction (as
    ``stream/crc.py`` picks), else the crc32c package's, imported here only: its import
    reads package metadata (~150 M instructions under callgrind, a quarter of a CLI
    update that decodes full indexes to plan)."""
    speedups = _native.live("speedups")
    if speedups is not None and speedups.CRC_IMPL == "sse4.2":
        return int(speedups.crc32c_std(data, 0))
    import crc32c

    return int(crc32c.crc32c(data))


def encode_header(h: ArchiveHeader) -> bytes:
    """The 160 header bytes for ``h``."""
    p = h.params
    body = _HEADER.pack(
        MAGIC, h.version, FLAG_SIGNED if h.signed else 0, HASH_BLAKE3, COMPRESSION_ZSTD,
        CHUNKER_FASTCDC, p.normalization, p.min_size, p.avg_size, p.max_size, 0,
        p.seed, h.image_size, h.chunk_count, h.order_count, h.index_offset, h.index_size,
        h.image_digest, h.index_digest, h.sig_size,
    )
    return body + _CRC.pack(_crc32c(body))


def decode_header(
    buf: bytes | bytearray | memoryview, *, source: str | None = None
) -> ArchiveHeader:
    """Decode and check the header at the start of ``buf``.

    Raises:
        StreamFormatError: wrong magic, truncated, inconsistent sizes.
        ChecksumError: the header CRC32C does not match.
        UnsupportedVersionError: a version other than 1.
    """
    mv = memoryview(buf)
    if len(mv) < HEADER_SIZE:
        raise StreamFormatError(
            f"archive header truncated ({len(mv)} of {HEADER_SIZE} bytes)", source=source, offset=0
        )
    if bytes(mv[:8]) != MAGIC:
        raise StreamFormatError(_not_an_archive(bytes(mv[:32])), source=source, offset=0)
    (
        _magic, version, flags, hash_algo, compression, chunker, norm, min_size, avg_size,
        max_size, _reserved, seed, image_size, chunk_count, order_count, index_offset,
        index_size, image_digest, index_digest, sig_size,
    ) = _HEADER.unpack_from(mv, 0)
    (crc,) = _CRC.unpack_from(mv, _HEADER.size)
    actual = _crc32c(mv[: _HEADER.size])
    if crc != actual:
        raise ChecksumError(
            "archive header CRC32C mismatch", expected=crc, actual=actual, source=source,
            offset=_HEADER.size,
        )
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"chunk archive version {version} (this build reads {FORMAT_VERSION})",
            source=source, offset=8,
        )

    def bad(what: str, offset: int) -> StreamFormatError:
        return StreamFormatError(what, source=source, offset=offset)

    if flags & ~FLAG_SIGNED:
        raise bad(f"unknown archive flags {flags:#x}", 10)
    if hash_algo != HASH_BLAKE3:
        raise bad(f"unknown hash algorithm {hash_algo}", 12)
    if compression != COMPRESSION_ZSTD:
        raise bad(f"unknown compression {compression}", 13)
    if chunker != CHUNKER_FASTCDC:
        raise bad(f"unknown chunker {chunker}", 14)
    params = ChunkerParams(min_size, avg_size, max_size, norm, seed)
    try:
        params.validate()
    except StreamFormatError as exc:
        raise exc.located(source=source, offset=16) from None
    if image_size > MAX_IMAGE_SIZE:
        raise bad(f"image size {image_size} too large", 40)
    max_positions = image_size // min_size + 1 if image_size else 0
    if order_count > max_positions or (image_size and order_count == 0):
        raise bad(f"order count {order_count} impossible for a {image_size}-byte image", 56)
    if chunk_count > order_count:
        raise bad(f"chunk count {chunk_count} exceeds order count {order_count}", 48)
    signed = bool(flags & FLAG_SIGNED)
    header = ArchiveHeader(
        params=params, image_size=image_size, chunk_count=chunk_count,
        order_count=order_count, index_offset=index_offset, image_digest=image_digest,
        index_digest=index_digest, signed=signed, version=version,
    )
    if index_size != header.index_size:
        raise bad(f"index size {index_size} != {header.index_size} for the counts given", 72)
    if sig_size != header.sig_size:
        raise bad(f"signature size {sig_size} does not match flags", 144)
    if index_offset < HEADER_SIZE:
        raise bad(f"index offset {index_offset} inside the header", 64)
    return header


def encode_index(
    digests: list[bytes], offsets: array[int], comp_sizes: array[int], raw_sizes: array[int],
    order: array[int],
) -> bytes:
    """The index bytes: one 48-byte entry per distinct chunk, then the u32 order."""
    parts = [
        _ENTRY.pack(d, o, c, r)
        for d, o, c, r in zip(digests, offsets, comp_sizes, raw_sizes, strict=True)
    ]
    order_le = array("I", order)
    if order_le.itemsize != 4:  # pragma: no cover - every supported platform has 4-byte I
        raise AssertionError("array('I') is not 32-bit here")
    parts.append(order_le.tobytes())
    return b"".join(parts)


def decode_index(
    header: ArchiveHeader, buf: bytes | bytearray | memoryview, *, source: str | None = None,
    base: int | None = None, data_end: int | None = None,
) -> ArchiveIndex:
    """Decode and check the index that ``header`` describes.

    Args:
        header: the decoded header.
        buf: exactly the index bytes (``header.index_size`` of them).
        source: name for errors.
        base: offset of ``buf`` in its file, for error locations (default ``index_offset``).
        data_end: end of the data section (default ``header.index_offset``).

    Raises:
        StreamFormatError: bad sizes or references; ``ChecksumError`` on a digest mismatch.
    """
    mv = memoryview(buf)
    base = header.index_offset if base is None else base
    data_end = header.index_offset if data_end is None else data_end
    if len(mv) != header.index_size:
        raise StreamFormatError(
            f"index is {len(mv)} bytes, header says {header.index_size}", source=source,
            offset=base,
        )
    actual = blake3.blake3(mv).digest()
    if actual != header.index_digest:
        raise ChecksumError(
            "archive index digest mismatch", expected=header.index_digest.hex(),
            actual=actual.hex(), source=source, offset=base,
        )
    n = header.chunk_count
    digests: list[bytes] = []
    offsets, comp_sizes, raw_sizes = array("Q"), array("I"), array("I")
    max_raw = header.params.max_size
    for i, (digest, off, comp, raw) in enumerate(_ENTRY.iter_unpack(mv[: n * ENTRY_SIZE])):
        if not 0 < raw <= max_raw or not 0 < comp <= max_compressed_size(raw):
            raise StreamFormatError(
                f"chunk entry {i}: sizes raw {raw} / compressed {comp} out of range",
                source=source, offset=base + i * ENTRY_SIZE, index=i,
            )
        if off < HEADER_SIZE or off + comp > data_end:
            raise StreamFormatError(
                f"chunk entry {i}: data [{off}, {off + comp}) outside the data section",
                source=source, offset=base + i * ENTRY_SIZE, index=i,
            )
        digests.append(digest)
        offsets.append(off)
        comp_sizes.append(comp)
        raw_sizes.append(raw)
    if len(set(digests)) != n:
        raise StreamFormatError("duplicate chunk ids in the dictionary", source=source, offset=base)
    order = array("I")
    order.frombytes(mv[n * ENTRY_SIZE :])
    if order and max(order) >= n:
        pos = next(i for i, e in enumerate(order) if e >= n)
        raise StreamFormatError(
            f"order position {pos} names entry {order[pos]} of {n}", source=source,
            offset=base + n * ENTRY_SIZE + pos * ORDER_ENTRY_SIZE, index=pos,
        )
    starts = array("Q", [0])
    starts.extend(accumulate(raw_sizes[e] for e in order))
    if starts[-1] != header.image_size:
        raise StreamFormatError(
            f"order rebuilds {starts[-1]} bytes, header says {header.image_size}",
            source=source, offset=base + n * ENTRY_SIZE,
        )
    if n and len(set(order)) != n:
        raise StreamFormatError("dictionary holds chunks the order never uses",
                                source=source, offset=base)
    return ArchiveIndex(digests, offsets, comp_sizes, raw_sizes, order, starts)


def decode_description(
    buf: bytes | bytearray | memoryview, *, source: str | None = None,
    public_key: PublicKey | None = None,
) -> tuple[ArchiveHeader, ArchiveIndex]:
    """Decode a store description (header || index || signature), checking it fully.

    Args:
        buf: the whole description file.
        source: name for errors.
        public_key: when given, the signature must be present and valid.
    """
    mv = memoryview(buf)
    header = decode_header(mv, source=source)
    end = HEADER_SIZE + header.index_size
    if len(mv) != end + header.sig_size:
        if len(mv) == header.archive_size:  # (a user's `image verify www/v2.bdar`)
            raise StreamFormatError(
                "a whole chunk archive, not a store's image description (image verify, "
                "mount and nbd take the STORE/NAME image clone made; image info reads an "
                "archive)", source=source)
        raise StreamFormatError(
            f"description is {len(mv)} bytes, expected {end + header.sig_size}",
            source=source, offset=len(mv),
        )
    if public_key is not None:
        verify_signature(public_key, header, mv[:HEADER_SIZE], mv[HEADER_SIZE:end],
                         mv[end:], source=source)
    index = decode_index(header, mv[HEADER_SIZE:end], source=source, base=HEADER_SIZE,
                         data_end=header.index_offset)
    return header, index


def sign(key: PrivateKey, header: bytes, index: bytes) -> bytes:
    """The Ed25519 signature over ``header || index`` (header must have ``signed`` set)."""
    return sign_message(key, header + index)


def verify_signature(
    key: PublicKey, header: ArchiveHeader, header_bytes: bytes | memoryview,
    index_bytes: bytes | memoryview, signature: bytes | memoryview, *, source: str | None = None,
) -> None:
    """Check the detached signature before anything in the index is trusted.

    Raises:
        SignatureError: unsigned archive, or the signature does not verify.
    """
    if not header.signed or len(signature) != SIGNATURE_SIZE:
        raise SignatureError("archive is not signed but a key was given", source=source)
    try:
        verify_message(key, bytes(header_bytes) + bytes(index_bytes), bytes(signature),
                       what="archive", source=source)
    except SignatureError as exc:
        raise exc.located(offset=header.index_offset + header.index_size) from None


def with_index_digest(header: ArchiveHeader, index: bytes) -> ArchiveHeader:
    """``header`` with ``index_digest`` set from ``index``."""
    return replace(header, index_digest=blake3.blake3(index).digest())


def decode_chunk(dctx: zstandard.ZstdDecompressor, blob: bytes | memoryview, raw_size: int,
                 entry: int, *, source: str, offset: int) -> bytes:
    """The ``raw_size`` bytes of chunk ``entry``'s zstd frame ``blob`` (at ``offset`` of
    ``source``; an archive's or a repository pack's), decompressed with that bound. A frame
    that does not decode to exactly them is a chunk not matching its id (``ChecksumError``,
    as a wrong digest is, which the caller checks): a damaged byte gives the same error
    wherever it falls, in the frame's header, its data or the content itself."""
    import zstandard  # (only where chunks are read: not on every importer's path)

    why = None
    try:
        params = zstandard.get_frame_parameters(blob)
        if params.content_size != raw_size:
            why = f"its zstd frame declares {params.content_size} bytes, the index {raw_size}"
        else:
            raw = dctx.decompress(blob, max_output_size=raw_size)
            if len(raw) != raw_size:
                why = f"{len(raw)} bytes, the index says {raw_size}"
    except zstandard.ZstdError as exc:
        why = f"its zstd frame does not decode: {exc}"
    if why is not None:
        raise ChecksumError(f"chunk {entry} does not match its id ({why}); not used",
                            source=source, offset=offset, index=entry)
    return raw
