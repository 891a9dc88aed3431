"""bsdiff (Colin Percival's BSDIFF40 format, bzip2 inside) via the ``bsdiff4`` package."""

from __future__ import annotations

import struct

from ...errors import StreamFormatError
from .base import DEFAULT_MAX_SIZE, Codec

__all__ = ["BsdiffCodec"]

_HEADER = struct.Struct("<8s8s8s8s")


def _offtin(raw: bytes) -> int:
    """bsdiff's sign-magnitude 64-bit integer."""
    value = int.from_bytes(raw, "little")
    if value & (1 << 63):
        return -(value & ~(1 << 63))
    return value


class BsdiffCodec(Codec):
    """bsdiff 4 with bzip2-compressed control, diff and extra blocks."""

    codec_id = 1
    name = "bsdiff"
    module = "bsdiff4"
    package = "bsdiff4"

    def make(self, old: bytes, new: bytes) -> bytes:
        """A BSDIFF40 patch."""
        return bytes(self.lib().diff(bytes(old), bytes(new)))

    def apply(self, old: bytes, patch: bytes, *, new_size: int | None = None) -> bytes:
        """Apply a BSDIFF40 patch after checking its header."""
        lib = self.lib()
        if len(patch) < _HEADER.size:
            raise StreamFormatError("bsdiff patch shorter than its header")
        magic, clen, dlen, nsize = _HEADER.unpack_from(patch)
        if magic != b"BSDIFF40":
            raise StreamFormatError("bsdiff patch has a bad magic")
        clen, dlen, size = _offtin(clen), _offtin(dlen), _offtin(nsize)
        limit = DEFAULT_MAX_SIZE if new_size is None else new_size
        if clen < 0 or dlen < 0 or _HEADER.size + clen + dlen > len(patch):
            raise StreamFormatError("bsdiff patch block lengths overrun the patch")
        if size < 0 or size > limit or (new_size is not None and size != new_size):
            raise StreamFormatError(f"bsdiff patch declares {size} bytes, expected {new_size}")
        try:
            return bytes(lib.patch(bytes(old), bytes(patch)))
        except (ValueError, OSError, MemoryError, RuntimeError, EOFError) as exc:
            raise StreamFormatError(f"bsdiff patch does not apply: {exc}") from exc
