"""Decode one send-stream command (and the stream header): the reference decoder and the
generated kernel-order fast path (:mod:`.codec` encodes).

Strategy: a command is decoded from a buffer in place. Attribute headers are read with
precompiled ``struct`` objects, small values (paths, names) are copied to ``bytes``, file data
becomes a ``memoryview`` slice of the buffer (no copy).

Decoding is strict where btrfs-progs is lenient, because streams are untrusted: an attribute
that the command does not define, a duplicate attribute, a wrong integer size or an attribute
that overruns its command is a :class:`~btrdelta.errors.StreamFormatError`. That keeps
``encode(decode(b)) == b`` for every stream the kernel makes.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable

from .. import TYPE_CHECKING
from .._value import field_names
from ..errors import StreamFormatError, UnsupportedVersionError
from .codec import _DATA, _NS, _TIMESPEC, _U16, _U32, _U64
from .constants import (
    ATTR_KIND,
    COMMAND_SPECS,
    MAGIC,
    MAX_ATTR,
    STREAM_HEADER,
    SUPPORTED_VERSIONS,
    TLV_HEADER,
    Attr,
    Cmd,
    Field,
    Kind,
)
from .framing import legal, send_place
from .records import RECORD_TYPES, Record

if TYPE_CHECKING:
    from typing import Any

__all__ = ["decode_payload", "decode_payload_fast", "decode_stream_header", "fast_decoder"]

def decode_stream_header(buf: Any) -> int:
    """Validate a 17-byte stream header and return its version."""
    magic, version = STREAM_HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise StreamFormatError(
            f"bad magic (starts {bytes(magic)[:13].hex(' ')}), not a btrfs send stream")
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersionError(f"unsupported stream version {version}")
    return int(version)


# --- decoding ---------------------------------------------------------------------------


def _attr_name(t: int) -> str:
    try:
        return Attr(t).name
    except ValueError:
        return str(t)


def _conv_u64(mv: memoryview, p: int, n: int) -> int:
    if n != 8:
        raise ValueError(n)
    return int(_U64.unpack_from(mv, p)[0])


def _conv_u32(mv: memoryview, p: int, n: int) -> int:
    if n != 4:
        raise ValueError(n)
    return int(_U32.unpack_from(mv, p)[0])


def _conv_u8(mv: memoryview, p: int, n: int) -> int:
    if n != 1:
        raise ValueError(n)
    return int(mv[p])


def _conv_uuid(mv: memoryview, p: int, n: int) -> uuid.UUID:
    if n != 16:
        raise ValueError(n)
    return uuid.UUID(bytes=bytes(mv[p : p + 16]))


def _conv_timespec(mv: memoryview, p: int, n: int) -> int:
    if n != 12:
        raise ValueError(n)
    sec, nsec = _TIMESPEC.unpack_from(mv, p)
    if nsec >= _NS:
        raise ValueError("nsec")
    return int(sec * _NS + nsec)


def _conv_bytes(mv: memoryview, p: int, n: int) -> bytes:
    return mv[p : p + n].tobytes()


def _conv_data(mv: memoryview, p: int, n: int) -> memoryview:
    return mv[p : p + n]


_CONVERTERS: dict[Kind, Callable[[memoryview, int, int], Any]] = {
    Kind.U8: _conv_u8,
    Kind.U32: _conv_u32,
    Kind.U64: _conv_u64,
    Kind.UUID: _conv_uuid,
    Kind.TIMESPEC: _conv_timespec,
    Kind.BYTES: _conv_bytes,
    Kind.DATA: _conv_data,
}


class _Decoder:
    """Precomputed decoding plan for one command: where each attribute goes in the record."""

    __slots__ = ("_attr_at", "cls", "cmd", "converters", "nfields", "optional", "slot")

    def __init__(self, cmd: Cmd) -> None:
        spec = COMMAND_SPECS[cmd]
        self.cmd = cmd
        self.cls = RECORD_TYPES[cmd]
        order = list(field_names(self.cls))
        self.nfields = len(order)
        #: attribute number -> (record position, converter)
        self.slot: dict[int, int] = {}
        self.converters: list[Callable[[memoryview, int, int], Any]] = [_conv_data] * len(order)
        self.optional = [False] * len(order)
        for f in spec.fields:
            pos = order.index(f.name)
            self.slot[int(f.attr)] = pos
            self.converters[pos] = _CONVERTERS[ATTR_KIND[f.attr]]
            self.optional[pos] = f.optional
        self._attr_at = {pos: f.attr for f in spec.fields for pos in [order.index(f.name)]}

    def missing(self, pos: int, swallowed: bool) -> StreamFormatError:
        """The error for the required attribute at record position ``pos``."""
        hint = ""
        if swallowed:
            hint = " (DATA carries no length in v2+ and must be last: v1-form DATA?)"
        return StreamFormatError(f"missing attribute {self._attr_at[pos].name}{hint}")


_MISSING: Any = object()
#: the decoding plans made so far (a send decodes nothing: made when first used)
_DECODERS: dict[int, _Decoder] = {}


def _decoder(cmd: int) -> _Decoder:
    dec = _DECODERS[cmd] = _Decoder(Cmd(cmd))
    return dec

_TLV = TLV_HEADER.unpack_from
_U16_FROM = _U16.unpack_from


def decode_payload(cmd: int, mv: memoryview, start: int, end: int, version: int) -> Record:
    """Decode the attributes in ``mv[start:end]`` as command ``cmd`` of stream ``version``.

    Raises:
        StreamFormatError: unknown command, bad attribute, missing attribute (no location:
            the caller adds offset and record number).
    """
    if not legal(cmd, send_place(version)):
        if cmd in COMMAND_SPECS:
            raise StreamFormatError(
                f"command {Cmd(cmd).name} does not exist in stream version {version}"
            )
        raise StreamFormatError(f"unknown command number {cmd}")
    dec = _DECODERS.get(cmd) or _decoder(cmd)
    slot = dec.slot
    conv = dec.converters
    values: list[Any] = [_MISSING] * dec.nfields
    max_attr = MAX_ATTR[version]
    pos = start
    swallowed = False
    while pos < end:
        if end - pos < 4:
            if end - pos >= 2 and version >= 2 and _U16_FROM(mv, pos)[0] == _DATA:
                t, n = _DATA, end - pos - 2
                pos += 2
            else:
                raise StreamFormatError(f"attribute header overruns command end at {pos}")
        else:
            t, n = _TLV(mv, pos)
            if t == _DATA and version >= 2:
                n = end - pos - 2
                pos += 2
                swallowed = True
            else:
                pos += 4
                if pos + n > end:
                    raise StreamFormatError(
                        f"attribute {_attr_name(t)} (length {n}) overruns command end"
                    )
        i = slot.get(t)
        if i is None:
            if t == 0 or t > max_attr:
                raise StreamFormatError(f"invalid attribute type {t}")
            raise StreamFormatError(f"attribute {_attr_name(t)} is not valid for {dec.cmd.name}")
        if values[i] is not _MISSING:
            raise StreamFormatError(f"duplicate attribute {_attr_name(t)}")
        try:
            values[i] = conv[i](mv, pos, n)
        except ValueError:
            raise StreamFormatError(
                f"attribute {_attr_name(t)} has invalid size or value (length {n})"
            ) from None
        pos += n
    for i, val in enumerate(values):
        if val is _MISSING:
            if not dec.optional[i]:
                raise dec.missing(i, swallowed)
            values[i] = None
    return dec.cls(*values)


# --- fast path ----------------------------------------------------------------------------
#
# Strategy: the kernel always emits a command's attributes in one order (the spec table).
# For that order we generate, per command and version class, a straight-line decoder that
# unpacks each run of fixed-size attributes with one precompiled struct and checks the
# type/length pairs in one tuple comparison. Anything unexpected makes it return None and
# the generic decoder above (the reference, which also produces the precise error) runs.

_FIXED_FMT = {Kind.U8: "B", Kind.U32: "I", Kind.U64: "Q", Kind.UUID: "16s", Kind.TIMESPEC: "qI"}


def _gen_fast_decoder(cmd: Cmd, v2: bool) -> Callable[[memoryview, int, int], Any]:
    spec = COMMAND_SPECS[cmd]
    cls = RECORD_TYPES[cmd]
    order = list(field_names(cls))
    ns: dict[str, Any] = {"TLV": _TLV, "U16": _U16_FROM, "UUID": uuid.UUID, "NS": _NS,
                          "Cls": cls}
    lines = ["def fast(mv, p, end):"]
    seg: list[tuple[Field, Kind]] = []
    var: dict[str, str] = {}
    counter = [0]

    def flush() -> None:
        if not seg:
            return
        k = counter[0]
        counter[0] += 1
        fmt = "<" + "".join("HH" + _FIXED_FMT[kind] for _, kind in seg)
        st = struct.Struct(fmt)
        ns[f"S{k}"] = st.unpack_from
        names: list[str] = []
        checks_got: list[str] = []
        checks_want: list[str] = []
        for f, kind in seg:
            t, n = f"t_{f.name}", f"n_{f.name}"
            names += [t, n]
            checks_got += [t, n]
            checks_want += [str(int(f.attr)), str(struct.calcsize("<" + _FIXED_FMT[kind]))]
            if kind is Kind.TIMESPEC:
                names += [f"s_{f.name}", f"ns_{f.name}"]
            else:
                names.append(f"r_{f.name}")
        lines.append(f"    if p + {st.size} > end: return None")
        lines.append(f"    {', '.join(names)}, = S{k}(mv, p)")
        lines.append(f"    if ({', '.join(checks_got)}) != ({', '.join(checks_want)}): return None")
        for f, kind in seg:
            if kind is Kind.TIMESPEC:
                lines.append(f"    if ns_{f.name} >= NS: return None")
                var[f.name] = f"s_{f.name} * NS + ns_{f.name}"
            elif kind is Kind.UUID:
                var[f.name] = f"UUID(bytes=r_{f.name})"
            else:
                var[f.name] = f"r_{f.name}"
        lines.append(f"    p += {st.size}")
        seg.clear()

    for f in spec.fields:
        if f.optional and not (v2 and f.attr in (Attr.OTIME, Attr.ENCRYPTION)):
            var[f.name] = "None"
            continue
        kind = ATTR_KIND[f.attr]
        if kind in _FIXED_FMT:
            seg.append((f, kind))
            continue
        flush()
        if kind is Kind.DATA and v2:
            lines.append(f"    if p + 2 > end or U16(mv, p)[0] != {int(f.attr)}: return None")
            lines.append(f"    v_{f.name} = mv[p + 2:end]")
            lines.append("    p = end")
        else:
            conv = "" if kind is Kind.DATA else ".tobytes()"
            lines.append("    if p + 4 > end: return None")
            lines.append("    t, n = TLV(mv, p)")
            lines.append(f"    if t != {int(f.attr)} or p + 4 + n > end: return None")
            lines.append(f"    v_{f.name} = mv[p + 4:p + 4 + n]{conv}")
            lines.append("    p += 4 + n")
        var[f.name] = f"v_{f.name}"
    flush()
    lines.append("    if p != end: return None")
    lines.append(f"    return Cls({', '.join(var[name] for name in order)})")
    exec("\n".join(lines), ns)  # generated from the constant spec table above
    return ns["fast"]  # type: ignore[no-any-return]


#: (command number, v2+) -> fast decoder
_FAST: dict[tuple[int, bool], Callable[[memoryview, int, int], Any] | None] = {}


def fast_decoder(cmd: int, v2: bool) -> Callable[[memoryview, int, int], Any] | None:
    """The generated kernel-order decoder of ``cmd`` (v1 or v2+ layout), made on first use."""
    key = (cmd, v2)
    try:
        return _FAST[key]
    except KeyError:
        dec = _gen_fast_decoder(Cmd(cmd), v2) if cmd in COMMAND_SPECS and cmd else None
        _FAST[key] = dec
        return dec


def decode_payload_fast(cmd: int, mv: memoryview, start: int, end: int, version: int) -> Record:
    """Like :func:`decode_payload`, trying the kernel-order fast path first."""
    fast = fast_decoder(cmd, version >= 2) if legal(cmd, send_place(version)) else None
    if fast is not None:
        rec = fast(mv, start, end)
        if rec is not None:
            return rec  # type: ignore[no-any-return]
    return decode_payload(cmd, mv, start, end, version)
