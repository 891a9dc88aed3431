"""``edits`` (codec 5, format 7): a patch of a few edits as varint copy / literal operations.

A file rebuilt with a handful of small changes (a version string, a build date, a few
patched bytes) needs only the changed bytes and where they are; an HDiffPatch diff of it
spends ~70 bytes on its header, sizes, cover table and RLE streams before those. This
codec writes the edits alone (format: ``docs/formats/delta-stream.md`` §4.1) and is made
only for such files: the matcher follows the two files from the start, resynchronising
after each difference by looking up the next 16 bytes of the new file near the old
position (``bytes.find``: the scanning is done in C), and gives up after
:data:`MAX_OPS` differences, leaving the file to the other codecs. Pure Python, no
library: every install can expand it.
"""

from __future__ import annotations

from ...errors import StreamFormatError
from .base import DEFAULT_MAX_SIZE, Codec

__all__ = ["EditsCodec", "made_size"]

#: differences the matcher follows before giving up (the file is not "a few edits")
MAX_OPS = 64
#: bytes of the new file looked up in the old one to resynchronise after a difference
ANCHOR = 16
#: how far after (and before) the old position the anchor is looked for
WINDOW = 1 << 16
#: new bytes skipped before each lookup: literals up to 32 bytes are found exactly, longer
#: ones at a coarser step (the start of the match is then walked back byte by byte)
_SKIPS = (*range(33), 40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 768, 1024,
          1536, 2048, 3072, 4096)


def _uvarint(value: int, out: bytearray) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _read_uvarint(mv: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    end = min(len(mv), pos + 10)
    while pos < end:
        byte = mv[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise StreamFormatError("edits patch ends inside a varint")


def _common(old: bytes, o: int, new: bytes, n: int) -> int:
    """Length of the common prefix of ``old[o:]`` and ``new[n:]`` (galloping, then a
    binary search: memcmp work proportional to the match, a few dozen comparisons)."""
    hi = min(len(old) - o, len(new) - n)
    lo, step = 0, 64
    while lo < hi:
        top = min(hi, lo + step)
        if old[o + lo : o + top] != new[n + lo : n + top]:
            hi = top - 1
            break
        lo = top
        step *= 2
    else:
        return lo
    # the first difference is in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if old[o + lo : o + mid] == new[n + lo : n + mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _resync(old: bytes, new: bytes, o: int, n: int) -> tuple[int, int]:
    """Where ``new[n:]`` and the old file agree again after a difference at ``o``/``n``:
    (new position, old position); (len(new), o) when nothing near is found."""
    for skip in _SKIPS:
        j = n + skip
        if j + ANCHOR > len(new):
            break
        anchor = new[j : j + ANCHOR]
        f = old.find(anchor, o, o + WINDOW + ANCHOR)
        if f < 0:
            f = old.rfind(anchor, max(0, o - WINDOW), o + ANCHOR - 1)
        if f >= 0:
            while j > n and f > 0 and new[j - 1] == old[f - 1]:
                j -= 1
                f -= 1
            return j, f
    return len(new), o


def made_size(patch: bytes | memoryview) -> int:
    """The size of what ``patch`` makes (its copies and literals), read without the old
    file: format 7's short CPATCH records no sizes.

    Raises:
        StreamFormatError: the operations are malformed.
    """
    mv = memoryview(patch)
    pos = got = 0
    while True:
        c, pos = _read_uvarint(mv, pos)
        got += c
        if pos == len(mv):
            return got
        lit, pos = _read_uvarint(mv, pos)
        if pos + lit > len(mv):
            raise StreamFormatError("edits patch has a literal past its end")
        pos += lit
        got += lit
        if pos == len(mv):
            return got
        _, pos = _read_uvarint(mv, pos)


class EditsCodec(Codec):
    """Copies from the old file and literal bytes, as LEB128 varints (format 7)."""

    codec_id = 5
    name = "edits"
    module = "btrdelta"
    package = "btrdelta"

    def make(self, old: bytes, new: bytes) -> bytes:
        """The patch (after :data:`MAX_OPS` differences, the rest of ``new`` is one
        literal: a patch as large as that is not kept)."""
        old, new = bytes(old), bytes(new)
        out = bytearray()
        o = n = 0
        for ops in range(MAX_OPS + 1):
            c = _common(old, o, new, n)
            _uvarint(c, out)
            o += c
            n += c
            if n == len(new):
                break
            j, f = _resync(old, new, o, n) if ops < MAX_OPS else (len(new), o)
            _uvarint(j - n, out)
            out += new[n:j]
            lit, n = j - n, j
            if n == len(new):
                break
            jump = f - o - lit
            _uvarint(2 * jump if jump >= 0 else -2 * jump - 1, out)
            o = f
        return bytes(out)

    def apply(self, old: bytes, patch: bytes, *, new_size: int | None = None) -> bytes:
        """Apply the copy / literal operations, each checked against both files' bounds
        (``new_size``: the size the result must have)."""
        size = DEFAULT_MAX_SIZE if new_size is None else new_size
        mv = memoryview(patch)
        parts: list[bytes | memoryview] = []
        oldv = memoryview(old)
        o = got = pos = 0
        while True:
            c, pos = _read_uvarint(mv, pos)
            if o + c > len(old) or got + c > size:
                raise StreamFormatError(f"edits patch copies past the end (old offset {o})")
            parts.append(oldv[o : o + c])
            o += c
            got += c
            if got == size or (new_size is None and pos == len(mv)):
                break
            lit, pos = _read_uvarint(mv, pos)
            if pos + lit > len(mv) or got + lit > size:
                raise StreamFormatError("edits patch has a literal past its end")
            parts.append(mv[pos : pos + lit])
            pos += lit
            got += lit
            if got == size or (new_size is None and pos == len(mv)):
                break
            z, pos = _read_uvarint(mv, pos)
            o += lit + (z >> 1 if not z & 1 else -((z + 1) >> 1))
            if o < 0 or o > len(old):
                raise StreamFormatError("edits patch moves outside the old file")
        if pos != len(mv):
            raise StreamFormatError("edits patch has bytes after its last operation")
        return b"".join(parts)
