"""``delta expand`` and direct application: a delta stream back to its btrfs stream.

Strategy: one generator, :func:`expand_items`, turns delta items into output items in
order: a stream header, a raw btrfs command (carried as is or inflated from the zstd
carrier), or a regenerated WRITE. For a ``PATCH`` it reads the old file (safely, below the
old root), checks its size and digest first, applies the codec, checks the new content's
size and digest, and only then lets the PWRITEs that follow produce WRITE commands from it.
A ``PENC`` (an ENCODED_WRITE of a ``--compressed-data`` stream) is recompressed from the
new content in a pool of threads (zstd and zlib release the GIL) while the records after
it are parsed; outputs still come out in stream order. :func:`expand_to` encodes the
output as bytes (``delta expand``, byte-identical to the stream ``delta make`` read),
:func:`expand_events` decodes it into the events :class:`~btrdelta.stream.StreamReader`
gives (``btrdelta receive`` of a delta stream).
Both check the final ``DEND`` record: command count, size and digest of the whole expanded
stream.

Memory: the zstd carrier is inflated piecewise (a hostile ZCMDS cannot expand beyond its
declared length by more than a bounded amount); patches and new contents are bounded by
``max_file_size``. Outputs that wait for an extent being recompressed (and the outputs
queued behind it) are bounded by ``_WINDOW`` (32 MiB) plus one output; when the window is
full, expansion waits for the first of them. The threads (one per usable CPU, none with a
single CPU) start at the first large PENC and stop when the expansion ends or is closed.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from .. import _native
from ..errors import BtrdeltaError, ChecksumError, StreamFormatError
from ..stream import records as R
from ..stream.codec import command_crc, decode_payload, encode_record
from ..stream.constants import (
    CMD_HEADER,
    CMD_HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD,
    STREAM_HEADER,
    Attr,
)
from ..stream.crc import crc32c
from ..stream.reader import EOF, NEED_DATA, Event, StreamHeader, StreamParser
from .carrier import SAME_PATH_TLV, CarrierState, unfold
from .codecs import get_codec
from .encoding import decode_item
from .format import (
    INNER_RECORDS,
    SAME_CODEC,
    BtrfsCommand,
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
from .oldfiles import DirCache, digest, hasher, list_old_dir, read_old_file
from .options import DEFAULT_MAX_FILE_SIZE
from .parser import DeltaParser, iter_items
from .recompress import compress_extent

__all__ = [
    "DEFAULT_MAX_FILE_SIZE",
    "DeltaEvents",
    "OldRoot",
    "expand_batches",
    "expand_events",
    "expand_items",
    "expand_to",
    "open_delta",
]

#: largest decompressed size one ZCMDS record may declare
MAX_ZCMDS_RAW = 64 << 20
#: pieces below this size are hashed / written in batches of _BATCH / _WRITE_BATCH bytes
_SMALL = 4096
_BATCH = 1 << 16
_WRITE_BATCH = 1 << 18
#: compressed bytes fed to the inflater at a time (bounds the output of one call)
_ZFEED = 1024
_MAX_CMD = max(int(c) for c in R.RECORD_TYPES)
_CRC_FIELD = struct.Struct("<I")
_U16 = struct.Struct("<H")
_HDR_ZERO_CRC = struct.Struct("<IHI")
_TLV_HEAD = struct.Struct("<HH")
_PATH_ATTR = 15  # btrfs's PATH attribute

#: the old snapshot: a directory, or a function giving it from the stream's SNAPSHOT/SUBVOL
OldRoot = str | os.PathLike[str] | Callable[[Any], "str | os.PathLike[str]"]

# output kinds of expand_items: a stream header, carried btrfs commands (a group of whole
# commands), a regenerated WRITE or ENCODED_WRITE
HEADER, RAW, WRITE = 0, 1, 2
# and of _Expander.run only: an ENCODED_WRITE being regenerated (a future), the DEND record
PENC, END = 3, 4
#: outputs waiting behind an extent being recompressed: at most this many bytes (and items)
_WINDOW = 32 << 20
_WINDOW_ITEMS = 4096
#: threads recompressing extents (one per CPU this process may use; none if only one);
#: extents below _INLINE bytes are recompressed at once
_WORKERS = (
    len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
)
_INLINE = 8192


@dataclass(slots=True)
class _Pending:
    """A PENC record whose extent is being recompressed (``packed``, in a worker thread)."""

    packed: Future[bytes] | bytes  # bytes: recompressed at once (a small extent)
    penc: PEncoded
    path: bytes
    version: int
    index: int  # of the delta record, for errors
    #: receive: the CLONE from the parent that stands for it (unchanged content)
    clone: R.Clone | None = None


@dataclass(slots=True)
class _Active:
    patch: Patch
    content: bytes
    pos: int = 0


class _SameWrite(R.Write):
    """A regenerated WRITE of content equal to the (verified) old file's. ``apply`` is what
    ``receive`` applies instead: a CLONE of the PWRITE's whole range from the parent
    snapshot on its first chunk, ``None`` on the others (see ``clone_same``)."""

    __slots__ = ("apply",)
    apply: R.Clone | None


class _SameEncodedWrite(R.EncodedWrite):
    """A regenerated ENCODED_WRITE of content equal to the old file's; ``apply`` is the
    CLONE of its file range from the parent that ``receive`` applies instead."""

    __slots__ = ("apply",)
    apply: R.Clone | None


class _Expander:
    def __init__(
        self, old_root: OldRoot, max_file_size: int, source: str | None,
        clone_same: bool = False,
    ) -> None:
        self.old_root = old_root
        self.root: str | os.PathLike[str] | None = (
            None if callable(old_root) else old_root
        )
        self.head: Any = None  # SNAPSHOT/SUBVOL of the current stream (for a callable root)
        self.max_file_size = max_file_size
        self.source = source
        #: regenerated WRITEs of unchanged content carry a CLONE from the parent snapshot
        #: (``_SameWrite``; only when the old root comes from the stream's SNAPSHOT)
        self.clone_same = clone_same and callable(old_root)
        self.version = 0
        self.dctx: Any = None
        self.count = 0
        self.size = 0
        self.hash: Any = None
        self.index = 0
        self.active: _Active | None = None
        self.pending: Patch | None = None
        self.pdata: list[bytes] = []
        self.pdata_len = 0
        #: the previous path (format 2 may leave it out) and folded times (format 3);
        #: old directory listings (format 4)
        self.cstate = CarrierState(lister=self.list_old_dir)
        #: directory fd of the last old file read
        self.dirs = DirCache()
        #: small pieces not hashed yet (see :meth:`add`)
        self.pend = bytearray()
        #: carried btrfs commands gathered by :meth:`split` and how many
        self.group = bytearray()
        self.group_n = 0
        #: recompression threads (PENC), started at the first PENC; see :meth:`close`
        self.pool: ThreadPoolExecutor | None = None
        #: the C path of carrier unfolding (``_unfold.c``) when it is live, or None
        unfold_c = _native.live("unfold")
        self.unfold_run: Any = unfold_c.run if unfold_c is not None else None

    @property
    def last_path(self) -> bytes | None:
        """The previous path (last carried PATH, PATCH path; RENAME's PATH_TO in format 3)."""
        return self.cstate.last_path

    @last_path.setter
    def last_path(self, path: bytes | None) -> None:
        self.cstate.last_path = path

    def fail(self, msg: str, exc: BtrdeltaError | None = None) -> BtrdeltaError:
        err = exc if exc is not None else StreamFormatError(msg)
        return err.located(source=self.source, index=self.index)

    # -- ZCMDS -------------------------------------------------------------------------

    def inflate(self, item: ZCommands) -> bytearray:
        if item.raw_len > MAX_ZCMDS_RAW:
            raise self.fail(f"ZCMDS declares {item.raw_len} bytes (limit {MAX_ZCMDS_RAW})")
        if self.dctx is None:
            self.dctx = zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj()
        out: list[bytes] = []
        got = 0
        z = item.zdata
        try:
            for i in range(0, len(z), _ZFEED):
                piece = self.dctx.decompress(z[i : i + _ZFEED])
                got += len(piece)
                if got > item.raw_len:
                    raise self.fail("ZCMDS inflates to more than it declares")
                out.append(piece)
        except zstandard.ZstdError as exc:
            raise self.fail(f"ZCMDS carrier is corrupt: {exc}") from exc
        if got != item.raw_len:
            raise self.fail(f"ZCMDS inflates to {got} bytes, declares {item.raw_len}")
        raw = bytearray().join(out)
        if item.crc is not None and crc32c(raw, 0) != item.crc:
            raise self.fail("", ChecksumError("CRC32C mismatch of a ZCMDS record's content"))
        return raw

    def split(
        self, raw: bytearray, crc_checked: bool = False, fmt: int = 2, grouped: bool = False
    ) -> Iterator[DeltaItem]:
        """Whole records in inflated carrier bytes: btrfs commands (CRC-checked) and, when
        the carrier's content CRC was checked (format 2), delta records with a zero CRC;
        format 3 commands are unfolded (:func:`.carrier.unfold`).

        ``grouped``: btrfs commands are appended to ``self.group`` (counted in
        ``self.group_n``) instead of yielded, and SUBVOL/SNAPSHOT set the old root's
        head; the common format-3/4 commands are then unfolded by the C module when built.
        """
        if not self.version:
            raise self.fail("btrfs commands before any STREAM record")
        mv = memoryview(raw)
        pos = 0
        limit = MAX_PAYLOAD[self.version]
        self.cstate.fmt = fmt
        fast = self.unfold_run if grouped and crc_checked and fmt >= 3 else None
        while pos < len(mv):
            if fast is not None:
                pos, n = fast(raw, pos, self.group, self.cstate, fmt, limit, _MAX_CMD)
                self.group_n += n
                if pos >= len(mv):
                    break
            if len(mv) - pos < CMD_HEADER_SIZE:
                raise self.fail("carried commands end inside a command header")
            length, cmd, crc = CMD_HEADER.unpack_from(mv, pos)
            end = pos + CMD_HEADER_SIZE + length
            if crc_checked and cmd in INNER_RECORDS:
                if crc != 0 or end > len(mv):
                    raise self.fail(f"carried delta record {cmd} is invalid")
                try:
                    sub = decode_item(cmd, mv, pos + CMD_HEADER_SIZE, end)
                except BtrdeltaError as exc:
                    raise self.fail("", exc) from None
                if type(sub) is Patch and (
                    (fmt < 3 and sub.hash_algo == HashAlgo.BLAKE3_64)
                    or (fmt < 4 and cmd == DCmd.CPATCH)
                    or (cmd != DCmd.CPATCH and sub.hash_algo == HashAlgo.BLAKE3_32)
                ):
                    raise self.fail("format-3/4 patch record in an older delta stream")
                yield sub
                pos = end
                continue
            if not 0 < cmd <= _MAX_CMD or length > limit or end > len(mv):
                raise self.fail(f"carried command {cmd} of length {length} is invalid")
            if crc_checked:
                # format 2: the CRC field is zero in the carrier, put the real one back;
                # a first TLV (0xffff, 0) stands for PATH = the previous path
                if crc != 0:
                    raise self.fail(f"carried command {cmd} has a non-zero CRC field")
                if fmt >= 3:
                    try:
                        buf3 = unfold(cmd, mv, pos, end, self.cstate, limit)
                    except BtrdeltaError as exc:
                        raise self.fail("", exc) from None
                    # the CRC field is 0 in both forms: btrfs's CRC (seed 0, no final
                    # inversion) of header + payload is one library call
                    if buf3 is None:
                        view = mv[pos:end]
                        _CRC_FIELD.pack_into(raw, pos + 6, crc32c(view, 0xFFFFFFFF) ^ 0xFFFFFFFF)
                    else:
                        view = memoryview(buf3)
                        _CRC_FIELD.pack_into(buf3, 6, crc32c(buf3, 0xFFFFFFFF) ^ 0xFFFFFFFF)
                    if grouped:
                        self.add_to_group(cmd, view)
                    else:
                        yield BtrfsCommand(cmd, view)
                    pos = end
                    continue
                first = mv[pos + 10 : pos + 14] if length >= 4 else b""
                if first == SAME_PATH_TLV:
                    if self.last_path is None:
                        raise self.fail("carried command refers to a previous path: none")
                    path = self.last_path
                    length += len(path)
                    if length > limit:
                        raise self.fail(f"carried command {cmd} of length {length} is invalid")
                    buf = bytearray(CMD_HEADER.pack(length, cmd, 0))
                    buf += _TLV_HEAD.pack(_PATH_ATTR, len(path))
                    buf += path
                    buf += mv[pos + 14 : end]
                    view = memoryview(buf)
                    _CRC_FIELD.pack_into(
                        buf, 6, command_crc(length, cmd, view[CMD_HEADER_SIZE:])
                    )
                else:
                    # in place: the inflated buffer is ours
                    if length >= 4 and _TLV_HEAD.unpack_from(raw, pos + 10)[0] == _PATH_ATTR:
                        n = _TLV_HEAD.unpack_from(raw, pos + 10)[1]
                        self.last_path = bytes(mv[pos + 14 : pos + 14 + n])
                    _CRC_FIELD.pack_into(
                        raw, pos + 6, command_crc(length, cmd, mv[pos + CMD_HEADER_SIZE : end])
                    )
                    view = mv[pos:end]
            elif command_crc(length, cmd, mv[pos + CMD_HEADER_SIZE : end]) != crc:
                raise self.fail("", ChecksumError("CRC32C mismatch in a carried command"))
            else:
                view = mv[pos:end]
            if grouped:
                self.add_to_group(cmd, view)
            else:
                yield BtrfsCommand(cmd, view)
            pos = end

    def add_to_group(self, cmd: int, raw: memoryview) -> None:
        """Append one btrfs command to the group of carried commands (see :meth:`split`)."""
        if cmd <= 2:
            self.new_head(cmd, raw)
        self.group += raw
        self.group_n += 1

    # -- patches -----------------------------------------------------------------------

    def start_patch(self, p: Patch) -> None:
        if self.active is not None or self.pending is not None:
            raise self.fail("PATCH while another patch is not used up")
        if p.path is None:
            if self.last_path is None:
                raise self.fail("PATCH refers to a previous path: there is none")
            p.path = self.last_path
        if p.base_path is None:
            p.base_path = p.path
        self.last_path = p.path
        if p.new_size > self.max_file_size or p.old_size > self.max_file_size:
            raise self.fail(
                f"patch sizes {p.old_size}/{p.new_size} exceed the limit {self.max_file_size}"
            )
        if p.codec == SAME_CODEC:
            if p.patch_len or p.old_size != p.new_size:
                raise self.fail("a 'same' patch with patch bytes or a size change")
        elif p.patch_len == 0 or p.patch_len >= p.new_size:
            raise self.fail(f"patch length {p.patch_len} is not below new size {p.new_size}")
        self.resolve_root("PATCH")
        self.pending = p
        self.pdata = []
        self.pdata_len = 0
        if p.data is not None or p.codec == SAME_CODEC:
            self.finish_patch(p, bytes(p.data) if p.data is not None else b"")

    def resolve_root(self, what: str) -> str | os.PathLike[str]:
        """The old snapshot's directory (asked of the old-root function once a stream)."""
        if self.root is None:
            if self.head is None:
                raise self.fail(f"{what} before any SNAPSHOT or SUBVOL")
            assert callable(self.old_root)
            try:
                self.root = self.old_root(self.head)
            except BtrdeltaError as exc:
                raise exc.located(source=self.source, index=self.index) from None
        return self.root

    def list_old_dir(self, path: bytes) -> list[bytes] | None:
        """Sorted names in the old snapshot's directory ``path`` (format 4 references)."""
        return list_old_dir(self.resolve_root("UNLINK reference"), path)

    def add_pdata(self, d: PatchData) -> None:
        p = self.pending
        if p is None:
            raise self.fail("PDATA without a PATCH")
        self.pdata_len += len(d.data)
        if self.pdata_len > p.patch_len:
            raise self.fail("PDATA longer than the patch length")
        self.pdata.append(bytes(d.data))
        if self.pdata_len == p.patch_len:
            self.finish_patch(p, b"".join(self.pdata))

    def finish_patch(self, p: Patch, patch: bytes) -> None:
        self.pending = None
        self.pdata = []
        assert self.root is not None
        try:
            old = read_old_file(
                self.root, p.base_path, expected_size=p.old_size, max_size=self.max_file_size,
                algo=p.hash_algo, expected_digest=p.old_digest, cache=self.dirs,
            )
            assert old is not None
            if p.codec == SAME_CODEC:
                self.active = _Active(p, old)
                return
            codec = get_codec(p.codec)
            new = codec.apply(old, patch, new_size=p.new_size)
        except BtrdeltaError as exc:
            raise exc.located(source=self.source, index=self.index, path=p.base_path) from None
        actual = digest(p.new_algo if p.new_algo is not None else p.hash_algo, new)
        if actual != p.new_digest:
            raise self.fail("", ChecksumError(
                "patched content differs from the new content (wrong old file or bad patch)",
                expected=p.new_digest.hex(), actual=actual.hex(), path=p.path,
            ))
        self.active = _Active(p, new)

    def pwrite(self, w: PWrite) -> Iterator[R.Write]:
        a = self.active
        if a is None:
            raise self.fail("PWRITE without a patched content")
        if a.pos + w.length > len(a.content) or w.length == 0:
            raise self.fail("PWRITE runs past the patched content")
        if self.version == 1 and w.chunk > 0xFFFF:
            raise self.fail(f"PWRITE chunk {w.chunk} does not fit a v1 WRITE")
        if w.offset + w.length >= 1 << 64:
            raise self.fail("PWRITE offset overflows")
        content = memoryview(a.content)
        path = a.patch.path
        off, pos, end = w.offset, a.pos, a.pos + w.length
        clone = self.same_clone(a, off, w.length, pos)
        if clone is not None:
            while pos < end:
                n = min(w.chunk, end - pos)
                rec = _SameWrite(path, off, content[pos : pos + n])
                rec.apply, clone = clone, None
                yield rec
                pos += n
                off += n
        while pos < end:
            n = min(w.chunk, end - pos)
            yield R.Write(path, off, content[pos : pos + n])
            pos += n
            off += n
        a.pos = end
        if end == len(a.content):
            self.active = None

    def same_clone(self, a: _Active, offset: int, length: int, old_offset: int) -> R.Clone | None:
        """With ``clone_same``, for content equal to the verified old file: the CLONE from
        the parent snapshot that puts ``length`` bytes of it at ``old_offset`` into the new
        file at ``offset`` (what ``receive`` applies instead of the regenerated write)."""
        head = self.head
        if not self.clone_same or a.patch.codec != SAME_CODEC or type(head) is not R.Snapshot:
            return None
        assert a.patch.base_path is not None
        return R.Clone(offset, length, a.patch.path, head.clone_uuid, head.clone_ctransid,
                       a.patch.base_path, old_offset)

    def pencoded(self, e: PEncoded) -> _Pending:
        """Start regenerating the ENCODED_WRITE a PENC record stands for: its extent is
        recompressed in a worker thread (a small one at once, which costs less than
        handing it over); :meth:`regenerated` gives the record."""
        a = self.active
        if a is None:
            raise self.fail("PENC without a patched content")
        if a.pos + e.length > len(a.content) or e.length == 0:
            raise self.fail("PENC runs past the patched content")
        if self.version < 2:
            raise self.fail("PENC in a v1 stream (ENCODED_WRITE needs v2)")
        if e.disk_len > MAX_PAYLOAD[self.version]:
            raise self.fail(f"PENC disk length {e.disk_len} exceeds a command's payload")
        raw = memoryview(a.content)[a.pos : a.pos + e.length]
        clone = self.same_clone(a, e.offset, e.file_len, a.pos + e.unencoded_offset)
        packed: Future[bytes] | bytes
        if e.length < _INLINE or _WORKERS < 2:
            try:
                packed = compress_extent(raw, e.compression, e.level)
            except BtrdeltaError as exc:
                raise self.fail("", exc) from None
        else:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(_WORKERS, "btrdelta-penc")
            packed = self.pool.submit(compress_extent, raw, e.compression, e.level)
        a.pos += e.length
        if a.pos == len(a.content):
            self.active = None
        return _Pending(packed, e, a.patch.path, self.version, self.index, clone)

    def regenerated(self, p: _Pending) -> tuple[R.EncodedWrite, list[Any]]:
        """The ENCODED_WRITE of a :meth:`pencoded` record and its exact bytes, checked
        against the original command's CRC (waits for the recompression)."""
        e, path = p.penc, p.path
        try:
            packed = p.packed if isinstance(p.packed, bytes) else p.packed.result()
            if len(packed) > e.disk_len:
                raise ChecksumError(
                    f"recompressed extent has {len(packed)} bytes, more than {e.disk_len}",
                    path=path,
                )
            data = packed + bytes(e.disk_len - len(packed))
            rec = (R.EncodedWrite if p.clone is None else _SameEncodedWrite)(
                path, e.offset, e.file_len, e.unencoded_len, e.unencoded_offset,
                e.compression, memoryview(data), e.encryption,
            )
            if p.clone is not None:
                rec.apply = p.clone  # type: ignore[attr-defined]
            pieces = encode_record(rec, p.version)
            if CMD_HEADER.unpack_from(pieces[0])[2] != e.crc:
                raise ChecksumError(
                    "recompressed extent differs from the original (another zstd/zlib build?)",
                    path=path,
                )
        except BtrdeltaError as exc:
            raise exc.located(source=self.source, index=p.index) from None
        return rec, pieces

    def close(self) -> None:
        """Stop the recompression threads (queued work is cancelled, running work ends)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    # -- driver ------------------------------------------------------------------------

    def run(self, items: Iterable[DeltaItem]) -> Generator[tuple[int, Any, Any], None, None]:
        try:
            for item in items:
                self.index += 1
                if type(item) is DeltaEnd:
                    self.check_idle("DEND")
                    yield END, item, None  # checked once all output before it is out
                    return
                yield from self.handle(item)
            raise self.fail("truncated delta stream (no DEND record)")
        finally:
            self.dirs.close()

    def handle(self, item: DeltaItem, inner: bool = False) -> Iterator[tuple[int, Any, Any]]:
        """Output items for one delta item (``inner``: it came out of the carrier)."""
        cls = type(item)
        if cls is BtrfsCommand:
            cmd: BtrfsCommand = item  # type: ignore[assignment]
            if not self.version:
                raise self.fail("btrfs commands before any STREAM record")
            if cmd.cmd <= 2:
                self.new_head(cmd.cmd, cmd.raw)
            yield RAW, 1, cmd.raw
        elif cls is ZCommands and not inner:
            # consecutive carried commands come out as one group of bytes
            z: ZCommands = item  # type: ignore[assignment]
            raw = self.inflate(z)
            for sub in self.split(raw, crc_checked=z.crc is not None, fmt=z.fmt, grouped=True):
                if self.group_n:
                    yield from self.flush_group()
                yield from self.handle(sub, inner=True)
            if self.group_n:
                yield from self.flush_group()
        elif cls is PWrite:
            for rec in self.pwrite(item):  # type: ignore[arg-type]
                yield WRITE, rec, None
        elif cls is PEncoded:
            pending = self.pencoded(item)  # type: ignore[arg-type]
            if isinstance(pending.packed, bytes):
                yield WRITE, *self.regenerated(pending)
            else:
                yield PENC, pending, None
        elif cls is PatchData:
            self.add_pdata(item)  # type: ignore[arg-type]
        elif cls is Patch:
            self.start_patch(item)  # type: ignore[arg-type]
            if item.auto_chunk:  # type: ignore[union-attr]
                # CPATCH: its one PWRITE (the whole new content from offset 0) is implied
                yield from self.handle(
                    PWrite(0, item.new_size, item.auto_chunk),  # type: ignore[union-attr]
                    inner=True,
                )
        elif cls is StreamStart and not inner:
            self.check_idle("STREAM")
            self.version = item.version  # type: ignore[union-attr]
            if callable(self.old_root):
                self.root = None
            if self.hash is None:
                self.hash = hasher(HashAlgo.BLAKE3)
            yield HEADER, item.version, None  # type: ignore[union-attr]
        else:
            raise self.fail(f"unexpected {cls.__name__} record")

    def check_idle(self, what: str) -> None:
        if self.active is not None or self.pending is not None:
            raise self.fail(f"{what} while a patch is not used up")

    def flush_group(self) -> Iterator[tuple[int, Any, Any]]:
        """The group of carried commands as one output item; a new group starts (the
        yielded one is never appended to again: records keep views of it)."""
        n, group = self.group_n, self.group
        self.group, self.group_n = bytearray(), 0
        yield RAW, n, group

    def new_head(self, cmd: int, raw: memoryview) -> None:
        """A SUBVOL or SNAPSHOT command: the old root of what follows may change."""
        if callable(self.old_root):
            try:
                self.head = decode_payload(cmd, raw, CMD_HEADER_SIZE, len(raw), self.version)
            except BtrdeltaError as exc:
                raise self.fail("", exc) from None
            self.root = None

    def add(self, piece: Any) -> None:
        """Count and hash one piece of the expanded stream (small pieces are hashed in
        batches: one hash call per ~64 KiB instead of one per command)."""
        n = len(piece)
        self.size += n
        if n < _SMALL:
            self.pend += piece
            if len(self.pend) >= _BATCH:
                self.hash.update(self.pend)
                self.pend.clear()
        else:
            if self.pend:
                self.hash.update(self.pend)
                self.pend.clear()
            self.hash.update(piece)

    def check_end(self, end: DeltaEnd) -> None:
        if self.pend:
            self.hash.update(self.pend)
            self.pend.clear()
        algo_hash = self.hash if self.hash is not None else hasher(HashAlgo.BLAKE3)
        if end.hash_algo != HashAlgo.BLAKE3:
            raise self.fail("DEND uses a digest this build does not check")
        if end.count != self.count or end.size != self.size:
            raise self.fail("", ChecksumError(
                f"expanded stream has {self.count} commands / {self.size} bytes, "
                f"DEND says {end.count} / {end.size}",
                expected=(end.count, end.size), actual=(self.count, self.size),
            ))
        actual = bytes(algo_hash.digest())
        if actual != end.digest:
            raise self.fail("", ChecksumError(
                "expanded stream digest mismatch", expected=end.digest.hex(), actual=actual.hex()
            ))


_WRITE_CMD = int(R.Write.cmd)
_PATH_TLV = struct.Struct("<HH")
_OFFSET_TLV = struct.Struct("<HHQ")


def _encode_write(rec: R.Write, version: int) -> list[Any]:
    """The bytes of a regenerated WRITE, as :func:`~btrdelta.stream.codec.encode_record`
    gives them (PATH, FILE_OFFSET, DATA; v1 DATA with a length, v2+ without), without its
    copies of the data (the hot path of expansion)."""
    path, data = rec.path, rec.data
    n = len(data)
    if len(path) > 0xFFFF or (version < 2 and n > 0xFFFF):
        return encode_record(rec, version)  # its checks and errors
    attrs = bytearray(_PATH_TLV.pack(int(Attr.PATH), len(path)))
    attrs += path
    attrs += _OFFSET_TLV.pack(int(Attr.FILE_OFFSET), 8, rec.offset)
    attrs += _PATH_TLV.pack(int(Attr.DATA), n) if version < 2 else _U16.pack(int(Attr.DATA))
    length = len(attrs) + n
    if length > MAX_PAYLOAD[version]:
        return encode_record(rec, version)
    # btrfs's CRC: seed 0 and no final inversion, i.e. the library's CRC continued from
    # 0xFFFFFFFF and inverted (stream.codec.command_crc)
    crc = crc32c(_HDR_ZERO_CRC.pack(length, _WRITE_CMD, 0), 0xFFFFFFFF)
    crc = crc32c(data, crc32c(attrs, crc)) ^ 0xFFFFFFFF
    return [CMD_HEADER.pack(length, _WRITE_CMD, crc), attrs, data]


def expand_items(
    items: Iterable[DeltaItem],
    old_root: OldRoot,
    *,
    max_file_size: int = DEFAULT_MAX_FILE_SIZE,
    source: str | None = None,
    clone_same: bool = False,
) -> Generator[tuple[int, list[Any], R.Record | StreamHeader | None], None, None]:
    """Expand delta items to ``(kind, pieces, record)`` with the bytes of each output item.

    An output item is a stream header, a group of consecutive carried btrfs commands or
    one regenerated WRITE / ENCODED_WRITE. ``pieces`` are its exact bytes in the btrfs
    stream; ``record`` is the decoded header or WRITE, ``None`` for a group of carried
    commands (the caller decodes those if it needs them). The final DEND check runs before
    the generator ends.

    Strategy: compressed extents (PENC) are recompressed in worker threads while the
    delta items after them are parsed. Outputs come out strictly in stream order: an
    output that follows an extent still being recompressed waits in a FIFO (at most
    ``_WINDOW`` bytes, then the first one is waited for). An error of a later record is
    raised only after the outputs before it (and their own errors). Closing the generator
    stops the threads.
    """
    ex = _Expander(old_root, max_file_size, source, clone_same)
    run = ex.run(items)
    waiting: deque[tuple[int, Any, Any, int]] = deque()  # (kind, a, b, size) of run()
    nbytes = 0

    def output(kind: int, a: Any, b: Any) -> tuple[int, list[Any], Any]:
        """One output of run() as expand_items yields it, counted and hashed, in order."""
        rec: Any = None
        if kind == HEADER:
            pieces: list[Any] = [STREAM_HEADER.pack(MAGIC, a)]
            rec = StreamHeader(a, ex.size)
        elif kind == RAW:
            pieces = [b]
            ex.count += a
        else:
            rec, pieces = ex.regenerated(a) if kind == PENC else (a, b)
            kind = WRITE
            ex.count += 1
        for piece in pieces:
            ex.add(piece)
        return kind, pieces, rec

    try:
        while True:
            failed: Exception | None = None  # raised once the outputs before it are out
            try:
                kind, a, b = next(run)
                if kind == WRITE and b is None:
                    try:  # now: the stream version may change before it goes out
                        b = _encode_write(a, ex.version)
                    except BtrdeltaError as exc:
                        raise ex.fail("", exc) from None
            except Exception as exc:
                failed = exc
            if failed is not None or kind == END:
                while waiting:  # the outputs before the failing or last record come first
                    yield output(*waiting.popleft()[:3])
                if failed is not None:
                    raise failed
                ex.check_end(a)
                return
            if kind != PENC and not waiting:
                yield output(kind, a, b)
                continue
            if kind == RAW and type(b) is memoryview:
                b = bytes(b)  # a delta item's bytes are valid until the parser's next item
            size = (
                a.penc.disk_len if kind == PENC else len(b) if kind == RAW
                else len(a.data) if kind == WRITE else 0
            )
            waiting.append((kind, a, b, size))
            nbytes += size
            while waiting and (
                nbytes > _WINDOW or len(waiting) > _WINDOW_ITEMS
                or waiting[0][0] != PENC or waiting[0][1].packed.done()
            ):
                kind, a, b, size = waiting.popleft()
                nbytes -= size
                yield output(kind, a, b)
    finally:
        run.close()
        ex.close()


def open_delta(f: BinaryIO, *, source: str | None = None) -> Iterator[DeltaItem]:
    """Delta items read from a binary file."""
    read = getattr(f, "read1", None) or f.read
    return iter_items(read, source=source, parser=DeltaParser(source=source))


def expand_to(
    items: Iterable[DeltaItem],
    old_root: OldRoot,
    write: Callable[[Any], object],
    *,
    max_file_size: int = DEFAULT_MAX_FILE_SIZE,
    source: str | None = None,
) -> int:
    """Write the expanded btrfs stream to ``write``; returns its size in bytes.

    Small pieces (headers, carried commands) are gathered and written ~256 KiB at a time;
    ``write`` is called for the last of them before the function returns.
    """
    size = 0
    pend = bytearray()
    outputs = expand_items(items, old_root, max_file_size=max_file_size, source=source)
    with closing(outputs):  # an error in write stops the recompression threads at once
        for _kind, pieces, _rec in outputs:
            for piece in pieces:
                n = len(piece)
                size += n
                if n < _SMALL:
                    pend += piece
                    if len(pend) >= _WRITE_BATCH:
                        write(pend)
                        pend = bytearray()
                else:
                    if pend:
                        write(pend)
                        pend = bytearray()
                    write(piece)
    if pend:
        write(pend)
    return size


#: events (and bytes of regenerated file data) in one batch of :func:`expand_batches`
_EVENTS_BATCH = 2048
_EVENTS_BYTES = 4 << 20


def expand_batches(
    items: Iterable[DeltaItem],
    old_root: OldRoot,
    *,
    max_file_size: int = DEFAULT_MAX_FILE_SIZE,
    source: str | None = None,
    clone_same: bool = False,
) -> Generator[list[Event], None, None]:
    """The events of the expanded stream in lists (what ``receive`` applies a list at a
    time). Carried commands are decoded a group at a time by a
    :class:`~btrdelta.stream.StreamParser` (the C batch decoder when built), which also
    checks that the expanded stream is well formed; regenerated WRITEs are the records
    the expansion made.

    ``clone_same``: the WRITEs of a file whose content equals its old file (verified
    before) become one CLONE from the parent snapshot per PWRITE range (``old_root`` must
    then be a function of the stream's SNAPSHOT, as for ``receive``): the receiver
    reflinks the unchanged data instead of writing it again (and falls back to copying
    where it cannot). The tree is the same; the old and new versions share the extents.
    The expanded stream is still checked as a whole (DEND)."""
    parser = StreamParser(source=source, verify_crc=False)
    take_batch = parser.take_batch
    next_event = parser.next_event
    batch: list[Event] = []
    nbytes = 0
    outputs = expand_items(items, old_root, max_file_size=max_file_size, source=source,
                           clone_same=clone_same)
    with closing(outputs):  # closing this generator stops the recompression threads
        for kind, pieces, rec in outputs:
            if type(rec) is _SameWrite or type(rec) is _SameEncodedWrite:
                if rec.apply is not None:
                    batch.append(rec.apply)
            elif kind == WRITE:
                batch.append(rec)  # type: ignore[arg-type]
                nbytes += len(rec.data)  # type: ignore[union-attr]
            else:
                parser.feed(pieces[0])
                try:
                    while True:
                        got = take_batch()
                        if got:
                            batch += got
                            continue
                        ev = next_event()
                        if ev is NEED_DATA or ev is EOF:  # EOF: never fed, never seen
                            break
                        # a header: the expansion's own (its offset counts regenerated WRITEs)
                        batch.append(rec if kind == HEADER else ev)  # type: ignore[arg-type]
                except BtrdeltaError as exc:  # offsets and indexes of the parser's are not ours
                    raise StreamFormatError(f"a carried command does not decode: {exc.message}",
                                            source=source) from None
            if len(batch) >= _EVENTS_BATCH or nbytes >= _EVENTS_BYTES:
                yield batch
                batch = []
                nbytes = 0
    if batch:
        yield batch


class DeltaEvents:
    """The events of a delta stream's expansion: iterate over it for the events one by one,
    as :meth:`StreamReader.events` yields them, or call :meth:`batches` for lists of them
    (``receive`` does, like it does with a :class:`StreamReader`)."""

    def __init__(
        self, items: Iterable[DeltaItem], old_root: OldRoot, max_file_size: int,
        source: str | None, clone_same: bool = False,
    ) -> None:
        self._args = (items, old_root, max_file_size, source, clone_same)

    def batches(self) -> Generator[list[Event], None, None]:
        """Lists of events (see :func:`expand_batches`); call it once."""
        items, old_root, max_file_size, source, clone_same = self._args
        return expand_batches(items, old_root, max_file_size=max_file_size, source=source,
                              clone_same=clone_same)

    def __iter__(self) -> Iterator[Event]:
        for batch in self.batches():
            yield from batch


def expand_events(
    delta_events: Iterable[DeltaItem] | BinaryIO,
    old_root: OldRoot | Path,
    *,
    max_file_size: int = DEFAULT_MAX_FILE_SIZE,
    source: str | None = None,
    clone_same: bool = False,
) -> DeltaEvents:
    """The events of the expanded stream, as :meth:`StreamReader.events` yields them.

    Args:
        delta_events: delta items (:func:`open_delta`) or a binary file with a delta stream.
        old_root: the old snapshot's directory, or a function of the stream's SNAPSHOT
            (or SUBVOL) record returning it (``lambda s: find_parent(dest, s)``).
        max_file_size: largest old file / new content a patch may involve.
        source: input name for error messages.
        clone_same: unchanged content as CLONEs from the parent (see
            :func:`expand_batches`; ``btrdelta receive`` does this).

    Each patched file's old content is verified before, and its new content after the
    patch is applied, before any of its WRITE events is yielded. The result is iterable
    once; its ``batches()`` gives the events in lists.
    """
    items: Iterable[DeltaItem]
    if hasattr(delta_events, "read"):
        items = open_delta(delta_events, source=source)  # type: ignore[arg-type]
    else:
        items = delta_events
    return DeltaEvents(items, old_root, max_file_size, source, clone_same)
