"""The local chunk store: verified chunks by id, image descriptions, random-access reads.

Layout (``docs/formats/chunk-store.md``)::

    STORE/chunks/<first 2 hex digits>/<64 hex digits>   one uncompressed chunk per file
    STORE/<NAME>                                        description: header || index || sig

Invariant: a file under ``chunks/`` always holds bytes whose BLAKE3 is its name. Chunks are
written under a temporary name in the same directory and renamed into place only after the
hash was checked, so an interrupted writer leaves at most a ``.tmp-*`` file that
:meth:`ChunkStore.gc` removes.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import blake3

from ..errors import ChecksumError, MissingBaseError, StreamFormatError, UnsafePathError
from ..trust import PublicKey
from .archive import ArchiveHeader, ArchiveIndex, decode_description
from .chunker import DIGEST_SIZE, chunk_digest

__all__ = ["ChunkStore", "GcReport", "ImageReader", "VerifyReport", "split_store_name"]

_TMP = ".tmp-"


def split_store_name(target: str) -> tuple[str, str]:
    """``"STORE/NAME"`` -> ``("STORE", "NAME")``, refusing names that leave the store."""
    store, name = os.path.split(os.path.normpath(target))
    if not name or name in (".", "..", "chunks") or name.startswith(".") or "\0" in name:
        raise UnsafePathError(f"bad image name {name!r} (want STORE/NAME)", path=target)
    return store or ".", name


@dataclass(frozen=True, slots=True)
class GcReport:
    """What :meth:`ChunkStore.gc` removed."""

    removed: int
    removed_bytes: int
    kept: int


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What :meth:`ChunkStore.verify` found (``missing`` and ``bad`` are chunk ids)."""

    chunks: int
    missing: list[bytes]
    bad: list[bytes]

    @property
    def ok(self) -> bool:
        """No chunk is missing or damaged."""
        return not self.missing and not self.bad


class ChunkStore:
    """A directory of verified chunks and image descriptions.

    Args:
        root: the store directory (created on first write); kept as an absolute path, so a
            process that changes directory (libfuse 3 does) still finds its chunks.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.chunks_dir = os.path.join(self.root, "chunks")

    # -- chunks ----------------------------------------------------------------------------
    def chunk_path(self, digest: bytes) -> str:
        """Path of the file holding chunk ``digest``."""
        hexd = digest.hex()
        return os.path.join(self.chunks_dir, hexd[:2], hexd)

    def has(self, digest: bytes) -> bool:
        """The chunk is in the store."""
        return os.path.exists(self.chunk_path(digest))

    def put(self, digest: bytes, data: bytes | bytearray | memoryview) -> bool:
        """Store ``data`` as chunk ``digest`` after checking its hash.

        Returns:
            ``True`` if written, ``False`` if the store already had it.

        Raises:
            ChecksumError: ``data`` does not hash to ``digest`` (nothing is written).
        """
        actual = chunk_digest(data)
        if actual != digest:
            raise ChecksumError(
                f"chunk {digest.hex()[:16]}… does not match its id",
                expected=digest.hex(), actual=actual.hex(),
            )
        path = self.chunk_path(digest)
        if os.path.exists(path):
            return False
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f"{_TMP}{os.getpid()}-{threading.get_ident()}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return True

    def iter_chunks(self) -> Iterator[tuple[bytes, str]]:
        """Every stored chunk id with its path (temporary files excluded)."""
        try:
            subdirs = sorted(os.listdir(self.chunks_dir))
        except FileNotFoundError:
            return
        for sub in subdirs:
            directory = os.path.join(self.chunks_dir, sub)
            for name in sorted(os.listdir(directory)):
                if len(name) == 2 * DIGEST_SIZE and name.startswith(sub):
                    try:
                        yield bytes.fromhex(name), os.path.join(directory, name)
                    except ValueError:
                        continue

    # -- descriptions ----------------------------------------------------------------------
    def description_path(self, name: str) -> str:
        """Path of description ``name``."""
        _, name = split_store_name(os.path.join(self.root, name))
        return os.path.join(self.root, name)

    def write_description(self, name: str, blob: bytes) -> None:
        """Atomically write description ``name``."""
        path = self.description_path(name)
        os.makedirs(self.root, exist_ok=True)
        tmp = os.path.join(self.root, f"{_TMP}{name}-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)

    def read_description(
        self, name: str, *, public_key: PublicKey | None = None
    ) -> tuple[ArchiveHeader, ArchiveIndex]:
        """Read and check description ``name`` (signature too when a key is given)."""
        path = self.description_path(name)
        try:
            with open(path, "rb") as f:
                blob = f.read(256 << 20)
        except FileNotFoundError:
            raise MissingBaseError("no such image in the store", path=path) from None
        return decode_description(blob, source=path, public_key=public_key)

    def descriptions(self) -> list[str]:
        """Names of the descriptions in the store."""
        try:
            entries = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        names = []
        for name in entries:
            path = os.path.join(self.root, name)
            if name == "chunks" or name.startswith(".") or not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                if f.read(8) == b"BDCHUNK\n":
                    names.append(name)
        return names

    # -- maintenance -----------------------------------------------------------------------
    def verify(
        self, name: str, *, on_progress: Callable[[int, int], None] | None = None
    ) -> VerifyReport:
        """Check that every chunk ``name`` needs is present and hashes to its id."""
        _, index = self.read_description(name)
        missing, bad = [], []
        total = len(index.digests)
        for i, digest in enumerate(index.digests):
            path = self.chunk_path(digest)
            try:
                with open(path, "rb") as f:
                    actual = blake3.blake3(f.read()).digest()
            except FileNotFoundError:
                missing.append(digest)
                continue
            if actual != digest:
                bad.append(digest)
            if on_progress is not None:
                on_progress(i + 1, total)
        return VerifyReport(total, missing, bad)

    def gc(self, *, dry_run: bool = False) -> GcReport:
        """Remove chunks no description uses, and leftover temporary files."""
        used: set[bytes] = set()
        for name in self.descriptions():
            try:
                used.update(self.read_description(name)[1].digests)
            except StreamFormatError as exc:
                raise exc.located(path=self.description_path(name)) from None
        removed = removed_bytes = kept = 0
        for digest, path in self.iter_chunks():
            if digest in used:
                kept += 1
                continue
            removed += 1
            removed_bytes += os.path.getsize(path)
            if not dry_run:
                os.unlink(path)
        for directory in (self.root, *self._chunk_subdirs()):
            with contextlib.suppress(FileNotFoundError):
                for entry in os.listdir(directory):
                    if entry.startswith(_TMP) and not dry_run:
                        os.unlink(os.path.join(directory, entry))
        return GcReport(removed, removed_bytes, kept)

    def _chunk_subdirs(self) -> list[str]:
        try:
            return [os.path.join(self.chunks_dir, d) for d in os.listdir(self.chunks_dir)]
        except FileNotFoundError:
            return []


@dataclass(slots=True)
class _OpenChunk:
    """A cached chunk descriptor: readers using it, and whether the LRU dropped it."""

    fd: int
    users: int = 1
    evicted: bool = False


class ImageReader:
    """Random-access, thread-safe reads of an image rebuilt from a store.

    Args:
        store: where the chunks are.
        index: the image's decoded index.
        max_open: file descriptors kept open (LRU).
    """

    def __init__(self, store: ChunkStore, index: ArchiveIndex, *, max_open: int = 256) -> None:
        self.store = store
        self.index = index
        self.size = index.starts[-1]
        self._fds: OrderedDict[int, _OpenChunk] = OrderedDict()
        self._lock = threading.Lock()
        self._max_open = max_open

    def _acquire(self, entry: int) -> _OpenChunk:
        """An open descriptor of chunk ``entry``, pinned until :meth:`_release`."""
        with self._lock:
            slot = self._fds.get(entry)
            if slot is not None:
                self._fds.move_to_end(entry)
                slot.users += 1
                return slot
            path = self.store.chunk_path(self.index.digests[entry])
            try:
                slot = _OpenChunk(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            except FileNotFoundError:
                raise MissingBaseError("chunk missing from the store", path=path) from None
            self._fds[entry] = slot
            while len(self._fds) > self._max_open:
                _, victim = self._fds.popitem(last=False)
                victim.evicted = True
                if victim.users == 0:
                    os.close(victim.fd)
            return slot

    def _release(self, slot: _OpenChunk) -> None:
        with self._lock:
            slot.users -= 1
            if slot.evicted and slot.users == 0:
                os.close(slot.fd)

    def read_chunk(self, entry: int, n: int, inner: int = 0) -> bytes:
        """``n`` bytes at ``inner`` in dictionary entry ``entry``'s chunk file.

        Raises:
            MissingBaseError: the chunk file is missing or too short.
        """
        # the lock only guards the LRU: reads run in parallel, and a descriptor evicted
        # while pinned is closed by its last user (its number is never reused under a read)
        slot = self._acquire(entry)
        try:
            data = os.pread(slot.fd, n, inner)
        finally:
            self._release(slot)
        if len(data) != n:
            raise MissingBaseError(
                "chunk file shorter than its index entry",
                path=self.store.chunk_path(self.index.digests[entry]),
            )
        return data

    def pread(self, length: int, offset: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (short only at the end of the image)."""
        if offset >= self.size or length <= 0:
            return b""
        end = min(self.size, offset + length)
        starts, order = self.index.starts, self.index.order
        pos = bisect.bisect_right(starts, offset) - 1
        pieces = []
        while offset < end:
            chunk_start, chunk_end = starts[pos], starts[pos + 1]
            n = min(end, chunk_end) - offset
            data = self.read_chunk(order[pos], n, offset - chunk_start)
            pieces.append(data)
            offset += n
            pos += 1
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def close(self) -> None:
        """Close every cached descriptor (call when no read is running)."""
        with self._lock:
            for slot in self._fds.values():
                slot.evicted = True
                if slot.users == 0:
                    os.close(slot.fd)
            self._fds.clear()
