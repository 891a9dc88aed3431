"""Decoding ENCODED_WRITE payloads (btrfs extents as stored on disk) to plain bytes.

Used when the destination cannot take the extent as is (not btrfs, unaligned, LZO sector
size mismatch). Formats (``docs/formats/send-stream.md``, "Encoded extents"): zlib is one zlib
stream, zstd one zstd frame, LZO (compression 3..7) is btrfs's own framing of raw LZO1X
segments of ``4096 << (compression - 3)`` bytes. Data after the end of the compressed
stream (sector padding) is ignored; output shorter than ``unencoded_len`` is zero-extended.
The output is bounded by ``unencoded_len`` (≤ 128 KiB for kernel streams; the caller checks
its own limit), so a hostile payload cannot make us allocate more.
"""

from __future__ import annotations

import functools
import struct
import zlib
from typing import Any

from ..errors import StreamFormatError

__all__ = ["COMPRESSION_NAMES", "MAX_UNENCODED", "decode_extent"]

#: largest decompressed extent accepted from an ENCODED_WRITE (the kernel writes 128 KiB);
#: the C fast path checks the same bound (``_constants.h``)
MAX_UNENCODED = 8 << 20

COMPRESSION_NAMES = {0: "none", 1: "zlib", 2: "zstd", 3: "lzo-4k", 4: "lzo-8k", 5: "lzo-16k",
                     6: "lzo-32k", 7: "lzo-64k"}

_U32 = struct.Struct("<I")


def _zlib(data: memoryview, limit: int) -> bytes:
    d = zlib.decompressobj()
    return d.decompress(data, limit)


@functools.cache
def _zstd() -> Any:
    # imported on first use: a receive without decompression does not pay for it
    import zstandard

    return zstandard.ZstdDecompressor()


@functools.cache
def _lzo() -> Any:
    import lzallright

    return lzallright.LZOCompressor()


@functools.cache
def _errors() -> tuple[type[BaseException], ...]:
    import lzallright
    import zstandard

    return (zlib.error, zstandard.ZstdError, lzallright.LZOError, ValueError)


def _zstd_frame(data: memoryview, limit: int) -> bytes:
    # one frame followed by zero padding; max_output_size bounds the allocation
    out: bytes = _zstd().decompress(data, max_output_size=limit)
    return out[:limit]


def _lzo_frames(data: memoryview, limit: int, sector: int) -> bytes:
    if len(data) < 4:
        raise ValueError("LZO extent shorter than its length header")
    (total,) = _U32.unpack_from(data, 0)
    total = min(total, len(data))
    pieces: list[bytes] = []
    produced = 0
    pos = 4
    while pos < total and produced < limit:
        room = sector - pos % sector
        if room < 4:  # a segment header never straddles a sector boundary
            pos += room
            continue
        if pos + 4 > total:
            break
        (seg_len,) = _U32.unpack_from(data, pos)
        pos += 4
        if seg_len > total - pos or seg_len > sector + sector // 16 + 64 + 3:
            raise ValueError(f"LZO segment length {seg_len} is out of bounds")
        out = _lzo().decompress(bytes(data[pos : pos + seg_len]), output_size_hint=sector)
        if len(out) > sector:
            raise ValueError("LZO segment decompressed to more than one sector")
        pieces.append(out)
        produced += len(out)
        pos += seg_len
    return b"".join(pieces)[:limit]


def decode_extent(data: Any, compression: int, unencoded_len: int) -> bytes:
    """Decompress one encoded extent to exactly ``unencoded_len`` bytes.

    Raises:
        StreamFormatError: unknown compression or undecodable data.
    """
    mv = memoryview(data).cast("B")
    try:
        if compression == 1:
            out = _zlib(mv, unencoded_len)
        elif compression == 2:
            out = _zstd_frame(mv, unencoded_len)
        elif 3 <= compression <= 7:
            out = _lzo_frames(mv, unencoded_len, 4096 << (compression - 3))
        else:
            raise StreamFormatError(f"unsupported ENCODED_WRITE compression {compression}")
    except _errors() as exc:
        name = COMPRESSION_NAMES.get(compression, str(compression))
        raise StreamFormatError(f"cannot decompress {name} extent: {exc}") from exc
    if len(out) < unencoded_len:
        out += bytes(unencoded_len - len(out))
    return out
