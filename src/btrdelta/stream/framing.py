"""The framing shared by btrfs send streams, delta streams and the formats to come.

Every format here is a header (a magic and a u32 version, which the parser on top checks)
followed by frames, little-endian::

    u32 payload length | u16 record number | u32 CRC32C | payload

The CRC is btrfs's: CRC-32C seeded with 0 and not inverted at the end, over the 10-byte
header with its CRC field zeroed, then the payload (:func:`~.codec.command_crc`). Payloads
are TLVs (u16 type, u16 length, value) whose meaning belongs to each format's codec.

Strategy (sans-I/O, as h11): a :class:`Framer` owns the input and nothing else. The caller
feeds bytes in any split with :meth:`Framer.feed` (``b""`` marks the end of input); the
parser on top reads its header with :meth:`Framer.peek` and takes the next frame with
:meth:`Framer.next_frame`, which returns ``NEED_DATA`` until the whole frame is there. A
frame wholly inside one fed buffer is a view of that buffer (no copy: the caller must not
modify a buffer once fed); a frame that spans feeds is assembled once, into a buffer of
exactly its size. A frame's length is checked against its format's limit
(:attr:`Framing.max_payload`) before anything is allocated, and its CRC before it is
returned. A frame stays unconsumed until :meth:`Framer.consume`, so a decode error is
located at its start. Batch decoders (the C one included) read whole frames in place from
:meth:`Framer.window` and report how far they got with :meth:`Framer.consume`.

A new format (the replication protocol's messages, say) gives its :class:`Framing` (limits,
words for errors, names of its records), checks its own header with :meth:`Framer.peek` /
:meth:`Framer.consume`, and decodes the payload of each frame :meth:`Framer.next_frame`
returns; ``tests/stream/test_framing.py`` has a small example.

Errors are :class:`~btrdelta.errors.StreamFormatError` (:class:`~btrdelta.errors.ChecksumError`
for a CRC) located with the source name, the byte offset, the record index and the record's
name (:meth:`Framer.fail`); the framer keeps the first one and raises it again on every
later call. The words of the messages come from a :class:`Framing` value, one per format.

:data:`RECORDS` is the one table of which record number is legal where: in which send-stream
version, at the top level of a delta stream, inside its zstd carrier.

:func:`encode_frame` and :func:`iter_tlvs` build and walk one frame of TLVs for the formats
that define their own records on this framing (the sendshot record, replication messages).

This module knows nothing of what a payload means (``codec``, ``delta.encoding`` do), and
never reads a file: :class:`~.reader.StreamReader` and ``delta.parser.iter_items`` do.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping

from .. import TYPE_CHECKING
from .._value import Value
from ..errors import BtrdeltaError, ChecksumError, StreamFormatError
from .constants import (
    CMD_HEADER,
    CMD_HEADER_SIZE,
    COMMAND_SPECS,
    SUPPORTED_VERSIONS,
    Cmd,
    simple_enum,
)
from .crc import crc32c

if TYPE_CHECKING:
    from typing import Any, Final, Literal, NoReturn

    _IntEnum = enum.IntEnum
    _Enum = enum.Enum
    _Flag = enum.Flag
else:
    _IntEnum = _Enum = _Flag = object

__all__ = [
    "EOF",
    "NEED_DATA",
    "RECORDS",
    "RECORD_NAMES",
    "DCmd",
    "Frame",
    "Framer",
    "Framing",
    "Place",
    "Sentinel",
    "encode_frame",
    "encode_frame_parts",
    "frame_parts",
    "iter_tlvs",
    "legal",
    "max_command",
    "send_place",
]


@simple_enum(enum.Enum)
class Sentinel(_Enum):
    """What a parser returns instead of an item."""

    #: feed more bytes
    NEED_DATA = "NEED_DATA"
    #: the input ended cleanly
    EOF = "EOF"


NEED_DATA: Final[Literal[Sentinel.NEED_DATA]] = Sentinel.NEED_DATA
EOF: Final[Literal[Sentinel.EOF]] = Sentinel.EOF


# --- which record is legal where ---------------------------------------------------------


@simple_enum(enum.Flag)
class Place(_Flag):
    """Where a record may appear."""

    SEND_V1 = 1
    SEND_V2 = 2
    SEND_V3 = 4
    #: the top level of a delta stream (btrfs commands there are raw, CRC included)
    DELTA = 8
    #: inside a delta stream's zstd carrier (CRC field 0; btrfs commands may be folded)
    CARRIER = 16
    #: any send-stream version (what makes a record a btrfs command)
    SEND = SEND_V1 | SEND_V2 | SEND_V3


@simple_enum(enum.IntEnum)
class DCmd(_IntEnum):
    """Record numbers the delta format adds (well above btrfs's 1..26)."""

    STREAM = 200
    ZCMDS = 201
    PATCH = 202
    PDATA = 203
    PWRITE = 204
    DEND = 205
    PENC = 206
    #: inside the carrier only: a compact PATCH (varints, short digests, the patch bytes
    #: inline, optionally its one PWRITE implied)
    CPATCH = 207


_SEND = {1: Place.SEND_V1, 2: Place.SEND_V2, 3: Place.SEND_V3}


def _since(version: int) -> Place:
    """A btrfs command defined since ``version``: every later send-stream version, and a
    delta stream's top level and carrier (btrfs commands pass through a delta stream)."""
    place = Place.DELTA | Place.CARRIER
    for v, p in _SEND.items():
        if v >= version:
            place |= p
    return place


#: (a flag's ``|`` and ``&`` run Python code: the table is made from one value per version)
_SINCE = {v: _since(v) for v in SUPPORTED_VERSIONS}


#: The one table of which record number is legal where. btrfs commands (1..26) by the
#: send-stream version that defined them (``COMMAND_SPECS``), delta records (200..207) by
#: where a delta stream may carry them. A number absent from the table is legal nowhere.
RECORDS: Final[Mapping[int, Place]] = {
    **{int(cmd): _SINCE[spec.version] for cmd, spec in COMMAND_SPECS.items()},
    DCmd.STREAM: Place.DELTA,
    DCmd.ZCMDS: Place.DELTA,
    DCmd.PATCH: Place.DELTA | Place.CARRIER,
    DCmd.PDATA: Place.DELTA | Place.CARRIER,
    DCmd.PWRITE: Place.DELTA | Place.CARRIER,
    DCmd.DEND: Place.DELTA,
    DCmd.PENC: Place.DELTA | Place.CARRIER,
    DCmd.CPATCH: Place.CARRIER,
}


def send_place(version: int) -> Place:
    """The place of a send stream of ``version`` (1..3)."""
    return _SEND[version]


def _legal_at() -> dict[Place, frozenset[int]]:
    # (a flag's ``.value`` runs Python code too: each is read once)
    bits = {c: where.value for c, where in RECORDS.items()}
    return {p: frozenset(c for c, b in bits.items() if b & v)
            for p, v in ((p, p.value) for p in Place.__members__.values())}


_LEGAL_AT: Final = _legal_at()


def legal(cmd: int, place: Place) -> bool:
    """Whether record ``cmd`` may appear at ``place`` (one of the places or several)."""
    at = _LEGAL_AT.get(place)
    return cmd in at if at is not None else bool(RECORDS.get(cmd, Place(0)) & place)


def max_command(version: int) -> int:
    """The highest command number a send stream of ``version`` defines (they are dense)."""
    return max(_LEGAL_AT[_SEND[version]])


# --- framing -------------------------------------------------------------------------------


class Framing(Value, frozen=True):
    """What differs between the formats that share the framing: the largest payload of a
    record, and the words of framing errors (``str.format`` templates, which may use
    ``length`` (announced payload bytes), ``limit`` (the largest allowed), ``total`` (header
    + payload), ``avail`` (bytes present) and ``version`` (:attr:`Framer.version`)).
    """

    #: the input ended where a frame could start, before the format's end record
    eof: str
    #: the input ended inside a frame header
    short_header: str
    #: the payload length is above the limit
    too_long: str
    #: the input ended inside a frame
    truncated: str
    #: record number -> name, for error locations
    names: Mapping[int, str]
    #: largest payload of record ``cmd`` in a stream of ``version``: ``f(cmd, version)``
    max_payload: Callable[[int, int], int]
    #: an unknown record number is named by its number in error locations (else not named)
    unknown_by_number: bool = False


#: one frame: record number, the buffer holding it and where it starts in that buffer
#: (payload at ``buf[start + 10 : start + 10 + length]``), and its payload length
Frame = tuple[int, memoryview, int, int]

_HDR = CMD_HEADER.unpack_from
_HDR6 = struct.Struct("<IH").pack
_ZERO_CRC = bytes(4)
_crc = crc32c


class Framer:
    """The input of one parser (sans-I/O): fed bytes, headers and frames taken in order.

    Args:
        framing: the format's words for errors.
        source: name of the input in error messages (a file name, ``-`` for stdin).
        verify_crc: check each frame's CRC32C in :meth:`next_frame` (turning it off is for
            measuring and fuzzing; batch decoders check CRCs themselves).

    ``unchecked`` (attribute) is a command number whose frames' CRC is not checked (-1:
    none; the replication protocol's DATA from version 4, whose bytes the send stream's own
    CRCs and the segment digests cover).
    """

    __slots__ = (
        "_chunks",
        "_consumed",
        "_cur",
        "_eof",
        "_pos",
        "avail",
        "failed",
        "framing",
        "index",
        "source",
        "unchecked",
        "verify_crc",
        "version",
    )

    def __init__(self, framing: Framing, *, source: str | None = None,
                 verify_crc: bool = True) -> None:
        self.framing = framing
        self.source = source
        self.verify_crc = verify_crc
        self.unchecked = -1
        #: version from the format's header (set by the parser; 0 before it)
        self.version = 0
        #: index of the next frame (0-based, counted over the whole input)
        self.index = 0
        #: the first error raised (raised again by every later call of the parser)
        self.failed: BtrdeltaError | None = None
        self._chunks: list[memoryview] = []
        self._cur: memoryview = memoryview(b"")
        self._pos = 0  # position in _cur
        #: bytes fed and not consumed yet (in ``_cur[_pos:]`` and ``_chunks``; read-only)
        self.avail = 0
        self._consumed = 0  # absolute offset of _cur[_pos]
        self._eof = False

    # -- input --------------------------------------------------------------------------

    def feed(self, data: Any) -> None:
        """Give the framer more bytes (kept as a view: do not modify them after); ``b""``
        marks the end of input (again: no effect; more bytes after it: an error)."""
        view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        if not len(view):
            self._eof = True
            return
        if self._eof:
            raise StreamFormatError("data fed after EOF", source=self.source)
        if self._pos >= len(self._cur) and not self._chunks:
            self._cur = view
            self._pos = 0
        else:
            self._chunks.append(view)
        self.avail += len(view)

    @property
    def offset(self) -> int:
        """Absolute byte offset of the next unconsumed byte."""
        return self._consumed

    @property
    def eof(self) -> bool:
        """Whether the end of input was fed."""
        return self._eof

    def needed(self, header: int = 0) -> int:
        """Bytes still missing for the next header of ``header`` bytes, or (``header`` 0)
        for the next frame, counted up to its format's limit (a read-size hint)."""
        if header:
            want = header
        elif self.avail < CMD_HEADER_SIZE:
            want = CMD_HEADER_SIZE
        else:
            length, cmd, _ = _HDR(self.peek(CMD_HEADER_SIZE), 0)
            want = CMD_HEADER_SIZE + min(length, self.framing.max_payload(cmd, self.version))
        return max(0, want - self.avail)

    # -- bytes ---------------------------------------------------------------------------

    def peek(self, n: int) -> memoryview:
        """The next ``n`` bytes (``n <= avail``) as one contiguous view, not consumed."""
        end = self._pos + n
        if end <= len(self._cur):
            return self._cur[self._pos : end]
        # assemble exactly n bytes into a new buffer (a split frame: copied once)
        buf = bytearray(n)
        got = len(self._cur) - self._pos
        buf[:got] = self._cur[self._pos :]
        merged = take = 0
        for chunk in self._chunks:
            take = min(len(chunk), n - got)
            buf[got : got + take] = chunk[:take]
            got += take
            merged += 1
            if got == n:
                break
        # replace the consumed-from chunks by the merged buffer + the rest of the last chunk
        rest = self._chunks[merged - 1][take:]
        self._chunks = ([rest] if len(rest) else []) + self._chunks[merged:]
        self._cur = memoryview(buf)
        self._pos = 0
        return self._cur

    def window(self) -> tuple[memoryview, int]:
        """The fed buffer being read and the position of the next byte in it: a batch
        decoder reads the whole frames there in place, then calls :meth:`consume`."""
        return self._cur, self._pos

    def consume(self, n: int, frames: int = 1) -> None:
        """Mark the next ``n`` bytes (holding ``frames`` frames) as read."""
        self._pos += n
        self.avail -= n
        self._consumed += n
        self.index += frames
        if self._pos >= len(self._cur) and self._chunks:
            self._cur = self._chunks.pop(0)
            self._pos = 0

    # -- frames --------------------------------------------------------------------------

    def next_frame(self) -> Frame | Literal[Sentinel.NEED_DATA]:
        """The next whole frame (not consumed: call :meth:`consume` once it is decoded) or
        ``NEED_DATA``. The payload length is checked against the format's limit before
        anything is allocated, the CRC (with ``verify_crc``) before the frame is returned.

        Raises:
            StreamFormatError: the input ends inside a frame or where one must start, or a
                length is above the limit.
            ChecksumError: the CRC does not match.
        """
        avail = self.avail
        words = self.framing
        if avail < CMD_HEADER_SIZE:
            if not self._eof:
                return NEED_DATA
            self.fail(StreamFormatError(words.eof if not avail else words.short_header))
        cur = self._cur
        pos = self._pos
        if pos + CMD_HEADER_SIZE <= len(cur):
            length, cmd, crc = _HDR(cur, pos)
        else:
            length, cmd, crc = _HDR(self.peek(CMD_HEADER_SIZE), 0)
        limit = words.max_payload(cmd, self.version)
        if length > limit:
            self.fail(StreamFormatError(self._words(words.too_long, length, limit)), cmd=cmd)
        total = CMD_HEADER_SIZE + length
        if avail < total:
            if not self._eof:
                return NEED_DATA
            self.fail(StreamFormatError(self._words(words.truncated, length, limit)), cmd=cmd)
        if pos + total <= len(cur):
            mv, start = cur, pos
        else:
            mv, start = self.peek(total), 0
        if self.verify_crc and cmd != self.unchecked:
            actual = _crc(
                mv[start + CMD_HEADER_SIZE : start + total],
                _crc(_ZERO_CRC, _crc(_HDR6(length, cmd), 0xFFFFFFFF)),
            ) ^ 0xFFFFFFFF
            if actual != crc:
                self.fail(ChecksumError(
                    f"CRC32C mismatch (stored {crc:#010x}, computed {actual:#010x})",
                    expected=crc, actual=actual,
                ), cmd=cmd)
        return cmd, mv, start, length

    def _words(self, template: str, length: int, limit: int) -> str:
        return template.format(length=length, limit=limit, total=CMD_HEADER_SIZE + length,
                               avail=self.avail, version=self.version)

    def fail(self, exc: BtrdeltaError, *, cmd: int | None = None, indexed: bool = True,
             offset: int | None = None) -> NoReturn:
        """Locate ``exc`` (source, ``offset`` or the next unconsumed byte, the next frame's
        index unless ``indexed`` is false, the name of record ``cmd``), keep it, raise it."""
        exc.located(
            source=self.source,
            offset=self._consumed if offset is None else offset,
            index=self.index if indexed else None,
            command=None if cmd is None else self.framing.names.get(
                cmd, str(cmd) if self.framing.unknown_by_number else None),
        )
        self.failed = exc
        raise exc


#: names of btrfs commands and delta records, for error locations
RECORD_NAMES: Final[Mapping[int, str]] = (
    {int(c): c.name for c in Cmd} | {int(c): c.name for c in DCmd}
)


# --- frames of TLVs (formats that define their own records on this framing) ---------------

_TLV = struct.Struct("<HH")
_FRAME_HDR = struct.Struct("<IHI")


def encode_frame(cmd: int, attrs: Iterable[tuple[int, Any]]) -> bytes:
    """One frame: record ``cmd`` with the TLVs ``(type, value)`` in order (values are
    buffers of at most 65535 bytes), length and CRC32C filled in."""
    return b"".join(encode_frame_parts(cmd, attrs))


def encode_frame_parts(cmd: int, attrs: Iterable[tuple[int, Any]]) -> list[Any]:
    """:func:`encode_frame` as its pieces, in order: the 10-byte header, then each TLV's
    header and value (the values themselves: a large frame is not copied to be joined)."""
    parts: list[Any] = []
    for typ, value in attrs:
        n = len(value)
        if n > 0xFFFF:
            raise ValueError(f"TLV {typ} of {n} bytes does not fit a u16 length")
        parts.append(_TLV.pack(typ, n))
        parts.append(value)
    return frame_parts(cmd, parts)


def frame_parts(cmd: int, payload: list[Any]) -> list[Any]:
    """A frame of ``cmd`` whose payload is the pieces ``payload`` (any bytes, not TLVs), as
    its pieces: the 10-byte header, then ``payload`` itself (not copied)."""
    length = sum(map(len, payload))
    crc = _crc(_ZERO_CRC, _crc(_HDR6(length, cmd), 0xFFFFFFFF))
    for piece in payload:
        crc = _crc(piece, crc)
    return [_FRAME_HDR.pack(length, cmd, crc ^ 0xFFFFFFFF), *payload]


def iter_tlvs(mv: memoryview, start: int, end: int) -> Iterator[tuple[int, memoryview]]:
    """``(type, value)`` of the TLVs of the payload ``mv[start:end]`` (values are views).

    Raises:
        StreamFormatError: a TLV runs past the payload's end.
    """
    pos = start
    while pos < end:
        if pos + 4 > end:
            raise StreamFormatError(f"truncated TLV header at payload byte {pos - start}")
        typ, n = _TLV.unpack_from(mv, pos)
        pos += 4
        if pos + n > end:
            raise StreamFormatError(f"TLV {typ} of {n} bytes runs past the record's end")
        yield typ, mv[pos : pos + n]
        pos += n
