"""The x86 branch converter of the ``xz`` carrier with x86 (carrier codec 3, format 6).

x86 machine code calls and jumps with 32-bit *relative* operands (``E8``/``E9`` + rel32),
so a function called from many places has a different operand at each call site and LZMA
finds no repeats. Replacing the relative operand by the absolute target (operand + the
position after the instruction) makes every call to one function the same five bytes. A
new package's executables and libraries are often most of an update (21 of the 48 MB of
new files of the Debian install pair): this takes ~2% off the carrier there, and costs
nothing measurable on other data.

The transform (``docs/formats/delta-stream.md``, "x86 branches"): scanning one ZCMDS
piece's inflated bytes from the start, at each ``E8`` or ``E9`` byte at offset ``i`` with
``i + 5 <= len`` whose operand's last byte (offset ``i + 4``) is ``00`` or ``FF`` (a
25-bit signed operand, as near calls are), the operand ``v`` (u32 little-endian) becomes
``sext25((v + base + i + 5) mod 2^25)`` and the scan goes on at ``i + 5``; at an
``E8``/``E9`` whose operand's last byte is anything else it goes on at ``i + 4``, and at
any other byte at ``i + 1``. ``base`` is the number of bytes inflated from the carrier
before the piece. Decoding scans the same way with ``v - base - i - 5``. Every test looks
at bytes no conversion has touched on either side, except a converted operand's last
byte, which stays in the same set (25-bit signed operands, last byte ``00`` or ``FF``):
skipping to ``i + 4`` after an unconverted opcode keeps a later conversion from changing
the byte ``i + 4`` its test looked at. So both sides convert at the same offsets and the
transform is exact on any bytes.

Owns the transform and the writer's choice of which pieces to convert (:func:`worth_it`:
each ZCMDS of an LZMA2 carrier names codec 2 or 3, so pieces without machine code are
left as they are); the carrier (:mod:`.writer`, :mod:`.unpack`) applies it to each piece.
The scan jumps from one ``E8``/``E9`` byte to the next with a compiled regular
expression, so Python touches only candidate bytes (~1 in 100 of machine code).
"""

from __future__ import annotations

__all__ = ["DENSITY", "decode", "encode", "worth_it"]

#: the opcodes, as the scan's regular expression
_OPCODE = rb"[\xe8\xe9]"
_MASK = (1 << 25) - 1
_SIGN = 1 << 24
_HIGH = 0xFE000000


def _convert(buf: bytearray, base: int, sign: int) -> int:
    # (``re`` imported here: every delta receive imports this module, few convert a piece,
    # and ``re`` is ~0.8 ms of a receive's start; ``re.compile`` keeps the compiled pattern)
    import re

    n = len(buf)
    search = re.compile(_OPCODE).search
    i = done = 0
    while (m := search(buf, i)) is not None:
        i = m.start()
        if i + 5 > n:
            break
        if buf[i + 4] in (0, 0xFF):
            done += 1
            v = (int.from_bytes(buf[i + 1 : i + 5], "little") + sign * (base + i + 5)) & _MASK
            if v & _SIGN:
                v |= _HIGH
            buf[i + 1 : i + 5] = v.to_bytes(4, "little")
            i += 5
        else:
            i += 4
    return done


def encode(buf: bytearray, base: int) -> int:
    """Convert the branch operands of ``buf`` (inflated carrier bytes from offset
    ``base`` of the carrier) to absolute targets, in place; how many."""
    return _convert(buf, base, 1)


def worth_it(raw: bytes | bytearray | memoryview, converted: int) -> bool:
    """Whether a piece in which :func:`encode` converted ``converted`` operands is
    machine code enough to be carried converted: at least one per :data:`DENSITY` bytes
    (x86-64 code has one call per ~50-100 bytes; text has none, other data ~1 per 32
    KiB, where converting costs ~0.1% of the carrier)."""
    return converted * DENSITY >= len(raw)


#: a piece is carried converted if it has at least one converted operand per this many bytes
DENSITY = 4096


def decode(buf: bytearray, base: int) -> None:
    """Undo :func:`encode` of ``buf`` (from offset ``base`` of the carrier), in place."""
    _convert(buf, base, -1)
