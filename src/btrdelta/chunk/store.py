"""The local chunk store: verified chunks by id, image descriptions, a lock, checks and gc.

Layout (``docs/formats/chunk-store.md``)::

    STORE/chunks/<first 2 hex digits>/<64 hex digits>   one uncompressed chunk per file
    STORE/<NAME>                                        description: header || index || sig
    STORE/.sources/<NAME>                               where NAME was cloned from (one line)
    STORE/.lock                                         flock: shared by writers and readers
                                                        of chunks, exclusive for gc and repair

Invariants: a chunk file gets its name only after its bytes were checked against the id and
made durable, so a name never refers to a partial file written by this code. Chunks are
written to unnamed files as they arrive and named in batches: one ``syncfs`` for the batch
(up to :data:`BATCH_FILES` files, :data:`BATCH_BYTES` bytes or :data:`BATCH_DELAY` seconds
old), then the names (:func:`btrdelta.fs.atomic.link_written`); a ``kill -9`` loses at most
the batch not yet named. On btrfs the ``syncfs`` commits the unnamed files' extents before
any name exists, so a power cut leaves a chunk whole under its name or no name (an ``fsync``
of an unnamed file persists nothing there: where there is no ``syncfs``, each file is also
``fsync``-ed once named; ``docs/formats/chunk-store.md``). A description is written
(atomically) only after every chunk it names was checked present and the chunk directories
were made durable. Damage from outside (a crash of an older version, a bad disk, a stray
write) is found by :meth:`ChunkStore.check` (size, then BLAKE3 of the content); damaged files
are dropped (:meth:`ChunkStore.drop`) and fetched again by a clone or ``verify --repair``;
:meth:`ChunkStore.gc` removes them too; an :class:`ImageReader` checks each chunk when it
first opens it and fails the reads of a damaged one.
This module does not fetch anything: that is the clone workflow's job.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping

import blake3

from .._futures import ThreadPoolExecutor
from .._value import Value, field
from ..errors import (
    BtrdeltaError,
    ChecksumError,
    MissingBaseError,
    StreamFormatError,
    UnsafePathError,
)
from ..fs.atomic import (
    discard_written,
    fsync_dir,
    link_written,
    write_atomic,
    write_unnamed,
)
from ..fs.btrfs import syncfs
from ..trust import PublicKey
from .archive import MAGIC, ArchiveHeader, ArchiveIndex, decode_description
from .chunker import DIGEST_SIZE, chunk_digest

__all__ = [
    "ChunkCheck",
    "ChunkStore",
    "GcReport",
    "ImageReader",
    "StoreBusyError",
    "VerifyReport",
    "split_store_name",
]

_TMP = ".tmp-"
_LOCK = ".lock"
_SOURCES = ".sources"
_READ_BLOCK = 4 << 20

#: a batch of new chunk files is made durable at once (one ``syncfs``) when it holds this
#: many files or bytes, or when its first file is this many seconds old
BATCH_FILES = 128
BATCH_BYTES = 8 << 20
BATCH_DELAY = 0.5


def _syncfs(fd: int) -> bool:
    """``syncfs`` the file system of ``fd``; ``False`` where the kernel has none."""
    try:
        syncfs(fd)
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            return False
        raise
    return True


def _durable(fds: list[int]) -> bool:
    """Make the content of the files ``fds`` durable before they are named: one ``syncfs``
    (their file system's whole write-back and, on btrfs, a transaction commit, which holds
    the unnamed files' extents; about what one ``fsync`` costs). Where there is none, an
    ``fsync`` each writes their data out, and ``False`` says each must be ``fsync``-ed once
    named as well: btrfs logs nothing of an inode without links, so that ``fsync`` alone
    leaves the name to be logged with an empty file (``fs.atomic``)."""
    if _syncfs(fds[0]):
        return True
    for fd in fds:
        os.fsync(fd)
    return False


class _Pending(Value):
    """A chunk written to an unnamed (or temporary) file, waiting for its batch's sync."""

    fd: int
    tmp: str | None
    directory: str
    size: int
    done: bool = False

    def link(self, name: str, *, sync: bool = False) -> bool:
        dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.done = True
            return link_written(self.fd, self.tmp, dir_fd, name, sync=sync)
        finally:
            os.close(dir_fd)

    def discard(self) -> None:
        if self.done:
            return
        self.done = True
        if self.tmp is None:
            os.close(self.fd)
            return
        dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            discard_written(self.fd, self.tmp, dir_fd)
        finally:
            os.close(dir_fd)


def split_store_name(target: str) -> tuple[str, str]:
    """``"STORE/NAME"`` -> ``("STORE", "NAME")``, refusing names that leave the store."""
    store, name = os.path.split(os.path.normpath(target))
    if not name or name in (".", "..", "chunks") or name.startswith(".") or "\0" in name:
        raise UnsafePathError(f"bad image name {name!r} (want STORE/NAME)", path=target)
    return store or ".", name


class StoreBusyError(BtrdeltaError):
    """Another process holds the store's lock in a conflicting mode."""


class GcReport(Value, frozen=True):
    """What :meth:`ChunkStore.gc` removed (``damaged`` is included in ``removed``)."""

    removed: int
    removed_bytes: int
    kept: int
    damaged: int = 0
    leftovers: int = 0


class ChunkCheck(Value):
    """What :meth:`ChunkStore.check` found.

    Attributes:
        ok: ids present with the right size and content.
        missing: ids with no file.
        damaged: id -> what is wrong (``empty``, ``short``, ``long``, ``content``,
            ``unreadable``).
    """

    ok: set[bytes] = field(default_factory=set)
    missing: list[bytes] = field(default_factory=list)
    damaged: dict[bytes, str] = field(default_factory=dict)


class VerifyReport(Value):
    """What a verify found (``missing`` and ``bad`` are chunk ids; ``reasons`` says why each
    bad one is bad; ``repaired`` counts chunks fetched again by a repair)."""

    chunks: int
    missing: list[bytes]
    bad: list[bytes]
    reasons: dict[bytes, str] = field(default_factory=dict)
    repaired: int = 0

    @property
    def ok(self) -> bool:
        """No chunk is missing or damaged."""
        return not self.missing and not self.bad


def _check_one(path: str, digest: bytes, size: int) -> str | None:
    """Why the chunk file at ``path`` is not ``digest`` of ``size`` bytes (``None``: it is,
    ``"missing"``: no file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            return "empty" if actual == 0 else ("short" if actual < size else "long")
        hasher = blake3.blake3()
        while block := os.read(fd, _READ_BLOCK):
            hasher.update(block)
        return None if hasher.digest() == digest else "content"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    finally:
        os.close(fd)


class ChunkStore:
    """A directory of verified chunks and image descriptions.

    Args:
        root: the store directory (created on first write); kept as an absolute path, so a
            process that changes directory (libfuse 3 does) still finds its chunks.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.chunks_dir = os.path.join(self.root, "chunks")
        self._dirty: set[str] = set()
        self._dirty_lock = threading.Lock()
        self._batch: dict[bytes, _Pending] = {}
        self._batch_bytes = 0
        self._batch_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._flush_error: BaseException | None = None

    # -- lock ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, *, exclusive: bool = False, wait: float = 0.0,
               create: bool = False) -> Iterator[None]:
        """Hold the store's lock: shared (clone, verify) or exclusive (gc, repair).

        Args:
            exclusive: exclusive mode.
            wait: seconds to wait for a conflicting holder to finish (0: fail at once).
            create: create the store directory if it does not exist.

        Raises:
            StoreBusyError: the lock could not be had in time.
            MissingBaseError: the store does not exist (and ``create`` is false).
        """
        if create:
            os.makedirs(self.root, exist_ok=True)
        path = os.path.join(self.root, _LOCK)
        flags = os.O_NOFOLLOW | os.O_CLOEXEC
        if create or os.path.isdir(self.chunks_dir):  # (never a .lock in a directory that
            flags |= os.O_CREAT                        # is no store: verify, mount of a file)
        try:
            try:
                fd = os.open(path, flags | os.O_RDWR, 0o644)
            except PermissionError:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            if not os.path.isdir(self.root):
                raise MissingBaseError("no chunk store here", path=self.root) from None
            yield  # a directory without chunks or lock: nothing to hold (what is read there
            return  # says what it is)
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + wait
        try:
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        what = "gc or a repair" if not exclusive else "a clone, verify or gc"
                        raise StoreBusyError(
                            f"store is busy ({what} holds its lock); try again later or "
                            "give --wait SECONDS", path=self.root) from None
                    time.sleep(0.1)
            yield
        finally:
            os.close(fd)

    # -- chunks ----------------------------------------------------------------------------
    def chunk_path(self, digest: bytes) -> str:
        """Path of the file holding chunk ``digest``."""
        hexd = digest.hex()
        return os.path.join(self.chunks_dir, hexd[:2], hexd)

    def has(self, digest: bytes) -> bool:
        """A file for the chunk exists (its content is not checked: see :meth:`check`)."""
        return os.path.exists(self.chunk_path(digest))

    def put(self, digest: bytes, data: bytes | bytearray | memoryview) -> bool:
        """Store ``data`` as chunk ``digest`` after checking its hash.

        The bytes go to an unnamed file at once; the file gets its name when its batch is
        made durable (:meth:`flush`: when the batch is full or a moment old, and at
        :meth:`sync`), never before. Call :meth:`sync` (or use :meth:`writing`) when done.

        Returns:
            ``True`` if new, ``False`` if the store already had (or is naming) that chunk.

        Raises:
            ChecksumError: ``data`` does not hash to ``digest`` (nothing is written).
        """
        actual = chunk_digest(data)
        if actual != digest:
            raise ChecksumError(
                f"chunk {digest.hex()[:16]}… does not match its id",
                expected=digest.hex(), actual=actual.hex(),
            )
        self._raise_flush_error()
        path = self.chunk_path(digest)
        if os.path.exists(path):
            return False
        with self._batch_lock:
            if digest in self._batch:
                return False
        directory = os.path.dirname(path)
        pending = _Pending(*self._write_unnamed(directory, digest.hex(), data), directory,
                           len(data))
        with self._batch_lock:
            if digest in self._batch:  # another thread stored it meanwhile
                pending.discard()
                return False
            self._batch[digest] = pending
            self._batch_bytes += len(data)
            full = len(self._batch) >= BATCH_FILES or self._batch_bytes >= BATCH_BYTES
            if len(self._batch) == 1 and not full:
                self._timer = threading.Timer(BATCH_DELAY, self._flush_in_background)
                self._timer.daemon = True
                self._timer.start()
        if full:
            self.flush()
        return True

    def _write_unnamed(self, directory: str, name: str,
                       data: bytes | bytearray | memoryview) -> tuple[int, str | None]:
        for attempt in range(2):
            try:
                dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                break
            except FileNotFoundError:
                if attempt:
                    raise
                os.makedirs(directory, exist_ok=True)
                with self._dirty_lock:
                    self._dirty.update((self.chunks_dir, self.root))
        try:
            return write_unnamed(dir_fd, name, data)
        finally:
            os.close(dir_fd)

    def flush(self) -> None:
        """Name the chunks written since the last flush: one ``syncfs`` makes their bytes
        durable, then each gets its name (their directories are ``fsync``-ed by
        :meth:`sync`). Chunks of a failed flush are dropped (fetched again next time)."""
        with self._flush_lock:
            with self._batch_lock:
                batch, self._batch, self._batch_bytes = self._batch, {}, 0
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
            if not batch:
                return
            named = set()
            try:
                synced = _durable([p.fd for p in batch.values()])
                for digest, pending in batch.items():
                    if pending.link(digest.hex(), sync=not synced):
                        named.add(pending.directory)
            finally:
                for pending in batch.values():
                    pending.discard()
                with self._dirty_lock:
                    self._dirty.update(named)

    def _flush_in_background(self) -> None:
        try:
            self.flush()
        except BaseException as exc:  # kept for the next put or sync
            self._flush_error = exc

    def _raise_flush_error(self) -> None:
        exc, self._flush_error = self._flush_error, None
        if exc is not None:
            raise exc

    def discard(self) -> None:
        """Drop the chunks written but not yet named (a clone that failed midway)."""
        with self._batch_lock:
            batch, self._batch, self._batch_bytes = self._batch, {}, 0
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        for pending in batch.values():
            pending.discard()

    def sync(self) -> None:
        """:meth:`flush`, then make every name added since the last call durable (one
        ``syncfs``; ``fsync`` of each directory where there is none)."""
        self.flush()
        self._raise_flush_error()
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
        if not dirty:
            return
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if _syncfs(fd):
                return
        finally:
            os.close(fd)
        for directory in sorted(dirty, key=len, reverse=True):
            fsync_dir(directory)

    @contextlib.contextmanager
    def writing(self) -> Iterator[ChunkStore]:
        """Put chunks inside the block: on success they are all named and durable
        (:meth:`sync`); on failure, the chunks already checked are still named (a re-run
        does not fetch them again) unless that fails too. Interrupted (Ctrl-C, SIGTERM),
        the batch not yet named is dropped and no ``syncfs`` waited for: it writes out the
        whole file system's dirty data, which took 2 s beside one writer and up to 6.7 s
        at load 9 (a batch holds at most half a second's or 8 MiB of arrivals)."""
        try:
            yield self
        except KeyboardInterrupt:
            self.discard()
            self._flush_error = None
            raise
        except BaseException:
            try:
                self.flush()
            except Exception:  # the first failure is the one to report
                self.discard()
            self._flush_error = None
            raise
        self.sync()

    def drop(self, digest: bytes) -> bool:
        """Remove chunk ``digest``'s file (a damaged one); ``False`` if there was none."""
        try:
            os.unlink(self.chunk_path(digest))
        except FileNotFoundError:
            return False
        return True

    def check(
        self, sizes: Mapping[bytes, int], *, jobs: int = 2,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> ChunkCheck:
        """Check every chunk of ``sizes`` (id -> expected size): present, right size, and
        hashing to its id. Reads run on ``jobs`` threads (BLAKE3 and reads release the GIL).
        """
        result = ChunkCheck()
        items = list(sizes.items())
        with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="check") as pool:
            verdicts = pool.map(lambda item: _check_one(self.chunk_path(item[0]), *item), items)
            for i, ((digest, _), verdict) in enumerate(zip(items, verdicts, strict=True)):
                if verdict is None:
                    result.ok.add(digest)
                elif verdict == "missing":
                    result.missing.append(digest)
                else:
                    result.damaged[digest] = verdict
                if on_progress is not None and (i % 64 == 63 or i + 1 == len(items)):
                    on_progress(i + 1, len(items))
        return result

    def iter_chunks(self) -> Iterator[tuple[bytes, str]]:
        """Every stored chunk id with its path (temporary files excluded)."""
        for directory in self._chunk_subdirs():
            sub = os.path.basename(directory)
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
        """Atomically and durably write description ``name`` (after :meth:`sync`)."""
        path = self.description_path(name)
        os.makedirs(self.root, exist_ok=True)
        self.sync()
        write_atomic(path, blob)

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
        except IsADirectoryError:
            raise MissingBaseError("not an image description (a directory)", path=path) from None
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
                if f.read(8) == MAGIC:
                    names.append(name)
        return names

    def set_source(self, name: str, location: str) -> None:
        """Record where image ``name`` was cloned from (for ``verify --repair``)."""
        directory = os.path.join(self.root, _SOURCES)
        os.makedirs(directory, exist_ok=True)
        write_atomic(os.path.join(directory, name), location.encode() + b"\n")

    def source_of(self, name: str) -> str | None:
        """Where image ``name`` was cloned from, if recorded."""
        path = os.path.join(self.root, _SOURCES, split_store_name(f"x/{name}")[1])
        try:
            with open(path, "rb") as f:
                return f.read(64 << 10).decode("utf-8", "replace").strip() or None
        except FileNotFoundError:
            return None

    # -- maintenance -----------------------------------------------------------------------
    def sizes_of(self, name: str) -> dict[bytes, int]:
        """Chunk id -> size for every chunk description ``name`` uses."""
        _, index = self.read_description(name)
        return dict(zip(index.digests, index.raw_sizes, strict=True))

    def verify(
        self, name: str, *, jobs: int = 2,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> VerifyReport:
        """Check that every chunk ``name`` needs is present, of its size, hashing to its id."""
        sizes = self.sizes_of(name)
        found = self.check(sizes, jobs=jobs, on_progress=on_progress)
        return VerifyReport(len(sizes), found.missing, list(found.damaged), found.damaged)

    def gc(self, *, dry_run: bool = False, quick: bool = False, jobs: int = 2,
           on_progress: Callable[[int, int], None] | None = None) -> GcReport:
        """Remove chunks no description uses, damaged chunks and leftover temporary files.

        Call it under the exclusive lock (:meth:`locked`). Kept chunks are checked like
        :meth:`check` does (only their sizes with ``quick``), with ``on_progress``.
        """
        used: dict[bytes, int] = {}
        names = self.descriptions()
        for name in names:
            try:
                used.update(self.sizes_of(name))
            except StreamFormatError as exc:
                raise exc.located(path=self.description_path(name)) from None
        removed = removed_bytes = kept = 0
        stored = dict(self.iter_chunks())
        damaged = self._damaged({d: s for d, s in used.items() if d in stored}, stored,
                                quick=quick, jobs=jobs, on_progress=on_progress)
        for digest, path in stored.items():
            if digest in used and digest not in damaged:
                kept += 1
                continue
            removed += 1
            with contextlib.suppress(FileNotFoundError):
                removed_bytes += os.lstat(path).st_size
                if not dry_run:
                    os.unlink(path)
        leftovers = self._remove_leftovers(set(names), dry_run=dry_run)
        return GcReport(removed, removed_bytes, kept, len(damaged), leftovers)

    def _damaged(self, sizes: dict[bytes, int], paths: dict[bytes, str], *, quick: bool,
                 jobs: int, on_progress: Callable[[int, int], None] | None) -> set[bytes]:
        if not quick:
            return set(self.check(sizes, jobs=jobs, on_progress=on_progress).damaged)
        bad = set()
        for digest, size in sizes.items():
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(paths[digest]).st_size != size:
                    bad.add(digest)
        return bad

    def _remove_leftovers(self, names: set[str], *, dry_run: bool) -> int:
        """Temporary files of interrupted writers, and source records of removed images."""
        doomed = []
        for directory in (self.root, *self._chunk_subdirs()):
            with contextlib.suppress(FileNotFoundError):
                doomed += [os.path.join(directory, e) for e in os.listdir(directory)
                           if e.startswith(_TMP) or (e.startswith(".") and ".tmp-" in e)]
        sources = os.path.join(self.root, _SOURCES)
        with contextlib.suppress(FileNotFoundError):
            doomed += [os.path.join(sources, e) for e in os.listdir(sources) if e not in names]
        if not dry_run:
            for path in doomed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        return len(doomed)

    def _chunk_subdirs(self) -> list[str]:
        try:
            subs = sorted(os.listdir(self.chunks_dir))
        except FileNotFoundError:
            return []
        return [os.path.join(self.chunks_dir, d) for d in subs
                if len(d) == 2 and os.path.isdir(os.path.join(self.chunks_dir, d))]


class _OpenChunk(Value):
    """A cached chunk descriptor: readers using it, and whether the LRU dropped it."""

    fd: int
    users: int = 1
    evicted: bool = False


class ImageReader:
    """Random-access, thread-safe reads of an image rebuilt from a store.

    With ``verify`` (the default), a chunk file is read whole and checked against its id
    (size and BLAKE3) the first time it is opened: a chunk damaged in the store (a power
    cut under an older version, a bad disk, a stray write) fails its reads with a
    :class:`~btrdelta.errors.ChecksumError` naming it, instead of serving wrong bytes.
    A reader whose caller checks the whole content anyway (a stream's BLAKE3) passes
    ``verify=False``.

    Args:
        store: where the chunks are.
        index: the image's decoded index.
        max_open: file descriptors kept open (LRU).
        verify: check each chunk once, when first opened.
    """

    def __init__(self, store: ChunkStore, index: ArchiveIndex, *, max_open: int = 256,
                 verify: bool = True) -> None:
        self.store = store
        self.index = index
        self.size = index.starts[-1]
        self._fds: OrderedDict[int, _OpenChunk] = OrderedDict()
        self._lock = threading.Lock()
        self._max_open = max_open
        self._verified: set[int] | None = set() if verify else None

    def _open(self, entry: int) -> int:
        """A new descriptor of chunk ``entry``'s file, checked once per reader (outside the
        lock: checks run in parallel)."""
        digest = self.index.digests[entry]
        path = self.store.chunk_path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise MissingBaseError("chunk missing from the store", path=path) from None
        if self._verified is None or entry in self._verified:
            return fd
        try:
            size = self.index.raw_sizes[entry]
            data = os.pread(fd, size + 1, 0)
            if len(data) != size or chunk_digest(data) != digest:
                what = ("empty" if not data else "short" if len(data) < size
                        else "long" if len(data) > size else "content differs")
                raise ChecksumError(
                    f"chunk damaged in the store ({what}): `btrdelta image verify --repair` "
                    "fetches it again", path=path)
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            self._verified.add(entry)
        return fd

    def _acquire(self, entry: int) -> _OpenChunk:
        """An open descriptor of chunk ``entry``, pinned until :meth:`_release`."""
        with self._lock:
            slot = self._fds.get(entry)
            if slot is not None:
                self._fds.move_to_end(entry)
                slot.users += 1
                return slot
        fd = self._open(entry)
        with self._lock:
            slot = self._fds.get(entry)
            if slot is not None:  # another thread opened it meanwhile
                os.close(fd)
                self._fds.move_to_end(entry)
                slot.users += 1
                return slot
            slot = _OpenChunk(fd)
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
            ChecksumError: the chunk file is damaged (``verify``).
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
