"""Replication messages: value classes and their bytes (sans-I/O).

Each direction of a connection is ``b"btrdelta-repl\\0"`` and a u32 framing version (1),
then messages on the send stream's framing (:mod:`btrdelta.stream.framing`): u32 payload
length, u16 message number, u32 CRC32C, TLVs ``(u16 type, u16 length, value)``; integers
are little-endian. Unknown TLV types are ignored (a later version may add some); unknown
message numbers are an error. ``docs/formats/replication-protocol.md`` is the spec.

Owns: the numbers, :func:`encode` (message -> bytes) and :func:`decode` (one frame ->
message, with :class:`~btrdelta.errors.ProtocolError` for anything malformed). The order of
messages is :mod:`.machine`'s.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import Any, Final, TypeAlias
from uuid import UUID

import blake3

from .._optional import need
from .._value import Value
from ..errors import MissingDependencyError, ProtocolError, StreamFormatError, shown
from ..stream.crc import crc32c
from ..stream.framing import Framing, encode_frame, iter_tlvs

__all__ = [
    "FRAMING",
    "MAX_HOLDINGS",
    "SENDER_FRAMING",
    "MAGIC",
    "MAX_DATA",
    "MAX_DATA_V3",
    "Accept",
    "Ack",
    "Checkpoint",
    "Commit",
    "Committed",
    "Data",
    "Held",
    "Hello",
    "Holdings",
    "Message",
    "Partial",
    "Plan",
    "Refuse",
    "data_crc",
    "data_raw",
    "decode",
    "encode",
    "max_data",
]

MAGIC: Final = b"btrdelta-repl\0"
HEADER: Final = struct.Struct("<14sI")
#: framing version written in the header
WIRE_VERSION: Final = 1
#: protocol versions this build knows: 2 digests segments with XXH3-128 instead of
#: BLAKE3-256 (see :func:`segment_hasher`), when the optional xxhash is installed; 3 is 2
#: with DATA of up to 1 MiB (:func:`max_data`); 4 is 3 with DATA's CRC field 0, neither
#: computed nor checked (:func:`data_crc`); 5 is 4 with DATA's bytes in one piece, the
#: rest of the message (:func:`data_raw`)
VERSIONS: Final = (1, 2, 3, 4, 5)


def spoken() -> tuple[int, ...]:
    """The versions this installation speaks (its HELLO): 2 to 5 only with xxhash (the
    ``[make]`` extra; a bare receiver speaks 1)."""
    try:
        need("xxhash")
    except MissingDependencyError:
        return (1,)
    return VERSIONS
#: stream bytes in one DATA message (protocol versions 1 and 2; 3: :data:`MAX_DATA_V3`)
MAX_DATA: Final = 256 * 1024
MAX_DATA_V3: Final = 1024 * 1024
_MAX_PAYLOAD = MAX_DATA_V3 + 64 * 1024


def max_data(version: int) -> int:
    """The most stream bytes one DATA message carries in protocol ``version``."""
    return MAX_DATA_V3 if version >= 3 else MAX_DATA


def data_crc(version: int) -> bool:
    """Whether DATA messages carry a CRC32C in protocol ``version`` (before 4). From
    version 4 their CRC field is 0 and not checked: every byte they carry is a send stream's,
    under its own record's CRC32C (checked before the record is applied) and its segment's
    digest (checked before the ACK), so a second CRC over the same bytes caught nothing
    more; a DATA message's own fields are checked by their rules (offset, lengths)."""
    return version < 4


def data_raw(version: int) -> bool:
    """Whether a DATA message's bytes are one piece in protocol ``version`` (from 5): the
    offset TLV, then the type of the bytes' TLV (u16) without a length, the bytes being the
    rest of the message (as a v2 send stream's DATA attribute), so that a receiver takes
    them as a view of the message it read instead of joining TLVs of 65535 bytes."""
    return version >= 5


HELLO, HOLDINGS, PLAN, REFUSE, ACCEPT, DATA, CHECKPOINT, ACK, COMMIT, COMMITTED = range(1, 11)
NAMES: Final = {HELLO: "HELLO", HOLDINGS: "HOLDINGS", PLAN: "PLAN", REFUSE: "REFUSE",
                ACCEPT: "ACCEPT", DATA: "DATA", CHECKPOINT: "CHECKPOINT", ACK: "ACK",
                COMMIT: "COMMIT", COMMITTED: "COMMITTED"}

#: the largest HOLDINGS a sender reads: one entry per subvolume of DEST (about 100 bytes:
#: 640,000 of them). Until session 21 every message was held to :data:`_MAX_PAYLOAD`, and
#: a DEST of 11,400 received subvolumes (16 months of hourly replication) failed every
#: replication to it ("message length ... exceeds"); only a sender reads one
MAX_HOLDINGS: Final = 64 << 20

#: what a receiver reads (every message up to :data:`_MAX_PAYLOAD`)
FRAMING: Final = Framing(
    eof="connection closed",
    short_header="connection closed inside a message header",
    too_long="message length {length} exceeds {limit}",
    truncated="connection closed inside a message of {total} bytes",
    names=NAMES,
    max_payload=lambda cmd, version: _MAX_PAYLOAD,
    unknown_by_number=True,
)
#: what a sender reads: a HOLDINGS up to :data:`MAX_HOLDINGS`
SENDER_FRAMING: Final = Framing(
    FRAMING.eof, FRAMING.short_header, FRAMING.too_long, FRAMING.truncated, NAMES,
    lambda cmd, version: MAX_HOLDINGS if cmd == HOLDINGS else _MAX_PAYLOAD, True)

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_TLV = struct.Struct("<HH")
_HDR6 = struct.Struct("<IH")
_FRAME_HDR = struct.Struct("<IHI")
#: version 5 DATA before its bytes: offset TLV (type, length 8, u64), the bytes' type
_RAW_HEAD = struct.Struct("<HHQH")
_ZERO_CRC = bytes(4)


class Hello(Value):
    """First message of each side: who it is and what it speaks."""

    #: ``"sender"`` or ``"receiver"``
    role: str
    #: protocol versions it speaks; the highest common one is used
    versions: tuple[int, ...]
    #: capabilities (e.g. ``"encoded"``: ENCODED_WRITE may be sent)
    caps: tuple[str, ...]
    #: a stable id (the receiver's destination id; the sender's store id)
    ident: str
    #: the source (sender) or destination (receiver), for messages
    name: str = ""


class Held(Value):
    """One subvolume the receiver holds."""

    name: str
    uuid: UUID
    #: its received UUID (what a stream named it), if any
    received_uuid: UUID | None
    stransid: int
    #: the sendshot digest it was received as (hex), when the receiver knows it
    sendshot: str | None = None


class Partial(Value):
    """A transfer the receiver has begun and can resume."""

    session: str
    #: bytes of the stream it holds (verified, at a segment boundary)
    offset: int
    #: segments it holds
    segments: int
    #: the chain digest at ``offset`` (hex)
    chain: str


class Holdings(Value):
    """What the receiver holds."""

    held: tuple[Held, ...]
    partial: Partial | None = None


class Plan(Value):
    """What the sender will send."""

    #: ``"full"``, ``"incremental"`` or ``"resume"``
    kind: str
    session: str
    #: the received subvolume's final name
    name: str
    #: the stream's UUID and ctransid (the new subvolume's received UUID)
    uuid: UUID
    ctransid: int
    #: the parent's UUID (incremental), else None
    parent_uuid: UUID | None
    #: the base sendshot (hex digest), else ""
    base: str
    #: bytes estimated (0: unknown)
    estimate: int
    #: segment size
    segment: int
    #: where the stream continues (resume), else 0
    offset: int = 0
    segments: int = 0


class Refuse(Value):
    """A typed refusal (either side, any time): no exchange follows."""

    code: str
    message: str


class Accept(Value):
    """The receiver takes the plan."""

    session: str


class Data(Value):
    """Stream bytes at ``offset`` (received in version 5: a view of the message read)."""

    offset: int
    data: bytes | memoryview


class Checkpoint(Value):
    """The end of segment ``index`` (bytes up to ``offset``) and its digests (hex)."""

    index: int
    offset: int
    digest: str
    chain: str


class Ack(Value):
    """The receiver holds segment ``index`` (spooled and verified)."""

    index: int
    offset: int


class Commit(Value):
    """The stream is complete: its size, chain digest and the sendshot it makes."""

    size: int
    chain: str
    sendshot: str


class Committed(Value):
    """The receiver finished the subvolume under its final name."""

    name: str
    uuid: UUID


Message: TypeAlias = (Hello | Holdings | Plan | Refuse | Accept | Data | Checkpoint | Ack
                      | Commit | Committed)

#: refusal codes
REFUSALS: Final = {
    "no-common-base": "the receiver holds no state of this source that the sender knows",
    "diverged": "the receiver holds a newer state of this source than the sender knows",
    "already-current": "the receiver already holds the source's current state",
    "version": "no common protocol version",
    "exists": "the destination already holds that name",
    "refused": "not allowed",
    "protocol": "the peer broke the protocol",
    "failed": "the receiver could not apply the stream",
    "busy": "another process is receiving into the destination",
}

# TLV types (per message)
_ROLE, _VERSION, _CAP, _IDENT, _NAME = 1, 2, 3, 4, 5
_HELD, _PARTIAL = 1, 2
_KIND, _SESSION, _PNAME, _UUID, _CTRANSID, _PARENT, _BASE, _ESTIMATE, _SEGMENT, _OFFSET, \
    _SEGMENTS = range(1, 12)
_CODE, _MESSAGE = 1, 2
_DOFF, _DBYTES = 1, 2
_INDEX, _COFF, _DIGEST, _CHAIN = 1, 2, 3, 4
_SIZE, _SENDSHOT = 1, 3


def _s(v: str) -> bytes:
    return v.encode("utf-8", "surrogateescape")


def _hex(v: str) -> bytes:
    return bytes.fromhex(v) if v else b""


def _held_bytes(h: Held) -> bytes:
    name = _s(h.name)
    return (_U16.pack(len(name)) + name + h.uuid.bytes
            + (h.received_uuid.bytes if h.received_uuid else bytes(16))
            + _U64.pack(h.stransid) + _hex(h.sendshot or ""))


def _attrs(msg: Message) -> tuple[int, list[tuple[int, Any]]]:
    if isinstance(msg, Hello):
        return HELLO, ([(_ROLE, _s(msg.role))] + [(_VERSION, _U16.pack(v)) for v in msg.versions]
                       + [(_CAP, _s(c)) for c in msg.caps]
                       + [(_IDENT, _s(msg.ident)), (_NAME, _s(msg.name))])
    if isinstance(msg, Holdings):
        out = [(_HELD, _held_bytes(h)) for h in msg.held]
        p = msg.partial
        if p is not None:
            out.append((_PARTIAL, _hex(p.session) + _U64.pack(p.offset) + _U64.pack(p.segments)
                        + _hex(p.chain)))
        return HOLDINGS, out
    if isinstance(msg, Plan):
        return PLAN, [
            (_KIND, _s(msg.kind)), (_SESSION, _hex(msg.session)), (_PNAME, _s(msg.name)),
            (_UUID, msg.uuid.bytes), (_CTRANSID, _U64.pack(msg.ctransid)),
            (_PARENT, msg.parent_uuid.bytes if msg.parent_uuid else b""),
            (_BASE, _hex(msg.base)), (_ESTIMATE, _U64.pack(msg.estimate)),
            (_SEGMENT, _U64.pack(msg.segment)), (_OFFSET, _U64.pack(msg.offset)),
            (_SEGMENTS, _U64.pack(msg.segments))]
    if isinstance(msg, Refuse):
        return REFUSE, [(_CODE, _s(msg.code)), (_MESSAGE, _s(msg.message)[:4000])]
    if isinstance(msg, Accept):
        return ACCEPT, [(_SESSION, _hex(msg.session))]
    if isinstance(msg, Data):
        view = memoryview(msg.data)
        return DATA, [(_DOFF, _U64.pack(msg.offset))] + [
            (_DBYTES, view[i:i + 0xFFFF]) for i in range(0, len(view), 0xFFFF)]
    if isinstance(msg, Checkpoint):
        return CHECKPOINT, [(_INDEX, _U64.pack(msg.index)), (_COFF, _U64.pack(msg.offset)),
                            (_DIGEST, _hex(msg.digest)), (_CHAIN, _hex(msg.chain))]
    if isinstance(msg, Ack):
        return ACK, [(_INDEX, _U64.pack(msg.index)), (_COFF, _U64.pack(msg.offset))]
    if isinstance(msg, Commit):
        return COMMIT, [(_SIZE, _U64.pack(msg.size)), (_CHAIN, _hex(msg.chain)),
                        (_SENDSHOT, _hex(msg.sendshot))]
    return COMMITTED, [(_PNAME, _s(msg.name)), (_UUID, msg.uuid.bytes)]


def encode(msg: Message) -> bytes:
    """The frame of one message."""
    cmd, attrs = _attrs(msg)
    if cmd == DATA and len(msg.data) > MAX_DATA_V3:  # type: ignore[union-attr]
        raise ValueError(f"DATA of {len(msg.data)} bytes")  # type: ignore[union-attr]
    return encode_frame(cmd, attrs)


def segment_hasher(version: int) -> Any:
    """A new hasher (``update``, ``hexdigest``) of a segment's bytes in protocol ``version``:
    BLAKE3-256 in version 1, XXH3-128 in version 2.

    The digest guards against accidents, not against the peer: the bytes of a segment
    arriving other than sent (each message also has its CRC32C; TLS and ssh their MACs) and,
    through the chain, a stream made again for a resume that differs from the one the
    receiver holds a part of. A lying sender can send any bytes with their right digest
    whatever the hash; the receiver confines what it applies. XXH3-128 does this at ten
    times BLAKE3's speed (it was a third of the receiver's work).
    """
    if version >= 2:
        return need("xxhash").xxh3_128()
    return blake3.blake3()


def encode_data(offset: int, pieces: Sequence[Any], *,
                crc: bool = True, raw: bool = False) -> tuple[list[Any], int]:
    """The frame of ``Data(offset, b"".join(pieces))`` as buffers to write in order (the
    pieces themselves among them, not copied), and the number of data bytes.

    The bytes are those of :func:`encode`: the data cut into TLVs of 65535 bytes, the last
    one shorter; without ``crc`` (protocol version 4) the CRC field is 0; ``raw`` (version
    5, without ``crc``): the data in one piece after its type (:func:`data_raw`).
    """
    views = [memoryview(p).cast("B") for p in pieces]
    total = sum(len(v) for v in views)
    if total > MAX_DATA_V3:
        raise ValueError(f"DATA of {total} bytes")
    if raw:
        return [_FRAME_HDR.pack(_RAW_HEAD.size + total, DATA, 0),
                _RAW_HEAD.pack(_DOFF, 8, offset, _DBYTES), *views], total
    out: list[Any] = [b"", _TLV.pack(_DOFF, 8) + _U64.pack(offset)]
    left = done = 0
    for view in views:
        pos, n = 0, len(view)
        while pos < n:
            if not left:  # the next TLV: what remains, at most 65535 bytes
                left = min(0xFFFF, total - done)
                out.append(_TLV.pack(_DBYTES, left))
            take = min(left, n - pos)
            out.append(view[pos:pos + take] if take != n else view)
            pos += take
            left -= take
            done += take
    length = sum(len(b) for b in out)
    if not crc:
        out[0] = _FRAME_HDR.pack(length, DATA, 0)
        return out, total
    value = crc32c(_ZERO_CRC, crc32c(_HDR6.pack(length, DATA), 0xFFFFFFFF))
    for b in out[1:]:
        value = crc32c(b, value)
    out[0] = _FRAME_HDR.pack(length, DATA, value ^ 0xFFFFFFFF)
    return out, total


# -- decoding -------------------------------------------------------------------------


def _str(v: memoryview) -> str:
    return bytes(v).decode("utf-8", "surrogateescape")


def _shown(v: memoryview) -> str:
    """A peer's text that is printed (a REFUSE's, a HELLO's id and name: ``replicate -v``
    and ``sendshot list`` show a receiver's id), escaped (:func:`~btrdelta.errors.shown`)."""
    return shown(_str(v))


def _int(v: memoryview, what: str) -> int:
    if len(v) == 8:
        return int(_U64.unpack(v)[0])
    if len(v) == 2:
        return int(_U16.unpack(v)[0])
    raise ProtocolError(f"{what}: an integer of {len(v)} bytes")


def _uuid(v: memoryview, what: str) -> UUID:
    if len(v) != 16:
        raise ProtocolError(f"{what}: a UUID of {len(v)} bytes")
    return UUID(bytes=bytes(v))


def _digest(v: memoryview, what: str, *, empty: bool = False) -> str:
    if not (len(v) == 32 or (empty and not len(v))
            or (what in ("session", "digest") and len(v) == 16)):
        raise ProtocolError(f"{what}: a digest of {len(v)} bytes")
    return bytes(v).hex()


def _one(attrs: dict[int, list[memoryview]], t: int, what: str) -> memoryview:
    got = attrs.get(t)
    if not got:
        raise ProtocolError(f"{what} missing")
    return got[0]


def _held(v: memoryview) -> Held:
    if len(v) < 2:
        raise ProtocolError("HOLDINGS: a truncated entry")
    n = _U16.unpack_from(v)[0]
    rest = v[2 + n:]
    if len(rest) not in (40, 72):
        raise ProtocolError("HOLDINGS: an entry of a wrong size")
    recv = bytes(rest[16:32])
    return Held(_str(v[2:2 + n]), UUID(bytes=bytes(rest[:16])),
                UUID(bytes=recv) if any(recv) else None,
                int(_U64.unpack_from(rest, 32)[0]),
                bytes(rest[40:]).hex() if len(rest) == 72 else None)


def _partial(v: memoryview) -> Partial:
    if len(v) != 16 + 16 + 32:
        raise ProtocolError("HOLDINGS: a partial entry of a wrong size")
    return Partial(bytes(v[:16]).hex(), int(_U64.unpack_from(v, 16)[0]),
                   int(_U64.unpack_from(v, 24)[0]), bytes(v[32:]).hex())


def _tlvs(mv: memoryview, start: int, end: int) -> dict[int, list[memoryview]]:
    out: dict[int, list[memoryview]] = {}
    try:
        for t, v in iter_tlvs(mv, start, end):
            out.setdefault(t, []).append(v)
    except Exception as exc:
        raise ProtocolError(str(exc)) from exc
    return out


def _decode_plan(a: dict[int, list[memoryview]]) -> Plan:
    parent = _one(a, _PARENT, "PLAN parent")
    kind = _str(_one(a, _KIND, "PLAN kind"))
    if kind not in ("full", "incremental", "resume"):
        raise ProtocolError(f"PLAN: unknown kind {kind!r}")
    segment = _int(_one(a, _SEGMENT, "PLAN segment"), "segment")
    if not 64 * 1024 <= segment <= 1 << 30:
        raise ProtocolError(f"PLAN: segment size {segment} out of range")
    return Plan(kind, _digest(_one(a, _SESSION, "PLAN session"), "session"),
                _str(_one(a, _PNAME, "PLAN name")), _uuid(_one(a, _UUID, "PLAN uuid"), "uuid"),
                _int(_one(a, _CTRANSID, "PLAN ctransid"), "ctransid"),
                _uuid(parent, "parent") if len(parent) else None,
                _digest(_one(a, _BASE, "PLAN base"), "base", empty=True),
                _int(_one(a, _ESTIMATE, "PLAN estimate"), "estimate"), segment,
                _int(_one(a, _OFFSET, "PLAN offset"), "offset"),
                _int(_one(a, _SEGMENTS, "PLAN segments"), "segments"))


def decode(cmd: int, mv: memoryview, start: int, end: int, version: int = 0) -> Message:
    """The message of frame ``cmd`` with payload ``mv[start:end]`` in protocol ``version``
    (0: not agreed yet).

    Raises:
        ProtocolError: an unknown message number, a missing or malformed field.
    """
    if cmd == DATA and data_raw(version):  # the bytes: a view of the message
        if end - start < _RAW_HEAD.size:
            raise ProtocolError("DATA without its offset")
        t, n, offset, bt = _RAW_HEAD.unpack_from(mv, start)
        if t != _DOFF or n != 8:
            raise ProtocolError("DATA without its offset")
        if bt != _DBYTES:
            raise ProtocolError("DATA without its bytes")
        return Data(offset, mv[start + _RAW_HEAD.size:end])
    if cmd == DATA:  # the hot path: no dict
        try:
            items = list(iter_tlvs(mv, start, end))
        except StreamFormatError as exc:
            raise ProtocolError(f"DATA: {exc.message}") from None
        if not items or items[0][0] != _DOFF:
            raise ProtocolError("DATA without its offset")
        offset = _int(items[0][1], "offset")
        return Data(offset, b"".join([v for t, v in items[1:] if t == _DBYTES]))
    a = _tlvs(mv, start, end)
    if cmd == HELLO:
        return Hello(_str(_one(a, _ROLE, "HELLO role")),
                     tuple(_int(v, "version") for v in a.get(_VERSION, [])),
                     tuple(_str(v) for v in a.get(_CAP, [])),
                     _shown(_one(a, _IDENT, "HELLO id")),
                     _shown(a.get(_NAME, [memoryview(b"")])[0]))
    if cmd == HOLDINGS:
        partial = a.get(_PARTIAL)
        return Holdings(tuple(_held(v) for v in a.get(_HELD, [])),
                        _partial(partial[0]) if partial else None)
    if cmd == PLAN:
        return _decode_plan(a)
    if cmd == REFUSE:
        return Refuse(_shown(_one(a, _CODE, "REFUSE code")),
                      _shown(_one(a, _MESSAGE, "REFUSE text")))
    if cmd == ACCEPT:
        return Accept(_digest(_one(a, _SESSION, "ACCEPT session"), "session"))
    if cmd == CHECKPOINT:
        return Checkpoint(_int(_one(a, _INDEX, "CHECKPOINT index"), "index"),
                          _int(_one(a, _COFF, "CHECKPOINT offset"), "offset"),
                          _digest(_one(a, _DIGEST, "CHECKPOINT digest"), "digest"),
                          _digest(_one(a, _CHAIN, "CHECKPOINT chain"), "chain"))
    if cmd == ACK:
        return Ack(_int(_one(a, _INDEX, "ACK index"), "index"),
                   _int(_one(a, _COFF, "ACK offset"), "offset"))
    if cmd == COMMIT:
        return Commit(_int(_one(a, _SIZE, "COMMIT size"), "size"),
                      _digest(_one(a, _CHAIN, "COMMIT chain"), "chain"),
                      _digest(_one(a, _SENDSHOT, "COMMIT sendshot"), "sendshot", empty=True))
    if cmd == COMMITTED:
        return Committed(_str(_one(a, _PNAME, "COMMITTED name")),
                         _uuid(_one(a, _UUID, "COMMITTED uuid"), "uuid"))
    raise ProtocolError(f"unknown message {cmd}")


def header() -> bytes:
    """The bytes each side sends first."""
    return HEADER.pack(MAGIC, WIRE_VERSION)


def check_header(buf: Any) -> int:
    """The framing version of a peer's header.

    Raises:
        ProtocolError: not a btrdelta replication peer, or an unknown framing version.
    """
    magic, version = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise ProtocolError("the peer is not a btrdelta replication peer (bad magic)")
    if version != WIRE_VERSION:
        raise ProtocolError(f"unsupported replication framing version {version}")
    return int(version)


def iter_messages(msgs: Iterator[Message]) -> Iterator[bytes]:
    """Frames of ``msgs`` (a convenience for tests and tools)."""
    for m in msgs:
        yield encode(m)
