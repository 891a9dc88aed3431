"""HDiffPatch (``HDIFF13`` compressed diffs, zstd inside) via the ``hdiffpatch`` package."""

from __future__ import annotations

from ...errors import StreamFormatError
from .base import DEFAULT_MAX_SIZE, Codec

__all__ = ["HdiffCodec", "HdiffRawCodec"]

_MAGIC = b"HDIFF13&"


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """HDiffPatch's packed unsigned integer: 7 bits per byte, most significant first,
    high bit set on every byte but the last."""
    value = 0
    for _ in range(10):
        if pos >= len(buf):
            raise StreamFormatError("hdiff patch header is truncated")
        byte = buf[pos]
        pos += 1
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, pos
    raise StreamFormatError("hdiff patch header has an overlong integer")


def _declared_sizes(patch: bytes) -> tuple[int, int]:
    """(new size, old size) from the header of an HDIFF13 patch."""
    if not patch.startswith(_MAGIC):
        raise StreamFormatError("hdiff patch has a bad magic")
    end = patch.find(b"\x00", len(_MAGIC), len(_MAGIC) + 32)
    if end < 0:
        raise StreamFormatError("hdiff patch has no compression name")
    new_size, pos = _varint(patch, end + 1)
    old_size, _ = _varint(patch, pos)
    return new_size, old_size


class HdiffCodec(Codec):
    """HDiffPatch's in-memory diff, compressed with zstd level 19."""

    codec_id = 3
    name = "hdiff"
    module = "hdiffpatch"
    package = "hdiffpatch"

    def _config(self, new_size: int) -> object:
        h = self.lib()
        window = min(max((max(new_size, 1) - 1).bit_length(), 10), 27)
        return h.ZStdConfig(level=19, window=window)

    def make(self, old: bytes, new: bytes) -> bytes:
        """An HDIFF13 patch with a zstd-compressed body."""
        h = self.lib()
        return bytes(h.diff(bytes(old), bytes(new), self._config(len(new)), validate=False))

    def from_raw(self, raw: bytes, new_size: int) -> bytes:
        """The patch :meth:`make` gives, from the uncompressed diff of the same files
        (:class:`HdiffRawCodec`): HDiffPatch recompresses it without diffing again (the
        same bytes, measured)."""
        return bytes(self.lib().recompress(bytes(raw), self._config(new_size)))

    def apply(self, old: bytes, patch: bytes, *, new_size: int | None = None) -> bytes:
        """Apply an HDIFF13 patch after checking the sizes it declares."""
        h = self.lib()
        patch = bytes(patch)
        size, old_size = _declared_sizes(patch)
        limit = DEFAULT_MAX_SIZE if new_size is None else new_size
        if size > limit or (new_size is not None and size != new_size):
            raise StreamFormatError(f"hdiff patch declares {size} bytes, expected {new_size}")
        if old_size != len(old):
            raise StreamFormatError(
                f"hdiff patch expects an old file of {old_size} bytes, got {len(old)}"
            )
        try:
            out = h.apply(bytes(old), patch)
        except (h.HDiffPatchError, ValueError, MemoryError) as exc:
            raise StreamFormatError(f"hdiff patch does not apply: {exc}") from exc
        if len(out) != size:
            raise StreamFormatError(f"hdiff patch produced {len(out)} bytes, declared {size}")
        return bytes(out)


class HdiffRawCodec(HdiffCodec):
    """HDiffPatch's in-memory diff, uncompressed: for patches carried inside the delta
    stream's zstd carrier, which compresses them with everything around them (the same
    edit repeated across files, the HDIFF header) better than one zstd frame per patch."""

    codec_id = 4
    name = "hdiff-raw"

    def make(self, old: bytes, new: bytes) -> bytes:
        """An HDIFF13 patch without compression."""
        h = self.lib()
        return bytes(h.diff(bytes(old), bytes(new), None, validate=False))
