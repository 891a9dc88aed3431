"""zstd with the old file as a raw-content dictionary and a long window (``--patch-from``)."""

from __future__ import annotations

from ... import TYPE_CHECKING
from ...errors import StreamFormatError
from .base import DEFAULT_MAX_SIZE, Codec

if TYPE_CHECKING:
    from typing import Any

__all__ = ["ZstdCodec"]

#: compression level of patches (the ratio matters far more than the time here)
LEVEL = 19
#: largest window a patch may ask for when applied (2 GiB, zstd's --long=31)
MAX_WINDOW_LOG = 31
#: hash and chain tables of patches (2**21 / 2**20 entries, 8 + 4 MiB): level 19 sizes them
#: to the files (2**24 entries, 64 MiB, for a 3.8 MB executable and its old version: 105 MB
#: of memory and 2.3 s); capped, that patch is 2% smaller, made in 1.4 s with 79 MB
CHAIN_LOG = 21
HASH_LOG = 20


def capped_params(z: Any, source_size: int, window_log: int, dict_size: int = 0,
                  **extra: Any) -> Any:
    """Level :data:`LEVEL`'s parameters for ``source_size`` bytes (and a ``dict_size``-byte
    dictionary) in a ``window_log`` window, their match tables capped at :data:`CHAIN_LOG` /
    :data:`HASH_LOG`; ``extra`` sets further parameters (``z``: the zstandard module)."""
    sized = z.ZstdCompressionParameters.from_level(
        LEVEL, source_size=source_size, dict_size=dict_size, window_log=window_log)
    return z.ZstdCompressionParameters.from_level(
        LEVEL, source_size=source_size, dict_size=dict_size, window_log=sized.window_log,
        chain_log=min(sized.chain_log, CHAIN_LOG), hash_log=min(sized.hash_log, HASH_LOG),
        **extra)


def _window_log(old_size: int, new_size: int) -> int:
    need = max(old_size + new_size, 1 << 10)
    return min(max((need - 1).bit_length(), 10), MAX_WINDOW_LOG)


class ZstdCodec(Codec):
    """One zstd frame of the new content, the old content as its raw-content dictionary."""

    codec_id = 2
    name = "zstd"
    module = "zstandard"
    package = "zstandard"

    def lib(self) -> Any:
        """``zstandard``'s C backend as :mod:`btrdelta._zstd` loads it (without the
        package's ``__init__``, which imports ``typing``), else the package."""
        if self._mod is None:
            try:
                from ..._zstd import zstd
            except ImportError:
                return super().lib()  # (names the missing package)
            self._mod = zstd
        return self._mod

    def _dict(self, old: bytes) -> Any:
        z = self.lib()
        if not len(old):
            return None
        return z.ZstdCompressionDict(bytes(old), dict_type=z.DICT_TYPE_RAWCONTENT)

    def make(self, old: bytes, new: bytes) -> bytes:
        """A zstd frame (content size recorded) compressed against ``old``."""
        z = self.lib()
        params = capped_params(z, len(new), _window_log(len(old), len(new)), len(old),
                               enable_ldm=True, write_content_size=1)
        cctx = z.ZstdCompressor(dict_data=self._dict(old), compression_params=params)
        return bytes(cctx.compress(bytes(new)))

    def apply(self, old: bytes, patch: bytes, *, new_size: int | None = None) -> bytes:
        """Decompress ``patch`` against ``old`` after checking the frame's content size."""
        z = self.lib()
        limit = DEFAULT_MAX_SIZE if new_size is None else new_size
        try:
            fp = z.get_frame_parameters(bytes(patch))
        except z.ZstdError as exc:
            raise StreamFormatError(f"zstd patch has a bad frame header: {exc}") from exc
        size = fp.content_size
        if size == z.CONTENTSIZE_UNKNOWN or size > limit or (
            new_size is not None and size != new_size
        ):
            raise StreamFormatError(f"zstd patch declares {size} bytes, expected {new_size}")
        if fp.window_size > (1 << MAX_WINDOW_LOG):
            raise StreamFormatError(f"zstd patch needs a {fp.window_size}-byte window")
        try:
            dctx = z.ZstdDecompressor(
                dict_data=self._dict(old), max_window_size=1 << MAX_WINDOW_LOG
            )
            out = dctx.decompress(bytes(patch), max_output_size=max(size, 1))
        except z.ZstdError as exc:
            raise StreamFormatError(f"zstd patch does not apply: {exc}") from exc
        if len(out) != size:
            raise StreamFormatError(f"zstd patch produced {len(out)} bytes, declared {size}")
        return bytes(out)
