"""Encoding file data as btrfs stores a compressed extent (``ENCODED_WRITE``).

Owns the compressors (:data:`COMPRESSORS`), the check of a stream version against a
compression (:func:`option_problem`) and :func:`encode_piece`; not which data is sent
(:mod:`.emit`, :mod:`.full`).
"""

from __future__ import annotations

from collections.abc import Callable

from .._zstd import zstd
from ..stream.constants import Compression
from ..stream.records import EncodedWrite

__all__ = ["COMPRESSORS", "SECTOR", "encode_piece", "option_problem"]

SECTOR = 4096


def _zstd() -> Callable[[bytes], bytes]:
    params = zstd.ZstdCompressionParameters.from_level(
        3, window_log=17, write_content_size=1
    )
    cctx = zstd.ZstdCompressor(compression_params=params)
    return cctx.compress


def _zlib() -> Callable[[bytes], bytes]:
    import zlib  # (loaded only for --compress zlib: a C module, ~0.3 ms of every send)

    return lambda data: zlib.compress(data, 3)


#: name -> (btrfs compression value, factory of a compress function)
COMPRESSORS: dict[str, tuple[int, Callable[[], Callable[[bytes], bytes]]]] = {
    "zstd": (int(Compression.ZSTD), _zstd),
    "zlib": (int(Compression.ZLIB), _zlib),
}


def _round_up(n: int, to: int = SECTOR) -> int:
    return -(-n // to) * to


def option_problem(version: int, compress: str | None) -> str | None:
    """What is wrong with a stream version and a compression, if anything."""
    if version not in (1, 2, 3):
        return f"unsupported stream version {version}"
    if compress is not None and compress not in COMPRESSORS:
        return f"unknown compression {compress!r} (zstd, zlib)"
    if compress is not None and version < 2:
        return "compressed data needs stream version 2 or later"
    return None


def encode_piece(compress: Callable[[bytes], bytes], compression: int, path: bytes, pos: int,
                 buf: bytes, size: int) -> EncodedWrite | None:
    """``buf`` (file data at ``pos`` of a file of ``size`` bytes) as an ``ENCODED_WRITE``
    laid out as btrfs stores a compressed extent, or None when it cannot be one (not on a
    sector boundary, one sector or less) or compressing does not save a sector."""
    n = len(buf)
    if pos % SECTOR or (n % SECTOR and pos + n != size) or n <= SECTOR:
        return None
    ram = _round_up(n)
    plain = buf if ram == n else buf + bytes(ram - n)
    packed = compress(plain)
    disk = _round_up(len(packed))
    if disk >= ram:
        return None
    data = packed + bytes(disk - len(packed))
    return EncodedWrite(
        path=path,
        offset=pos,
        unencoded_file_len=n,
        unencoded_len=ram,
        unencoded_offset=0,
        compression=compression,
        data=memoryview(data),
        encryption=0,
    )
