"""Decoding ENCODED_WRITE payloads (btrfs extents as stored on disk) to plain bytes.

Used when the destination cannot take the extent as is (not btrfs, unaligned, LZO sector
size mismatch). Formats (``docs/formats/send-stream.md``, "Encoded extents"): zlib is one zlib
stream, zstd one zstd frame, LZO (compression 3..7) is btrfs's own framing of raw LZO1X
segments of ``4096 << (compression - 3)`` bytes. Data after the end of the compressed
stream (sector padding) is ignored; output shorter than ``unencoded_len`` is zero-extended;
a zstd frame or zlib stream that would inflate to more is refused (the kernel never writes
one), LZO output is cut there.

Memory is bounded by ``unencoded_len`` (≤ :data:`MAX_UNENCODED`, checked here too; the kernel
writes ≤ 128 KiB), whatever the payload declares: a zstd frame is decoded in one shot only
when its header declares a content size within the limit, otherwise through a reader that
stops at the limit with a window of at most :data:`MAX_UNENCODED` (``zstandard`` ignores
``max_output_size`` when the frame declares its own size, so a 32 KB frame declaring 1 GiB
would otherwise be inflated whole); zlib is inflated with a ``max_length``; LZO output is
checked per segment against the sector size (lzallright grows its buffer until the segment
fits, so one hostile segment costs at most LZO's expansion ratio, ~255 times the segment's
≤ 70 KB, in passing).
"""

from __future__ import annotations

import functools
import struct
import threading
import zlib

from .. import TYPE_CHECKING
from ..errors import StreamFormatError

if TYPE_CHECKING:
    from typing import Any

__all__ = ["COMPRESSION_NAMES", "MAX_UNENCODED", "decode_extent"]

#: largest decompressed extent accepted from an ENCODED_WRITE (the kernel writes 128 KiB);
#: the C fast path checks the same bound (``_constants.h``)
MAX_UNENCODED = 8 << 20

COMPRESSION_NAMES = {0: "none", 1: "zlib", 2: "zstd", 3: "lzo-4k", 4: "lzo-8k", 5: "lzo-16k",
                     6: "lzo-32k", 7: "lzo-64k"}

_U32 = struct.Struct("<I")


def _zlib(data: memoryview, limit: int) -> bytes:
    d = zlib.decompressobj()
    out = d.decompress(data, limit)  # limit > 0: max_length 0 would mean "no limit"
    if d.unconsumed_tail and d.decompress(d.unconsumed_tail, 1):
        raise ValueError(f"inflates to more than the extent's {limit} bytes")
    return out


@functools.cache
def _zstd() -> Any:
    # imported on first use: a receive without decompression does not pay for it
    import zstandard

    return zstandard


#: this thread's decompressors: a zstandard context (and an LZO one) must not be used by
#: two threads at once, and two receives may run in threads of one process
_local = threading.local()


def _lzo() -> Any:
    lzo = getattr(_local, "lzo", None)
    if lzo is None:
        import lzallright

        lzo = _local.lzo = lzallright.LZOCompressor()
    return lzo


@functools.cache
def _errors() -> tuple[type[BaseException], ...]:
    import lzallright
    import zstandard

    return (zlib.error, zstandard.ZstdError, lzallright.LZOError, ValueError)


def _zstd_dctx() -> Any:
    dctx = getattr(_local, "zstd", None)
    if dctx is None:
        # the window bound makes a frame that needs more memory an error, not an allocation
        dctx = _local.zstd = _zstd().ZstdDecompressor(max_window_size=MAX_UNENCODED)
    return dctx


def _zstd_frame(data: memoryview, limit: int) -> bytes | bytearray:
    # one frame followed by zero padding
    declared = _zstd().frame_content_size(data)
    if declared > limit:
        raise ValueError(f"frame declares {declared} bytes, more than the extent's {limit}")
    if declared >= 0:  # the kernel's frames: one shot, allocates `declared`
        out: bytes = _zstd_dctx().decompress(data, max_output_size=limit)
        return out
    # size unknown: never ask for more than the limit (and one byte to see an excess); a
    # reader over a buffer fills its output unless the frame ends first (a second call would
    # take the padding for the next frame)
    buf = bytearray(limit + 1)
    reader = _zstd_dctx().stream_reader(data, read_across_frames=False)
    got = reader.readinto(buf)
    if got > limit:
        raise ValueError(f"frame inflates to more than the extent's {limit} bytes")
    del buf[limit:]
    return buf


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


def decode_extent(data: Any, compression: int, unencoded_len: int) -> bytes | bytearray:
    """Decompress one encoded extent to exactly ``unencoded_len`` bytes.

    Raises:
        StreamFormatError: unknown compression or undecodable data.
    """
    if not 1 <= compression <= 7:
        raise StreamFormatError(f"unsupported ENCODED_WRITE compression {compression}")
    if not 0 <= unencoded_len <= MAX_UNENCODED:
        raise StreamFormatError(
            f"ENCODED_WRITE unencoded length {unencoded_len} is over the limit {MAX_UNENCODED}")
    mv = memoryview(data).cast("B")
    try:
        if not unencoded_len:
            out: bytes | bytearray = b""
        elif compression == 1:
            out = _zlib(mv, unencoded_len)
        elif compression == 2:
            out = _zstd_frame(mv, unencoded_len)
        else:
            out = _lzo_frames(mv, unencoded_len, 4096 << (compression - 3))
    except _errors() as exc:
        name = COMPRESSION_NAMES.get(compression, str(compression))
        raise StreamFormatError(f"cannot decompress {name} extent: {exc}") from exc
    if len(out) < unencoded_len:
        out = bytes(out) + bytes(unencoded_len - len(out))
    return out
