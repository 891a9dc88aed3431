"""``delta expand``: a delta stream back to its btrfs stream, byte for byte.

Strategy: one generator, :func:`expand_items`, turns delta items into output items in
order: a stream header, a group of raw btrfs commands (carried as they are, or inflated and
unfolded from the zstd carrier by :mod:`.unpack`), or a regenerated WRITE / ENCODED_WRITE
(the patched file's new content, :mod:`.patching`). Each output is counted and hashed as it
goes out, and the final ``DEND`` record is checked against the whole: command count, size
and BLAKE3 digest of the expanded stream. :func:`expand_to` writes the output's bytes
(``delta expand``); :mod:`.events` hands its records to ``btrdelta receive``.

Memory is bounded by ``max_file_size`` (default :data:`DEFAULT_MAX_FILE_SIZE`, 256 MiB)
whatever the input declares: a patched file's old and new content, one ZCMDS's inflated bytes
(≤ 64 MiB by the format) and the carrier's zstd window may each be that large, no more;
the zstd carrier is inflated piecewise (a hostile ZCMDS cannot expand beyond its declared
length by more than a bounded amount) and its commands are unfolded and handed on
:data:`~.unpack.GROUP_MAX` (1 MiB, or :data:`~.unpack.GROUP_COMMANDS` commands) at a time,
however much they unfold to.

An ENCODED_WRITE regenerated from a PENC is recompressed in a worker thread while the
records after it are parsed; outputs still come out in stream order: those behind an
extent being recompressed wait, at most ``_WINDOW`` (32 MiB) plus one output, then the
first of them is waited for. The threads (one per usable CPU, none with a
single CPU) start at the first large PENC and stop when the expansion ends or is closed.
With ``hash_clones=False`` (receive on btrfs), a PENC of unchanged content that a CLONE
stands for is not recompressed at all: it is counted with its size, and the digest is no
longer computed (DEND's count and size are still checked).
"""

from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import closing

from .. import TYPE_CHECKING
from ..errors import BtrdeltaError, ChecksumError, StreamFormatError
from ..fs.sandbox import list_dir as list_old_dir
from ..stream import records as R
from ..stream.codec import encode_record
from ..stream.constants import CMD_HEADER, CMD_HEADER_SIZE, MAGIC, MAX_PAYLOAD, STREAM_HEADER, Attr
from ..stream.crc import crc32c
from ..stream.decode import decode_payload
from ..stream.reader import StreamHeader
from .format import (
    DEFAULT_MAX_FILE_SIZE,
    SAME_CODEC,
    BtrfsCommand,
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
from .oldfiles import hasher
from .parser import DeltaParser, iter_items
from .patching import Patcher, Pending
from .unpack import CarrierReader

if TYPE_CHECKING:
    from typing import Any, BinaryIO

__all__ = [
    "APPLY",
    "DEFAULT_MAX_FILE_SIZE",
    "END",
    "FLUSH",
    "HEADER",
    "PENC",
    "RAW",
    "WRITE",
    "OldRoot",
    "expand_items",
    "expand_to",
    "open_delta",
]

#: pieces below this size are hashed / written in batches of _BATCH / _WRITE_BATCH bytes
_SMALL = 4096
_BATCH = 1 << 16
_WRITE_BATCH = 1 << 18
_U16 = struct.Struct("<H")
_HDR_ZERO_CRC = struct.Struct("<IHI")

#: the old snapshot: a directory, or a function giving it from the stream's SNAPSHOT/SUBVOL
#: (its one argument; ``...`` rather than ``Any``: this alias is made at run time, where
#: ``typing`` is not imported)
OldRoot = str | os.PathLike[str] | Callable[..., "str | os.PathLike[str]"]

# output kinds of expand_items: a stream header, carried btrfs commands (a group of whole
# commands), a regenerated WRITE or ENCODED_WRITE; with ``flush``, FLUSH (no bytes): a
# long patch comes next, hand on what came before it; APPLY (no bytes): a command left
# out, counted, and what ``receive`` applies instead (its record: a CLONE, a WRITE or a
# tuple of them; only with ``clone_same`` and not ``hash_clones``)
HEADER, RAW, WRITE, FLUSH, APPLY = 0, 1, 2, 6, 7
# and of _Expander.run only: an ENCODED_WRITE being regenerated (a future), the DEND record,
# an ENCODED_WRITE of unchanged content left to its CLONE (not regenerated: hash_clones),
# the same as (what is applied, its command's size) (Patcher.unread_clone)
PENC, END, CLONED, SIZED = 3, 4, 5, 8
#: a patch of new content this large (not a ``same`` one) comes after a FLUSH output
#: (HDiffPatch: ~1 ms a MB, scipy's OpenBLAS ~30 ms)
_FLUSH_MIN = 1 << 20
#: outputs waiting behind an extent being recompressed: at most this many bytes (and items)
_WINDOW = 32 << 20
_WINDOW_ITEMS = 4096


class _Expander:
    """Delta items to outputs (:meth:`run`), and the check of what went out against DEND."""

    def __init__(
        self, old_root: OldRoot, max_file_size: int, source: str | None,
        clone_same: bool = False, hash_clones: bool = True, check_digest: bool = True,
        flush: bool = False, records_only: bool = False,
    ) -> None:
        self.old_root = old_root
        self.flush = flush
        #: the caller takes a regenerated WRITE's record, never its bytes (see expand_items)
        self.records_only = records_only
        self.root: str | os.PathLike[str] | None = (
            None if callable(old_root) else old_root
        )
        self.head: Any = None  # SNAPSHOT/SUBVOL of the current stream (for a callable root)
        self.source = source
        self.version = 0
        #: commands, bytes and digest of what went out (:meth:`add`)
        self.count = 0
        self.size = 0
        self.hash: Any = None
        #: False once a command was left out (CLONED, SIZED): the digest is no longer computed;
        #: never computed without ``check_digest``
        self.hashing = check_digest
        #: small pieces not hashed yet (see :meth:`add`)
        self.pend = bytearray()
        #: index of the delta record being expanded (1-based), for errors
        self.index = 0
        self.carrier = CarrierReader(self.list_old_dir, self.new_head, max_file_size)
        #: regenerated WRITEs of unchanged content carry a CLONE from the parent snapshot
        #: (only when the old root comes from the stream's SNAPSHOT)
        self.patcher = Patcher(self.resolve_root, self.carrier.state, max_file_size, source,
                               clone_same and callable(old_root), hash_clones)
        self.patcher.digest_off = not check_digest
        self.patcher.content_checked = not check_digest

    def fail(self, msg: str, exc: BtrdeltaError | None = None) -> BtrdeltaError:
        err = exc if exc is not None else StreamFormatError(msg)
        return err.located(source=self.source, index=self.index)

    def resolve_root(self, what: str) -> str | os.PathLike[str]:
        """The old snapshot's directory (asked of the old-root function once a stream)."""
        if self.root is None:
            if self.head is None:
                raise StreamFormatError(f"{what} before any SNAPSHOT or SUBVOL")
            assert callable(self.old_root)
            self.root = self.old_root(self.head)
        return self.root

    def list_old_dir(self, path: bytes) -> list[bytes] | None:
        """Sorted names in the old snapshot's directory ``path`` (UNLINK references)."""
        return list_old_dir(self.resolve_root("UNLINK reference"), path, self.patcher.dirs)

    def new_head(self, cmd: int, raw: memoryview) -> None:
        """A SUBVOL or SNAPSHOT command: the old root of what follows may change."""
        if callable(self.old_root):
            self.head = decode_payload(cmd, raw, CMD_HEADER_SIZE, len(raw), self.version)
            self.patcher.head = self.head
            self.root = None

    def run(self, items: Iterable[DeltaItem]) -> Generator[tuple[int, Any, Any], None, None]:
        """``(kind, a, b)`` outputs of ``items`` in order, ending with ``(END, DEND, None)``
        (checked by the caller once all output before it is out). The input is read to its
        end first: bytes after DEND are refused (the parser names their offset)."""
        it = iter(items)
        for item in it:
            self.index += 1
            self.patcher.index = self.index
            try:
                if type(item) is DeltaEnd:
                    self.patcher.check_idle("DEND")
                    self.patcher.settle()
                    for _ in it:  # the parser raises on data after DEND; items, here
                        raise StreamFormatError("records after DEND")
                else:
                    yield from self.handle(item)
            except BtrdeltaError as exc:
                exc.located(source=self.source, index=self.index)
                raise
            if type(item) is DeltaEnd:
                yield END, item, None
                return
        raise self.fail("truncated delta stream (no DEND record)")

    def handle(self, item: DeltaItem, inner: bool = False) -> Iterator[tuple[int, Any, Any]]:
        """Output items for one delta item (``inner``: it came out of the carrier)."""
        cls = type(item)
        if cls is BtrfsCommand:
            cmd: BtrfsCommand = item  # type: ignore[assignment]
            if not self.version:
                raise StreamFormatError("btrfs commands before any STREAM record")
            if cmd.cmd <= 2:
                self.new_head(cmd.cmd, cmd.raw)
            yield RAW, 1, cmd.raw
        elif cls is ZCommands and not inner:
            yield from self.carried(item)  # type: ignore[arg-type]
        elif cls is PWrite:
            for rec in self.patcher.pwrite(item):  # type: ignore[arg-type]
                yield WRITE, rec, None
        elif cls is PEncoded:
            pending = self.patcher.pencoded(item, self.index)  # type: ignore[arg-type]
            if pending.packed is None:
                yield CLONED, pending, None
            elif isinstance(pending.packed, bytes):
                yield WRITE, *self.patcher.regenerated(pending)
            else:
                yield PENC, pending, None
        elif cls is PatchData:
            self.patcher.add_pdata(item)  # type: ignore[arg-type]
        elif cls is Patch:
            p: Patch = item  # type: ignore[assignment]
            if self.flush and p.codec != SAME_CODEC and p.new_size >= _FLUSH_MIN:
                yield FLUSH, None, None
            self.patcher.start(p)
            if p.auto_chunk:
                # CPATCH: its one PWRITE (the whole new content from offset 0) is implied
                yield from self.handle(PWrite(0, p.new_size, p.auto_chunk), inner=True)
        elif cls is StreamStart and not inner:
            self.patcher.check_idle("STREAM")
            self.patcher.settle()  # the END before it is held back until this output
            self.version = self.patcher.version = item.version  # type: ignore[union-attr]
            if callable(self.old_root):
                self.root = None
            if self.hash is None and self.hashing:
                self.hash = hasher(HashAlgo.BLAKE3)
            yield HEADER, item.version, None  # type: ignore[union-attr]
        else:
            raise StreamFormatError(f"unexpected {cls.__name__} record")

    def carried(self, z: ZCommands) -> Iterator[tuple[int, Any, Any]]:
        """The records of a ZCMDS piece: consecutive btrfs commands as one group of bytes,
        delta records handled in between."""
        carrier = self.carrier
        unread_clone, start = self.patcher.unread_clone, self.patcher.start
        for sub in carrier.split(carrier.inflate(z), self.version, grouped=True):
            if carrier.count:
                yield RAW, *carrier.take_group()
            if sub is None:  # the group is full (taken above)
                continue
            cls = type(sub)
            if cls is PEncoded:  # an unchanged file's extent, most often: no Pending
                got = unread_clone(sub)  # type: ignore[arg-type]
                if got is not None:
                    yield SIZED, *got
                    continue
            elif cls is Patch and sub.codec == SAME_CODEC and not sub.auto_chunk:  # type: ignore[union-attr]
                start(sub)  # type: ignore[arg-type]  # (handle's case, with nothing to yield)
                continue
            yield from self.handle(sub, inner=True)
        if carrier.count:
            yield RAW, *carrier.take_group()

    def add(self, piece: Any) -> None:
        """Count and hash one piece of the expanded stream (small pieces are hashed in
        batches: one hash call per ~64 KiB instead of one per command)."""
        n = len(piece)
        self.size += n
        if not self.hashing:
            return
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

    def left_out(self, size: int) -> None:
        """A command of ``size`` bytes that is counted but not produced (CLONED, SIZED): the
        digest can no longer be computed, so it is not (:meth:`check_end`)."""
        self.count += 1
        self.size += size
        self.hashing = False
        self.patcher.digest_off = True
        self.pend.clear()

    def check_end(self, end: DeltaEnd) -> None:
        """What went out against the DEND record: count, size, BLAKE3 digest (unless a
        command was left out: :meth:`left_out`)."""
        if self.pend:
            self.hash.update(self.pend)
            self.pend.clear()
        if end.hash_algo != HashAlgo.BLAKE3:
            raise self.fail("DEND uses a digest this build does not check")
        if end.count != self.count or end.size != self.size:
            raise self.fail("", ChecksumError(
                f"expanded stream has {self.count} commands / {self.size} bytes, "
                f"DEND says {end.count} / {end.size}",
                expected=(end.count, end.size), actual=(self.count, self.size),
            ))
        if not self.hashing:
            return
        algo_hash = self.hash if self.hash is not None else hasher(HashAlgo.BLAKE3)
        actual = bytes(algo_hash.digest())
        if actual != end.digest:
            raise self.fail("", ChecksumError(
                "expanded stream digest mismatch", expected=end.digest.hex(), actual=actual.hex()
            ))

    def close(self) -> None:
        """Stop the recompression threads, close the old tree's directory."""
        self.patcher.close()


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


class _Outputs:
    """The outputs of :meth:`_Expander.run` in stream order, each counted and hashed as it
    goes out. Those behind an extent still being recompressed wait in a FIFO: at most
    ``_WINDOW`` bytes (``_WINDOW_ITEMS`` items), then the first one is waited for."""

    def __init__(self, ex: _Expander) -> None:
        self.ex = ex
        self.waiting: deque[tuple[int, Any, Any, int]] = deque()  # (kind, a, b, size)
        self.nbytes = 0

    def push(self, kind: int, a: Any, b: Any) -> Iterator[tuple[int, list[Any], Any]]:
        """The outputs that can go out once ``(kind, a, b)`` came (maybe none)."""
        if kind != PENC and not self.waiting:
            yield self.out(kind, a, b)
            return
        if kind == RAW and type(b) is memoryview:
            b = bytes(b)  # a delta item's bytes: the caller's parser may reuse its buffer
        size = (
            a.penc.disk_len if kind == PENC else len(b) if kind == RAW
            else len(a.data) if kind == WRITE else 0
        )  # (a FLUSH waiting behind an extent: 0)
        waiting = self.waiting
        waiting.append((kind, a, b, size))
        self.nbytes += size
        while waiting and (
            self.nbytes > _WINDOW or len(waiting) > _WINDOW_ITEMS
            or waiting[0][0] != PENC or waiting[0][1].packed.done()
        ):
            kind, a, b, size = waiting.popleft()
            self.nbytes -= size
            yield self.out(kind, a, b)

    def drain(self) -> Iterator[tuple[int, list[Any], Any]]:
        """Every output still waiting (before the last or a failing record)."""
        while self.waiting:
            kind, a, b, size = self.waiting.popleft()
            self.nbytes -= size
            yield self.out(kind, a, b)

    def out(self, kind: int, a: Any, b: Any) -> tuple[int, list[Any], Any]:
        """One output as :func:`expand_items` yields it, counted and hashed."""
        ex = self.ex
        rec: Any = None
        if kind == HEADER:
            pieces: list[Any] = [STREAM_HEADER.pack(MAGIC, a)]
            rec = StreamHeader(a, ex.size)
        elif kind == RAW:
            pieces = [b]
            ex.count += a
        elif kind == SIZED:
            ex.left_out(b)
            return APPLY, [], a
        elif kind == CLONED:
            pending: Pending = a
            ex.left_out(ex.patcher.cloned_size(pending))
            return APPLY, [], pending.clone
        elif kind == FLUSH:
            return FLUSH, [], None
        else:
            pending = a
            rec, pieces = ex.patcher.regenerated(pending) if kind == PENC else (a, b)
            kind = WRITE
            ex.count += 1
        for piece in pieces:
            ex.add(piece)
        return kind, pieces, rec


class _Sized:
    """A piece of the expanded stream that is counted, not made: its length only (nothing
    hashes it, nobody reads its bytes)."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def _write_size(rec: R.Write, version: int) -> list[Any]:
    """:func:`_encode_write`'s pieces as one piece of their size (where they could be
    made; else made, with their checks and errors)."""
    path, n = rec.path, len(rec.data)
    if len(path) > 0xFFFF or (version < 2 and n > 0xFFFF):
        return _encode_write(rec, version)
    # PATH and FILE_OFFSET TLVs, DATA's header (v1: type and length; v2+: type), the data
    length = _PATH_TLV.size + len(path) + _OFFSET_TLV.size + (
        _PATH_TLV.size if version < 2 else _U16.size) + n
    if length > MAX_PAYLOAD[version]:
        return _encode_write(rec, version)
    return [_Sized(CMD_HEADER_SIZE + length)]


def _next_output(ex: _Expander, run: Iterator[tuple[int, Any, Any]]) -> tuple[int, Any, Any]:
    kind, a, b = next(run)
    if kind == WRITE and b is None:
        try:  # now: the stream version may change before it goes out
            b = _write_size(a, ex.version) if ex.records_only and not ex.hashing \
                else _encode_write(a, ex.version)
        except BtrdeltaError as exc:
            raise ex.fail("", exc) from None
    return kind, a, b


def expand_items(
    items: Iterable[DeltaItem],
    old_root: OldRoot,
    *,
    max_file_size: int = DEFAULT_MAX_FILE_SIZE,
    source: str | None = None,
    clone_same: bool = False,
    hash_clones: bool = True,
    check_digest: bool = True,
    flush: bool = False,
    records_only: bool = False,
) -> Generator[
    tuple[int, list[Any], R.Record | StreamHeader | tuple[R.Record, ...] | None], None, None
]:
    """Expand delta items to ``(kind, pieces, record)`` with the bytes of each output item.

    An output item is a stream header, a group of consecutive carried btrfs commands or
    one regenerated WRITE / ENCODED_WRITE. ``pieces`` are its exact bytes in the btrfs
    stream; ``record`` is the decoded header or WRITE, ``None`` for a group of carried
    commands (the caller decodes those if it needs them). The final DEND check runs before
    the generator ends. With ``clone_same`` and not ``hash_clones``, the ENCODED_WRITE of an
    extent left to its CLONE comes as ``(APPLY, [], what receive applies instead)``: no
    pieces, the CLONE (or the WRITE, or a tuple of them) as its record.

    Strategy: compressed extents (PENC) are recompressed in worker threads while the
    delta items after them are parsed. Outputs come out strictly in stream order
    (:class:`_Outputs`). An error of a later record is raised only after the outputs before
    it (and their own errors). Closing the generator stops the threads.

    ``check_digest=False``: the expanded stream is not hashed, DEND's digest is not checked
    (its count and size are), for a caller that checked the delta stream's bytes and checks
    what it makes of them (``update``: the artifact's BLAKE3 from the signed index, the
    received tree's content identity).

    ``flush``: a ``(FLUSH, [], None)`` output comes before a patch of :data:`_FLUSH_MIN`
    bytes or more of new content is applied (a consumer that gathers outputs, as
    ``receive`` does, hands on what it holds rather than keep it while the patch runs).

    ``records_only``: the caller takes a regenerated WRITE's record, not its pieces; when
    the expanded stream is not hashed (``check_digest=False``, or a CLONE left an extent
    out) a WRITE's pieces are then one object of their length (counted for DEND, not
    made: no copy of the header and attributes, no CRC over the data).
    """
    ex = _Expander(old_root, max_file_size, source, clone_same, hash_clones, check_digest,
                   flush, records_only)
    outputs = _Outputs(ex)
    run = ex.run(items)
    try:
        while True:
            try:
                kind, a, b = _next_output(ex, run)
            except Exception:
                yield from outputs.drain()  # the outputs before the failing record first
                raise
            if kind == END:
                yield from outputs.drain()
                ex.check_end(a)
                return
            if kind != PENC and not outputs.waiting:  # (push's first case: no generator)
                yield outputs.out(kind, a, b)
            else:
                yield from outputs.push(kind, a, b)
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
