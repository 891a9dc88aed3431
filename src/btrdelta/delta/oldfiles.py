"""The digests delta streams use, and reading an old file checked against its digest.

Paths come from streams, so they are untrusted: the old file is found with the safe walk
of :mod:`btrdelta.fs.sandbox` (no absolute path, no ``.``/``..``, no symlink followed below
the old root), so nothing outside the old root is ever read. Looking up and listing old
files without reading them is :mod:`btrdelta.fs.sandbox`'s too.
"""

from __future__ import annotations

import os
import threading
from collections import deque

import blake3

from .. import TYPE_CHECKING
from .._pool import Pool, Task
from ..errors import ApplyError, BtrdeltaError, ChecksumError, MissingBaseError
from ..fs.sandbox import DirCache, open_regular, open_regular_sized
from .format import HashAlgo

if TYPE_CHECKING:
    import mmap
    from typing import Any

__all__ = ["MAP_MIN", "OldFileChecks", "digest", "hasher", "map_old_file", "read_old_file",
           "read_old_files"]

#: old files of at least this many bytes are mapped, not read, where they cannot change
#: (:func:`map_old_file`)
MAP_MIN = 1 << 20


class _Blake3_128:
    """BLAKE3 with a 16-byte output (the first 16 bytes of its extendable output)."""

    __slots__ = ("_h",)
    LENGTH = 16

    def __init__(self) -> None:
        self._h = blake3.blake3(max_threads=1)

    def update(self, data: Any) -> None:
        self._h.update(data)

    def digest(self) -> bytes:
        return bytes(self._h.digest(length=self.LENGTH))


class _Blake3_64(_Blake3_128):
    """BLAKE3 with an 8-byte output (a prefix of the 16-byte one)."""

    __slots__ = ()
    LENGTH = 8


class _Blake3_32(_Blake3_128):
    """BLAKE3 with a 4-byte output (a prefix of the 16-byte one)."""

    __slots__ = ()
    LENGTH = 4


def hasher(algo: int) -> Any:
    """A new hash object for ``algo`` (``update``/``digest``)."""
    if algo == HashAlgo.BLAKE3:
        return blake3.blake3(max_threads=1)
    if algo == HashAlgo.BLAKE3_128:
        return _Blake3_128()
    if algo == HashAlgo.BLAKE3_64:
        return _Blake3_64()
    if algo == HashAlgo.BLAKE3_32:
        return _Blake3_32()
    if algo == HashAlgo.SHA256:
        import hashlib  # on first use: its import loads every algorithm (~20 ms)

        return hashlib.sha256()
    raise ValueError(f"unknown hash algorithm {algo}")  # pragma: no cover


#: BLAKE3 digests of buffers from this size on use every core (same output). Below it one
#: thread is faster where the cores are busy: a patched file's content of 1-4 MB took
#: 0.7-6 ms with the threads during a receive, ~0.2-0.8 ms alone; 35 MB, 4 ms against 13
_THREADED = 16 << 20
_BLAKE3_LENGTH = {
    HashAlgo.BLAKE3: 32, HashAlgo.BLAKE3_128: 16, HashAlgo.BLAKE3_64: 8, HashAlgo.BLAKE3_32: 4,
}


def digest(algo: int, data: Any) -> bytes:
    """Digest of ``data`` with ``algo``."""
    length = _BLAKE3_LENGTH.get(algo)  # type: ignore[call-overload]
    if length is not None and len(data) >= _THREADED:
        h3 = blake3.blake3(max_threads=blake3.blake3.AUTO)
        h3.update(data)
        return bytes(h3.digest(length=length))
    h = hasher(algo)
    h.update(data)
    return bytes(h.digest())


def read_old_file(
    root: str | os.PathLike[str],
    path: bytes,
    *,
    expected_size: int | None = None,
    max_size: int = 1 << 32,
    algo: int | None = None,
    expected_digest: bytes | None = None,
    cache: DirCache | None = None,
) -> bytes | None:
    """Content of the regular file ``root/path`` (``cache``: reuse directory fds).

    Returns ``None`` if the file does not exist (or is not regular) and nothing is
    expected of it.

    Raises:
        UnsafePathError: ``path`` is empty, absolute or has ``..``/empty components.
        MissingBaseError: ``expected_size`` is given and the file is missing.
        ChecksumError: the size or the ``algo`` digest differs from what is expected.
    """
    got = _old_content(root, path, expected_size, max_size, algo, expected_digest, cache,
                       mapped=False)
    assert got is None or type(got) is bytes
    return got


def map_old_file(
    root: str | os.PathLike[str],
    path: bytes,
    *,
    expected_size: int | None = None,
    max_size: int = 1 << 32,
    algo: int | None = None,
    expected_digest: bytes | None = None,
    cache: DirCache | None = None,
) -> bytes | mmap.mmap | None:
    """:func:`read_old_file`, but a file of :data:`MAP_MIN` bytes or more in a read-only
    btrfs subvolume (a parent snapshot) comes as a read-only mapping of it: its pages are
    the page cache's, not copied into fresh memory (numpy's hop: the CPU of its patches on
    the expansion thread 4.60 -> 3.09 ms). Only where the file cannot change:
    a mapped file that shrinks faults its reader with SIGBUS, and a read-only subvolume
    refuses every write (it would have to be made writable first). A file with holes is
    read, its holes made of zeros, not mapped (their pages would fault in zeroed)."""
    return _old_content(root, path, expected_size, max_size, algo, expected_digest, cache,
                        mapped=True)


def _frozen(fd: int) -> bool:
    """Whether file ``fd`` is in a read-only btrfs subvolume."""
    from ..fs.btrfs import subvol_info  # (only for a file of MAP_MIN bytes or more)

    try:
        return subvol_info(fd).readonly
    except OSError:  # not btrfs
        return False


def _read_sparse(fd: int, size: int, path: bytes, segments: list[tuple[int, int]]) -> bytes:
    """The ``size`` bytes of file ``fd``, whose data ranges are ``segments``
    (:func:`~btrdelta.fs.copy.data_segments`; ``[(0, size)]`` for a small file): its holes
    are not read but made of zeros: a file with no data at
    all comes as ``bytes(size)``, whose pages stay untouched until they are read
    (scenario trailing-hole-303's 256 MiB old file, no data: nothing read, 256 MiB less
    resident while it is diffed), and a file with a few data extents costs a copy of the
    zeros, not a read of them."""
    if not segments:
        return bytes(size)
    pieces: list[bytes] = []
    got = 0
    for start, length in segments:
        if start > got:
            pieces.append(bytes(start - got))
            got = start
        end = start + length
        while got < end:
            piece = os.pread(fd, min(end - got, 1 << 30), got)
            if not piece:
                raise ApplyError("old file changed while being read", op="read", path=path)
            pieces.append(piece)
            got += len(piece)
    if got < size:
        pieces.append(bytes(size - got))
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _old_content(
    root: str | os.PathLike[str], path: bytes, expected_size: int | None, max_size: int,
    algo: int | None, expected_digest: bytes | None, cache: DirCache | None, *, mapped: bool,
) -> bytes | mmap.mmap | None:
    fd = open_regular(root, path, cache)
    if fd is None:
        if expected_size is None:
            return None
        raise MissingBaseError("old file of a patch is missing", path=path)
    data: bytes | mmap.mmap
    try:
        size = os.fstat(fd).st_size
        if expected_size is not None:
            _expect_size(size, expected_size, path)
        if size > max_size:
            return None
        segments = [(0, size)]
        if size >= MAP_MIN:
            from ..fs.content import data_segments

            segments = data_segments(fd, size)
        if mapped and size >= MAP_MIN and segments == [(0, size)] and _frozen(fd):
            import mmap

            data = mmap.mmap(fd, size, prot=mmap.PROT_READ)  # (kept once fd is closed)
        else:  # (a sparse file is not mapped: its holes would fault in as zeroed pages)
            data = _read_sparse(fd, size, path, segments)
    except OSError as exc:
        raise ApplyError(f"cannot read old file: {exc.strerror}", op="read", path=path) from exc
    finally:
        os.close(fd)
    if algo is not None and expected_digest is not None:
        _expect_digest(digest(algo, data), expected_digest, path)
    return data


def read_old_files(
    root: str | os.PathLike[str],
    paths: tuple[bytes, ...],
    *,
    expected_size: int,
    algo: int,
    expected_digest: bytes,
    cache: DirCache | None = None,
) -> bytes:
    """The old content of a patch made of several old files (BASE_PATH + BASES): their
    contents one after the other, ``expected_size`` bytes in all (never more is read)
    with the ``algo`` digest ``expected_digest``.

    Raises:
        UnsafePathError, MissingBaseError: as :func:`read_old_file`, for any of them.
        ChecksumError: the total size or the digest differs from what is expected.
    """
    pieces: list[bytes] = []
    left = expected_size
    for path in paths:
        fd = open_regular(root, path, cache)
        if fd is None:
            raise MissingBaseError("old file of a patch is missing", path=path)
        try:
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > left:
            raise ChecksumError(
                f"old files of the patch have more than the {expected_size} bytes it expects",
                path=path,
            )
        data = read_old_file(root, path, expected_size=size, max_size=size, cache=cache)
        assert data is not None
        pieces.append(data)
        left -= size
    data = b"".join(pieces)
    if left:
        raise ChecksumError(
            f"old files of the patch have {len(data)} bytes, the patch expects {expected_size}",
            expected=expected_size, actual=len(data), path=paths[0],
        )
    actual = digest(algo, data)
    if actual != expected_digest:
        raise ChecksumError(
            "old files differ from the ones the patch was made against",
            expected=expected_digest.hex(), actual=actual.hex(), path=paths[0],
        )
    return data


def _expect_size(actual: int, expected: int, path: bytes) -> None:
    if actual != expected:
        raise ChecksumError(f"old file has {actual} bytes, the patch expects {expected}",
                            expected=expected, actual=actual, path=path)


def _expect_digest(actual: bytes, expected: bytes, path: bytes) -> None:
    if actual != expected:
        raise ChecksumError("old file differs from the one the patch was made against",
                            expected=expected.hex(), actual=actual.hex(), path=path)


#: what :class:`OldFileChecks` reads of an old file at a time: a file of that many bytes or
#: fewer is one ``preadv`` (scipy's 1,203 unchanged files average 22 KB)
_CHUNK = 128 << 10
#: each check thread's read buffer (:func:`_buffer`)
_local = threading.local()


def _buffer() -> bytearray:
    """This thread's :data:`_CHUNK`-byte read buffer, made once. A new 1 MiB buffer per
    batch was fresh memory, a page fault per 4 KiB page, whenever malloc had given the
    last one back (775 faults in the checks of scipy's 21 batches; 71 with this one)."""
    buf: bytearray | None = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = bytearray(_CHUNK)
    return buf


def _check_old_file(root: str | os.PathLike[str], path: bytes, size: int, algo: int,
                    expected: bytes, cache: DirCache, buf: bytearray, fd: int = -1) -> None:
    """Raise as :func:`read_old_file` would if ``root/path`` has not ``size`` bytes with the
    ``algo`` digest ``expected``; read a piece at a time into ``buf``, nothing kept.
    ``fd``: the file, opened already with its size checked (closed here, whatever
    happens), read from offset 0."""
    if fd < 0:
        got_fd = open_regular_sized(root, path, cache)
        if got_fd is None:
            raise MissingBaseError("old file of a patch is missing", path=path)
        fd, actual = got_fd
        try:
            _expect_size(actual, size, path)
        except BtrdeltaError:
            os.close(fd)
            raise
    view = memoryview(buf)
    # BLAKE3 (every digest a delta names but SHA-256) without hasher()'s dispatch and
    # wrapper: ~1.5 us less a file, scipy's 1,203 unchanged files in a receive
    length = _BLAKE3_LENGTH.get(algo)  # type: ignore[call-overload]
    try:
        h = blake3.blake3(max_threads=1) if length is not None else hasher(algo)
        got = 0
        while got < size:
            n = os.preadv(fd, (view[: min(size - got, len(buf))],), got)
            if not n:
                break
            h.update(view[:n])
            got += n
        if got != size:
            raise ApplyError("old file changed while being read", op="read", path=path)
    except OSError as exc:
        raise ApplyError(f"cannot read old file: {exc.strerror}", op="read", path=path) from exc
    finally:
        os.close(fd)
    _expect_digest(bytes(h.digest() if length is None else h.digest(length=length)), expected,
                   path)


#: one old file to check: (old root, path, size, digest algorithm, digest, record index,
#: its open fd or -1)
_Check = tuple["str | os.PathLike[str]", bytes, int, int, bytes, int, int]


def _close_fds(batch: list[_Check]) -> None:
    """Close the fds a batch of checks holds (a batch dropped, or left by a failure)."""
    for check in batch:
        if check[6] >= 0:
            os.close(check[6])


class OldFileChecks:
    """Old files checked against their size and digest in worker threads, while the caller
    goes on without their content (``btrdelta receive`` on btrfs, where the content of an
    unchanged file is cloned from the parent, never read by the receive itself).

    Files are checked in batches (``_BATCH_FILES`` files or ``_BATCH_BYTES`` bytes, each
    batch in one thread with its own :class:`DirCache`), in the order they were added.
    :meth:`add` raises the failure of a batch that is finished, and waits for the oldest
    batch when more than ``_IN_FLIGHT`` are not; :meth:`wait` waits for all of them: the
    caller calls it before anything that depends on the old files being right is made
    final (the received subvolume gets its name after the END it holds back). A failure
    is the error :func:`read_old_file` raises, with the index of the record that named the
    file. A file may be handed over open (its size checked by the caller): the check
    reads it without looking it up again and closes it; at most ``_MAX_FDS`` such files
    are held open at a time (past them, a file handed over is closed and checked by its
    path).
    """

    _BATCH_FILES = 64
    _BATCH_BYTES = 4 << 20
    _IN_FLIGHT = 16
    _MAX_FDS = 256

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: Pool | None = None
        self._batch: list[_Check] = []
        self._bytes = 0
        #: batches submitted, not yet waited for: (future, the batch, fds it holds)
        self._running: deque[tuple[Task[None], list[_Check], int]] = deque()
        #: fds held by the batch being gathered and by the running ones
        self._fds = 0
        self._batch_fds = 0

    def add(self, root: str | os.PathLike[str], path: bytes, size: int, algo: int,
            expected_digest: bytes, index: int, fd: int = -1) -> None:
        """Check ``root/path`` (``size`` bytes, ``expected_digest``) in the background;
        ``fd``: the file opened already, its size checked (this takes it over; closed at
        once when ``_MAX_FDS`` are held: the check opens the file again, rather than the
        caller waiting for the oldest batch to give some back)."""
        if fd >= 0 and self._fds >= self._MAX_FDS:
            os.close(fd)
            fd = -1
        self._batch.append((root, path, size, algo, expected_digest, index, fd))
        self._bytes += size
        if fd >= 0:
            self._fds += 1
            self._batch_fds += 1
        if len(self._batch) >= self._BATCH_FILES or self._bytes >= self._BATCH_BYTES:
            self._submit()
        running = self._running
        while running and (running[0][0].done() or len(running) > self._IN_FLIGHT):
            self._take()

    def _take(self) -> None:
        """Wait for the oldest running batch; raise its failure."""
        fut, _batch, fds = self._running.popleft()
        self._fds -= fds
        fut.result()

    def _submit(self) -> None:
        if not self._batch:
            return
        if self._pool is None:
            self._pool = Pool(self.workers, "btrdelta-oldcheck")
        batch = self._batch
        self._running.append((self._pool.submit(self._check, batch), batch, self._batch_fds))
        self._batch = []
        self._bytes = 0
        self._batch_fds = 0

    def _check(self, batch: list[_Check]) -> None:
        cache = DirCache()
        buf = _buffer()  # read into, hashed, reused: no new memory per file or batch
        started = 0  # checks started (each closes its fd)
        try:
            for root, path, size, algo, expected, index, fd in batch:
                started += 1
                try:
                    _check_old_file(root, path, size, algo, expected, cache, buf, fd)
                except BtrdeltaError as exc:
                    raise exc.located(index=index) from None
        finally:
            _close_fds(batch[started:])  # those not reached (a failure)
            cache.close()

    def wait(self) -> None:
        """Every file added so far checked; raises the first failure (in order added)."""
        self._submit()
        while self._running:
            self._take()

    def close(self) -> None:
        """Stop the threads: batches not started are dropped, running ones end; the files
        they hold open are closed."""
        _close_fds(self._batch)
        self._batch = []
        running, self._running = self._running, deque()
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        for fut, batch, _fds in running:
            if fut.cancelled():
                _close_fds(batch)
        self._fds = self._batch_fds = 0
