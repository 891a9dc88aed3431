"""``edits`` (codec 5, format 7) and ``edits2`` (codec 6, format 8): a patch of a few edits
as varint copy / literal operations.

A file rebuilt with a handful of small changes (a version string, a build date, a few
patched bytes) needs only the changed bytes and where they are; an HDiffPatch diff of it
spends ~70 bytes on its header, sizes, cover table and RLE streams before those. These
codecs write the edits alone (format: ``docs/formats/delta-stream.md`` §4.1, §4.2) and are
made only for such files: one matcher follows the two files from the start,
resynchronising after each difference by looking up the next 16 bytes of the new file near
the old position (``bytes.find``: the scanning is done in C), and gives up after
:data:`MAX_OPS` differences, leaving the file to the other codecs. ``edits`` writes a
literal length and a jump after each copy; ``edits2`` one operation code (substitution,
insertion, deletion, or both values), a byte less per typical edit. Pure Python, no
library: every install can expand them.
"""

from __future__ import annotations

from ...errors import StreamFormatError
from .base import DEFAULT_MAX_SIZE, Codec

__all__ = ["EditsCodec", "PackedEditsCodec", "made_size"]

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


#: one operation found by the matcher: copy length, then the literal bytes (``None``: the
#: new file ends after the copy) and the jump of the old position after them (``None``: the
#: new file ends after the literal)
Op = tuple[int, bytes | None, int | None]


def _match(old: bytes, new: bytes) -> list[Op]:
    """The operations that make ``new`` from ``old`` (after :data:`MAX_OPS` differences,
    the rest of ``new`` is one literal: a patch as large as that is not kept)."""
    ops: list[Op] = []
    o = n = 0
    for count in range(MAX_OPS + 1):
        c = _common(old, o, new, n)
        o += c
        n += c
        if n == len(new):
            ops.append((c, None, None))
            break
        j, f = _resync(old, new, o, n) if count < MAX_OPS else (len(new), o)
        lit, n = new[n:j], j
        if n == len(new):
            ops.append((c, lit, None))
            break
        ops.append((c, lit, f - o - len(lit)))
        o = f
    return ops


def _zigzag(v: int) -> int:
    return 2 * v if v >= 0 else -2 * v - 1


def _encode(ops: list[Op], packed: bool) -> bytes:
    """The patch bytes of ``ops``: format 7's ``edits`` (a literal length and a jump after
    every copy) or, ``packed``, format 8's ``edits2`` (one operation code)."""
    out = bytearray()
    for c, lit, jump in ops:
        _uvarint(c, out)
        if lit is None:
            break
        n = len(lit)
        if not packed:
            _uvarint(n, out)
            out += lit
            if jump is not None:
                _uvarint(_zigzag(jump), out)
        elif jump is None or (jump == 0 and n):  # a substitution (or the last literal)
            _uvarint(n * 4, out)
            out += lit
        elif n and jump == -n:  # an insertion
            _uvarint(n * 4 + 1, out)
            out += lit
        elif not n and jump > 0:  # a deletion
            _uvarint(jump * 4 + 2, out)
        else:
            _uvarint(n * 4 + 3, out)
            out += lit
            _uvarint(_zigzag(jump), out)
    return bytes(out)


def _walk(
    mv: memoryview, old: memoryview | None, new_size: int | None, packed: bool
) -> tuple[list[memoryview], int]:
    """Run the operations of the patch ``mv``: (the pieces of the new content, its size).
    ``old`` ``None``: count only (the size, read without the old file). ``new_size``: stop
    there (``None``: at the end of the patch bytes)."""
    size = DEFAULT_MAX_SIZE if new_size is None else new_size
    limit = size if old is None else len(old)
    parts: list[memoryview] = []
    o = got = pos = 0
    while True:
        c, pos = _read_uvarint(mv, pos)
        if (old is not None and o + c > limit) or got + c > size:
            raise StreamFormatError(f"edits patch copies past the end (old offset {o})")
        if old is not None:
            parts.append(old[o : o + c])
        o += c
        got += c
        if got == size or (new_size is None and pos == len(mv)):
            break
        v, pos = _read_uvarint(mv, pos)
        kind, lit = (v & 3, v >> 2) if packed else (3, v)
        if kind == 2:
            lit = 0
        elif pos + lit > len(mv) or got + lit > size:
            raise StreamFormatError("edits patch has a literal past its end")
        parts.append(mv[pos : pos + lit])
        pos += lit
        got += lit
        if kind != 2 and (got == size or (new_size is None and pos == len(mv))):
            break
        if kind == 3:
            z, pos = _read_uvarint(mv, pos)
            jump = z >> 1 if not z & 1 else -((z + 1) >> 1)
        else:
            jump = (0, -lit, v >> 2)[kind]
        o += lit + jump
        if old is not None and (o < 0 or o > limit):
            raise StreamFormatError("edits patch moves outside the old file")
    if pos != len(mv):
        raise StreamFormatError("edits patch has bytes after its last operation")
    return parts, got


def made_size(patch: bytes | memoryview, packed: bool = False) -> int:
    """The size of what ``patch`` (``packed``: an ``edits2`` patch) makes, read without the
    old file: the short CPATCH of formats 7 and 8 records no sizes.

    Raises:
        StreamFormatError: the operations are malformed.
    """
    return _walk(memoryview(patch), None, None, packed)[1]


class EditsCodec(Codec):
    """Copies from the old file and literal bytes, as LEB128 varints (format 7)."""

    codec_id = 5
    takes_buffers = True
    name = "edits"
    module = "btrdelta"
    package = "btrdelta"
    #: format 8's operation codes (:class:`PackedEditsCodec`)
    packed = False

    def make(self, old: bytes, new: bytes) -> bytes:
        """The patch (after :data:`MAX_OPS` differences, the rest of ``new`` is one
        literal: a patch as large as that is not kept)."""
        return _encode(_match(bytes(old), bytes(new)), self.packed)

    def apply(self, old: bytes, patch: bytes, *, new_size: int | None = None) -> bytes:
        """Apply the operations, each checked against both files' bounds (``new_size``:
        the size the result must have)."""
        return b"".join(_walk(memoryview(patch), memoryview(old), new_size, self.packed)[0])


class PackedEditsCodec(EditsCodec):
    """``edits`` with one operation code after each copy (format 8): a substitution, an
    insertion or a deletion costs one varint less (§4.2 of the format)."""

    codec_id = 6
    name = "edits2"
    packed = True
