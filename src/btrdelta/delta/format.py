"""The delta-stream format as pure code: header, record numbers, encode, push parser.

A delta stream uses the framing of a btrfs send stream (10-byte command header, TLV
attributes, CRC32C with btrfs's convention) behind its own 21-byte header
(``btrdelta-dstream\\0`` + u32 format version). Its records are (see
``docs/formats/delta-stream.md``):

* btrfs commands 1..26, byte for byte as in the original stream (uncompressed passthrough);
* ``STREAM`` (200): an embedded btrfs stream header (its protocol version);
* ``ZCMDS`` (201): a run of original btrfs commands (raw bytes, CRCs included) compressed
  as the next piece of ONE zstd frame that spans the whole delta stream (long window);
* ``PATCH`` (202) + ``PDATA`` (203): a binary patch from a file of the old snapshot to the
  concatenated data of the WRITE commands that follow as ``PWRITE`` (204);
* ``DEND`` (205): the end, with the size and digest of the whole expanded stream.

This module owns bytes <-> records only: no files, no decompression of patches. Parsing
untrusted input raises only :class:`~btrdelta.errors.StreamFormatError` (and its
:class:`~btrdelta.errors.ChecksumError`) carrying the byte offset and record number.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal

import crc32c as _crc32c

from ..errors import BtrdeltaError, ChecksumError, StreamFormatError, UnsupportedVersionError
from ..stream.codec import command_crc
from ..stream.constants import CMD_HEADER, CMD_HEADER_SIZE, MAX_PAYLOAD, SUPPORTED_VERSIONS, Cmd

__all__ = [
    "DELTA_HEADER",
    "DELTA_MAGIC",
    "DELTA_VERSION",
    "NEED_DATA",
    "BtrfsCommand",
    "DAttr",
    "DCmd",
    "DeltaEnd",
    "DeltaItem",
    "DeltaParser",
    "HashAlgo",
    "Patch",
    "PatchData",
    "PWrite",
    "StreamStart",
    "ZCommands",
    "encode_delta_header",
    "encode_item",
    "is_delta_stream",
]

DELTA_MAGIC: Final = b"btrdelta-dstream\x00"
DELTA_HEADER: Final = struct.Struct("<17sI")  # magic, format version
DELTA_HEADER_SIZE: Final = DELTA_HEADER.size  # 21
DELTA_VERSION: Final = 1

#: Largest payload of one delta record (btrfs commands keep their own, smaller limits).
MAX_DELTA_PAYLOAD: Final = 8 << 20
#: Largest piece of patch bytes in one PDATA record.
PDATA_CHUNK: Final = 1 << 20

_TLV = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_crc = _crc32c.crc32c


class DCmd(enum.IntEnum):
    """Record numbers the delta format adds (well above btrfs's 1..26)."""

    STREAM = 200
    ZCMDS = 201
    PATCH = 202
    PDATA = 203
    PWRITE = 204
    DEND = 205


class DAttr(enum.IntEnum):
    """Attribute numbers of delta records (their own space, not btrfs's)."""

    VERSION = 1  # u32
    PATH = 2  # bytes
    BASE_PATH = 3  # bytes
    CODEC = 4  # u32
    HASH = 5  # u32 (HashAlgo)
    OLD_SIZE = 6  # u64
    OLD_DIGEST = 7  # bytes
    NEW_SIZE = 8  # u64
    NEW_DIGEST = 9  # bytes
    LENGTH = 10  # u64
    OFFSET = 11  # u64
    CHUNK = 12  # u32
    COUNT = 13  # u64
    DIGEST = 14  # bytes
    DATA = 15  # bytes, no length: the rest of the record, always last


class HashAlgo(enum.IntEnum):
    """Digest algorithms for old-file, new-content and whole-stream checksums."""

    SHA256 = 1
    BLAKE3 = 2


DIGEST_SIZE: Final = {HashAlgo.SHA256: 32, HashAlgo.BLAKE3: 32}


# --- items ------------------------------------------------------------------------------


@dataclass(slots=True)
class StreamStart:
    """An embedded btrfs stream header: ``btrfs-stream\\0`` + ``version``."""

    version: int


@dataclass(slots=True)
class BtrfsCommand:
    """One original btrfs command, raw (header, CRC and payload), carried uncompressed."""

    cmd: int
    raw: memoryview


@dataclass(slots=True)
class ZCommands:
    """Next piece of the stream-wide zstd frame; decompresses to ``raw_len`` bytes of
    complete btrfs commands."""

    raw_len: int
    zdata: memoryview


@dataclass(slots=True)
class Patch:
    """A patch from old file ``base_path`` to the data of the PWRITEs that follow."""

    path: bytes
    base_path: bytes
    codec: int
    hash_algo: int
    old_size: int
    old_digest: bytes
    new_size: int
    new_digest: bytes
    patch_len: int


@dataclass(slots=True)
class PatchData:
    """A piece of the current patch's bytes."""

    data: memoryview


@dataclass(slots=True)
class PWrite:
    """``ceil(length / chunk)`` WRITE commands on the patched path from ``offset`` on,
    each ``chunk`` bytes (the last one shorter), data taken from the patch's new content."""

    offset: int
    length: int
    chunk: int


@dataclass(slots=True)
class DeltaEnd:
    """End of the delta stream: count, size and digest of the whole expanded stream."""

    count: int
    size: int
    hash_algo: int
    digest: bytes


DeltaItem = StreamStart | BtrfsCommand | ZCommands | Patch | PatchData | PWrite | DeltaEnd


# --- encoding ---------------------------------------------------------------------------


def encode_delta_header(version: int = DELTA_VERSION) -> bytes:
    """The 21-byte delta-stream header."""
    return DELTA_HEADER.pack(DELTA_MAGIC, version)


def is_delta_stream(prefix: bytes) -> bool:
    """Whether ``prefix`` (at least 17 bytes) starts a delta stream."""
    return bytes(prefix[:17]) == DELTA_MAGIC


def _tlv(attr: DAttr, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise StreamFormatError(f"delta attribute {attr.name} longer than 65535 bytes")
    return _TLV.pack(int(attr), len(value)) + value


def _frame(cmd: int, attrs: bytes, data: Any = None) -> list[Any]:
    length = len(attrs) + (len(data) if data is not None else 0)
    if length > MAX_DELTA_PAYLOAD:
        raise StreamFormatError(f"delta record {cmd} payload of {length} bytes is too large")
    pieces: list[Any] = [attrs] if data is None else [attrs, data]
    value = _crc(struct.pack("<IH", length, cmd), 0xFFFFFFFF)
    value = _crc(b"\x00\x00\x00\x00", value)
    for piece in pieces:
        value = _crc(piece, value)
    return [CMD_HEADER.pack(length, cmd, value ^ 0xFFFFFFFF), *pieces]


def encode_item(item: DeltaItem) -> list[Any]:
    """Encode one delta item as pieces for ``writelines`` (btrfs commands: their raw bytes).

    Raises:
        StreamFormatError: a value does not fit its attribute.
    """
    u32, u64 = _U32.pack, _U64.pack
    if isinstance(item, BtrfsCommand):
        return [item.raw]
    if isinstance(item, StreamStart):
        return _frame(DCmd.STREAM, _tlv(DAttr.VERSION, u32(item.version)))
    if isinstance(item, ZCommands):
        attrs = _tlv(DAttr.LENGTH, u64(item.raw_len)) + _U16.pack(DAttr.DATA)
        return _frame(DCmd.ZCMDS, attrs, item.zdata)
    if isinstance(item, Patch):
        attrs = b"".join(
            (
                _tlv(DAttr.PATH, item.path),
                _tlv(DAttr.BASE_PATH, item.base_path),
                _tlv(DAttr.CODEC, u32(item.codec)),
                _tlv(DAttr.HASH, u32(item.hash_algo)),
                _tlv(DAttr.OLD_SIZE, u64(item.old_size)),
                _tlv(DAttr.OLD_DIGEST, item.old_digest),
                _tlv(DAttr.NEW_SIZE, u64(item.new_size)),
                _tlv(DAttr.NEW_DIGEST, item.new_digest),
                _tlv(DAttr.LENGTH, u64(item.patch_len)),
            )
        )
        return _frame(DCmd.PATCH, attrs)
    if isinstance(item, PatchData):
        return _frame(DCmd.PDATA, _U16.pack(DAttr.DATA), item.data)
    if isinstance(item, PWrite):
        attrs = (
            _tlv(DAttr.OFFSET, u64(item.offset))
            + _tlv(DAttr.LENGTH, u64(item.length))
            + _tlv(DAttr.CHUNK, u32(item.chunk))
        )
        return _frame(DCmd.PWRITE, attrs)
    if isinstance(item, DeltaEnd):
        attrs = (
            _tlv(DAttr.COUNT, u64(item.count))
            + _tlv(DAttr.LENGTH, u64(item.size))
            + _tlv(DAttr.HASH, u32(item.hash_algo))
            + _tlv(DAttr.DIGEST, item.digest)
        )
        return _frame(DCmd.DEND, attrs)
    raise TypeError(f"not a delta item: {item!r}")  # pragma: no cover


# --- decoding ---------------------------------------------------------------------------

_U32_ATTRS = {DAttr.VERSION, DAttr.CODEC, DAttr.HASH, DAttr.CHUNK}
_U64_ATTRS = {DAttr.OLD_SIZE, DAttr.NEW_SIZE, DAttr.LENGTH, DAttr.OFFSET, DAttr.COUNT}
_BYTES_ATTRS = {DAttr.PATH, DAttr.BASE_PATH, DAttr.OLD_DIGEST, DAttr.NEW_DIGEST, DAttr.DIGEST}

#: which attributes each delta record must carry (DATA: the rest of the record)
_REQUIRED: dict[int, tuple[DAttr, ...]] = {
    DCmd.STREAM: (DAttr.VERSION,),
    DCmd.ZCMDS: (DAttr.LENGTH, DAttr.DATA),
    DCmd.PATCH: (
        DAttr.PATH, DAttr.BASE_PATH, DAttr.CODEC, DAttr.HASH, DAttr.OLD_SIZE,
        DAttr.OLD_DIGEST, DAttr.NEW_SIZE, DAttr.NEW_DIGEST, DAttr.LENGTH,
    ),
    DCmd.PDATA: (DAttr.DATA,),
    DCmd.PWRITE: (DAttr.OFFSET, DAttr.LENGTH, DAttr.CHUNK),
    DCmd.DEND: (DAttr.COUNT, DAttr.LENGTH, DAttr.HASH, DAttr.DIGEST),
}


def _decode_attrs(cmd: int, mv: memoryview, pos: int, end: int) -> dict[DAttr, Any]:
    allowed = _REQUIRED[cmd]
    values: dict[DAttr, Any] = {}
    while pos < end:
        if end - pos < 2:
            raise StreamFormatError("attribute header overruns record end")
        (t,) = _U16.unpack_from(mv, pos)
        try:
            attr = DAttr(t)
        except ValueError:
            raise StreamFormatError(f"invalid delta attribute type {t}") from None
        if attr not in allowed:
            raise StreamFormatError(f"attribute {attr.name} is not valid for {DCmd(cmd).name}")
        if attr in values:
            raise StreamFormatError(f"duplicate attribute {attr.name}")
        if attr is DAttr.DATA:
            values[attr] = mv[pos + 2 : end]
            pos = end
            break
        if end - pos < 4:
            raise StreamFormatError("attribute header overruns record end")
        (_, n) = _TLV.unpack_from(mv, pos)
        pos += 4
        if pos + n > end:
            raise StreamFormatError(f"attribute {attr.name} (length {n}) overruns record end")
        if attr in _U32_ATTRS:
            if n != 4:
                raise StreamFormatError(f"attribute {attr.name} has invalid size {n}")
            values[attr] = _U32.unpack_from(mv, pos)[0]
        elif attr in _U64_ATTRS:
            if n != 8:
                raise StreamFormatError(f"attribute {attr.name} has invalid size {n}")
            values[attr] = _U64.unpack_from(mv, pos)[0]
        else:
            values[attr] = mv[pos : pos + n].tobytes()
        pos += n
    for attr in allowed:
        if attr not in values:
            raise StreamFormatError(f"missing attribute {attr.name}")
    return values


def decode_item(cmd: int, mv: memoryview, start: int, end: int) -> DeltaItem:
    """Decode the payload ``mv[start:end]`` of delta record ``cmd`` (200..205).

    Raises:
        StreamFormatError: unknown record, bad or missing attribute (no location).
    """
    if cmd not in _REQUIRED:
        raise StreamFormatError(f"unknown delta record number {cmd}")
    a = _decode_attrs(cmd, mv, start, end)
    if cmd == DCmd.STREAM:
        if a[DAttr.VERSION] not in SUPPORTED_VERSIONS:
            raise UnsupportedVersionError(
                f"embedded btrfs stream version {a[DAttr.VERSION]} is not supported"
            )
        return StreamStart(a[DAttr.VERSION])
    if cmd == DCmd.ZCMDS:
        return ZCommands(a[DAttr.LENGTH], a[DAttr.DATA])
    if cmd == DCmd.PATCH:
        algo = a[DAttr.HASH]
        if algo not in DIGEST_SIZE:
            raise StreamFormatError(f"unknown hash algorithm {algo}")
        for attr in (DAttr.OLD_DIGEST, DAttr.NEW_DIGEST):
            if len(a[attr]) != DIGEST_SIZE[HashAlgo(algo)]:
                raise StreamFormatError(f"{attr.name} has the wrong size for its algorithm")
        return Patch(
            a[DAttr.PATH], a[DAttr.BASE_PATH], a[DAttr.CODEC], algo, a[DAttr.OLD_SIZE],
            a[DAttr.OLD_DIGEST], a[DAttr.NEW_SIZE], a[DAttr.NEW_DIGEST], a[DAttr.LENGTH],
        )
    if cmd == DCmd.PDATA:
        return PatchData(a[DAttr.DATA])
    if cmd == DCmd.PWRITE:
        if a[DAttr.CHUNK] == 0:
            raise StreamFormatError("PWRITE with chunk size 0")
        return PWrite(a[DAttr.OFFSET], a[DAttr.LENGTH], a[DAttr.CHUNK])
    algo = a[DAttr.HASH]
    if algo not in DIGEST_SIZE or len(a[DAttr.DIGEST]) != DIGEST_SIZE[HashAlgo(algo)]:
        raise StreamFormatError("DEND digest has an unknown algorithm or the wrong size")
    return DeltaEnd(a[DAttr.COUNT], a[DAttr.LENGTH], algo, a[DAttr.DIGEST])


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Literal[_Sentinel.NEED_DATA] = _Sentinel.NEED_DATA

_CMD_NAMES: dict[int, str] = {int(c): c.name for c in Cmd} | {int(c): c.name for c in DCmd}


class DeltaParser:
    """Push parser for delta streams (sans-I/O): ``feed`` bytes, pull items.

    The btrfs commands carried uncompressed are checked for their CRC and framed, not
    decoded (the stream version they need comes with ``STREAM``). Whatever the input, the
    parser raises only :class:`StreamFormatError` (or a subclass) with ``offset`` and
    ``index`` set.

    Args:
        source: name used in error messages.
    """

    def __init__(self, *, source: str | None = None) -> None:
        self.source = source
        #: index of the next record (0-based)
        self.index = 0
        #: format version from the header (0 before it)
        self.version = 0
        self._buf = bytearray()
        self._pos = 0
        self._base = 0  # absolute offset of _buf[0]
        self._eof = False
        self._ended = False
        self._failed: BtrdeltaError | None = None

    @property
    def offset(self) -> int:
        """Absolute offset of the next unparsed byte."""
        return self._base + self._pos

    def feed(self, data: Any) -> None:
        """Append bytes; ``b""`` marks the end of input."""
        if not len(data):
            self._eof = True
            return
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[: self._pos]
            self._base += self._pos
            self._pos = 0
        self._buf += data

    def needed(self) -> int:
        """Bytes still missing for the next item (a read-size hint)."""
        avail = len(self._buf) - self._pos
        if not self.version:
            return max(0, DELTA_HEADER_SIZE - avail)
        if avail < CMD_HEADER_SIZE:
            return CMD_HEADER_SIZE - avail
        length = int(_U32.unpack_from(self._buf, self._pos)[0])
        return max(0, CMD_HEADER_SIZE + min(length, MAX_DELTA_PAYLOAD) - avail)

    def _fail(self, exc: BtrdeltaError, cmd: int | None = None) -> None:
        exc.located(
            source=self.source, offset=self.offset, index=self.index if self.version else None,
            command=_CMD_NAMES.get(cmd, str(cmd)) if cmd is not None else None,
        )
        self._failed = exc
        raise exc

    def next_item(self) -> DeltaItem | Literal[_Sentinel.NEED_DATA] | None:
        """The next item, ``NEED_DATA``, or ``None`` at a clean end (after ``DEND``).

        Items hold ``memoryview`` slices of a private copy: valid until the next call.
        """
        if self._failed is not None:
            raise self._failed
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if not self.version:
            if avail < DELTA_HEADER_SIZE:
                if self._eof:
                    self._fail(StreamFormatError("truncated or empty delta stream header"))
                return NEED_DATA
            magic, version = DELTA_HEADER.unpack_from(buf, pos)
            if magic != DELTA_MAGIC:
                self._fail(StreamFormatError("bad magic, not a btrdelta delta stream"))
            if version != DELTA_VERSION:
                self._fail(UnsupportedVersionError(f"unsupported delta format version {version}"))
            self._pos += DELTA_HEADER_SIZE
            self.version = version
            return self.next_item()
        if self._ended:
            if avail:
                self._fail(StreamFormatError("data after the end of the delta stream"))
            if not self._eof:
                return NEED_DATA
            return None
        if avail < CMD_HEADER_SIZE:
            if not self._eof:
                return NEED_DATA
            self._fail(StreamFormatError("truncated delta stream (no DEND record)"))
        length, cmd, crc = CMD_HEADER.unpack_from(buf, pos)
        limit = MAX_DELTA_PAYLOAD if cmd >= 200 else MAX_PAYLOAD[3]
        if length > limit:
            self._fail(StreamFormatError(f"record length {length} exceeds {limit}"), cmd)
        total = CMD_HEADER_SIZE + length
        if avail < total:
            if not self._eof:
                return NEED_DATA
            self._fail(StreamFormatError(f"truncated record: {total} bytes announced"), cmd)
        mv = memoryview(bytes(buf[pos : pos + total]))
        actual = command_crc(length, cmd, mv[CMD_HEADER_SIZE:])
        if actual != crc:
            self._fail(
                ChecksumError(
                    f"CRC32C mismatch (stored {crc:#010x}, computed {actual:#010x})",
                    expected=crc, actual=actual,
                ),
                cmd,
            )
        item: DeltaItem
        if 0 < cmd <= max(int(c) for c in Cmd):
            item = BtrfsCommand(cmd, mv)
        else:
            try:
                item = decode_item(cmd, mv, CMD_HEADER_SIZE, total)
            except BtrdeltaError as exc:
                self._fail(exc, cmd)
        self._pos += total
        self.index += 1
        if isinstance(item, DeltaEnd):
            self._ended = True
        return item


def iter_items(
    read: Callable[[int], bytes], *, source: str | None = None, block_size: int = 1 << 20,
    parser: DeltaParser | None = None,
) -> Iterator[DeltaItem]:
    """Pull items from a ``read(n)`` callable (a file's ``read``) until the clean end."""
    p = parser if parser is not None else DeltaParser(source=source)
    while True:
        item = p.next_item()
        if item is NEED_DATA:
            p.feed(read(max(block_size, p.needed())))
            continue
        if item is None:
            return
        yield item
