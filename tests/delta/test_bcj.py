"""The x86 branch converter of the ``xz`` carrier (format 6): exact on any bytes, and
worth it on machine code."""

from __future__ import annotations

import lzma
import shutil
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from btrdelta.delta import bcj

#: bytes that make the converter's decisions interact: opcodes next to operand bytes
_TRICKY = st.lists(st.sampled_from([0xE8, 0xE9, 0x00, 0xFF, 0x01, 0x80]), max_size=64).map(bytes)


@settings(max_examples=500, deadline=None)
@given(data=st.one_of(_TRICKY, st.binary(max_size=256)), base=st.integers(0, 1 << 40))
def test_decode_undoes_encode(data: bytes, base: int) -> None:
    buf = bytearray(data)
    bcj.encode(buf, base)
    assert len(buf) == len(data)
    bcj.decode(buf, base)
    assert buf == data


def _machine_code() -> bytes:
    """A real x86-64 executable of this machine (its shell)."""
    exe = Path(shutil.which("bash") or "/bin/bash").resolve()
    return exe.read_bytes()[: 2 << 20]


def test_calls_to_one_function_become_equal_and_compress_smaller() -> None:
    """On a real executable, relative CALL operands become absolute targets: raw LZMA2
    (the carrier's filter, preset 6) of the converted bytes is smaller by
    more than 3%, and the conversion is undone exactly."""
    code = _machine_code()
    assert code[:4] == b"\x7fELF"
    conv = bytearray(code)
    bcj.encode(conv, 4096)
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 6}]
    plain = len(lzma.compress(code, lzma.FORMAT_RAW, filters=filters))
    converted = len(lzma.compress(bytes(conv), lzma.FORMAT_RAW, filters=filters))
    assert converted < 0.97 * plain
    bcj.decode(conv, 4096)
    assert conv == code


def test_known_conversion() -> None:
    """One call at offset 3 of a piece that starts 100 bytes into the carrier: operand
    0x10 becomes 0x10 + 100 + 3 + 5; a negative operand wraps within 25 bits; an opcode
    whose operand's last byte is not 00/FF is left, and so are the next 3 bytes."""
    buf = bytearray(b"\x90\x90\x90\xe8\x10\x00\x00\x00")
    bcj.encode(buf, 100)
    assert buf == b"\x90\x90\x90\xe8" + (0x10 + 108).to_bytes(4, "little")
    buf = bytearray(b"\xe8" + (-200 & 0xFFFFFFFF).to_bytes(4, "little"))
    bcj.encode(buf, 0)
    assert buf == b"\xe8" + (-195 & 0xFFFFFFFF).to_bytes(4, "little")
    buf = bytearray(b"\xe9\x01\xe8\x00\x12\xe8\x01\x00\x00\x00")
    bcj.encode(buf, 0)
    # E9 at 0: last operand byte 0x12 -> left, scan goes on at 4 (the E8 at 2 is skipped);
    # E8 at 5: converted with 5 + 5
    assert buf == b"\xe9\x01\xe8\x00\x12\xe8\x0b\x00\x00\x00"
