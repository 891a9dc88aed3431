"""Delta records as bytes and back: TLV attributes, the compact CPATCH, LEB128 varints.

:func:`encode_item` gives the pieces of one record for ``writelines`` (btrfs commands:
their raw bytes), framed as the shared framing wants (``stream.framing``: u32 length, u16
number, u32 CRC32C; a zero CRC inside the carrier). :func:`decode_item` turns a delta
record's payload back into an item, checking every attribute: decoding untrusted bytes
raises only :class:`~btrdelta.errors.StreamFormatError` (without a location: the parser
adds it). The numbers and item types are in :mod:`.format`; reading a whole delta stream
is :mod:`.parser`.
"""

from __future__ import annotations

import struct

from .. import TYPE_CHECKING
from ..errors import StreamFormatError, UnsupportedVersionError
from ..stream.constants import CMD_HEADER, SUPPORTED_VERSIONS
from ..stream.crc import crc32c
from .codecs.edits import made_size
from .format import (
    CP_AUTO,
    CP_BASE,
    CP_BASES,
    CP_EDITS,
    CP_EDITS2,
    CP_EDITS_ALGO,
    CP_NEW,
    CP_NEW_ALGO,
    CP_OLD_ALGO,
    CP_PATH,
    CP_SAME,
    CP_SAME_ALGO,
    DIGEST_SIZE,
    EDITS2_CODEC,
    EDITS_CODEC,
    MAX_BASES,
    MAX_DELTA_PAYLOAD,
    NO_DIGEST,
    OLD_SIZE_UNKNOWN,
    SAME_CODEC,
    BtrfsCommand,
    DAttr,
    DCmd,
    DeltaEnd,
    DeltaItem,
    HashAlgo,
    Patch,
    PatchData,
    PEncoded,
    PWrite,
    StreamStart,
    ZCommands,
)

if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "can_compact", "decode_bases", "decode_item", "encode_bases", "encode_item",
    "read_uvarint", "unzigzag", "uvarint", "zigzag",
]

_TLV = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_crc = crc32c


def _uvarint(value: int) -> bytes:
    """LEB128 (7 bits a byte, least significant first)."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_uvarint(mv: Any, pos: int, end: int) -> tuple[int, int]:
    """A LEB128 value at ``mv[pos:end]`` (at most 10 bytes) and the position after it.

    Raises:
        StreamFormatError: truncated or longer than 10 bytes.
    """
    value = shift = 0
    for i in range(pos, min(end, pos + 10)):
        b = mv[i]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i + 1
        shift += 7
    raise StreamFormatError("truncated or overlong varint")


uvarint = _uvarint


def zigzag(n: int) -> int:
    """A signed difference as the unsigned value its LEB128 carries (0, -1, 1, -2, ... as
    0, 1, 2, 3, ...)."""
    return n * 2 if n >= 0 else -n * 2 - 1


def unzigzag(z: int) -> int:
    """:func:`zigzag` undone."""
    return z >> 1 if not z & 1 else -((z + 1) >> 1)


def encode_bases(bases: tuple[bytes, ...]) -> bytes:
    """The BASES value (or CPATCH field): each path as LEB128 length + bytes."""
    return b"".join(_uvarint(len(b)) + b for b in bases)


def decode_bases(mv: Any, pos: int, end: int) -> tuple[tuple[bytes, ...], int]:
    """BASES entries in ``mv[pos:end]`` until ``end``: (paths, ``end``).

    Raises:
        StreamFormatError: an entry overruns, is empty, or there are too many.
    """
    out: list[bytes] = []
    while pos < end:
        n, pos = read_uvarint(mv, pos, end)
        if n == 0 or n > 0xFFFF or pos + n > end:
            raise StreamFormatError("BASES entry is empty or overruns the record")
        out.append(bytes(mv[pos : pos + n]))
        pos += n
    if not out or len(out) >= MAX_BASES:
        raise StreamFormatError(f"a patch names 1 + {len(out)} old files (at most {MAX_BASES})")
    return tuple(out), pos


#: CPATCH flag of a short patch (a 4-byte old digest, or with CP_NEW the new content's;
#: no sizes) by codec
_SHORT = {EDITS_CODEC: CP_EDITS, EDITS2_CODEC: CP_EDITS2}


def can_compact(item: Patch) -> bool:
    """Whether a PATCH can be written as a CPATCH (inside the carrier)."""
    if item.codec == SAME_CODEC:
        return item.hash_algo == CP_SAME_ALGO
    if item.hash_algo == NO_DIGEST:  # format 10: a short patch with its new digest
        return item.data is not None and item.codec in _SHORT and (
            item.new_algo == CP_NEW_ALGO) and not item.bases
    if item.new_algo == NO_DIGEST:
        return item.data is not None and item.codec in _SHORT and (
            item.hash_algo == CP_EDITS_ALGO) and not item.bases
    return (
        item.data is not None and item.hash_algo == CP_OLD_ALGO
        and item.new_algo == CP_NEW_ALGO
    )


def _encode_cpatch(item: Patch, omit_path: bool, omit_base: bool) -> list[Any]:
    flags = (0 if omit_path else CP_PATH) | (0 if omit_base else CP_BASE)
    flags |= (CP_SAME if item.codec == SAME_CODEC else 0) | (CP_AUTO if item.auto_chunk else 0)
    flags |= CP_BASES if item.bases else 0
    edits = item.new_algo == NO_DIGEST
    new_only = item.hash_algo == NO_DIGEST  # format 10: the new digest instead of the old
    flags |= _SHORT[item.codec] if edits or new_only else 0
    flags |= CP_NEW if new_only else 0
    parts = [bytes([flags])]
    if not omit_path:
        parts += [_uvarint(len(item.path)), item.path]
    if not omit_base:
        parts += [_uvarint(len(item.base_path)), item.base_path]
    if item.bases:
        value = encode_bases(item.bases)
        parts += [_uvarint(len(value)), value]
    if item.codec == SAME_CODEC:
        parts += [_uvarint(item.old_size), item.old_digest]
    elif edits:  # formats 7 / 8: codec 5 / 6 implied, no sizes, a 4-byte old digest, no
        # new digest
        parts.append(item.old_digest)
    elif new_only:  # format 10: as the short form, the new content's 4-byte digest
        parts.append(item.new_digest)
    else:
        d = item.new_size - item.old_size  # zigzag: sizes usually change by a few bytes
        parts += [
            _uvarint(item.codec), _uvarint(item.old_size),
            _uvarint(zigzag(d)), item.old_digest, item.new_digest,
        ]
    if item.auto_chunk:
        parts.append(_uvarint(item.auto_chunk))
    attrs = b"".join(parts)
    return _frame(DCmd.CPATCH, attrs, item.data if item.codec != SAME_CODEC else None, True)


def _decode_cpatch(mv: memoryview, pos: int, end: int) -> Patch:
    if pos >= end:
        raise StreamFormatError("empty CPATCH")
    flags = mv[pos]
    pos += 1
    short = flags & (CP_EDITS | CP_EDITS2)
    if (
        flags & ~(CP_PATH | CP_BASE | CP_SAME | CP_AUTO | CP_BASES | CP_EDITS | CP_EDITS2
                  | CP_NEW)
        or (flags & CP_SAME and flags & (CP_BASES | CP_EDITS | CP_EDITS2))
        or (flags & CP_BASES and short) or short == CP_EDITS | CP_EDITS2
        or (flags & CP_NEW and not short)
    ):
        raise StreamFormatError(f"CPATCH has unknown flags {flags:#x}")
    paths: list[bytes | None] = []
    for bit in (CP_PATH, CP_BASE):
        if flags & bit:
            n, pos = read_uvarint(mv, pos, end)
            if n > 0xFFFF or pos + n > end:
                raise StreamFormatError("CPATCH path overruns the record")
            paths.append(mv[pos : pos + n].tobytes())
            pos += n
        else:
            paths.append(None)
    bases: tuple[bytes, ...] = ()
    if flags & CP_BASES:
        n, pos = read_uvarint(mv, pos, end)
        if pos + n > end:
            raise StreamFormatError("CPATCH BASES overrun the record")
        bases, pos = decode_bases(mv, pos, pos + n)
    if flags & CP_SAME:
        size, pos = read_uvarint(mv, pos, end)
        k = DIGEST_SIZE[CP_SAME_ALGO]
        if pos + k > end:
            raise StreamFormatError("CPATCH digest overruns the record")
        dig = mv[pos : pos + k].tobytes()
        pos += k
        patch = Patch(paths[0], paths[1], SAME_CODEC, CP_SAME_ALGO, size, dig, size, dig, 0)
    elif short:  # formats 7 and 8: sizes from the old file and from the patch
        k = DIGEST_SIZE[CP_EDITS_ALGO]
        if pos + k > end:
            raise StreamFormatError("CPATCH digest overruns the record")
        codec = EDITS_CODEC if short == CP_EDITS else EDITS2_CODEC
        dig = mv[pos : pos + k].tobytes()
        if flags & CP_NEW:  # format 10: the new content's digest, no old digest
            patch = Patch(paths[0], paths[1], codec, NO_DIGEST, OLD_SIZE_UNKNOWN, b"", 0, dig,
                          0, None, CP_NEW_ALGO)
        else:
            patch = Patch(paths[0], paths[1], codec, CP_EDITS_ALGO, OLD_SIZE_UNKNOWN, dig, 0,
                          b"", 0, None, NO_DIGEST)
        pos += k
    else:
        codec, pos = read_uvarint(mv, pos, end)
        old_size, pos = read_uvarint(mv, pos, end)
        z, pos = read_uvarint(mv, pos, end)
        new_size = old_size + unzigzag(z)
        if new_size < 0:
            raise StreamFormatError("CPATCH new size is negative")
        k, j = DIGEST_SIZE[CP_OLD_ALGO], DIGEST_SIZE[CP_NEW_ALGO]
        if pos + k + j > end or codec == SAME_CODEC:
            raise StreamFormatError("CPATCH is truncated or names the 'same' codec")
        old_dig = mv[pos : pos + k].tobytes()
        new_dig = mv[pos + k : pos + k + j].tobytes()
        pos += k + j
        patch = Patch(paths[0], paths[1], codec, CP_OLD_ALGO, old_size, old_dig, new_size,
                      new_dig, 0, None, CP_NEW_ALGO)
    if flags & CP_AUTO:
        patch.auto_chunk, pos = read_uvarint(mv, pos, end)
        if not 0 < patch.auto_chunk < 1 << 32:
            raise StreamFormatError("CPATCH implied PWRITE chunk is invalid")
    patch.bases = bases
    if not flags & CP_SAME:
        patch.data = mv[pos:end]
        patch.patch_len = end - pos
        if short:
            patch.new_size = made_size(patch.data, packed=short == CP_EDITS2)
    elif pos != end:
        raise StreamFormatError("a 'same' CPATCH carries patch bytes")
    return patch


# --- encoding ---------------------------------------------------------------------------


def _tlv(attr: DAttr, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise StreamFormatError(f"delta attribute {attr.name} longer than 65535 bytes")
    return _TLV.pack(int(attr), len(value)) + value


def _frame(cmd: int, attrs: bytes, data: Any = None, inner: bool = False) -> list[Any]:
    length = len(attrs) + (len(data) if data is not None else 0)
    if length > MAX_DELTA_PAYLOAD:
        raise StreamFormatError(f"delta record {cmd} payload of {length} bytes is too large")
    pieces: list[Any] = [attrs] if data is None else [attrs, data]
    if inner:
        return [CMD_HEADER.pack(length, cmd, 0), *pieces]
    value = _crc(struct.pack("<IH", length, cmd), 0xFFFFFFFF)
    value = _crc(b"\x00\x00\x00\x00", value)
    for piece in pieces:
        value = _crc(piece, value)
    return [CMD_HEADER.pack(length, cmd, value ^ 0xFFFFFFFF), *pieces]


def encode_item(
    item: DeltaItem, *, inner: bool = False, omit_path: bool = False, omit_base: bool = False,
    compact: bool = False,
) -> list[Any]:
    """Encode one delta item as pieces for ``writelines`` (btrfs commands: their raw bytes).

    ``inner``: for the inside of the zstd carrier (CRC field 0; PATCH, PDATA, PWRITE and
    PENC only). ``omit_path`` / ``omit_base`` (PATCH): leave out PATH (it is the previous
    path, see the format doc) / BASE_PATH (it equals PATH). ``compact`` (with ``inner``,
    when :func:`can_compact`): write a PATCH as a CPATCH.

    Raises:
        StreamFormatError: a value does not fit its attribute.
    """
    u32, u64 = _U32.pack, _U64.pack
    if isinstance(item, BtrfsCommand):
        return [item.raw]
    if isinstance(item, StreamStart):
        return _frame(DCmd.STREAM, _tlv(DAttr.VERSION, u32(item.version)))
    if isinstance(item, ZCommands):
        attrs = _tlv(DAttr.LENGTH, u64(item.raw_len)) + _tlv(DAttr.CRC, u32(item.crc))
        if item.codec:  # format 5
            attrs += _tlv(DAttr.CODEC, u32(item.codec))
            if item.dict_size:
                attrs += _tlv(DAttr.DICT, u32(item.dict_size))
        return _frame(DCmd.ZCMDS, attrs + _U16.pack(DAttr.DATA), item.zdata)
    if isinstance(item, Patch):
        if inner and compact:
            return _encode_cpatch(item, omit_path, omit_base)
        return _encode_patch(item, inner, omit_path, omit_base)
    if isinstance(item, PatchData):
        return _frame(DCmd.PDATA, _U16.pack(DAttr.DATA), item.data, inner)
    if isinstance(item, PWrite):
        attrs = (
            _tlv(DAttr.OFFSET, u64(item.offset))
            + _tlv(DAttr.LENGTH, u64(item.length))
            + _tlv(DAttr.CHUNK, u32(item.chunk))
        )
        return _frame(DCmd.PWRITE, attrs, None, inner)
    if isinstance(item, PEncoded):
        return _encode_pencoded(item, inner)
    if isinstance(item, DeltaEnd):
        attrs = (
            _tlv(DAttr.COUNT, u64(item.count))
            + _tlv(DAttr.LENGTH, u64(item.size))
            + _tlv(DAttr.HASH, u32(item.hash_algo))
            + _tlv(DAttr.DIGEST, item.digest)
        )
        return _frame(DCmd.DEND, attrs)
    raise TypeError(f"not a delta item: {item!r}")  # pragma: no cover


def _encode_patch(item: Patch, inner: bool, omit_path: bool, omit_base: bool) -> list[Any]:
    u32, u64 = _U32.pack, _U64.pack
    parts = []
    if not omit_path:
        parts.append(_tlv(DAttr.PATH, item.path))
    if not omit_base:
        parts.append(_tlv(DAttr.BASE_PATH, item.base_path))
    if item.bases:
        parts.append(_tlv(DAttr.BASES, encode_bases(item.bases)))
    parts += [
        _tlv(DAttr.CODEC, u32(item.codec)),
        _tlv(DAttr.HASH, u32(item.hash_algo)),
        _tlv(DAttr.OLD_SIZE, u64(item.old_size)),
        _tlv(DAttr.OLD_DIGEST, item.old_digest),
        _tlv(DAttr.NEW_SIZE, u64(item.new_size)),
    ]
    if item.codec != SAME_CODEC:
        parts.append(_tlv(DAttr.NEW_DIGEST, item.new_digest))
    parts.append(_tlv(DAttr.LENGTH, u64(item.patch_len)))
    if item.data is not None:
        parts.append(_U16.pack(DAttr.DATA))
    return _frame(DCmd.PATCH, b"".join(parts), item.data, inner)


def _encode_pencoded(item: PEncoded, inner: bool) -> list[Any]:
    u32, u64 = _U32.pack, _U64.pack
    parts = [
        _tlv(DAttr.OFFSET, u64(item.offset)),
        _tlv(DAttr.LENGTH, u64(item.length)),
        _tlv(DAttr.FILE_LEN, u64(item.file_len)),
        _tlv(DAttr.UNENC_LEN, u64(item.unencoded_len)),
        _tlv(DAttr.UNENC_OFFSET, u64(item.unencoded_offset)),
        _tlv(DAttr.COMPRESSION, u32(item.compression)),
    ]
    if item.encryption is not None:
        parts.append(_tlv(DAttr.ENCRYPTION, u32(item.encryption)))
    parts += [
        _tlv(DAttr.DISK_LEN, u64(item.disk_len)),
        _tlv(DAttr.LEVEL, u32(item.level & 0xFFFFFFFF)),
        _tlv(DAttr.CRC, u32(item.crc)),
    ]
    return _frame(DCmd.PENC, b"".join(parts), None, inner)


# --- decoding ---------------------------------------------------------------------------

_U32_ATTRS = {
    DAttr.VERSION, DAttr.CODEC, DAttr.HASH, DAttr.CHUNK, DAttr.COMPRESSION, DAttr.ENCRYPTION,
    DAttr.LEVEL, DAttr.CRC, DAttr.DICT,
}
_U64_ATTRS = {
    DAttr.OLD_SIZE, DAttr.NEW_SIZE, DAttr.LENGTH, DAttr.OFFSET, DAttr.COUNT, DAttr.FILE_LEN,
    DAttr.UNENC_LEN, DAttr.UNENC_OFFSET, DAttr.DISK_LEN,
}
_BYTES_ATTRS = {DAttr.PATH, DAttr.BASE_PATH, DAttr.OLD_DIGEST, DAttr.NEW_DIGEST, DAttr.DIGEST,
                DAttr.BASES}

#: which attributes each delta record must carry (DATA: the rest of the record)
_DATTRS: dict[int, DAttr] = {int(a): a for a in DAttr}
_REQUIRED: dict[int, tuple[DAttr, ...]] = {
    DCmd.STREAM: (DAttr.VERSION,),
    DCmd.ZCMDS: (DAttr.LENGTH, DAttr.CRC, DAttr.DATA),
    DCmd.PATCH: (
        DAttr.PATH, DAttr.BASE_PATH, DAttr.CODEC, DAttr.HASH, DAttr.OLD_SIZE,
        DAttr.OLD_DIGEST, DAttr.NEW_SIZE, DAttr.NEW_DIGEST, DAttr.LENGTH,
    ),
    DCmd.PDATA: (DAttr.DATA,),
    DCmd.PWRITE: (DAttr.OFFSET, DAttr.LENGTH, DAttr.CHUNK),
    DCmd.DEND: (DAttr.COUNT, DAttr.LENGTH, DAttr.HASH, DAttr.DIGEST),
    DCmd.PENC: (
        DAttr.OFFSET, DAttr.LENGTH, DAttr.FILE_LEN, DAttr.UNENC_LEN, DAttr.UNENC_OFFSET,
        DAttr.COMPRESSION, DAttr.DISK_LEN, DAttr.LEVEL, DAttr.CRC,
    ),
}
#: attributes a record may carry without needing them
_OPTIONAL: dict[int, tuple[DAttr, ...]] = {
    DCmd.PATCH: (DAttr.DATA, DAttr.BASES),  # PATH and BASE_PATH may be left out too
    DCmd.PENC: (DAttr.ENCRYPTION,),
    DCmd.ZCMDS: (DAttr.CODEC, DAttr.DICT),  # format 5 (the parser checks which)
}


def _decode_attrs(cmd: int, mv: memoryview, pos: int, end: int) -> dict[DAttr, Any]:
    allowed = _REQUIRED[cmd] + _OPTIONAL.get(cmd, ())
    values: dict[DAttr, Any] = {}
    while pos < end:
        if end - pos < 2:
            raise StreamFormatError("attribute header overruns record end")
        (t,) = _U16.unpack_from(mv, pos)
        attr = _DATTRS.get(t)  # not DAttr(t): an enum call per attribute costs ~5% of expand
        if attr is None:
            raise StreamFormatError(f"invalid delta attribute type {t}")
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
    for attr in _REQUIRED[cmd]:
        if attr not in values and not (
            attr is DAttr.NEW_DIGEST and values.get(DAttr.CODEC) == SAME_CODEC
        ) and not (cmd == DCmd.PATCH and attr in (DAttr.PATH, DAttr.BASE_PATH)):
            raise StreamFormatError(f"missing attribute {attr.name}")
    return values


def _penc_layout(encryption: bool) -> tuple[struct.Struct, tuple[int, ...]]:
    """The PENC record as :func:`_encode_pencoded` writes it (with or without ENCRYPTION):
    one struct over its TLVs (each header as a u32, then its value), and those headers."""
    attrs = list(_REQUIRED[DCmd.PENC])
    if encryption:
        attrs.insert(attrs.index(DAttr.COMPRESSION) + 1, DAttr.ENCRYPTION)
    fmt = "<"
    heads = []
    for attr in attrs:
        width = 8 if attr in _U64_ATTRS else 4
        fmt += "I" + ("Q" if width == 8 else "I")
        heads.append(int(attr) | width << 16)
    return struct.Struct(fmt), tuple(heads)


#: a PENC in a layout ``delta make`` writes is decoded with one unpack (the attribute
#: loop cost ~9 µs a record, 4,105 records on the Debian pair); any other layout takes
#: the general path and its checks. By payload size: without, with ENCRYPTION.
_PENC_LAYOUTS = {lay[0].size: lay for lay in (_penc_layout(False), _penc_layout(True))}
_PENC, _CPATCH = int(DCmd.PENC), int(DCmd.CPATCH)


def _decode_penc(mv: memoryview, start: int, end: int) -> PEncoded | None:
    """A PENC payload in a usual layout, or ``None`` (then :func:`_decode_attrs`)."""
    layout = _PENC_LAYOUTS.get(end - start)
    if layout is None:
        return None
    v = layout[0].unpack_from(mv, start)
    if v[0::2] != layout[1]:
        return None
    values: list[Any] = list(v[1::2])
    if len(values) == 9:  # no ENCRYPTION: PEncoded's field after COMPRESSION
        values.insert(6, None)
    if values[8] & 0x80000000:  # LEVEL is signed
        values[8] -= 1 << 32
    return PEncoded(*values)


def decode_item(cmd: int, mv: memoryview, start: int, end: int) -> DeltaItem:
    """Decode the payload ``mv[start:end]`` of delta record ``cmd`` (200..205).

    Raises:
        StreamFormatError: unknown record, bad or missing attribute (no location).
    """
    if cmd == _PENC:  # (the most frequent first; ints: an IntEnum member's lookup is a
        # Python call on 3.11)
        penc = _decode_penc(mv, start, end)
        if penc is not None:
            return penc
    elif cmd == _CPATCH:
        return _decode_cpatch(mv, start, end)
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
        return ZCommands(a[DAttr.LENGTH], a[DAttr.DATA], a[DAttr.CRC], a.get(DAttr.CODEC, 0),
                         a.get(DAttr.DICT, 0))
    if cmd == DCmd.PATCH:
        algo = a[DAttr.HASH]
        if algo not in DIGEST_SIZE:
            raise StreamFormatError(f"unknown hash algorithm {algo}")
        same = a[DAttr.CODEC] == SAME_CODEC
        if same:
            if DAttr.NEW_DIGEST in a or a[DAttr.LENGTH] or DAttr.DATA in a:
                raise StreamFormatError("a 'same' patch has no new digest and no patch bytes")
            if a[DAttr.OLD_SIZE] != a[DAttr.NEW_SIZE]:
                raise StreamFormatError("a 'same' patch must keep the size")
            a[DAttr.NEW_DIGEST] = a[DAttr.OLD_DIGEST]
        for attr in (DAttr.OLD_DIGEST, DAttr.NEW_DIGEST):
            if len(a[attr]) != DIGEST_SIZE[HashAlgo(algo)]:
                raise StreamFormatError(f"{attr.name} has the wrong size for its algorithm")
        data = a.get(DAttr.DATA)
        if data is not None and len(data) != a[DAttr.LENGTH]:
            raise StreamFormatError("PATCH carries a different number of bytes than LENGTH")
        bases: tuple[bytes, ...] = ()
        if DAttr.BASES in a:
            if same:
                raise StreamFormatError("a 'same' patch has no BASES")
            raw = a[DAttr.BASES]
            bases = decode_bases(raw, 0, len(raw))[0]
        return Patch(
            a.get(DAttr.PATH), a.get(DAttr.BASE_PATH), a[DAttr.CODEC], algo, a[DAttr.OLD_SIZE],
            a[DAttr.OLD_DIGEST], a[DAttr.NEW_SIZE], a[DAttr.NEW_DIGEST], a[DAttr.LENGTH], data,
            bases=bases,
        )
    if cmd == DCmd.PDATA:
        return PatchData(a[DAttr.DATA])
    if cmd == DCmd.PWRITE:
        if a[DAttr.CHUNK] == 0:
            raise StreamFormatError("PWRITE with chunk size 0")
        return PWrite(a[DAttr.OFFSET], a[DAttr.LENGTH], a[DAttr.CHUNK])
    if cmd == DCmd.PENC:
        level = a[DAttr.LEVEL]
        return PEncoded(
            a[DAttr.OFFSET], a[DAttr.LENGTH], a[DAttr.FILE_LEN], a[DAttr.UNENC_LEN],
            a[DAttr.UNENC_OFFSET], a[DAttr.COMPRESSION], a.get(DAttr.ENCRYPTION),
            a[DAttr.DISK_LEN], level - (1 << 32) if level & 0x80000000 else level, a[DAttr.CRC],
        )
    algo = a[DAttr.HASH]
    if algo not in DIGEST_SIZE or len(a[DAttr.DIGEST]) != DIGEST_SIZE[HashAlgo(algo)]:
        raise StreamFormatError("DEND digest has an unknown algorithm or the wrong size")
    return DeltaEnd(a[DAttr.COUNT], a[DAttr.LENGTH], algo, a[DAttr.DIGEST])
