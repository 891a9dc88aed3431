"""Cutting a release stream into the repository's chunk packs, and reading it back.

:func:`pack_stream` cuts a plain send stream with the repository's FastCDC parameters,
looks every chunk up in the chunk map (chunks stored by earlier releases are not stored
again), compresses the new ones with zstd on a thread pool, appends them to new pack files
at the end of the pack space, and returns the full index (``repo/fullindex.py``) that
rebuilds the stream. :func:`open_full` reads a full back from the local packs, each chunk
checked against its id, the whole against the stream digest.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from array import array
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import blake3
import zstandard

from .._futures import ThreadPoolExecutor
from ..chunk.archive import (
    ArchiveHeader,
    decode_chunk,
    encode_header,
    encode_index,
    with_index_digest,
)
from ..chunk.chunker import ChunkerParams, chunk_digest, hash_chunks, open_map
from ..chunk.compress import thread_compressor
from ..errors import ChecksumError, StreamFormatError
from ..fs.atomic import atomic_output, fsync_dir
from ..repo.catalog import CHUNK_RECORD, PackEntry
from ..repo.fullindex import FullIndex, PackSlot, encode_pack_table
from .streams import ChunkConcat

__all__ = [
    "PACK_LIMIT",
    "LocalPacks",
    "PackReader",
    "PackResult",
    "open_full",
    "pack_stream",
    "publish_file",
]

#: a pack file is closed when it reaches this size (mirrors and object stores prefer
#: files of bounded size)
PACK_LIMIT = 256 << 20


@dataclass(slots=True)
class PackResult:
    """What :func:`pack_stream` made."""

    full_index: bytes
    new_packs: list[PackEntry] = field(default_factory=list)
    #: chunk map records of the new chunks
    new_records: bytes = b""
    chunks: int = 0
    new_chunks: int = 0
    new_bytes: int = 0
    stream_size: int = 0
    chunk_bytes: int = 0


class _PackWriter:
    """Appends compressed chunks to pack files in ``packs_dir`` from pack-space ``base``."""

    def __init__(self, packs_dir: Path, tmp_dir: Path, base: int, limit: int) -> None:
        self.packs_dir, self.tmp_dir, self.limit = packs_dir, tmp_dir, limit
        self.base = base
        self.done: list[PackEntry] = []
        self._fd = -1
        self._tmp = ""
        self._len = 0
        self._hash = blake3.blake3()

    def append(self, blob: bytes) -> int:
        """Store one frame; returns its pack-space offset."""
        if self._fd < 0:
            # 0644 less the umask, as every other file of the repository: a web server
            # runs as another user (mkstemp's 0600 made nginx answer 403 for every pack)
            self._tmp = os.fspath(self.tmp_dir / f"pack-{secrets.token_hex(8)}")
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                               0o644)
        offset = self.base + self._len
        view = memoryview(blob)
        while view:
            view = view[os.write(self._fd, view):]
        self._hash.update(blob)
        self._len += len(blob)
        if self._len >= self.limit:
            self.close()
        return offset

    def close(self) -> None:
        """Finish the open pack: fsync, rename to ``<blake3>.pack``."""
        if self._fd < 0:
            return
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        pid = self._hash.hexdigest()
        self.packs_dir.mkdir(exist_ok=True)
        os.replace(self._tmp, self.packs_dir / f"{pid}.pack")
        fsync_dir(str(self.packs_dir))  # (the catalog that names the pack is written after it)
        self.done.append(PackEntry(pid, self.base, self._len))
        self.base += self._len
        self._len = 0
        self._hash = blake3.blake3()

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            os.unlink(self._tmp)
            self._fd = -1


def pack_stream(
    stream: Path, repo: Path, tmp_dir: Path, *, params: ChunkerParams, level: int,
    chunk_map: dict[bytes, tuple[int, int, int]], packs: list[PackEntry],
    threads: int | None = None, limit: int = PACK_LIMIT,
) -> PackResult:
    """Store the chunks of ``stream`` that ``chunk_map`` lacks; returns the full index.

    ``chunk_map`` is updated with the new chunks; ``packs`` is the catalog's pack space
    (the new packs start at its end).
    """
    workers = threads or os.cpu_count() or 1
    compress = thread_compressor(level)
    end = packs[-1].base + packs[-1].length if packs else 160
    writer = _PackWriter(repo / "packs", tmp_dir, end, limit)
    res = PackResult(b"")
    entries: dict[bytes, int] = {}
    digests: list[bytes] = []
    offsets, comp, raw, order = array("Q"), array("I"), array("I"), array("I")
    pending: deque[tuple[int, bytes, int, Future[bytes]]] = deque()
    records: list[bytes] = []

    def drain(keep: int) -> None:
        while len(pending) > keep:
            entry, digest, size, fut = pending.popleft()
            blob = fut.result()
            offset = writer.append(blob)
            offsets[entry], comp[entry] = offset, len(blob)
            chunk_map[digest] = (offset, len(blob), size)
            records.append(CHUNK_RECORD.pack(digest, offset, len(blob), size))
            res.new_chunks += 1
            res.new_bytes += len(blob)

    try:
        with open_map(stream) as fm, \
                ThreadPoolExecutor(workers, thread_name_prefix="zstd") as pool, \
                ThreadPoolExecutor(2, thread_name_prefix="blake3") as hashers:
            view = fm.view
            whole = hashers.submit(fm.digest)  # (read beside the map, not through it)
            for batch in hash_chunks(view, params, pool=hashers):
                for data, digest in zip(batch.views, batch.digests, strict=True):
                    entry = entries.get(digest)
                    if entry is None:
                        entry = entries[digest] = len(digests)
                        digests.append(digest)
                        raw.append(len(data))
                        known = chunk_map.get(digest)
                        if known is not None:
                            offsets.append(known[0])
                            comp.append(known[1])
                        else:
                            offsets.append(0)
                            comp.append(0)
                            pending.append((entry, digest, len(data),
                                            pool.submit(compress, data)))
                            drain(4 * workers)
                    order.append(entry)
                    res.chunks += 1
                # before this batch: out of the resident set, as image compress does (a 1.2 GB
                # Debian root's full: 1.17 GB RSS; a chunk still compressing maps again)
                fm.drop(batch.offsets[0])
                del batch
            drain(0)
            writer.close()
            res.stream_size = len(view)
            stream_digest = whole.result()
    except BaseException:
        writer.abort()
        raise
    res.new_packs = writer.done
    res.new_records = b"".join(records)
    res.chunk_bytes = sum(comp)
    res.full_index = _full_index(params, res.stream_size, stream_digest, digests, offsets,
                                 comp, raw, order, packs + writer.done)
    return res


def _full_index(params: ChunkerParams, size: int, digest: bytes, digests: list[bytes],
                offsets: array[int], comp: array[int], raw: array[int], order: array[int],
                space: list[PackEntry]) -> bytes:
    """Description over the pack space + the table of the packs it uses."""
    index = encode_index(digests, offsets, comp, raw, order)
    end = space[-1].base + space[-1].length if space else 160
    header = with_index_digest(ArchiveHeader(
        params=params, image_size=size, chunk_count=len(digests), order_count=len(order),
        index_offset=end, image_digest=digest), index)
    return encode_header(header) + index + encode_pack_table(_used_packs(space, offsets))


def _used_packs(space: list[PackEntry], offsets: array[int]) -> list[PackSlot]:
    import bisect

    bases = [p.base for p in space]
    used: set[int] = set()
    for off in offsets:
        used.add(bisect.bisect_right(bases, off) - 1)
    return [PackSlot(bytes.fromhex(space[i].id), space[i].base, space[i].length)
            for i in sorted(used)]


def open_full(full: FullIndex, packs: PackReader, *, source: str) -> ChunkConcat:
    """The stream of ``full``, each chunk read with ``packs.read(slot, start, end)``
    (offsets inside the pack), decompressed with a size bound and checked against its id.
    Closing the stream closes ``packs``."""
    index = full.index
    dctx = zstandard.ZstdDecompressor()

    def get(pos: int) -> bytes:
        entry = index.order[pos]
        off, size, rawsize = index.offsets[entry], index.comp_sizes[entry], index.raw_sizes[entry]
        slot = full.pack_at(off)
        blob = packs.read(slot, off - slot.base, off - slot.base + size)
        data = decode_chunk(dctx, blob, rawsize, entry, source=slot.path,
                            offset=off - slot.base)
        if chunk_digest(data) != index.digests[entry]:
            raise ChecksumError(f"chunk {entry} does not match its id; not used",
                                source=slot.path, offset=off - slot.base, index=entry)
        return data

    return ChunkConcat(len(index.order), get, full.header.image_digest, source=source,
                       on_close=packs.close)


class PackReader(Protocol):
    """Where :func:`open_full` reads chunk frames from."""

    def read(self, slot: PackSlot, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of pack ``slot``."""
        ...

    def close(self) -> None:
        """Release what reading held."""
        ...


class LocalPacks:
    """Packs of a repository directory: one descriptor per pack read, kept until
    :meth:`close` (the stream :func:`open_full` returns closes it)."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self._fds: dict[bytes, int] = {}

    def read(self, slot: PackSlot, start: int, end: int) -> bytes:
        fd = self._fds.get(slot.pack_id)
        if fd is None:
            fd = self._fds[slot.pack_id] = os.open(self.repo / slot.path,
                                                   os.O_RDONLY | os.O_CLOEXEC)
        data = os.pread(fd, end - start, start)
        if len(data) != end - start:
            raise StreamFormatError("pack truncated", source=slot.path, offset=start + len(data))
        return data

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


def publish_file(path: Path, directory: Path, ext: str) -> tuple[str, int]:
    """Move the finished file ``path`` to ``directory/<its BLAKE3>.ext``, durably, 0644 less
    the umask as every other file of the repository (a web server runs as another user: a
    job run elsewhere under a umask of 077 made its output 0600, and nginx answered 403);
    returns (hex BLAKE3, length). Read in blocks and renamed, never held whole: a delta of
    new incompressible files is as large as they are (a 55 MiB delta took 55 MiB of ``repo
    add``'s memory, then as much again for its copy). Copied where it cannot be renamed
    (another file system) or its mode set (another user's file). The file renamed must be
    the one hashed, else nothing is published (:class:`ChecksumError`)."""
    h = blake3.blake3()
    size = 0
    directory.mkdir(exist_ok=True)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
        target = directory / f"{h.hexdigest()}.{ext}"
        try:
            os.fchmod(f.fileno(), 0o644 & ~_umask())
            os.fsync(f.fileno())  # (a job's output may come from another machine's run-job)
            os.replace(path, target)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM):
                raise
            f.seek(0)
            with atomic_output(target) as dst:
                shutil.copyfileobj(f, dst, 1 << 20)
            path.unlink()
        else:
            hashed, now = os.fstat(f.fileno()), os.lstat(target)
            if (now.st_dev, now.st_ino) != (hashed.st_dev, hashed.st_ino):
                target.unlink()  # (a job's second run renamed its output over the first)
                raise ChecksumError("replaced while it was published (a second run of its "
                                    "job?): run repo add again", source=str(path))
    fsync_dir(str(directory))
    return h.hexdigest(), size


def _umask() -> int:
    """This process's umask (read, not set: ``os.umask`` would change it for a moment)."""
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"Umask:"):
                return int(line.split()[1], 8)
    return 0o022  # (a kernel before 4.7 does not say)
