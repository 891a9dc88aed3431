"""The one safe walk of untrusted paths below a trusted directory.

Strategy: a path that comes from a stream (or a delta, a record, a peer) is never turned
into an absolute path. It is split into components and checked (:func:`split_path`: no
absolute path, no NUL, no ``.``/``..``, no empty component); every directory on the way is
opened with ``openat(O_DIRECTORY | O_NOFOLLOW)`` relative to the previous one
(:func:`open_subdir`, the one step of every walk), so a symlink anywhere on the way,
including one the stream planted itself, fails the walk instead of being followed. The
last component is then used with the ``*at`` system call that does not follow it
(``renameat``, ``linkat`` without ``AT_SYMLINK_FOLLOW``, ``fchownat`` and ``utimensat`` with
``AT_SYMLINK_NOFOLLOW``, ``openat`` with ``O_NOFOLLOW``). Nothing here uses ``realpath``, so
there is no check-then-use race with the names the stream controls.

Two shapes share that walk:

* :class:`Sandbox` holds the root directory of a tree being written (a received
  subvolume) and caches the directories opened below it by path (most records land in a few
  directories); :meth:`Sandbox.invalidate` drops every cached entry at or below a path that
  a rename or rmdir changed, so a cached descriptor always names what the path names now.
* :func:`open_regular`, :func:`file_size` and :func:`list_dir` look things up read-only
  below a root given as a path (an old snapshot a delta was made against): the root itself
  is the user's path and is followed, everything below it is not. A missing entry, a
  symlink or a non-directory on the way are all "not there" (``None``); :class:`DirCache`
  keeps the directory of the last lookup open.

The C fast path of receive (``receive/_fastapply.c``) applies the same rules with the same
open flags (:data:`DIR_OPEN`, :data:`PATH_OPEN`) and cache bound (:data:`CACHE_MAX`), taken
from the generated ``_constants.h``.

Knows nothing of stream records; raises :class:`~btrdelta.errors.UnsafePathError` for paths
it refuses and lets :class:`OSError` through for the caller to wrap.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable, Sequence

from .. import TYPE_CHECKING
from ..errors import UnsafePathError

if TYPE_CHECKING:
    from typing import Final

__all__ = [
    "CACHE_MAX",
    "DIR_FLAGS",
    "DIR_OPEN",
    "PATH_FLAGS",
    "PATH_OPEN",
    "ROOT",
    "WALK_KEEP",
    "DirCache",
    "Sandbox",
    "check_name",
    "file_size",
    "list_dir",
    "open_flags",
    "open_regular",
    "open_regular_sized",
    "open_subdir",
    "split_path",
    "walk",
]

#: the parent placeholder :meth:`Sandbox.parent` returns for the subvolume root itself
ROOT = b""

#: how every directory below a root is opened (names: the C header spells them too)
DIR_OPEN: Final = ("O_RDONLY", "O_DIRECTORY", "O_NOFOLLOW", "O_CLOEXEC")
#: how an entry itself is opened to be looked at (fstat, fchmod through /proc) unfollowed
PATH_OPEN: Final = ("O_PATH", "O_NOFOLLOW", "O_CLOEXEC")
#: directories a :class:`Sandbox` keeps open before it starts over
CACHE_MAX: Final = 256
#: of the directories one walk opens, the deepest this many stay cached (the others are
#: closed once the next one is open): a walk deeper than :data:`CACHE_MAX` that kept them
#: all would fill the cache, have it cleared at once and the next walk start at the root
#: again, time in the square of the depth (a chain of 1,000 directories: 1.9 million opens)
WALK_KEEP: Final = 16


def open_flags(names: Iterable[str]) -> int:
    """The ``os.O_*`` flags named in ``names``, or-ed."""
    flags = 0
    for name in names:
        flags |= getattr(os, name)
    return flags


DIR_FLAGS: Final = open_flags(DIR_OPEN)
PATH_FLAGS: Final = open_flags(PATH_OPEN)
#: a root given as a path is the user's (trusted) path: a symlink to it is followed
_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
#: regular files read below a root (O_NONBLOCK: opening a FIFO never blocks)
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def check_name(name: bytes, what: str = "name") -> bytes:
    """Validate one path component (a subvolume name, the last part of a path).

    Raises:
        UnsafePathError: empty, ``.``, ``..``, or containing ``/`` or NUL.
    """
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise UnsafePathError(f"unsafe {what} {name!r}", path=name)
    return name


def split_path(path: bytes) -> list[bytes]:
    """Split a stream path into checked components (``b""`` = the root: ``[]``).

    Raises:
        UnsafePathError: absolute path, NUL byte, empty, ``.`` or ``..`` component.
    """
    if not path:
        return []
    parts = path.split(b"/")
    # membership tests on the list run in C: one pass per forbidden component
    if b"" in parts or b".." in parts or b"." in parts or b"\0" in path:
        if path[:1] == b"/":
            raise UnsafePathError("absolute path in stream", path=path)
        if b"\0" in path:
            raise UnsafePathError("NUL byte in stream path", path=path)
        raise UnsafePathError("empty, '.' or '..' component in stream path", path=path)
    return parts


def open_subdir(dir_fd: int, name: bytes, path: bytes) -> int:
    """One step of every walk: the directory ``name`` of ``dir_fd``, never a symlink.

    Raises:
        UnsafePathError: ``name`` is a symlink or not a directory (``path`` names the whole
            path in the error).
        OSError: ``name`` does not exist (and other system errors).
    """
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePathError(
                f"path component {name!r} is a symlink or not a directory", path=path
            ) from exc
        raise


def walk(dir_fd: int, parts: Sequence[bytes], path: bytes = b"") -> int:
    """An owned descriptor of the directory ``dir_fd/parts...`` (``parts`` not empty),
    each component opened with :func:`open_subdir`; ``dir_fd`` stays the caller's.

    Raises:
        UnsafePathError: a component is a symlink or not a directory.
        OSError: a component does not exist.
    """
    cur = dir_fd
    for part in parts:
        try:
            nfd = open_subdir(cur, part, path)
        finally:
            if cur != dir_fd:
                os.close(cur)
        cur = nfd
    return cur


class Sandbox:
    """A subvolume root directory and the directories opened below it.

    Args:
        root_fd: an open directory descriptor (owned by the sandbox; closed by
            :meth:`close`).
    """

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self._dirs: dict[bytes, int] = {}
        #: the last :meth:`parent` answer (consecutive records mostly name one path); it is
        #: dropped whenever a cached directory descriptor is closed
        self._last: tuple[bytes, tuple[int, bytes]] | None = None
        #: every cached key and all its ancestors: a rename of anything else is cheap
        self._prefixes: set[bytes] = set()

    @classmethod
    def open(
        cls, directory: str | bytes | os.PathLike[str], *, dir_fd: int | None = None
    ) -> Sandbox:
        """Open ``directory`` (trusted, e.g. from the command line) as a sandbox root."""
        return cls(os.open(directory, DIR_FLAGS, dir_fd=dir_fd))

    def close(self) -> None:
        """Close every descriptor."""
        self.clear()
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- directory descriptors ---------------------------------------------------------

    def clear(self) -> None:
        """Forget all cached directories."""
        self._last = None
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        self._prefixes.clear()

    def trim(self) -> None:
        """Bound the cache; call between records (never while holding a returned fd)."""
        if len(self._dirs) > CACHE_MAX:
            self.clear()

    def invalidate(self, path: bytes) -> None:
        """Drop cached directories at or below ``path`` (after it was renamed or removed)."""
        if path not in self._prefixes:
            return
        self._last = None
        prefix = path + b"/"
        stale = [k for k in self._dirs if k == path or k.startswith(prefix)]
        for key in stale:
            os.close(self._dirs.pop(key))
        self._prefixes = set()
        for key in self._dirs:
            self._add_prefixes(key)

    def _add_prefixes(self, key: bytes) -> None:
        prefixes = self._prefixes
        while key and key not in prefixes:
            prefixes.add(key)
            cut = key.rfind(b"/")
            key = key[:cut] if cut > 0 else b""

    def dir_fd(self, parts: list[bytes], path: bytes) -> int:
        """Descriptor of the directory named by ``parts`` (walked without following links).

        Raises:
            UnsafePathError: a component is a symlink or not a directory.
            OSError: a component does not exist (and other system errors).
        """
        if not parts:
            return self.root_fd
        key = b"/".join(parts)
        fd = self._dirs.get(key)
        if fd is not None:
            return fd
        # the longest cached prefix is the starting point of the walk
        start = 0
        cur = self.root_fd
        for i in range(len(parts) - 1, 0, -1):
            cached = self._dirs.get(b"/".join(parts[:i]))
            if cached is not None:
                start, cur = i, cached
                break
        opened: list[tuple[bytes, int]] = []
        keep = len(parts) - WALK_KEEP  # the index of the first directory kept
        loose = -1  # an open directory on the way that is not kept
        try:
            for i in range(start, len(parts)):
                cur = open_subdir(cur, parts[i], path)
                if loose >= 0:
                    os.close(loose)
                    loose = -1
                if i >= keep:
                    opened.append((b"/".join(parts[: i + 1]), cur))
                else:
                    loose = cur
        except BaseException:
            if loose >= 0:
                os.close(loose)
            for _, nfd in opened:
                os.close(nfd)
            raise
        for k, nfd in opened:
            self._dirs[k] = nfd
        self._add_prefixes(opened[-1][0])
        return cur

    def parent(self, path: bytes) -> tuple[int, bytes]:
        """``(directory fd, last component)`` for a path that names an entry.

        Raises:
            UnsafePathError: the path is unsafe or is the root (``b""``).
        """
        last = self._last
        if last is not None and last[0] == path:
            return last[1]  # checked and resolved by the previous call, still open
        parts = split_path(path)
        if not parts:
            raise UnsafePathError("this command cannot apply to the subvolume root", path=path)
        name = parts[-1]
        if len(parts) == 1:
            found = (self.root_fd, name)
        else:
            fd = self._dirs.get(path[: -len(name) - 1])
            found = (fd if fd is not None else self.dir_fd(parts[:-1], path), name)
        self._last = (path, found)
        return found

    def open_path(self, path: bytes) -> int:
        """An ``O_PATH`` descriptor of the entry itself (a symlink is not followed)."""
        parts = split_path(path)
        if not parts:
            return os.open(".", PATH_FLAGS | os.O_DIRECTORY, dir_fd=self.root_fd)
        fd = self.dir_fd(parts[:-1], path)
        return os.open(parts[-1], PATH_FLAGS, dir_fd=fd)

    def open_file(self, path: bytes, flags: int, *, noatime: bool = False) -> int:
        """Open an existing regular file for I/O; refuse symlinks, devices, FIFOs, dirs.

        The entry is first opened with ``O_PATH | O_NOFOLLOW`` and checked with ``fstat``;
        only a regular file is then reopened (through ``/proc/self/fd``) with ``flags``, so
        opening never blocks on a FIFO nor touches a device the stream created. ``noatime``:
        with ``O_NOATIME`` where allowed (the owner or CAP_FOWNER), reading it then leaves
        its atime.
        """
        pfd = self.open_path(path)
        try:
            st = os.fstat(pfd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePathError(
                    "not a regular file (symlink, device, FIFO or directory)", path=path
                )
            if noatime:
                with contextlib.suppress(PermissionError):
                    return os.open(f"/proc/self/fd/{pfd}", flags | os.O_NOATIME | os.O_CLOEXEC)
            return os.open(f"/proc/self/fd/{pfd}", flags | os.O_CLOEXEC)
        finally:
            os.close(pfd)

    def proc_path(self, path: bytes) -> bytes:
        """A ``/proc/self/fd/N/name`` path for syscalls without a dirfd form (xattrs).

        The directory part is the already-resolved directory descriptor; callers must use
        the ``l*`` (no-follow) variant so the last component is not followed either.
        """
        fd, name = self.parent(path)
        return b"/proc/self/fd/%d/%s" % (fd, name)


# -- read-only lookups below a root given as a path ------------------------------------


def _entry_parts(path: bytes) -> list[bytes]:
    parts = split_path(path)
    if not parts:
        raise UnsafePathError("empty path", path=path)
    return parts


def _open_dir(root: str | os.PathLike[str], parts: Sequence[bytes]) -> int | None:
    """An owned fd of the directory ``root/parts...`` (the root followed, the parts walked
    without following symlinks), ``None`` if there is none.

    Raises:
        OSError: the root itself cannot be opened.
    """
    fd = os.open(root, _ROOT_FLAGS)
    if not parts:
        return fd
    try:
        return walk(fd, parts)
    except (OSError, UnsafePathError):
        return None
    finally:
        os.close(fd)


class DirCache:
    """Keeps open the directories of the last lookup, from the root down (a stream names
    files in tree order: the files of one directory come one after the other, then those
    of a sibling or a subdirectory): a lookup opens only the components below what it
    shares with the previous one, one ``openat`` per file in the same directory. At most
    :data:`_DIR_CACHE_DEPTH` levels stay open (below them, the walk of each lookup is
    kept until the next). Not thread-safe; :meth:`close` releases the fds."""

    __slots__ = ("_deep", "_fds", "_parts", "_root")

    def __init__(self) -> None:
        self._root: str | None = None
        #: components of the directories held open, and their fds (``_fds[0]``: the root,
        #: ``_fds[i]``: ``root/_parts[:i]``)
        self._parts: list[bytes] = []
        self._fds: list[int] = []
        #: the fd of a lookup deeper than the levels kept (owned until the next lookup)
        self._deep = -1

    def dir_fd(self, root: str | os.PathLike[str], parts: list[bytes]) -> int | None:
        """A borrowed fd of ``root/parts...`` (walked without following symlinks), ``None``
        if there is none.

        Raises:
            OSError: ``root`` itself cannot be opened.
        """
        if self._deep >= 0:
            os.close(self._deep)
            self._deep = -1
        sroot = os.fspath(root)
        if sroot != self._root or not self._fds:
            self.close()
            self._fds.append(os.open(root, _ROOT_FLAGS))
            self._root = sroot
        have, fds = self._parts, self._fds
        n = 0
        m = min(len(have), len(parts))
        while n < m and have[n] == parts[n]:
            n += 1
        for fd in fds[n + 1 :]:
            os.close(fd)
        del fds[n + 1 :]
        del have[n:]
        try:
            while len(have) < len(parts) and len(have) < _DIR_CACHE_DEPTH:
                fds.append(open_subdir(fds[-1], parts[len(have)], b""))
                have.append(parts[len(have)])
            if len(have) < len(parts):
                self._deep = walk(fds[-1], parts[len(have) :])
                return self._deep
        except (OSError, UnsafePathError):
            return None
        return fds[-1]

    def close(self) -> None:
        """Close the cached directory fds."""
        for fd in self._fds:
            os.close(fd)
        if self._deep >= 0:
            os.close(self._deep)
        self._root, self._parts, self._fds, self._deep = None, [], [], -1


#: directory levels a :class:`DirCache` keeps open (a path may have thousands)
_DIR_CACHE_DEPTH = 32


def _open_regular_at(dir_fd: int, name: bytes) -> tuple[int, int] | None:
    """``name`` in ``dir_fd`` opened read-only, if it is a regular file: (fd, size)."""
    try:
        ffd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    st = os.fstat(ffd)
    if not stat.S_ISREG(st.st_mode):
        os.close(ffd)
        return None
    return ffd, st.st_size


def open_regular(
    root: str | os.PathLike[str], path: bytes, cache: DirCache | None = None
) -> int | None:
    """An ``O_RDONLY`` fd (the caller closes it) of the regular file ``root/path``, ``None``
    if there is none (missing, not regular, or a symlink on the way).

    Args:
        cache: reuse the directory fd of the previous lookup.

    Raises:
        UnsafePathError: ``path`` is empty, absolute or has ``.``/``..``/empty components.
        OSError: ``root`` itself cannot be opened.
    """
    got = open_regular_sized(root, path, cache)
    return None if got is None else got[0]


def open_regular_sized(
    root: str | os.PathLike[str], path: bytes, cache: DirCache | None = None
) -> tuple[int, int] | None:
    """:func:`open_regular` and the file's size from the same ``fstat``: ``(fd, size)``."""
    parts = _entry_parts(path)
    if cache is not None:
        dfd = cache.dir_fd(root, parts[:-1])
        return None if dfd is None else _open_regular_at(dfd, parts[-1])
    fd = _open_dir(root, parts[:-1])
    if fd is None:
        return None
    try:
        return _open_regular_at(fd, parts[-1])
    finally:
        os.close(fd)


def file_size(root: str | os.PathLike[str], path: bytes) -> int | None:
    """Size of the regular file ``root/path``, ``None`` if absent, not a regular file or
    the path is unsafe."""
    try:
        fd = open_regular(root, path)
    except UnsafePathError:
        return None
    if fd is None:
        return None
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def list_dir(root: str | os.PathLike[str], path: bytes,
             cache: DirCache | None = None) -> list[bytes] | None:
    """Sorted entry names of the directory ``root/path`` (``b""``: the root itself), walked
    without following symlinks; ``None`` if it is not a directory or the path is unsafe.
    ``cache``: the directory is looked up with it (and kept there: the files of a directory
    listed for a delta's UNLINKs are read next).

    Directories on another device are left out: a subvolume inside a btrfs subvolume (in a
    snapshot, the empty directory standing for it, inode 2) or a mount point. btrfs send
    leaves them out, so the tree a receiver made of a snapshot has none of them: with them
    the sender's and the receiver's listings of the old snapshot would differ (a delta's
    old-name and UNLINK references are positions in them)."""
    try:
        parts = split_path(path)
    except UnsafePathError:
        return None
    try:
        fd = _open_dir(root, parts) if cache is None else cache.dir_fd(root, parts)
    except OSError:
        return None
    if fd is None:
        return None
    try:
        dev = os.fstat(fd).st_dev
        with os.scandir(fd) as entries:
            return sorted(os.fsencode(e.name) for e in entries
                          if not e.is_dir(follow_symlinks=False)
                          or e.stat(follow_symlinks=False).st_dev == dev)
    except OSError:
        return None
    finally:
        if cache is None:
            os.close(fd)
