"""Safe resolution of stream paths inside one subvolume directory.

Strategy: a :class:`Sandbox` holds an open file descriptor of the subvolume's root directory
and never turns a stream path into an absolute path. A path is split into components and
checked (no absolute path, no NUL, no ``.``/``..``, no empty component); every directory on
the way is opened with ``openat(O_DIRECTORY | O_NOFOLLOW)`` relative to the previous one, so
a symlink anywhere on the way — including one the stream planted itself — fails the walk
instead of being followed. The last component is then used with the ``*at`` system call that
does not follow it (``renameat``, ``linkat`` without ``AT_SYMLINK_FOLLOW``, ``fchownat`` and
``utimensat`` with ``AT_SYMLINK_NOFOLLOW``, ``openat`` with ``O_NOFOLLOW``). Nothing here uses
``realpath``, so there is no check-then-use race with the names the stream controls.

Opened directories are cached by their path (most records land in a few directories);
:meth:`Sandbox.invalidate` drops every cached entry at or below a path that a rename or
rmdir changed, so a cached descriptor always names what the path names now.

This module knows nothing of stream records; it raises :class:`~btrdelta.errors.UnsafePathError`
for paths it refuses and lets :class:`OSError` through for the caller to wrap.
"""

from __future__ import annotations

import os
import stat

from ..errors import UnsafePathError

__all__ = ["ROOT", "Sandbox", "check_name", "split_path"]

#: the parent placeholder :meth:`Sandbox.parent` returns for the subvolume root itself
ROOT = b""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_CACHE_MAX = 256


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
        return cls(os.open(directory, _DIR_FLAGS, dir_fd=dir_fd))

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
        if len(self._dirs) > _CACHE_MAX:
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
        try:
            for i in range(start, len(parts)):
                try:
                    nfd = os.open(parts[i], _DIR_FLAGS, dir_fd=cur)
                except OSError as exc:
                    if exc.errno in (40, 20):  # ELOOP, ENOTDIR
                        raise UnsafePathError(
                            f"path component {parts[i]!r} is a symlink or not a directory",
                            path=path,
                        ) from exc
                    raise
                opened.append((b"/".join(parts[: i + 1]), nfd))
                cur = nfd
        except BaseException:
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
            return os.open(".", _PATH_FLAGS | os.O_DIRECTORY, dir_fd=self.root_fd)
        fd = self.dir_fd(parts[:-1], path)
        return os.open(parts[-1], _PATH_FLAGS, dir_fd=fd)

    def open_file(self, path: bytes, flags: int) -> int:
        """Open an existing regular file for I/O; refuse symlinks, devices, FIFOs, dirs.

        The entry is first opened with ``O_PATH | O_NOFOLLOW`` and checked with ``fstat``;
        only a regular file is then reopened (through ``/proc/self/fd``) with ``flags``, so
        opening never blocks on a FIFO nor touches a device the stream created.
        """
        pfd = self.open_path(path)
        try:
            st = os.fstat(pfd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePathError(
                    "not a regular file (symlink, device, FIFO or directory)", path=path
                )
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
