"""``delta make``: turn a btrfs send stream into a delta stream against an old snapshot.

Strategy: the input is read command by command, keeping each command's raw bytes. Names
are followed with :class:`~btrdelta.tree.pathmap.PathMap`. The data records of one file
(consecutive WRITE / CLONE / ENCODED_WRITE / FALLOCATE / UPDATE_EXTENT on one path) form a
*group*, the only thing ever buffered (capped by ``max_file_size``). If the old snapshot has
a regular file at the group's base path, a worker thread diffs the old file against the
concatenated WRITE data of the group (the codec libraries release the GIL, so ``jobs``
threads use ``jobs`` cores) and the group becomes ``PATCH``/``PDATA`` + ``PWRITE`` records,
while its other records stay as they were; if the patch is not smaller than the data it
replaces, the group stays as it was. Every other command goes into the stream-wide zstd
carrier. Output order is input order: results are written as soon as every earlier group is
done, and the reader waits when too many groups or bytes are in flight.

ENCODED_WRITE payloads are never patched (recompressing them is not provably bit-exact);
they are carried as they are, like every command that is not a WRITE of a patched group.
A WRITE is only replaced when our encoder reproduces its bytes exactly, so expansion is
byte-identical by construction.
"""

from __future__ import annotations

import os
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from ..errors import BtrdeltaError, ChecksumError, StreamFormatError
from ..stream import records as R
from ..stream.codec import command_crc, decode_payload, decode_stream_header, encode_record
from ..stream.constants import CMD_HEADER, CMD_HEADER_SIZE, MAX_PAYLOAD, STREAM_HEADER_SIZE, Cmd
from ..tree.pathmap import PathMap
from .codecs import AUTO, Codec, get_codec, make_best
from .format import (
    PDATA_CHUNK,
    BtrfsCommand,
    DeltaEnd,
    DeltaItem,
    HashAlgo,
    Patch,
    PatchData,
    PWrite,
    StreamStart,
)
from .oldfiles import digest, hasher, old_file_size, read_old_file
from .writer import DEFAULT_LEVEL, DeltaWriter

__all__ = ["MakeOptions", "MakeStats", "make_delta"]

_DATA_RECORDS = (R.Write, R.Clone, R.EncodedWrite, R.Fallocate, R.UpdateExtent)
_NAME_RECORDS = (
    R.Rename, R.Link, R.Unlink, R.Rmdir, R.Mkfile, R.Mkdir, R.Mknod, R.Mkfifo, R.Mksock,
    R.Symlink, R.Snapshot, R.Subvol,
)
_CMD_NAMES = {int(c): c.name for c in Cmd}


@dataclass
class MakeOptions:
    """Knobs of :func:`make_delta`.

    Attributes:
        codec: a codec name, or ``auto`` (smallest of :data:`~.codecs.AUTO` per file).
        max_file_size: files (old or new data) larger than this are not diffed.
        min_file_size: groups with less WRITE data than this are not diffed.
        jobs: diff worker threads.
        level: zstd level of carried commands (0: uncompressed passthrough).
        hash_algo: digest for old file, new content and the whole stream.
    """

    codec: str = "auto"
    max_file_size: int = 256 << 20
    min_file_size: int = 64
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)
    level: int = DEFAULT_LEVEL
    hash_algo: int = HashAlgo.BLAKE3


@dataclass
class MakeStats:
    """What :func:`make_delta` did."""

    input_bytes: int = 0
    output_bytes: int = 0
    commands: int = 0
    groups: int = 0
    candidates: int = 0
    patched_files: int = 0
    #: WRITE bytes replaced by patches, and the patches' size, by codec name
    replaced_bytes: Counter[str] = field(default_factory=Counter)
    patch_bytes: Counter[str] = field(default_factory=Counter)
    files_by_codec: Counter[str] = field(default_factory=Counter)

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "commands": self.commands,
            "candidates": self.candidates,
            "patched_files": self.patched_files,
            "codecs": {
                name: {
                    "files": self.files_by_codec[name],
                    "replaced_bytes": self.replaced_bytes[name],
                    "patch_bytes": self.patch_bytes[name],
                }
                for name in sorted(self.files_by_codec)
            },
        }


# --- reading raw commands ---------------------------------------------------------------


class _Raw:
    __slots__ = ("cmd", "raw", "rec")

    def __init__(self, cmd: int, raw: bytearray, rec: R.Record) -> None:
        self.cmd = cmd
        self.raw = raw
        self.rec = rec


class _RawReader:
    """Commands of a btrfs stream with their raw bytes, CRC-checked and decoded."""

    def __init__(self, f: BinaryIO, source: str | None, algo: int) -> None:
        self.f = f
        self.source = source
        self.offset = 0
        self.index = 0
        self.version = 0
        self.hash = hasher(algo)
        self.streams = 0

    def _read(self, n: int) -> bytes:
        data = self.f.read(n)
        if data is None:  # pragma: no cover - non-blocking files are not supported
            data = b""
        while len(data) < n:
            more = self.f.read(n - len(data))
            if not more:
                break
            data += more
        return data

    def _error(self, msg: str, cmd: int | None = None, exc: BtrdeltaError | None = None) -> None:
        err = exc if exc is not None else StreamFormatError(msg)
        err.located(
            source=self.source, offset=self.offset, index=self.index,
            command=_CMD_NAMES.get(cmd) if cmd is not None else None,
        )
        raise err

    def header(self) -> int | None:
        """Read a stream header; ``None`` at a clean end of input."""
        data = self._read(STREAM_HEADER_SIZE)
        if not data and self.streams:
            return None
        if len(data) < STREAM_HEADER_SIZE:
            self._error("empty stream" if not data else "truncated stream header")
        try:
            self.version = decode_stream_header(data)
        except BtrdeltaError as exc:
            self._error("", exc=exc)
        self.hash.update(data)
        self.offset += STREAM_HEADER_SIZE
        self.streams += 1
        return self.version

    def command(self) -> _Raw:
        head = self._read(CMD_HEADER_SIZE)
        if len(head) < CMD_HEADER_SIZE:
            self._error("unexpected EOF in stream (no END command)")
        length, cmd, crc = CMD_HEADER.unpack(head)
        if length > MAX_PAYLOAD[self.version]:
            self._error(f"command length {length} exceeds the v{self.version} limit", cmd)
        buf = bytearray(CMD_HEADER_SIZE + length)
        buf[:CMD_HEADER_SIZE] = head
        view = memoryview(buf)
        got = CMD_HEADER_SIZE
        while got < len(buf):
            n = self.f.readinto(view[got:])  # type: ignore[attr-defined]
            if not n:
                self._error(f"truncated command: {len(buf)} bytes announced", cmd)
            got += n
        actual = command_crc(length, cmd, view[CMD_HEADER_SIZE:])
        if actual != crc:
            self._error("", cmd, ChecksumError(
                f"CRC32C mismatch (stored {crc:#010x}, computed {actual:#010x})",
                expected=crc, actual=actual,
            ))
        try:
            rec = decode_payload(cmd, view, CMD_HEADER_SIZE, len(buf), self.version)
        except BtrdeltaError as exc:
            self._error("", cmd, exc)
        self.hash.update(buf)
        self.offset += len(buf)
        self.index += 1
        return _Raw(cmd, buf, rec)


# --- groups -----------------------------------------------------------------------------


class _Group:
    __slots__ = ("base", "buffering", "path", "records", "version", "write_bytes", "writes")

    def __init__(self, path: bytes, base: bytes, version: int, buffering: bool) -> None:
        self.path = path
        self.base = base
        self.version = version
        self.buffering = buffering
        self.records: list[_Raw] = []
        self.write_bytes = 0
        self.writes = 0


def _canonical_write(r: _Raw, version: int) -> bool:
    """Whether our encoder gives back exactly the raw bytes of this WRITE."""
    rec = r.rec
    if not len(rec.data):  # type: ignore[union-attr]
        return False
    try:
        pieces = encode_record(rec, version)
    except BtrdeltaError:
        return False
    head = pieces[0] + pieces[1]
    return r.raw.startswith(head) and len(r.raw) == len(head) + (
        len(pieces[2]) if len(pieces) > 2 else 0
    )


@dataclass
class _Result:
    codec: Codec
    patch: bytes
    old_size: int
    old_digest: bytes
    new_digest: bytes


def _diff(
    old_root: str | os.PathLike[str], group: _Group, opts: MakeOptions
) -> _Result | None:
    """Worker: diff the old file against the group's WRITE data (runs in a thread)."""
    new = b"".join(
        r.rec.data for r in group.records if type(r.rec) is R.Write
    )
    try:
        old = read_old_file(old_root, group.base, max_size=opts.max_file_size)
    except BtrdeltaError:
        return None
    if not old:
        return None
    if opts.codec == "auto":
        codec, patch = make_best(old, new, AUTO)
    else:
        codec = get_codec(opts.codec)
        patch = codec.make(old, new)
    if len(patch) >= len(new):
        return None
    if codec.apply(old, patch, new_size=len(new)) != new:  # pragma: no cover - codec bug
        return None
    return _Result(
        codec, patch, len(old), digest(opts.hash_algo, old), digest(opts.hash_algo, new)
    )


def _runs(group: _Group, items: list[DeltaItem]) -> None:
    """The group's records with WRITE runs as PWRITE records."""
    run: list[int] | None = None  # offset, length, chunk, last length

    def close() -> None:
        nonlocal run
        if run is not None:
            items.append(PWrite(run[0], run[1], run[2]))
            run = None

    for r in group.records:
        rec = r.rec
        if type(rec) is R.Write:
            n = len(rec.data)
            if (
                run is not None
                and run[0] + run[1] == rec.offset
                and run[3] == run[2]
                and n <= run[2]
            ):
                run[1] += n
                run[3] = n
            else:
                close()
                run = [rec.offset, n, n, n]
        else:
            close()
            items.append(BtrfsCommand(r.cmd, memoryview(r.raw)))
    close()


def _patched_items(group: _Group, res: _Result, opts: MakeOptions) -> list[DeltaItem]:
    items: list[DeltaItem] = [
        Patch(
            group.path, group.base, res.codec.codec_id, opts.hash_algo, res.old_size,
            res.old_digest, group.write_bytes, res.new_digest, len(res.patch),
        )
    ]
    view = memoryview(res.patch)
    items.extend(PatchData(view[i : i + PDATA_CHUNK]) for i in range(0, len(view), PDATA_CHUNK))
    _runs(group, items)
    return items


# --- the driver -------------------------------------------------------------------------


class _Slot:
    __slots__ = ("future", "group", "items", "size")

    def __init__(self) -> None:
        self.items: list[DeltaItem] = []
        self.future: Future[_Result | None] | None = None
        self.group: _Group | None = None
        self.size = 0


def make_delta(
    src: BinaryIO,
    old_root: str | os.PathLike[str],
    write: Callable[[Any], object],
    options: MakeOptions | None = None,
    *,
    source: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> MakeStats:
    """Read a btrfs send stream from ``src`` and write its delta stream to ``write``.

    Args:
        src: a buffered binary file (``read``/``readinto``) with the btrfs stream(s).
        old_root: directory of the old snapshot (the stream's parent).
        write: receives the delta stream's bytes.
        options: codec, limits, threads.
        source: input name for error messages.
        on_progress: called with (input bytes, output bytes) now and then.

    Raises:
        StreamFormatError: the input is not a valid send stream.
        CodecUnavailableError: the requested codec is not installed.
    """
    opts = options or MakeOptions()
    if opts.codec != "auto":
        get_codec(opts.codec)
    stats = MakeStats()
    reader = _RawReader(src, source, HashAlgo.BLAKE3)
    out = DeltaWriter(write, level=opts.level)
    pathmap = PathMap()
    queue: deque[_Slot] = deque()
    in_flight = 0
    queued = 0
    max_flight = max(1, opts.jobs) * 2
    max_queued = max(64 << 20, 2 * opts.max_file_size)
    pool = ThreadPoolExecutor(max_workers=max(1, opts.jobs), thread_name_prefix="btrdelta-diff")

    def emit_slot(slot: _Slot) -> None:
        nonlocal in_flight
        if slot.future is not None:
            group = slot.group
            assert group is not None
            res = slot.future.result()
            in_flight -= 1
            if res is None:
                for r in group.records:
                    out.command(r.raw)
            else:
                name = res.codec.name
                stats.patched_files += 1
                stats.files_by_codec[name] += 1
                stats.replaced_bytes[name] += group.write_bytes
                stats.patch_bytes[name] += len(res.patch)
                for item in _patched_items(group, res, opts):
                    out.item(item)
        for item in slot.items:
            out.item(item)

    def drain(block: bool) -> None:
        nonlocal queued
        while queue:
            slot = queue[0]
            if slot.future is not None and not slot.future.done() and not block:
                return
            queue.popleft()
            queued -= slot.size
            emit_slot(slot)
            block = block and (in_flight >= max_flight or queued > max_queued)
        if on_progress is not None:
            on_progress(reader.offset, out.bytes_written)

    def put(item: DeltaItem, size: int = 0) -> None:
        nonlocal queued
        if not queue:
            out.item(item)
            return
        tail = queue[-1]
        tail.items.append(item)
        tail.size += size
        queued += size

    def put_raw(r: _Raw) -> None:
        put(BtrfsCommand(r.cmd, memoryview(r.raw)), len(r.raw))

    def close_group(group: _Group | None) -> None:
        nonlocal in_flight, queued
        if group is None or not group.buffering:
            return
        if group.writes == 0 or group.write_bytes < opts.min_file_size:
            for r in group.records:
                put_raw(r)
            return
        slot = _Slot()
        slot.group = group
        slot.size = group.write_bytes
        slot.future = pool.submit(_diff, old_root, group, opts)
        queue.append(slot)
        queued += slot.size
        in_flight += 1
        tail = _Slot()  # records after the group
        queue.append(tail)
        if in_flight >= max_flight or queued > max_queued:
            drain(block=True)
        else:
            drain(block=False)

    def spill(group: _Group) -> None:
        for r in group.records:
            put_raw(r)
        group.records = []
        group.buffering = False

    group: _Group | None = None
    try:
        while True:
            version = reader.header()
            if version is None:
                break
            close_group(group)
            group = None
            put(StreamStart(version))
            while True:
                r = reader.command()
                rec = r.rec
                cls = type(rec)
                if cls in _DATA_RECORDS:
                    path: bytes = rec.path  # type: ignore[union-attr]
                    if group is None or group.path != path:
                        close_group(group)
                        base = pathmap.base(path)
                        stats.groups += 1
                        size = old_file_size(old_root, base) if base else None
                        ok = size is not None and 0 < size <= opts.max_file_size
                        stats.candidates += ok
                        group = _Group(path, base, reader.version, ok)
                    if not group.buffering:
                        put_raw(r)
                    else:
                        if cls is R.Write:
                            n = len(rec.data)  # type: ignore[union-attr]
                            if group.write_bytes + n > opts.max_file_size or not _canonical_write(
                                r, reader.version
                            ):
                                spill(group)
                                put_raw(r)
                                continue
                            group.write_bytes += n
                            group.writes += 1
                        group.records.append(r)
                    continue
                close_group(group)
                group = None
                if cls in _NAME_RECORDS:
                    pathmap.feed(rec)
                put_raw(r)
                if cls is R.End:
                    break
        close_group(group)
        drain(block=True)
        while queue:
            drain(block=True)
        stats.commands = reader.index
        stats.input_bytes = reader.offset
        out.item(
            DeltaEnd(reader.index, reader.offset, HashAlgo.BLAKE3, bytes(reader.hash.digest()))
        )
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    stats.output_bytes = out.bytes_written
    if on_progress is not None:
        on_progress(reader.offset, out.bytes_written)
    return stats
