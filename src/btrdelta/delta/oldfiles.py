"""Reading files of the old snapshot safely, and the digests delta streams use.

Paths come from streams, so they are untrusted: :func:`read_old_file` refuses absolute
paths, ``.``/``..`` and empty components, walks every directory with
``openat(O_DIRECTORY | O_NOFOLLOW)`` and opens the file with ``O_NOFOLLOW``, so nothing
outside the old root (and no symlink) is ever read.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import blake3

from ..errors import ApplyError, ChecksumError, MissingBaseError, UnsafePathError
from .format import HashAlgo

__all__ = [
    "DirCache",
    "digest", "hasher", "list_old_dir", "old_file_size", "open_old_file", "read_old_file",
]

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: the old root itself is the user's path: a symlink to it is followed
_ROOT = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


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


#: BLAKE3 digests of buffers from this size on use every core (same output)
_THREADED = 1 << 20
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


def _components(path: bytes) -> list[bytes]:
    if not path or path.startswith(b"/") or b"\x00" in path:
        raise UnsafePathError("unsafe old-file path", path=path)
    parts = path.split(b"/")
    if any(p in (b"", b".", b"..") for p in parts):
        raise UnsafePathError("unsafe old-file path", path=path)
    return parts


def _walk(root: str | os.PathLike[str], parts: list[bytes]) -> int | None:
    """An owned fd of the directory ``root/parts...`` (the root followed, the parts
    walked without following symlinks), ``None`` if there is none.

    Raises:
        OSError: the root itself cannot be opened.
    """
    fd = os.open(root, _ROOT)
    for part in parts:
        try:
            nfd = os.open(part, _DIR, dir_fd=fd)
        except OSError:
            os.close(fd)
            return None
        os.close(fd)
        fd = nfd
    return fd


class DirCache:
    """Keeps the directory fd of the last old file opened (files of one directory come one
    after the other in a stream): one ``openat`` per file instead of one per path
    component. Not thread-safe; :meth:`close` releases the fd."""

    __slots__ = ("_fd", "_key")

    def __init__(self) -> None:
        self._key: tuple[Any, tuple[bytes, ...]] | None = None
        self._fd = -1

    def dir_fd(self, root: str | os.PathLike[str], parts: list[bytes]) -> int | None:
        """A borrowed fd of ``root/parts...`` (walked without following symlinks)."""
        key = (os.fspath(root), tuple(parts))
        if key == self._key:
            return self._fd
        self.close()
        fd = _walk(root, parts)
        if fd is not None:
            self._key, self._fd = key, fd
        return fd

    def close(self) -> None:
        """Close the cached directory fd."""
        if self._fd >= 0:
            os.close(self._fd)
        self._key, self._fd = None, -1


def _open(
    root: str | os.PathLike[str], path: bytes, cache: DirCache | None = None
) -> int | None:
    """An O_RDONLY fd of the regular file ``root/path``, or ``None`` if there is none."""
    parts = _components(path)
    if cache is not None:
        dfd = cache.dir_fd(root, parts[:-1])
        return None if dfd is None else _open_regular(parts[-1], dfd)
    fd = _walk(root, parts[:-1])
    if fd is None:
        return None
    try:
        return _open_regular(parts[-1], fd)
    finally:
        os.close(fd)


def _open_regular(name: bytes, dir_fd: int) -> int | None:
    """``name`` in ``dir_fd`` opened with ``_FILE``, if it is a regular file."""
    try:
        ffd = os.open(name, _FILE, dir_fd=dir_fd)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(ffd).st_mode):
        os.close(ffd)
        return None
    return ffd


def list_old_dir(root: str | os.PathLike[str], path: bytes) -> list[bytes] | None:
    """Sorted entry names of the directory ``root/path`` (``b""``: the root itself), walked
    without following symlinks; ``None`` if it is not a directory or the path is unsafe."""
    try:
        parts = _components(path) if path else []
    except UnsafePathError:
        return None
    try:
        fd = _walk(root, parts)
    except OSError:
        return None
    if fd is None:
        return None
    try:
        return sorted(os.fsencode(name) for name in os.listdir(fd))
    except OSError:
        return None
    finally:
        os.close(fd)


def open_old_file(root: str | os.PathLike[str], path: bytes) -> int | None:
    """An O_RDONLY fd (the caller closes it) of the regular file ``root/path``, ``None`` if
    there is none.

    Raises:
        UnsafePathError: ``path`` is absolute or has ``..``/empty components.
    """
    return _open(root, path)


def old_file_size(root: str | os.PathLike[str], path: bytes) -> int | None:
    """Size of the regular file ``root/path``, ``None`` if absent or not a regular file."""
    try:
        fd = _open(root, path)
    except UnsafePathError:
        return None
    if fd is None:
        return None
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


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
        UnsafePathError: ``path`` is absolute or has ``..``/empty components.
        MissingBaseError: ``expected_size`` is given and the file is missing.
        ChecksumError: the size or the ``algo`` digest differs from what is expected.
    """
    fd = _open(root, path, cache)
    if fd is None:
        if expected_size is None:
            return None
        raise MissingBaseError("old file of a patch is missing", path=path)
    try:
        size = os.fstat(fd).st_size
        if expected_size is not None and size != expected_size:
            raise ChecksumError(
                f"old file has {size} bytes, the patch expects {expected_size}",
                expected=expected_size, actual=size, path=path,
            )
        if size > max_size:
            return None
        pieces: list[bytes] = []
        got = 0
        while got < size:
            piece = os.read(fd, min(size - got, 1 << 30))
            if not piece:
                break
            pieces.append(piece)
            got += len(piece)
        if got != size:
            raise ApplyError("old file changed while being read", op="read", path=path)
    except OSError as exc:
        raise ApplyError(f"cannot read old file: {exc.strerror}", op="read", path=path) from exc
    finally:
        os.close(fd)
    data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    if algo is not None and expected_digest is not None:
        actual = digest(algo, data)
        if actual != expected_digest:
            raise ChecksumError(
                "old file differs from the one the patch was made against",
                expected=expected_digest.hex(), actual=actual.hex(), path=path,
            )
    return data
