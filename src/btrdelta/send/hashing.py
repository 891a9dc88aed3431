"""Reading and hashing the regular files of scanned trees (:class:`ContentHasher`).

Every regular file of a tree is read once, in a thread pool (``read`` releases the GIL;
holes are hashed as zeros without being read): its content digest (XXH3-128) and inode
flags, and in record mode (a sendshot record is made or read) its data segments, block
digests and BLAKE3 digest (:mod:`.onepass`). In record mode the bytes of the sent tree's
small files are kept for the send (:meth:`ContentHasher.take`), which then neither opens
nor reads them again. Owns the reading of files for digests; not the walk
(:mod:`.scan`) or the record format (:mod:`btrdelta.tree.sendshot`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import stat
import threading
import weakref
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence

from .. import TYPE_CHECKING
from .._optional import need
from ..errors import BtrdeltaError
from ..fs.btrfs import get_fileattr
from ..fs.content import data_segments, has_byte_at, iter_data_segments
from ..tree.content import no_zero_block
from .extents import SEARCH_MIN, extents_of
from .onepass import (
    BLOCK,
    BlockHasher,
    Stopped,
    block_segments,
    content_hasher,
    digests_of,
    segment_max,
)

if TYPE_CHECKING:
    from .scan import Node, Tree

__all__ = ["DIRECT_WINDOW", "KEEP_BUDGET", "KEEP_MAX", "ContentHasher", "DirectReader",
           "block_segments", "direct_buffer", "open_file", "open_to_read", "reader", "uncache"]

#: files up to this size are read with one ``read``; larger ones in pieces of this size
_WHOLE = 1 << 20
#: bytes a :class:`DirectReader` reads at a time (a multiple of every block size)
DIRECT_WINDOW = 1 << 20
#: record mode: the hashing threads keep the bytes of files of the sent tree up to this size
#: (without holes) for the send, at most :data:`KEEP_BUDGET` bytes in all (the smallest
#: files first: they cost the most system calls per byte)
KEEP_MAX = 128 << 10
#: files a hashing thread opens ahead of the one it reads, their reads started (cold files
#: of a fresh snapshot on a loop device: 20,000 small ones read in 0.5-0.6 s instead of
#: 1.1-1.9 s, one after another, each read waiting for the device)
_AHEAD = 16


def keep_budget() -> int:
    """Bytes of small files the hashing threads may keep: 64 MiB, at most a sixteenth of
    the machine's memory (at least 8 MiB)."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 64 << 20
    return max(8 << 20, min(64 << 20, ram // 16))


KEEP_BUDGET = keep_budget()


def _open_noatime(path: bytes, flags: int) -> int:
    """``os.open`` with O_NOATIME where allowed (the owner or CAP_FOWNER), else without."""
    try:
        return os.open(path, flags | os.O_NOATIME)
    except PermissionError:
        return os.open(path, flags)


def open_file(path: bytes) -> int:
    """Open a regular file read-only without following symlinks (and without atime update
    where allowed)."""
    return _open_noatime(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


def open_dir(path: bytes) -> int:
    """Open a directory read-only without following symlinks and, where allowed, so that
    listing it through this descriptor (``os.listdir(fd)``) leaves its atime alone: a send
    of a plain directory tree does not change the times it sends (a stream made again of
    the same tree, as a resumed replication makes it, is then the same stream)."""
    return _open_noatime(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def lstat_root(root: bytes) -> os.stat_result:
    """``lstat`` of the root of a tree to scan.

    Raises:
        BtrdeltaError: ``root`` is not a directory or cannot be read.
    """
    try:
        st = os.lstat(root)
    except OSError as exc:
        raise BtrdeltaError(f"cannot scan: {exc.strerror}", path=root) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise BtrdeltaError("not a directory", path=root)
    return st


def reader(fd: int, content: bytes | None = None) -> Callable[[int, int], bytes]:
    """``read(n, pos)`` of an open file, or of its bytes kept (``content``: the whole file,
    the same object when read whole)."""
    if content is None:
        return lambda n, pos: os.pread(fd, n, pos)
    kept = content
    return lambda n, pos: kept[pos:pos + n]


class DirectReader:
    """``read(n, pos)`` of a large file read once, in order, through ``O_DIRECT``: a
    window of :data:`DIRECT_WINDOW` bytes read at a time into one page-aligned buffer,
    each piece returned as new bytes (:meth:`open`; :meth:`close` gives the descriptor its
    flags back).

    For the files of a fresh read-only snapshot that a send reads whole (its inodes' pages
    are not cached, and nothing will read them again): the page cache is neither filled
    nor emptied. 4 x 128 MiB from a snapshot just taken (load 13): 0.06-0.12 s of CPU
    instead of 0.20-0.23 s read buffered in 128 KiB, and deleting the snapshot then
    0.01 s instead of 0.26-0.35 s (its cached pages dropped).
    """

    __slots__ = ("_buf", "_end", "_flags", "_start", "_view", "fd")

    def __init__(self, fd: int, flags: int, buf: mmap.mmap) -> None:
        self.fd, self._flags, self._buf = fd, flags, buf
        self._view = memoryview(buf)
        self._start = self._end = 0

    @classmethod
    def open(cls, fd: int, size: int, buf: mmap.mmap) -> DirectReader | None:
        """A direct reader of ``fd`` (``buf``: :data:`DIRECT_WINDOW` bytes, page-aligned),
        or None where buffered reads are the better choice: a file smaller than a window
        or whose middle is cached already (a read of it without waiting returns bytes), or
        one that cannot be read directly (``fd`` < 0: no file)."""
        if fd < 0 or size < DIRECT_WINDOW:
            return None
        probe = memoryview(buf)[:BLOCK]
        try:
            os.preadv(fd, [probe], size // 2 // BLOCK * BLOCK, os.RWF_NOWAIT)
            return None  # cached: copying from the cache beats reading the disk again
        except BlockingIOError:
            pass
        except OSError:
            return None
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        except OSError:
            return None
        return cls(fd, flags, buf)

    def __call__(self, n: int, pos: int) -> bytes:
        if pos < self._start or pos + n > self._end:
            start = pos - pos % BLOCK
            if pos + n > start + DIRECT_WINDOW:
                return os.pread(self.fd, n, pos)  # (larger than a window: not sent so)
            try:
                got = self._fill(start)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.close()  # the filesystem refused it here: buffered from now on
                self._start = self._end = 0
                return os.pread(self.fd, n, pos)
            self._start, self._end = start, start + got
        at = pos - self._start
        return self._buf[at:min(at + n, self._end - self._start)]

    def _fill(self, start: int) -> int:
        """Read the window at ``start`` (a block boundary); the bytes read (fewer: the end
        of the file)."""
        got = 0
        while got < DIRECT_WINDOW:
            n = os.preadv(self.fd, [self._view[got:]], start + got)
            if n <= 0:
                break
            got += n
            if n % BLOCK:
                break  # the end of the file
        return got

    def close(self) -> None:
        """Give the descriptor its flags back (buffered reads again)."""
        if self._flags >= 0:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, self._flags)
            self._flags = -1
            self._end = 0


def direct_buffer() -> mmap.mmap:
    """A page-aligned buffer of :data:`DIRECT_WINDOW` bytes for :class:`DirectReader`."""
    return mmap.mmap(-1, DIRECT_WINDOW)


def open_to_read(path: bytes) -> int:
    """:func:`open_file`, its failure said as the one-line error the send reports.

    Raises:
        BtrdeltaError: the file cannot be opened (naming ``path``).
    """
    try:
        return open_file(path)
    except OSError as exc:
        raise BtrdeltaError(f"cannot read file: {exc.strerror}", path=path) from exc


def _hash_file(path: bytes, size: int, buf: bytearray | mmap.mmap, fd: int = -1,
               stop: threading.Event | None = None) -> tuple[bytes, int]:
    """(XXH3-128 of the content, btrfs flags) of one regular file of ``size`` bytes (``fd``:
    opened already, closed here; ``stop`` set: raises :class:`Stopped` within a MiB)."""
    xxhash = need("xxhash", "make")
    if fd < 0:
        fd = open_to_read(path)
    try:
        flags = get_fileattr(fd)
        if size <= _WHOLE:
            data = os.read(fd, size + 1) if size else b""
            if len(data) != size:
                raise BtrdeltaError("file changed while sending (size differs)", path=path)
            return xxhash.xxh3_128_digest(data), flags
        view = memoryview(buf)
        pos = 0
        segs = data_segments(fd, size)
        in_data = sum(n for _off, n in segs)
        h = content_hasher(size - in_data, in_data)
        # holes are hashed as the zeros they read as, without reading them (by length)
        for off, length in [*segs, (size, 0)]:
            if pos < off:
                h.zeros(off - pos, stop)
                pos = off
            end = off + length
            while pos < end:
                if stop is not None and stop.is_set():
                    raise Stopped("hashing stopped")
                n = os.preadv(fd, [view[: min(_WHOLE, end - pos)]], pos)
                if n <= 0:
                    raise BtrdeltaError("file changed while sending (short read)", path=path)
                h.update(view[:n])
                pos += n
        if has_byte_at(fd, size):
            raise BtrdeltaError("file changed while sending (size differs)", path=path)
        return h.digest(), flags
    finally:
        os.close(fd)




class _Job:
    """One batch queued on :class:`_Batches`: :meth:`result` waits for it."""

    __slots__ = ("_done", "args", "error", "value")

    def __init__(self, args: tuple[list[tuple[Node, bytes]], bool]) -> None:
        self.args = args
        self.value = 0
        self.error: BaseException | None = None
        self._done = threading.Lock()
        self._done.acquire()  # released when the batch is done (or dropped)

    def finish(self) -> None:
        self._done.release()

    def result(self) -> int:
        """The batch's return value (raises what it raised; :class:`BtrdeltaError` when it
        was dropped by :meth:`_Batches.close`)."""
        with self._done:
            pass
        if self.error is not None:
            raise self.error
        return self.value


#: seconds an idle hashing thread waits for the next batch before it ends: a full send's
#: walk queues batches as it publishes directories, and a thread started again for each
#: one held up the walk until the new thread ran (``Thread.start``: 10-60 ms a time at load
#: 7, ten times for Debian's ``/usr``)
_LINGER = 0.5


def _weakly(method: Callable[[list[tuple[Node, bytes]], bool], int]
            ) -> Callable[[list[tuple[Node, bytes]], bool], int]:
    """``method`` called through a weak reference to its object: the pool of a
    :class:`ContentHasher` holding its bound method made a reference cycle that kept each
    send's hasher, its trees and the bytes it kept until a full collection (a long
    ``replicate --listen`` grew)."""
    ref = weakref.WeakMethod(method)

    def call(batch: list[tuple[Node, bytes]], keeping: bool) -> int:
        if (bound := ref()) is None:  # (its hasher is gone)
            raise BtrdeltaError("hashing stopped")
        return bound(batch, keeping)

    return call


class _Batches:
    """Up to ``workers`` threads running ``run(*args)`` over batches in the order queued.

    What :class:`ContentHasher` needs of ``concurrent.futures.ThreadPoolExecutor``, which
    (with the ``logging`` it imports) costs a small send ~4 ms of its start: a thread is
    started per batch queued while fewer than ``workers`` run and none waits for work; one
    that found the queue empty waits up to :data:`_LINGER` seconds for the next batch, then
    ends; :meth:`close` drops what was not started or is queued while it runs (a walk still
    publishing), ends the waiting threads and joins them (a batch queued later starts new ones).
    """

    def __init__(self, run: Callable[[list[tuple[Node, bytes]], bool], int],
                 workers: int) -> None:
        self._run, self._workers = run, workers
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Job] = deque()
        self._threads: list[threading.Thread] = []
        self._running = 0  # threads started and not ended
        self._idle = 0  # threads waiting for a batch
        self._closed = False

    def submit(self, batch: list[tuple[Node, bytes]], keeping: bool) -> _Job:
        job = _Job((batch, keeping))
        with self._cond:
            if self._closed:  # (close() runs: it would join a thread not yet started)
                job.error = BtrdeltaError("hashing stopped")
                job.finish()
                return job
            self._queue.append(job)
            if self._idle >= len(self._queue):  # (a waiting thread for each batch queued)
                self._cond.notify()
            elif self._running < self._workers:
                t = threading.Thread(target=self._work, daemon=True,
                                     name=f"btrdelta-hash_{len(self._threads)}")
                self._threads.append(t)
                self._running += 1
                t.start()
        return job

    def _work(self) -> None:
        cond, queue = self._cond, self._queue
        while True:
            with cond:
                if not queue and not self._closed:
                    self._idle += 1
                    cond.wait(_LINGER)
                    self._idle -= 1
                if not queue or self._closed:
                    self._running -= 1
                    return
                job = queue.popleft()
            try:
                job.value = self._run(*job.args)
            except BaseException as exc:  # handed to result() in the waiting thread
                job.error = exc
            finally:
                job.finish()

    def close(self) -> None:
        """Drop the batches not started, end the waiting threads, wait for them all."""
        with self._cond:
            self._closed = True
            dropped = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in dropped:
            job.error = BtrdeltaError("hashing stopped")
            job.finish()
        for t in self._threads:  # (none is added while closed: submit() drops)
            t.join()
        with self._cond:
            self._closed = False  # (a batch queued later starts new threads)


def _hash_file_blocks(
    path: bytes, size: int, buf: bytearray | mmap.mmap, seed: int, keep: bool = False, ino: int = 0,
    fd: int = -1, whole_blocks: bool = False, drop: bool = True, extent_min: int = SEARCH_MIN,
    stop: threading.Event | None = None, content3: bool = True, extent_max: int | None = None,
) -> tuple[bytes, int, list[tuple[int, int]], bytes, bytes, bytes | None, bytes | None]:
    """Record mode: (XXH3-128 digest, flags, block-aligned data segments, seeded XXH3-128 of
    each 4 KiB block of them, content digest (``content3``: tree-sum-3's; else BLAKE3-256),
    content, extent items) of one regular file,
    read once (``fd``: opened already, closed here).

    The content (the bytes hashed) only with ``keep``, of a file without holes of at most
    :data:`KEEP_MAX` bytes; else None. The extent items (:func:`~.extents.extents_of`, from
    ``extent_min`` bytes on) only
    with ``ino`` (its inode number: the file is in a read-only btrfs snapshot); else None.
    With ``whole_blocks`` (the filesystem's holes are whole 4 KiB blocks) a file to keep is
    read first, and its holes are only looked for (``SEEK_DATA``/``SEEK_HOLE``) when one of
    its blocks is all zeros.

    A kept file of a read-only snapshot (``ino``; and ``drop``) leaves the page cache once
    read (``POSIX_FADV_DONTNEED``): its bytes are sent from memory, and the pages would
    otherwise be dropped when the snapshot is deleted, on a replication's last step (Debian
    ``/usr``: the deletion took 0.103 s instead of 0.057 s after its 4,600 small files
    were read, at load 15).

    ``stop`` set: raises :class:`Stopped` within a MiB read or hashed (without ``content3``
    a hole's zeros, hashed by BLAKE3 at ~5 GB/s of CPU, included)."""
    if fd < 0:
        fd = open_to_read(path)
    try:
        flags = get_fileattr(fd)
        extents = extents_of(fd, ino, size, flags, extent_min, most=extent_max) if ino else None
        if keep and whole_blocks and 0 < size <= KEEP_MAX:
            content = os.pread(fd, size + 1, 0)
            if len(content) != size:
                raise BtrdeltaError("file changed while sending (size differs)", path=path)
            if (no_zeros := no_zero_block(content)) or data_segments(fd, size) == [(0, size)]:
                digest, blocks, bdigest = digests_of(content, seed, content3, no_zeros)
                if ino and drop:
                    uncache(fd)
                return digest, flags, [(0, size)], blocks, bdigest, content, extents
        # (past the bound, holes as data: the kept file's digests are of its bytes read)
        segs = block_segments(iter_data_segments(fd, size), size, segment_max(extent_max))
        if keep and size <= KEEP_MAX and (not size or segs == [(0, size)]):
            content = os.pread(fd, size + 1, 0) if size else b""
            if len(content) != size:
                raise BtrdeltaError("file changed while sending (size differs)", path=path)
            digest, blocks, bdigest = digests_of(content, seed, content3)
            if ino and size and drop:
                uncache(fd)
            return digest, flags, segs, blocks, bdigest, content, extents
        hasher = BlockHasher(seed, stop, content3, size)
        view = memoryview(buf)
        for off, length in segs:
            pos, end = off, off + length
            while pos < end:
                if stop is not None and stop.is_set():
                    raise Stopped("hashing stopped")
                n = os.preadv(fd, [view[: min(_WHOLE, end - pos)]], pos)
                if n <= 0:
                    raise BtrdeltaError("file changed while sending (short read)", path=path)
                hasher.update(pos, view[:n])
                pos += n
        if has_byte_at(fd, size):
            raise BtrdeltaError("file changed while sending (size differs)", path=path)
        digest, blocks, bdigest = hasher.finish(size)
        return digest, flags, segs, blocks, bdigest, None, extents
    finally:
        os.close(fd)


def uncache(fd: int) -> None:
    """Drop the cached pages of the file open at ``fd``, a read-only snapshot's file whose
    bytes were read for the stream: the kernel frees them now, in the thread that read them,
    not all at once when the snapshot is deleted (the last step of a replication)."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _open_ahead(batch: list[tuple[Node, bytes]], i: int, ahead: dict[int, int]) -> None:
    """Open file ``i`` of ``batch`` (if there is one, not empty) into ``ahead`` and ask the
    kernel to read its first MiB now (``POSIX_FADV_WILLNEED`` starts the reads and returns).
    A file that cannot be opened here is opened again when its turn comes (which says
    why)."""
    if i >= len(batch) or not batch[i][0].size:
        return
    try:
        fd = open_file(batch[i][1])
    except OSError:
        return
    ahead[i] = fd
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, min(batch[i][0].size, _WHOLE), os.POSIX_FADV_WILLNEED)


class ContentHasher:
    """Reads and hashes the regular files of trees in a thread pool, while the caller goes on.

    :meth:`submit` queues a scanned tree (so hashing the old tree overlaps with scanning the
    new one), :meth:`wait` finishes. Files go to the workers in batches (big files first);
    reads release the GIL, so the work spreads over cores.

    Args:
        workers: thread count (default: the CPU count, at most 4).
        seed: record mode (a sendshot record is made or read): also the data segments,
            block digests (XXH3-128 with this seed) and BLAKE3 digest of each file; files
            whose ``segments`` are already known (taken from a record) are not read.
        extents: record mode, the files are in a read-only btrfs snapshot: also the
            extent items of each file (:func:`~.extents.extents_of`).

    In record mode the bytes of small files of a tree submitted with ``keep`` are kept
    (:meth:`take`, at most :data:`KEEP_BUDGET` bytes not taken yet), so that the send does
    not open and read them a second time: the smallest files, or, in an ``order``, every
    file of up to :data:`KEEP_MAX` bytes while the budget has room.

    A tree submitted with an ``order`` (the order a full send emits its inodes in) is read
    in that order, in batches that start small, and :meth:`ready` waits for one file only:
    the send emits each file as soon as its batch is hashed, while the threads read ahead,
    instead of waiting for the whole tree.
    """

    def __init__(self, workers: int | None = None, seed: int | None = None,
                 extents: bool = False, content3: bool = True) -> None:
        self.seed = seed
        #: record mode: the files' content digests are tree-sum-3's (record version 4), else
        #: BLAKE3 of the whole content (version 3: a send against such a record compares them)
        self.content3 = content3
        #: the files' holes are whole 4 KiB blocks (a block with a byte other than zero is
        #: data): set by the caller that knows the filesystem (:class:`~.scan.TreeScan`)
        self.whole_blocks = False
        #: record mode on a read-only btrfs snapshot: record files' extent items
        self.extents = extents
        #: ... of files from this size on (a search a file; a full send's smaller files get
        #: theirs from the sweep that stamps its inodes: :func:`~.extents.from_sweep`)
        self.extent_min = SEARCH_MIN
        #: ... and past this many bytes of a file's items, cells (the record's bound: a
        #: store's ``extent_max``; None: :data:`~.extents.EXTENT_MAX`), cut as searched
        self.extent_max: int | None = None
        #: drop the pages of a snapshot's files once read for the stream (:func:`uncache`):
        #: a read-only snapshot's, unless the caller knows the send reads little (then the
        #: ~13 µs of each call, ~1 ms of a small round, buy nothing: the few MiB left cached
        #: go with the snapshot)
        self.uncache = extents
        #: bytes read for this hashing by others (:mod:`.extents`), counted by :meth:`wait`
        self.read_before = 0
        #: files open already, by ``id`` of their node (read in parts by :mod:`.extents`):
        #: the stream reads their changed blocks from these rather than opening them again
        #: (:meth:`opened_file`); :meth:`close_files` closes what it did not take
        self.opened: dict[int, int] = {}
        #: leave up to this many files hashed here open there too (those whose bytes were
        #: not kept: the stream reads their changed blocks)
        self.keep_open = 0
        self._done = 0
        self.workers = workers or min(4, os.cpu_count() or 1)
        #: set by :meth:`close`: the threads stop within a MiB of the file they hash
        self._stop = threading.Event()
        self._pool = _Batches(_weakly(self._run), self.workers) if self.workers > 1 else None
        self._local = threading.local()
        self._jobs: list[_Job] = []
        self._batches: list[tuple[list[tuple[Node, bytes]], bool]] = []
        self._trees: list[Tree] = []
        #: kept bytes by node, as ``id(node)`` -> (the node, its bytes): the nodes of a tree
        #: found by a change sweep are hashed before they are numbered (every ``id`` 0);
        #: the entry holds the node, so no other object takes its ``id`` meanwhile
        self._kept: dict[int, tuple[Node, bytes]] = {}
        self._kept_bytes = 0
        self._keeping = False
        self._keep_max = -1
        self._keep_lock = threading.Lock()
        #: ordered submission: node id -> its batch (an index into the jobs, or into the
        #: batches with one worker), and how many of those were run here
        self._batch_of: dict[int, int] = {}
        self._ran = 0
        #: a tree streamed (:meth:`stream`): its files added but not queued yet, their ids,
        #: their bytes, the batch size, whether their bytes are kept; under ``_add_lock``
        self._pending: list[tuple[Node, bytes]] = []
        self._pending_ids: set[int] = set()
        self._pending_bytes = 0
        self._most = 16
        self._streamed: Tree | None = None
        self._stream_keeping = False
        self._add_lock = threading.Lock()

    def _run(self, batch: list[tuple[Node, bytes]], keeping: bool = False) -> int:
        buf = getattr(self._local, "buf", None)
        if buf is None:  # (a mapping: only the pages a read fills are touched)
            buf = self._local.buf = direct_buffer()
        total = 0
        seed = self.seed
        kept, lock = self._kept, self._keep_lock
        ahead: dict[int, int] = {}  # index in the batch -> its file, opened ahead
        try:
            for i in range(min(_AHEAD, len(batch))):
                _open_ahead(batch, i, ahead)
            for i, (node, path) in enumerate(batch):
                _open_ahead(batch, i + _AHEAD, ahead)
                fd = ahead.pop(i, -1)
                if seed is None:
                    node.digest, node.flags = _hash_file(path, node.size, buf, fd, self._stop)
                else:
                    keep = keeping and node.size <= self._keep_max and \
                        self._kept_bytes + node.size <= KEEP_BUDGET
                    # (a file whose bytes are not kept: a copy of its descriptor is hashed
                    # and closed, the file stays open)
                    still = -1
                    if fd >= 0 and not keep and len(self.opened) < self.keep_open:
                        still, fd = fd, os.dup(fd)
                    try:
                        (node.digest, node.flags, node.segments, node.blocks, node.bdigest,
                         content, node.extents) = _hash_file_blocks(
                            path, node.size, buf, seed, keep,
                            node.st_ino if self.extents else 0, fd, self.whole_blocks,
                            self.uncache, self.extent_min, self._stop, self.content3,
                            self.extent_max)
                    except BaseException:
                        if still >= 0:
                            os.close(still)
                        raise
                    if still >= 0 and content is None:
                        self.opened[id(node)] = still
                    elif still >= 0:
                        os.close(still)
                    if content is not None:
                        with lock:
                            if self._kept_bytes + node.size <= KEEP_BUDGET:
                                kept[id(node)] = (node, content)
                                self._kept_bytes += node.size
                total += node.size
        finally:
            for fd in ahead.values():
                os.close(fd)
        return total

    def take(self, node: Node) -> bytes | None:
        """The content of ``node`` (of the tree submitted with ``keep``) if it was kept
        (then no longer), else None."""
        got = self._kept.pop(id(node), None) if self._kept else None
        if got is None:
            return None
        with self._keep_lock:
            self._kept_bytes -= len(got[1])
        return got[1]

    def submit(self, tree: Tree, later: Collection[int] = (), *,
               keep: bool | Callable[[Node], bool] = False,
               order: Sequence[int] | None = None) -> None:
        """Queue every regular file of ``tree`` (no-op for a hashed or queued tree) but
        the nodes ``later`` (hashed by whoever reads them: see :class:`BlockHasher`);
        ``keep``: keep small files' bytes for :meth:`take` (one tree only), or only those
        of the files it accepts (without ``order``; the others are read into one reused
        buffer: no new memory per file); ``order``: the node ids in the order their files
        are wanted (:meth:`ready`), else the largest files first."""
        if tree.hashed or any(t is tree for t in self._trees):
            return
        self._trees.append(tree)
        keeping = bool(keep) and self.seed is not None and not self._keeping
        self._keeping |= keeping
        nodes = tree.nodes
        picked: Iterable[Node] = (nodes[i] for i in order) if order is not None \
            else sorted(nodes.values(), key=lambda n: -n.size)
        jobs = [(n, tree.root + b"/" + n.path) for n in picked
                if n.is_reg and n.segments is None and n.id not in later]
        if keeping and callable(keep) and order is None:
            self._cut([j for j in jobs if not keep(j[0])], False, False)
            jobs = [j for j in jobs if keep(j[0])]
        if keeping and order is not None:
            # sent in this order, each file soon after it is read: every small file can be
            # kept (the budget bounds how far ahead the threads keep)
            self._keep_max = KEEP_MAX
        elif keeping:  # the largest size whose files and all smaller ones fit the budget
            total = 0
            for size in sorted(n.size for n, _path in jobs):
                if size > KEEP_MAX or total + size > KEEP_BUDGET:
                    break
                total += size
                self._keep_max = size
        self._cut(jobs, keeping, order is not None)

    def _cut(self, jobs: list[tuple[Node, bytes]], keeping: bool, ordered: bool) -> None:
        """Queue ``jobs`` in batches of up to 8 MiB or 256 files (``ordered``: the first
        ones small, the first file being wanted at once)."""
        cur: list[tuple[Node, bytes]] = []
        cur_bytes = 0
        most = 16 if ordered else 256
        for job in jobs:
            cur.append(job)
            cur_bytes += job[0].size + 16384
            if cur_bytes >= (8 << 20) or len(cur) >= most:
                self._queue(cur, keeping, ordered)
                cur, cur_bytes = [], 0
                most = min(256, most * 2)
        if cur:
            self._queue(cur, keeping, ordered)

    def stream(self, tree: Tree) -> None:
        """Files of ``tree`` (a scan that is still walking it: :class:`~.walk.ScanStream`)
        come by :meth:`add` in the order they are wanted (:meth:`ready`), their bytes kept
        (as ``submit(tree, keep=True, order=...)``)."""
        self._trees.append(tree)
        self._streamed = tree
        self._stream_keeping = keeping = self.seed is not None and not self._keeping
        self._keeping |= keeping
        if keeping:
            self._keep_max = KEEP_MAX

    def add(self, nodes: list[Node]) -> None:
        """Queue these regular files of the streamed tree (those not hashed yet), in order:
        in batches as :meth:`submit` cuts an ordered tree's (the first ones small; the last
        one queued when a file of it is wanted, or by :meth:`wait`)."""
        tree = self._streamed
        assert tree is not None
        prefix = tree.root + b"/"
        with self._add_lock:
            for n in nodes:
                if n.segments is not None:
                    continue
                self._pending.append((n, prefix + n.path))
                self._pending_ids.add(n.id)
                self._pending_bytes += n.size + 16384
                if self._pending_bytes >= (8 << 20) or len(self._pending) >= self._most:
                    self._flush()
                    self._most = min(256, self._most * 2)

    def _flush(self) -> None:
        """Queue the files added and not queued yet (under ``_add_lock``)."""
        if self._pending:
            self._queue(self._pending, self._stream_keeping, True)
            self._pending, self._pending_bytes = [], 0
            self._pending_ids.clear()

    def _queue(self, batch: list[tuple[Node, bytes]], keeping: bool, ordered: bool) -> None:
        index = len(self._batches if self._pool is None else self._jobs)
        if self._pool is None:
            self._batches.append((batch, keeping))  # one worker: hashed here when wanted
        else:
            self._jobs.append(self._pool.submit(batch, keeping))
        if ordered:  # (after the batch: a streamed tree's files are wanted by another thread)
            self._batch_of.update((node.id, index) for node, _path in batch)

    def ready(self, node: Node) -> None:
        """Wait until ``node``'s file (of a tree submitted with an ``order``) is hashed;
        returns at once for any other node.

        Raises:
            BtrdeltaError: a file of its batch cannot be read or changed size.
        """
        index = self._batch_of.get(node.id)
        if index is None and self._streamed is not None:
            with self._add_lock:  # (added, not queued yet: its batch is queued now)
                if node.id in self._pending_ids:
                    self._flush()
                index = self._batch_of.get(node.id)
        if index is None:
            return
        if self._pool is not None:
            self._jobs[index].result()
            return
        while self._ran <= index:  # one worker: this thread hashes, in order
            batch, keeping = self._batches[self._ran]
            self._ran += 1
            self._done += self._run(batch, keeping)

    def wait(self, on_bytes: Callable[[int], None] | None = None) -> int:
        """Wait for every queued file; returns the bytes read (in all, also those of
        earlier calls and :attr:`read_before`: a second call says the same).

        Args:
            on_bytes: called with the total bytes hashed so far, as batches finish.

        Raises:
            BtrdeltaError: a file cannot be read or changed size since the scan.
        """
        with self._add_lock:
            self._flush()  # (a streamed tree: its walk is over)
        try:
            for batch, keeping in self._batches[self._ran:]:  # (the first ones: by ready)
                self._done += self._run(batch, keeping)
                if on_bytes is not None:
                    on_bytes(self.read_before + self._done)
            self._batches.clear()
            for job in self._jobs:
                self._done += job.result()
                if on_bytes is not None:
                    on_bytes(self.read_before + self._done)
            self._jobs.clear()
            self._batch_of.clear()
            self._ran = 0
        finally:
            self.close()
        for tree in self._trees:
            tree.hashed = True
        if on_bytes is not None:
            on_bytes(self.read_before + self._done)
        return self.read_before + self._done


    def opened_file(self, node: Node) -> int:
        """The file of ``node`` open already (:attr:`opened`), now the caller's to close;
        -1 if none."""
        return self.opened.pop(id(node), -1) if self.opened else -1

    def close_files(self) -> None:
        """Close the files of :attr:`opened` that nobody took."""
        while self.opened:
            os.close(self.opened.popitem()[1])

    def close(self) -> None:
        """Drop queued work and stop the threads (after an error elsewhere, a signal: within a
        MiB of the file each one hashes)."""
        self._batches.clear()
        if self._pool is not None:
            self._stop.set()
            try:
                self._pool.close()
            finally:
                self._stop.clear()
