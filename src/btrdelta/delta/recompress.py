"""Regenerating the kernel's compressed extents (ENCODED_WRITE payloads) bit for bit.

A stream sent with ``--compressed-data`` carries extents as btrfs stored them. To patch such
a file, ``delta make`` decompresses each payload to the bytes the kernel compressed, and
keeps a record "recompress these bytes with parameters P" only if doing so here gives back
exactly the payload (compressed stream + zero padding to the sector size). What the kernel
does (``fs/btrfs/{zstd,zlib,lzo}.c``):

* **zstd** (compression 2): ``ZSTD_getParams(level, len)`` with the window log capped at 17,
  one frame with the content size, no checksum, no dictionary id, streamed in 4 KiB pages.
  The level (1..15, or negative) is a mount option and is not recorded; the frame is
  reproduced by python-zstandard's one-shot compression with the same parameters (single
  block: streaming and one-shot give the same bytes). Measured: 100% of the extents of a
  ``compress=zstd`` file system, ~75% with ``compress=zstd:9``.
* **zlib** (compression 1): ``deflateInit(level)`` (window 15, memLevel 8), input in 4 KiB
  pages each followed by ``Z_SYNC_FLUSH``, then ``Z_FINISH``. The kernel's zlib is an old
  fork that inserts strings differently across flushes, so only about two thirds of the
  extents come out identical from the system zlib; the others stay as they are.
* **LZO** (3..7): the kernel's own LZO1X-1 (13-bit dictionary) has no userspace twin on PyPI
  (``lzallright``/lzokay compress differently), so LZO extents are never regenerated.

Which level a file system used is learnt while making: :class:`LevelGuesser` tries the
levels that worked before, then the default, then (a bounded number of times) every level.
"""

from __future__ import annotations

import threading
import zlib
from collections import Counter

from .. import TYPE_CHECKING
from .._zstd import zstd
from ..errors import StreamFormatError

if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "ZLIB",
    "ZSTD",
    "LevelGuesser",
    "compress_extent",
    "natural_extent",
    "regenerable",
]

ZLIB = 1
ZSTD = 2
#: kernel defaults (``compress=zstd`` / ``compress=zlib`` without a level)
DEFAULT_LEVEL = {ZSTD: 3, ZLIB: 3}
#: levels a kernel may use, in the order they are tried after the default
LEVELS = {
    ZSTD: [*range(1, 16), *range(-1, -16, -1)],
    ZLIB: list(range(1, 10)),
}
#: the kernel compresses at most 128 KiB per extent; larger "extents" are not kernel-made
MAX_EXTENT = 128 << 10
_ZSTD_MAX_WINDOW_LOG = 17
_PAGE = 4096

#: (level, size) -> btrfs's zstd parameters for them (see _btrfs_zstd_params)
_zstd_params: dict[tuple[int, int], Any] = {}
#: the distinct parameters: equal parameters are one object, kept for the process's life
_zstd_interned: dict[tuple[int, ...], Any] = {}
#: zstd contexts are not thread-safe: one per thread
_local = threading.local()


def _dctx() -> Any:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstd.ZstdDecompressor()
    return d


def _zstd_compressor(level: int, size: int) -> Any:
    """A (thread-local, reused) compressor with btrfs's parameters for ``size`` bytes.

    Contexts are cached by parameters, not by size: the parameters change only with the
    size class (12 of them for the 4105 extents of 2434 sizes of the Debian benchmark), and
    a new context costs more than compressing a small extent.
    """
    cache: dict[int, Any] | None = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    params = _zstd_params.get((level, size))
    if params is None:
        params = _btrfs_zstd_params(level, size)
    cctx = cache.get(id(params))
    if cctx is None:
        if len(cache) >= 64:
            cache.clear()
        cctx = cache[id(params)] = zstd.ZstdCompressor(compression_params=params)
    return cctx


def _btrfs_zstd_params(level: int, size: int) -> Any:
    """``ZSTD_getParams(level, size)`` with the window log capped as btrfs does (interned:
    equal parameters are the same object)."""
    base = zstd.ZstdCompressionParameters.from_level(level, source_size=size)
    window_log = min(base.window_log, _ZSTD_MAX_WINDOW_LOG)
    key = (
        level, base.compression_level, window_log, base.chain_log, base.hash_log,
        base.search_log, base.min_match, base.target_length, base.strategy,
    )
    params = _zstd_interned.get(key)
    if params is None:
        params = zstd.ZstdCompressionParameters.from_level(
            level,
            source_size=size,
            window_log=window_log,
            write_content_size=1,
            write_checksum=0,
            write_dict_id=0,
        )
        _zstd_interned.setdefault(key, params)
        params = _zstd_interned[key]
    if len(_zstd_params) < 1 << 14:
        _zstd_params[(level, size)] = params
    return params


def compress_extent(raw: Any, compression: int, level: int) -> bytes:
    """Compress ``raw`` the way btrfs does for ``compression`` at ``level`` (no padding).

    Raises:
        StreamFormatError: unknown compression or level.
    """
    if compression == ZSTD:
        if not -22 <= level <= 22 or level == 0:
            raise StreamFormatError(f"invalid zstd level {level} in a PENC record")
        return bytes(_zstd_compressor(level, len(raw)).compress(raw))
    if compression == ZLIB:
        if not 1 <= level <= 9:
            raise StreamFormatError(f"invalid zlib level {level} in a PENC record")
        c = zlib.compressobj(level, zlib.DEFLATED, 15, 8)
        mv = memoryview(raw)
        parts = []
        for i in range(0, len(mv), _PAGE):
            parts.append(c.compress(mv[i : i + _PAGE]))
            parts.append(c.flush(zlib.Z_SYNC_FLUSH))
        parts.append(c.flush(zlib.Z_FINISH))
        return b"".join(parts)
    raise StreamFormatError(f"compression {compression} cannot be regenerated")


def natural_extent(data: Any, compression: int) -> bytes | None:
    """The bytes the kernel compressed into ``data`` (no zero extension), or ``None`` if
    ``data`` is not one well-formed zstd frame / zlib stream of at most 128 KiB."""
    try:
        if compression == ZSTD:
            fp = zstd.get_frame_parameters(data)
            if fp.content_size > MAX_EXTENT or fp.has_checksum:
                return None
            out = _dctx().decompress(data, max_output_size=MAX_EXTENT)
            return bytes(out) if len(out) == fp.content_size else None
        if compression == ZLIB:
            d = zlib.decompressobj()
            out = d.decompress(data, MAX_EXTENT + 1)
            if not d.eof or len(out) > MAX_EXTENT:
                return None
            return out
    except (zstd.ZstdError, zlib.error, ValueError):
        return None
    return None


def _matches(packed: bytes, data: memoryview) -> bool:
    n = len(packed)
    if n > len(data) or data[:n] != packed:
        return False
    tail = data[n:]
    return not len(tail) or tail.tobytes().count(0) == len(tail)


class LevelGuesser:
    """Finds the level that regenerates a compressed extent, learning as it goes.

    Thread-safe: make's worker threads share one guesser per run.

    Args:
        full_scans: how many extents may be tried with every level when no known level
            works (after that only levels that already worked are tried).
    """

    def __init__(self, full_scans: int = 8) -> None:
        self._lock = threading.Lock()
        self._hits: dict[int, Counter[int]] = {ZSTD: Counter(), ZLIB: Counter()}
        self._scans_left = full_scans
        #: extents tried / regenerated, by compression
        self.tried: Counter[int] = Counter()
        self.regenerated: Counter[int] = Counter()

    def _order(self, compression: int) -> tuple[list[int], bool]:
        with self._lock:
            known = [lv for lv, _ in self._hits[compression].most_common()]
            scan = self._scans_left > 0
        first = known or [DEFAULT_LEVEL[compression]]
        if DEFAULT_LEVEL[compression] not in first:
            first.append(DEFAULT_LEVEL[compression])
        return first, scan

    def find(self, raw: bytes, data: Any, compression: int) -> int | None:
        """The level whose output, zero-padded, is exactly ``data``; ``None`` if none."""
        mv = memoryview(data).cast("B")
        first, scan = self._order(compression)
        levels = first + ([lv for lv in LEVELS[compression] if lv not in first] if scan else [])
        found = None
        for i, level in enumerate(levels):
            if i == len(first):
                with self._lock:
                    if self._scans_left <= 0:
                        break
                    self._scans_left -= 1
            if _matches(compress_extent(raw, compression, level), mv):
                found = level
                break
        with self._lock:
            self.tried[compression] += 1
            if found is not None:
                self._hits[compression][found] += 1
                self.regenerated[compression] += 1
        return found


def regenerable(compression: int) -> bool:
    """Whether extents of this compression are ever regenerated (zstd and zlib)."""
    return compression in (ZSTD, ZLIB)
