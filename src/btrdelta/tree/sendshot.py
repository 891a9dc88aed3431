"""The sendshot record: what a receiver holds after applying one send stream, without data.

A *sendshot* replaces the old snapshot that an incremental ``btrfs send -p`` needs: per
inode its identity (inode number, btrfs generation and transid), metadata (type, mode,
owner, times, ``chattr`` flags, xattrs, every name, device number, symlink target, size) and,
per regular file, where its data is (data segments; the rest are holes), a digest of every
4 KiB block of data (XXH3-128 seeded with the record's secret seed) and of the whole
content (XXH3-128, and the tree-sum-3 content digest: :mod:`.content`; BLAKE3-256 of the
whole content in versions up to 3). No file data. The head names the stream the receiver
got (its UUID and ctransid: the receiver's *received UUID*), the source
subvolume, and the sendshot it was sent against.

Encoding (``docs/formats/sendshot.md``): a 22-byte header (``btrdelta-sendshot\\0`` and a
u32 version), then zstd frames holding frames of TLVs on the send stream's framing
(:mod:`btrdelta.stream.framing`: u32 length, u16 record, u32 CRC32C, TLVs): ``HEAD``, the
inodes in scan order (root first, then depth first by sorted names) and ``END`` with the
counts. Versions 2 to 7 (3 adds each file's extent items, 4 the tree-sum-3 content
digests, 6 puts each column's bytes 8-aligned in its record, read in place; 6 is written,
and 3 for a record sent against a version 3 one; 5 and 7: patch records) store the inodes
as *columns*, one record per field of every inode; version 1 (still read) as one ``INODE``
record per inode, each regular file's ``BLOCKS`` right after it. The record's *digest* (its
name in a store) is the BLAKE3-256 of the uncompressed bytes (header included).

Owns: the model (:class:`SendshotHead`, :class:`RecordInode`), :func:`write_record` (a
streaming encoder onto any ``write``) and :class:`RecordReader` (a streaming decoder of a
binary file: the head alone, or every inode). Knows nothing of where records are stored
(``send.store``) or how trees are scanned (``send.scan``).
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence

import blake3

from .. import TYPE_CHECKING
from .._value import Value
from .._zstd import zstd
from ..errors import StreamFormatError, UnsupportedVersionError
from ..stream.constants import CMD_HEADER_SIZE
from ..stream.framing import NEED_DATA, Framer, Framing, encode_frame_parts, frame_parts, iter_tlvs
from .early import ALIGNED, MAGIC, PATCH, PATCHES, inflate, take

if TYPE_CHECKING:
    from typing import Any, BinaryIO, Final

    from .columns import Columns, Encoded

__all__ = ["ALIGNED", "BLOCK", "MAGIC", "NO_SEQUENCE", "PATCH", "PATCHES", "READS", "VERSION",
           "Patch", "RecordInode", "RecordReader", "SendshotHead", "decode_head", "encode_head",
           "read_head", "write_record"]

VERSION: Final = 8
#: the version of a patch record written (version 5's, its columns as version 8's)
PATCH_WRITTEN: Final = 9
#: the versions :class:`RecordInode` reads
READS: Final = (1, 2, 3, 4, 5, 6, 7, 8, 9)
#: the versions written: 8 (6 until session 28, 4 until 27), whose DIGESTS hold tree-sum-3
#: content digests (:mod:`.content`); 3, whose DIGESTS hold BLAKE3 of the whole content (a
#: record sent against a version 3 base keeps its kind of digests: they are compared); 9
#: (7, 5), a patch
WRITES: Final = (3, 4, 5, 6, 7, 8, 9)
#: a SEQUENCE value: not known (a record of a version before 8, or not read from btrfs)
NO_SEQUENCE: Final = 0xFFFF_FFFF_FFFF_FFFF
_HEADER = struct.Struct("<18sI")
#: bytes per block digest
BLOCK: Final = 4096
_DIGEST = 16
#: the largest payload of a record frame (a BLOCKS frame holds up to 4095 digests)
_MAX_PAYLOAD = 1 << 20

# record numbers (DROP and SLOTS: version 5's)
_HEAD, _INODE, _BLOCKS, _END, _DROP, _SLOTS = 1, 2, 3, 4, 5, 6
_NAMES = {_HEAD: "HEAD", _INODE: "INODE", _BLOCKS: "BLOCKS", _END: "END", _DROP: "DROP",
          _SLOTS: "SLOTS"}

# HEAD attributes
(H_STREAM_UUID, H_CTRANSID, H_SUBVOL_UUID, H_PARENT, H_CREATED, H_NAME, H_SOURCE, H_GEN,
 H_SEED, H_KIND, H_TREE, H_VERSION, H_BASE) = range(1, 14)
# INODE attributes
I_FIXED, I_TARGET, I_XATTR, I_DENTRY, I_SEGMENTS, I_DIGESTS = range(1, 7)
#: INODE's fixed fields: ino, generation, transid, mode, uid, gid, rdev, size, atime, mtime,
#: ctime (i64 ns), flags
_FIXED = struct.Struct("<QQQIIIQQqqqQ")
# END attributes (SPAN and LIVE: version 5's)
E_INODES, E_FILES, E_BYTES, E_BLOCKS, E_SPAN, E_LIVE = range(1, 7)

_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_U32 = struct.Struct("<I")
_PAIR = struct.Struct("<QQ")
_DENTRY = struct.Struct("<Q")
_XATTR = struct.Struct("<H")


class SendshotHead(Value):
    """What a sendshot record is about (its ``HEAD`` record)."""

    #: the UUID and ctransid the receiver's copy is known by (its received UUID)
    stream_uuid: uuid.UUID
    stream_ctransid: int
    #: the subvolume name in the stream
    name: bytes
    #: when the record was made (ns since the epoch)
    created_ns: int
    #: ``"sent"`` (made by a send) or ``"adopted"`` (``sendshot create``)
    kind: str = "sent"
    #: the source subvolume's own UUID (btrfs), else None
    subvol_uuid: uuid.UUID | None = None
    #: digest (hex) of the sendshot the stream was sent against (None: a full stream)
    parent: str | None = None
    #: the path the tree was read from
    source: bytes = b""
    #: btrfs: the generation of the read-only snapshot read (inode transids up to it are
    #: in this record); 0 elsewhere
    generation: int = 0
    #: seed of the block digests (XXH3-128 seeded)
    seed: int = 0
    #: BLAKE3-256 identity of the tree (metadata and content digests), 32 bytes
    tree_digest: bytes = b""
    #: the record format version (:data:`WRITES` when written): 4's DIGESTS hold
    #: tree-sum-3 content digests, the others' BLAKE3 of the whole content
    version: int = VERSION
    #: a patch record (version 5): the digest (hex) of the record it patches
    base: str | None = None

    @property
    def content3(self) -> bool:
        """Whether the files' BLAKE3 digests are tree-sum-3 content digests."""
        return self.version >= 4


class Patch:
    """What a patch record (version 5) holds beside its head: the rows of its base's view
    dropped (``drop``, sorted), the row each of its rows takes (``slots``: a row of the
    base's view it replaces, or the next new row), its rows (``rows``: columns whose
    PARENT values are rows of the result) and the result's number of rows (``span``,
    dropped ones included) and of inodes (``live``)."""

    __slots__ = ("aligned", "base", "drop", "live", "rows", "slots", "span", "where")

    def __init__(self, drop: Sequence[int], slots: Sequence[int], rows: Any, span: int,
                 live: int, where: dict[int, int] | None = None, aligned: bool = False,
                 base: str | None = None) -> None:
        self.drop, self.slots, self.rows, self.span, self.live = drop, slots, rows, span, live
        self.base = base  # (a writer's: the record it patches, if not the one sent against)
        #: read from a record: the offset of each record (DROP, SLOTS, a column) in it
        self.where = where or {}
        #: read from a record of version 7 (columns in place, not cut into TLVs)
        self.aligned = aligned

    def at(self, record: int, index: int, size: int) -> int:
        """The offset in the record of value ``index`` (of ``size`` bytes) of ``record``
        (its values cut into TLVs of 65535 bytes; version 7: after the payload's padding)."""
        pos = index * size
        start = self.where.get(record, 0) + CMD_HEADER_SIZE
        if self.aligned:
            return start + -start % 8 + pos
        return start + 4 * (pos // 0xFFFF + 1) + pos


class RecordInode(Value):
    """One inode of a sendshot record."""

    ino: int
    mode: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    #: (parent directory's ino, name) for every name (none for the root)
    dentries: list[tuple[int, bytes]]
    generation: int = 0
    transid: int = 0
    rdev: int = 0
    flags: int = 0
    target: bytes = b""
    xattrs: dict[bytes, bytes] | None = None
    #: regular files: (offset, length) of the data (non-hole) ranges
    segments: list[tuple[int, int]] | None = None
    #: XXH3-128 of the content (the tree identity's digest), BLAKE3-256 of the content
    digest: bytes = b""
    bdigest: bytes = b""
    #: seeded XXH3-128 of each 4 KiB block of the segments, concatenated
    blocks: bytes = b""
    #: regular files on btrfs (version 3): the file extent items the content was read
    #: with, packed as ``btrdelta.fs.btrfs.EXTENT`` (50 bytes each); None: not recorded
    extents: bytes | None = None
    #: btrfs (version 8): the inode's sequence (``i_version``); :data:`NO_SEQUENCE`: unknown
    sequence: int = NO_SEQUENCE


def _u64(v: int) -> bytes:
    return _U64.pack(v)


def _head_attrs(head: SendshotHead) -> list[tuple[int, bytes]]:
    attrs = [
        (H_VERSION, _U32.pack(head.version)),
        (H_STREAM_UUID, head.stream_uuid.bytes),
        (H_CTRANSID, _u64(head.stream_ctransid)),
        (H_NAME, head.name),
        (H_CREATED, _u64(head.created_ns)),
        (H_KIND, head.kind.encode()),
        (H_SOURCE, head.source),
        (H_GEN, _u64(head.generation)),
        (H_SEED, _u64(head.seed)),
        (H_TREE, head.tree_digest),
    ]
    if head.subvol_uuid is not None:
        attrs.append((H_SUBVOL_UUID, head.subvol_uuid.bytes))
    if head.parent is not None:
        attrs.append((H_PARENT, bytes.fromhex(head.parent)))
    if head.base is not None:
        attrs.append((H_BASE, bytes.fromhex(head.base)))
    return attrs


def write_record(
    write: Callable[[bytes], object], head: SendshotHead,
    inodes: Iterable[RecordInode] | Encoded | Patch, *, level: int = 1,
) -> tuple[str, int]:
    """Encode a record onto ``write`` (compressed); returns ``(digest hex, inodes)``.

    Args:
        write: where the encoded bytes go.
        head: the record's head.
        inodes: every inode, the root first; or the record's columns already encoded
            (:meth:`~.columns.Columns.patched`); or, for a patch record (``head.base``
            set, version 5 or 7), the :class:`Patch`.
        level: zstd level. 1: most of a record is digests, which do not compress; level 3
            made records 1% smaller (names, metadata) for 50% more time, and its larger
            window and tables cost ~1,000 more page faults to write and read a record of
            6,000 inodes. The window is :data:`_WINDOW_LOG`'s (or larger) whatever the level.
    """
    from .columns import encode_rows

    patch = inodes if isinstance(inodes, Patch) else None
    if (patch is not None) != (head.version in PATCHES) or \
            (patch is not None) != (head.base is not None):
        raise ValueError("a patch record is version 5, 7 or 9 and names its base; others not")
    encoded = patch.rows if patch is not None else inodes if isinstance(inodes, tuple) \
        else encode_rows(inodes)  # type: ignore[arg-type]
    cols, (count, files, nbytes, nblocks) = encoded
    if C_SEQUENCE not in VERSION_COLUMNS.get(head.version, COLUMNS):  # (before version 8)
        cols = [(c, data) for c, data in cols if c != C_SEQUENCE]
    # every frame's pieces first (views of the columns, not copies), so that the zstd frame
    # says its content size: a reader decompresses the record at once into one buffer
    pieces = encode_frame_parts(_HEAD, _head_attrs(head))
    ends = [(E_INODES, _u64(count)), (E_FILES, _u64(files)),  # (BYTES: at most 2^64 - 1)
            (E_BYTES, _u64(min(nbytes, (1 << 64) - 1))), (E_BLOCKS, _u64(nblocks))]
    if patch is not None:
        cols = [(_DROP, _packed(patch.drop)), (_SLOTS, _packed(patch.slots)), *cols]
        ends += [(E_SPAN, _u64(patch.span)), (E_LIVE, _u64(patch.live))]
    pieces += _column_frames(cols, sum(map(len, pieces)), head.version in ALIGNED)
    pieces += encode_frame_parts(_END, ends)
    if head.version not in WRITES:
        raise ValueError(f"sendshot records of version {head.version} are not written")
    header = _HEADER.pack(MAGIC, head.version)
    digest = blake3.blake3(header)
    size = sum(map(len, pieces))
    wlog = _WIDE_LOG if size >= _WIDE_FROM else _WINDOW_LOG
    params = zstd.ZstdCompressionParameters.from_level(level, source_size=size, window_log=wlog)
    comp = zstd.ZstdCompressor(compression_params=params).compressobj(size=size)
    write(header)

    def put(data: memoryview | bytes) -> None:
        digest.update(data)
        out = comp.compress(data)
        if out:
            write(out)

    # the pieces (a frame's header, a TLV's header, up to 64 KiB of a column) are hashed
    # and compressed _COALESCE bytes at a time: a record written by a thread beside a
    # stream being sent made ~120 calls, each waiting for the GIL
    buf = memoryview(bytearray(_COALESCE))
    n = 0
    for piece in pieces:
        size = len(piece)
        if n and n + size > _COALESCE:
            put(buf[:n])
            n = 0
        if size > _COALESCE - n:
            put(piece)
        else:
            buf[n:n + size] = piece
            n += size
    if n:
        put(buf[:n])
    write(comp.flush())
    return digest.hexdigest(), count


def _column_frames(cols: Iterable[tuple[int, Any]], at: int, aligned: bool) -> list[Any]:
    """The frames of the columns ``cols`` (record number, bytes), the first at offset ``at``
    of the body, as pieces: each column's bytes cut into TLVs of 65535 bytes, or
    (``aligned``: versions 6 and 7) at the payload's first 8-aligned offset of the body."""
    pieces: list[Any] = []
    for c, data in cols:
        view = memoryview(data).cast("B")
        if aligned:
            frame = frame_parts(c, [bytes(-(at + CMD_HEADER_SIZE) % 8), view])
        else:
            frame = encode_frame_parts(c, [(1, view[i:i + 0xFFFF])
                                           for i in range(0, len(view), 0xFFFF)])
        at += sum(map(len, frame))
        pieces += frame
    return pieces


def _packed(values: Sequence[int]) -> bytes:
    """``values`` as u32 little-endian."""
    return struct.pack(f"<{len(values)}I", *values)


# -- versions 2 and 3: columns-------------------------------------------------------------

#: NSEGS value: the file is one data segment ``(0, SIZE)``
WHOLE: Final = 0xFFFFFFFF

#: record number of each column, in the order they are written
(C_INO, C_GEN, C_TRANSID, C_MODE, C_UID, C_GID, C_RDEV, C_SIZE, C_ATIME, C_MTIME, C_CTIME,
 C_FLAGS, C_NNAMES, C_PARENT, C_NAMELEN, C_NAMES, C_TARGETLEN, C_TARGETS, C_NXATTRS,
 C_XATTRS, C_NSEGS, C_SEGMENTS, C_DIGESTS, C_BLOCKS, C_NEXTENTS, C_EXTENTS,
 C_SEQUENCE) = range(16, 43)
FIRST_COLUMN: Final = C_INO
COLUMNS: Final = {
    C_INO: "INO", C_GEN: "GEN", C_TRANSID: "TRANSID", C_MODE: "MODE", C_UID: "UID",
    C_GID: "GID", C_RDEV: "RDEV", C_SIZE: "SIZE", C_ATIME: "ATIME", C_MTIME: "MTIME",
    C_CTIME: "CTIME", C_FLAGS: "FLAGS", C_NNAMES: "NNAMES", C_PARENT: "PARENT",
    C_NAMELEN: "NAMELEN", C_NAMES: "NAMES", C_TARGETLEN: "TARGETLEN", C_TARGETS: "TARGETS",
    C_NXATTRS: "NXATTRS", C_XATTRS: "XATTRS", C_NSEGS: "NSEGS", C_SEGMENTS: "SEGMENTS",
    C_DIGESTS: "DIGESTS", C_BLOCKS: "BLOCKS", C_NEXTENTS: "NEXTENTS", C_EXTENTS: "EXTENTS",
    C_SEQUENCE: "SEQUENCE"}
#: the columns of each version that has columns (version 3 added the extents, 8 SEQUENCE)
VERSION_COLUMNS: Final = {2: tuple(range(C_INO, C_NEXTENTS)),
                          **dict.fromkeys((3, 4, 5, 6, 7), tuple(range(C_INO, C_SEQUENCE))),
                          8: tuple(COLUMNS), 9: tuple(COLUMNS)}
#: struct code of the fixed-width per-inode columns
PER_INODE = ((C_INO, "Q"), (C_GEN, "Q"), (C_TRANSID, "Q"), (C_MODE, "I"), (C_UID, "I"),
             (C_GID, "I"), (C_RDEV, "Q"), (C_SIZE, "Q"), (C_ATIME, "q"), (C_MTIME, "q"),
             (C_CTIME, "q"), (C_FLAGS, "Q"), (C_NNAMES, "I"), (C_TARGETLEN, "I"),
             (C_NXATTRS, "I"), (C_SEQUENCE, "Q"))


#: bytes of a record hashed and compressed at a time (:func:`write_record`; below glibc's
#: 128 KiB mmap threshold)
_COALESCE = 120 << 10
#: the zstd window of a record written: 64 KiB, 4 MiB for a body of 4 MiB or more. A streaming
#: compressor copies its input into a buffer of the window: the in-place tree's 1.48 MB body
#: with 512 KiB (level 1's) 2.78 ms and 334 page faults, with 64 KiB 2.32 ms and 189 (session
#: 21), with 4 MiB 0.9 % smaller for 0.85 ms more. A large tree's copies repeat digests, names
#: and extents farther apart: the benchmark's large tree (four copies, body 10.5 MB) 5.23 MB
#: with 64 KiB, 1.72 MB with 4 MiB, as fast to write, inflated in 1.6 against 2.3 ms (s. 31)
_WINDOW_LOG, _WIDE_LOG, _WIDE_FROM = 16, 22, 4 << 20

_FRAMING = Framing(
    eof="truncated sendshot record (no END record)",
    short_header="truncated sendshot record (no END record)",
    too_long="record length {length} exceeds {limit}",
    truncated="truncated record: {total} bytes announced",
    names={**_NAMES, **COLUMNS},
    max_payload=lambda cmd, version: _MAX_PAYLOAD if cmd < _DROP else 0xFFFFFFFF,
    unknown_by_number=True,
)


def _uuid(v: memoryview) -> uuid.UUID:
    if len(v) != 16:
        raise StreamFormatError("a UUID must be 16 bytes")
    return uuid.UUID(bytes=bytes(v))


def _int(v: memoryview) -> int:
    if len(v) == 8:
        return int(_U64.unpack(v)[0])
    if len(v) == 4:
        return int(_U32.unpack(v)[0])
    raise StreamFormatError(f"an integer of {len(v)} bytes")


def _decode_head(mv: memoryview, start: int, end: int, version: int | None) -> SendshotHead:
    """A HEAD's attributes; ``version`` None: the record's version is its VERSION's."""
    f: dict[int, memoryview] = dict(iter_tlvs(mv, start, end))
    if version is None:
        version = _int(f[H_VERSION]) if H_VERSION in f else -1
        if version not in READS:
            raise UnsupportedVersionError(f"sendshot record version {version}")
    elif H_VERSION in f and _int(f[H_VERSION]) != version:
        raise UnsupportedVersionError(f"sendshot record version {_int(f[H_VERSION])}")
    for need in (H_STREAM_UUID, H_CTRANSID, H_NAME, H_CREATED):
        if need not in f:
            raise StreamFormatError(f"HEAD lacks attribute {need}")
    parent, base = f.get(H_PARENT), f.get(H_BASE)
    if (version in PATCHES) != (base is not None) or (base is not None and len(base) != 32):
        raise StreamFormatError("a patch record (version 5, 7 or 9) names its base (32 bytes), "
                                "no other does")
    return SendshotHead(
        stream_uuid=_uuid(f[H_STREAM_UUID]), stream_ctransid=_int(f[H_CTRANSID]),
        name=bytes(f[H_NAME]), created_ns=_int(f[H_CREATED]),
        kind=bytes(f.get(H_KIND, b"sent")).decode("ascii", "replace"),
        subvol_uuid=_uuid(f[H_SUBVOL_UUID]) if H_SUBVOL_UUID in f else None,
        parent=bytes(parent).hex() if parent is not None else None,
        source=bytes(f.get(H_SOURCE, b"")), generation=_int(f[H_GEN]) if H_GEN in f else 0,
        seed=_int(f[H_SEED]) if H_SEED in f else 0, tree_digest=bytes(f.get(H_TREE, b"")),
        version=version, base=bytes(base).hex() if base is not None else None,
    )


def _pairs(v: memoryview) -> list[tuple[int, int]]:
    if len(v) % 16:
        raise StreamFormatError("segments must be pairs of u64")
    return [(int(a), int(b)) for a, b in _PAIR.iter_unpack(v)]


_TLV = struct.Struct("<HH")


def _decode_inode(mv: memoryview, start: int, end: int) -> RecordInode:
    pos = start
    node: RecordInode | None = None
    tlv = _TLV.unpack_from
    while pos < end:
        if pos + 4 > end:
            raise StreamFormatError("a truncated TLV")
        typ, n = tlv(mv, pos)
        pos += 4
        v = mv[pos:pos + n]
        pos += n
        if len(v) != n:
            raise StreamFormatError(f"TLV {typ} runs past the record's end")
        if typ == I_FIXED:
            if n != _FIXED.size:
                raise StreamFormatError(f"INODE fields of {n} bytes")
            (ino, gen, transid, mode, uid, gid, rdev, size, atime, mtime, ctime,
             flags) = _FIXED.unpack(v)
            node = RecordInode(ino, mode, uid, gid, size, atime, mtime, ctime, [],
                               generation=gen, transid=transid, rdev=rdev, flags=flags)
        elif node is None:
            raise StreamFormatError("INODE does not start with its fixed fields")
        elif typ == I_DENTRY:
            if n < 9:
                raise StreamFormatError("a dentry needs a parent and a name")
            node.dentries.append((int(_DENTRY.unpack_from(v)[0]), bytes(v[8:])))
        elif typ == I_SEGMENTS:
            node.segments = _pairs(v)
        elif typ == I_DIGESTS:
            if n != 48:
                raise StreamFormatError("INODE digests must be 16 + 32 bytes")
            node.digest, node.bdigest = bytes(v[:16]), bytes(v[16:])
        elif typ == I_TARGET:
            node.target = bytes(v)
        elif typ == I_XATTR:
            k = _XATTR.unpack_from(v)[0] if n >= 2 else n
            if n < 2 + k:
                raise StreamFormatError("a truncated xattr")
            if node.xattrs is None:
                node.xattrs = {}
            node.xattrs[bytes(v[2:2 + k])] = bytes(v[2 + k:])
    if node is None:
        raise StreamFormatError("INODE lacks its fixed fields")
    return node


def _in_place(mv: memoryview, start: int, end: int, at: int, whole: bool) -> memoryview:
    """A column's bytes in a record of version 6 or 7: the payload ``mv[start:end]`` (at
    offset ``at`` of the body) after its padding (zeros to the first 8-aligned offset). A
    view of the body when the body is ``mv`` whole (``whole``: then aligned in memory as in
    the body), else a copy (a frame assembled from pieces of a stream)."""
    first = start + -at % 8
    if first > end or any(mv[start:first]):
        raise StreamFormatError(f"the column's padding is not {-at % 8} zero bytes")
    return mv[first:end] if whole else memoryview(bytes(mv[first:end]))


def _column(mv: memoryview, start: int, end: int) -> bytes | memoryview:
    """The values of a record's TLVs of type 1, joined (a column's bytes, BLOCKS' digests);
    a column of one TLV is its view (the caller copies what it keeps)."""
    values = [v for typ, v in iter_tlvs(mv, start, end) if typ == 1]
    return values[0] if len(values) == 1 else b"".join(values)


class _Known:
    """A digest computed already (:mod:`.early`) in place of the hasher of each frame."""

    def __init__(self, digest: str) -> None:
        self._hex = digest

    def update(self, _data: object) -> None:
        pass

    def hexdigest(self) -> str:
        return self._hex


def _ends(mv: memoryview, start: int, end: int) -> dict[int, int]:
    """The counts of an END record."""
    return {t: _int(v) for t, v in iter_tlvs(mv, start, end)}


class RecordReader:
    """Streaming decoder of an encoded record in ``file`` (a binary file at its start).

    :attr:`head` is read on construction; :meth:`inodes` yields the rest (each regular
    file with its block digests) and checks the ``END`` counts and the digest. Every error is
    a :class:`~btrdelta.errors.StreamFormatError` naming ``source``, the offset in the
    uncompressed record and the record number.

    A record whose zstd frame says its size (written since session 13) is decompressed at
    once into one buffer when it is read whole (:meth:`columns`, :meth:`inodes`): no piece
    is copied to be joined with the next, and the decompressor needs no window.

    Args:
        file: the encoded record.
        source: its name in error messages.
        whole: the record is read whole: decompress it at once from the start (else the
            head is decoded from its start alone, and the rest read again when wanted).
        digest: the digest naming the record (hex). Read whole at once, it is hashed before
            it is decoded: where that is ``digest``, its frames' CRC32Cs are not computed
            again (~0.7 ms a send for 42,000 inodes); else they say where it is damaged.
    """

    def __init__(self, file: BinaryIO, *, source: str | None = None,
                 whole: bool = False, digest: str | None = None) -> None:
        self.source = source
        header = file.read(_HEADER.size)
        if len(header) != _HEADER.size:
            raise StreamFormatError("truncated sendshot record header", source=source)
        magic, version = _HEADER.unpack(header)
        if magic != MAGIC:
            raise StreamFormatError("bad magic, not a sendshot record", source=source)
        if version not in READS:
            raise UnsupportedVersionError(
                f"sendshot record version {version} (this btrdelta reads versions "
                f"{', '.join(map(str, READS))}: a newer btrdelta made it)", source=source)
        self.version = version
        self._file, self._header = file, header
        #: the digest of all of the record, hashed by the thread that read it ahead
        #: (:mod:`.early`): it is the reader's once every frame was decoded, nothing after
        self._known: str | None = None
        self._expect = digest
        #: whether the body was read (at once if it could be) after the header
        self._reread = whole
        got = self._body() if whole else None
        # (the head alone: its first block read in 16 KiB pieces, not zstd's 128 KiB)
        self._start(*(got or (zstd.ZstdDecompressor().stream_reader(
            file, read_size=16 << 10, read_across_frames=True), None)))
        #: bytes decompressed at a time: little for the head (a store lists every record's
        #: head), then 1 MiB
        self._want = 16 << 10
        self.head: SendshotHead = self._head()
        self._want = 1 << 20
        #: the digest (hex) of the record, once :meth:`inodes` reached its end
        self.digest: str | None = None

    def _start(self, reader: Any, whole: Any = None) -> None:
        """Decode from the first frame after the header: decompressed by ``reader``, or
        (``whole``) all of it already."""
        self._digest: Any = blake3.blake3(self._header) if self._known is None else \
            _Known(self._known)
        self._reader = reader
        #: the body was fed whole: a frame's payload is a view of it at its body offset
        self._whole = whole is not None
        self._framer = Framer(_FRAMING, source=self.source)
        self._framer.version = self.version
        self._framer.verify_crc = whole is None or not self._known or self._known != self._expect
        if whole is not None:
            self._framer.feed(whole)
            self._framer.feed(b"")

    def _head(self) -> SendshotHead:
        cmd, mv, start, end = self._next()
        if cmd != _HEAD:
            self._framer.fail(StreamFormatError("the record does not start with HEAD"), cmd=cmd)
        version = self.version
        head: SendshotHead = self._decode(
            lambda mv, a, b: _decode_head(mv, a, b, version), mv, start, end, cmd)
        self._done()
        return head

    def _body(self) -> tuple[Any, Any] | None:
        """The compressed body after the header, read again: ``(None, its content)`` when
        its zstd frame says its size, else ``(a stream reader of it, None)``; None for a
        file that cannot be read again."""
        f = self._file
        early = take(f, self._header)  # (read ahead by a thread: .early)
        if early is not None:
            self._known = early[1]
            return None, early[0]
        try:  # (read, not mapped: a record truncated under a mapping would be a SIGBUS)
            f.seek(_HEADER.size)
            data = f.read()
        except (AttributeError, OSError, ValueError):
            return None
        try:
            if (body := inflate(zstd, data)) is not None:
                if self._expect is not None:  # (hashed at once: see digest)
                    hasher = blake3.blake3(self._header)
                    hasher.update(body)
                    self._known = hasher.hexdigest()
                return None, body
        except (zstd.ZstdError, MemoryError):
            pass  # several frames, or damaged: decoded as a stream (which says where)
        return zstd.ZstdDecompressor().stream_reader(data, read_across_frames=True), None

    def _at_once(self) -> None:
        """Before reading the rest of a record whose head alone was read: read it again
        from its first frame, at once if it can be (:meth:`_body`)."""
        if self._reread:
            return
        self._reread = True
        got = self._body()
        if got is None:
            return
        head = self.head
        self._start(*got)
        if self._head() != head:
            raise StreamFormatError("the record changed while it was read", source=self.source)

    def _next(self) -> tuple[int, memoryview, int, int]:
        fr = self._framer
        while True:
            frame = fr.next_frame()
            if frame is not NEED_DATA:
                cmd, mv, start, length = frame
                self._len = CMD_HEADER_SIZE + length
                self._digest.update(mv[start:start + self._len])
                return cmd, mv, start + CMD_HEADER_SIZE, start + self._len
            try:
                chunk = self._reader.read(self._want)
            except zstd.ZstdError as exc:
                raise StreamFormatError(f"corrupt compressed record: {exc}",
                                        source=self.source) from exc
            fr.feed(chunk)

    def _done(self) -> None:
        self._framer.consume(self._len)

    def _decode(self, fn: Callable[[memoryview, int, int], Any], mv: memoryview, start: int,
                end: int, cmd: int) -> Any:
        try:
            return fn(mv, start, end)
        except StreamFormatError as exc:
            self._framer.fail(exc, cmd=cmd)

    def inodes(self) -> Iterator[RecordInode]:
        """Every inode in record order, regular files with their ``blocks``.

        Raises:
            StreamFormatError: bad bytes, a wrong order, counts that do not match the END.
        """
        if self.version == 1:
            yield from self._inodes_v1()
            return
        yield from self.columns().rows()

    def columns(self) -> Columns:
        """The record's inodes as :class:`~.columns.Columns` (a version 1 record's are
        converted), decoded and checked whole; :attr:`digest` is then set.

        Raises:
            StreamFormatError: bad bytes, a wrong order, counts that do not match the END.
        """
        from .columns import Columns, encode_rows

        if self.version == 1:
            cols, (count, _f, _b, nblk) = encode_rows(self._inodes_v1())
            return Columns(dict(cols), count, nblk)
        if self.version in PATCHES:
            self._framer.fail(StreamFormatError(f"a patch record (version {self.version}) is "
                                                "read with its base"), indexed=False)
        cols_in, ends, _where = self._records(VERSION_COLUMNS[self.version])
        try:
            got = Columns(cols_in, ends.get(E_INODES, 0), ends.get(E_BLOCKS, 0))
        except StreamFormatError as exc:
            self._framer.fail(exc, indexed=False)
        self.digest = self._digest.hexdigest()
        return got

    def patch(self) -> Patch:
        """A patch record's (version 5) DROP, SLOTS, rows (:class:`~.columns.Columns`
        whose PARENT values are below END's SPAN) and counts, checked as one record;
        :attr:`digest` is then set. Its base's view checks the rest (:mod:`.chain`).

        Raises:
            StreamFormatError: bad bytes, not a patch record, counts that do not add up.
        """
        from .columns import Columns, u32s

        if self.version not in PATCHES:
            raise StreamFormatError(f"a version {self.version} record is not a patch",
                                    source=self.source)
        cols_in, ends, where = self._records((_DROP, _SLOTS, *VERSION_COLUMNS[self.version]))
        count, span = ends.get(E_INODES, 0), ends.get(E_SPAN, 0)
        lists = [u32s(cols_in.pop(c)) for c in (_DROP, _SLOTS)]
        try:
            if len(lists[1]) != count:
                raise StreamFormatError(f"SLOTS holds {len(lists[1])} rows, END {count}")
            rows = Columns(cols_in, count, ends.get(E_BLOCKS, 0), span=span)
        except (StreamFormatError, ValueError) as exc:
            self._framer.fail(exc if isinstance(exc, StreamFormatError)
                              else StreamFormatError(str(exc)), indexed=False)
        self.digest = self._digest.hexdigest()
        return Patch(lists[0], lists[1], rows, span, ends.get(E_LIVE, 0), where,
                     self.version in ALIGNED)

    def _records(self, numbers: Iterable[int]
                 ) -> tuple[dict[int, memoryview | bytes], dict[int, int], dict[int, int]]:
        """The records ``numbers`` (each a column: TLVs of type 1 joined), then END, then
        nothing: (their values, END's counts, the offset of each)."""
        self._at_once()
        fr = self._framer
        cols_in: dict[int, memoryview | bytes] = {}
        where: dict[int, int] = {}
        column = _column if self.version not in ALIGNED else \
            lambda mv, a, b: _in_place(mv, a, b, fr.offset + CMD_HEADER_SIZE, self._whole)
        for c in numbers:
            where[c] = fr.offset
            cmd, mv, start, end = self._next()
            if cmd != c:
                fr.fail(StreamFormatError(f"expected {_NAMES.get(c) or COLUMNS[c]}"), cmd=cmd)
            cols_in[c] = self._decode(column, mv, start, end, cmd)
            if len(cols_in[c]) % 4 and c in (_DROP, _SLOTS):
                fr.fail(StreamFormatError("not a whole number of u32"), cmd=cmd)
            self._done()
        where[_END] = fr.offset
        cmd, mv, start, end = self._next()
        if cmd != _END:
            fr.fail(StreamFormatError("expected END after the columns"), cmd=cmd)
        ends = self._decode(_ends, mv, start, end, cmd)
        self._done()
        self._check_end()
        return cols_in, ends, where

    def _check_end(self) -> None:
        if self._framer.avail or (self._reader is not None and self._reader.read(1)):
            self._framer.fail(StreamFormatError("data after the record's END"))

    def _inodes_v1(self) -> Iterator[RecordInode]:
        fr = self._framer
        count = nblocks = 0
        node: RecordInode | None = None
        blocks: list[bytes] = []
        while True:
            cmd, mv, start, end = self._next()
            if cmd == _BLOCKS:
                if node is None or node.segments is None:
                    fr.fail(StreamFormatError("BLOCKS without a regular file"), cmd=cmd)
                blocks.append(self._decode(_column, mv, start, end, cmd))
                self._done()
                continue
            if node is not None:
                node.blocks = b"".join(blocks)
                nblocks += len(node.blocks) // _DIGEST
                blocks = []
                yield node
                node = None
            if cmd == _INODE:
                node = self._decode(_decode_inode, mv, start, end, cmd)
                count += 1
                self._done()
            elif cmd == _END:
                ends = self._decode(_ends, mv, start, end, cmd)
                if ends.get(E_INODES) != count or ends.get(E_BLOCKS) != nblocks:
                    fr.fail(StreamFormatError(
                        f"END counts {ends.get(E_INODES)} inodes, {ends.get(E_BLOCKS)} "
                        f"blocks; the record holds {count} and {nblocks}"), cmd=cmd)
                self._done()
                break
            else:
                fr.fail(StreamFormatError(f"unexpected record {cmd}"), cmd=cmd)
        self._check_end()
        self.digest = self._digest.hexdigest()


def read_head(file: BinaryIO, *, source: str | None = None) -> SendshotHead:
    """The head of the record in ``file`` (decompresses only its start)."""
    return RecordReader(file, source=source).head


def encode_head(head: SendshotHead) -> bytes:
    """The attributes of ``head`` as a record's HEAD holds them (TLVs), the record's version
    included (it says which content digests the record holds): what :func:`decode_head`
    reads back (the store's head cache keeps these)."""
    return b"".join(_TLV.pack(typ, len(value)) + bytes(value)
                    for typ, value in _head_attrs(head))


def decode_head(data: bytes | memoryview) -> SendshotHead:
    """The head :func:`encode_head` encoded.

    Raises:
        StreamFormatError: bad bytes.
    """
    view = memoryview(data)
    return _decode_head(view, 0, len(view), None)
