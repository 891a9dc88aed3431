"""Encode one send-stream command; the btrfs flavour of CRC32C; the C accelerator's plan.

Encoding returns a list of pieces (header, attribute bytes, data view) for
``writelines``/``writev``; the CRC is computed over the pieces, never over a concatenation.
Decoding is :mod:`.decode`'s (a send decodes nothing: it does not import it).
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable, Sequence

from .. import TYPE_CHECKING, _native
from .._value import field_names
from ..errors import StreamFormatError, UnsupportedVersionError
from .constants import (
    ATTR_KIND,
    CMD_HEADER,
    COMMAND_SPECS,
    MAGIC,
    MAX_PAYLOAD,
    STREAM_HEADER,
    SUPPORTED_VERSIONS,
    TLV_HEADER,
    Attr,
    Cmd,
    Kind,
)
from .crc import crc32c
from .framing import max_command
from .records import RECORD_TYPES, Record

if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "btrfs_crc32c",
    "encode_record",
    "encode_stream_header",
]

_crc = crc32c
_ZERO_CRC = b"\x00\x00\x00\x00"
_HDR6 = struct.Struct("<IH")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_TIMESPEC = struct.Struct("<qI")
_NS = 1_000_000_000
_DATA = int(Attr.DATA)


def btrfs_crc32c(pieces: Sequence[Any], crc: int = 0) -> int:
    """CRC32C as btrfs send uses it: seed 0, no final inversion, over ``pieces`` in order.

    The library computes the standard CRC32C (init and xor-out 0xFFFFFFFF); btrfs's value is
    the raw register, so we feed the inverted seed and invert the result.
    """
    value = crc ^ 0xFFFFFFFF
    for piece in pieces:
        value = _crc(piece, value)
    return value ^ 0xFFFFFFFF


def command_crc(payload_len: int, cmd: int, payload: Any) -> int:
    """CRC of a command: header with the CRC field zeroed, then the payload."""
    value = _crc(_HDR6.pack(payload_len, cmd), 0xFFFFFFFF)
    value = _crc(_ZERO_CRC, value)
    return _crc(payload, value) ^ 0xFFFFFFFF


# --- stream header ----------------------------------------------------------------------


def encode_stream_header(version: int) -> bytes:
    """The 17-byte stream header for ``version``."""
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersionError(f"cannot write stream version {version}")
    return STREAM_HEADER.pack(MAGIC, version)


# --- encoding ---------------------------------------------------------------------------


def _enc_int(st: struct.Struct) -> Callable[[Any], bytes]:
    return st.pack


def _enc_uuid(v: Any) -> bytes:
    return bytes(v.bytes)


def _enc_timespec(v: Any) -> bytes:
    sec, nsec = divmod(int(v), _NS)
    return _TIMESPEC.pack(sec, nsec)


def _enc_bytes(v: Any) -> bytes:
    return bytes(v)


_ENCODERS: dict[Kind, Callable[[Any], bytes]] = {
    Kind.U8: _enc_int(_U8),
    Kind.U32: _enc_int(_U32),
    Kind.U64: _enc_int(_U64),
    Kind.UUID: _enc_uuid,
    Kind.TIMESPEC: _enc_timespec,
    Kind.BYTES: _enc_bytes,
}


#: per command: (field name, attribute number, encoder (None: DATA), optional)
if TYPE_CHECKING:
    _Plan = tuple[tuple[str, int, Callable[[Any], bytes] | None, bool], ...]
_PLANS: dict[int, _Plan] = {}


def _plan(cmd: int) -> _Plan:
    plan = _PLANS.get(cmd)
    if plan is None:
        plan = _PLANS[cmd] = tuple(
            (f.name, int(f.attr),
             None if ATTR_KIND[f.attr] is Kind.DATA else _ENCODERS[ATTR_KIND[f.attr]],
             f.optional)
            for f in COMMAND_SPECS[Cmd(cmd)].fields)
    return plan


def encode_record(rec: Record, version: int) -> list[Any]:
    """Encode ``rec`` as one command of a ``version`` stream: ``[header, attrs, data?]``.

    Raises:
        StreamFormatError: the record cannot be expressed in ``version`` (a v2 command in a
            v1 stream, a value too long for its TLV, a payload above the version's limit).
    """
    cmd = rec.cmd
    icmd = int(cmd)
    if COMMAND_SPECS[cmd].version > version:
        raise StreamFormatError(f"{cmd.name} cannot be expressed in stream version {version}")
    parts: list[bytes] = []
    data: Any = None
    tlv = TLV_HEADER.pack
    for name, attr, enc, optional in _PLANS.get(icmd) or _plan(icmd):
        value = getattr(rec, name)
        if value is None:
            if optional:
                continue
            raise StreamFormatError(f"{cmd.name}: attribute {Attr(attr).name} has no value")
        if enc is None:
            view = memoryview(value).cast("B") if not isinstance(value, bytes) else value
            if version >= 2:
                parts.append(_U16.pack(_DATA))
                data = view
                continue
            if len(view) > 0xFFFF:
                raise StreamFormatError(
                    f"{cmd.name}: {len(view)} bytes of data do not fit a v1 DATA attribute"
                )
            parts.append(tlv(_DATA, len(view)))
            parts.append(bytes(view))
            continue
        try:
            raw = enc(value)
        except (struct.error, ValueError, TypeError, AttributeError, OverflowError) as exc:
            raise StreamFormatError(
                f"{cmd.name}: bad value for {Attr(attr).name}: {value!r}"
            ) from exc
        if len(raw) > 0xFFFF:
            raise StreamFormatError(f"{cmd.name}: {Attr(attr).name} is longer than 65535 bytes")
        parts.append(tlv(attr, len(raw)))
        parts.append(raw)
    attrs = b"".join(parts)
    length = len(attrs) + (len(data) if data is not None else 0)
    if length > MAX_PAYLOAD[version]:
        raise StreamFormatError(
            f"{cmd.name}: payload of {length} bytes exceeds the v{version} limit"
            f" of {MAX_PAYLOAD[version]}"
        )
    value = _crc(_HDR6.pack(length, icmd) + _ZERO_CRC + attrs, 0xFFFFFFFF)
    if data is not None:
        value = _crc(data, value)
    header = CMD_HEADER.pack(length, icmd, value ^ 0xFFFFFFFF)
    return [header, attrs] if data is None else [header, attrs, data]


# --- optional C accelerator ---------------------------------------------------------------
#
# dulwich-style: the Python code above stays the reference; ``_speedups`` (C, built when a
# compiler is present) replaces the batch loop in parsers (``reader``) and the encoding of
# plain commands in writers (``writer``) made while it is live (``btrdelta._native``). It
# gets the decoding plan from COMMAND_SPECS, the same rules as _gen_fast_decoder, and each
# version's highest command from the framing's table; both use this module, so the plan is
# given wherever the module is loaded (a send writes streams without loading the reader).

_KIND_CODE = {Kind.U8: 0, Kind.U32: 1, Kind.U64: 2, Kind.UUID: 3, Kind.TIMESPEC: 4,
              Kind.BYTES: 5, Kind.DATA: 6}


def _speedups_plan() -> tuple[Any, ...]:
    """``configure()`` arguments: per command, the kernel-order fields fast decoders accept."""
    commands: list[Any] = [None] * (max(COMMAND_SPECS) + 1)
    # (keyed by the attribute, an IntEnum: a Kind, a plain Enum, hashes in Python)
    code = {attr: _KIND_CODE[kind] for attr, kind in ATTR_KIND.items()}
    for cmd, spec in COMMAND_SPECS.items():
        cls = RECORD_TYPES[cmd]
        order = list(field_names(cls))
        # optional (v2+) attributes are decoded where the kernel puts them, skipped when
        # absent
        # (this kernel leaves ENCRYPTION out of ENCODED_WRITE when it is 0)
        plans = [
            tuple(
                (int(f.attr), code[f.attr], order.index(f.name), f.optional)
                for f in spec.fields
                if v2 or not f.optional
            )
            for v2 in (False, True)
        ]
        commands[cmd] = (cls, len(order), *plans)
    limits = ((0, 0), *((max_command(v), MAX_PAYLOAD[v]) for v in SUPPORTED_VERSIONS))
    return uuid.UUID, tuple(commands), limits, int(Cmd.END), crc32c


_native.on_load("speedups", lambda mod: mod.configure(*_speedups_plan()))
