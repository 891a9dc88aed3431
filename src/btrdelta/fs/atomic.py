"""Files that appear whole or not at all, written without following a path anyone else controls.

This module owns how btrdelta creates output files and store entries:

* :func:`atomic_output` gives a writable, seekable file whose content replaces ``path`` only
  when the ``with`` block succeeds: the bytes go to an unnamed file (``O_TMPFILE``) in the
  same directory, or, where the file system has none, to a new temporary name opened with
  ``O_CREAT | O_EXCL | O_NOFOLLOW``; then ``fsync``, a rename over ``path`` and an
  ``fsync`` of the directory (both skipped with ``durable=False``: ``send`` writes its
  stream as ``btrfs send -f`` does). On any failure the temporary file is removed and ``path`` is
  untouched. No predictable name is ever opened, so a symlink planted by another user
  (``OUT.tmp-1234 -> /etc/shadow``) is never written through.
* :func:`create_file` durably creates a file that must not exist yet (a chunk in a store:
  written, ``fsync``-ed, then linked under its final name, which fails if the name exists);
  :func:`write_unnamed` and :func:`link_written` are its two halves, for callers that make
  many files durable at once (the chunk store: one ``syncfs`` per batch) before naming them.

An unnamed file is ``fsync``-ed once it has a name: btrfs does not log an inode without
links (its ``fsync`` returns having persisted nothing of it), and the ``fsync`` of the
directory after the rename logs the new name with the inode as last logged: after a power
cut the name was there with an empty file (``make vmtest``, session 12: an install cut at
its start left ``.btrdelta/state.json`` empty on Debian's 6.1 kernel, and every later
device command refused the device). ``create_file`` ``fsync``-s before the link too (the
data durable before the name on file systems that do persist unnamed files).

It knows nothing of formats; callers decide what the bytes are.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator

from .. import TYPE_CHECKING
from ..errors import BtrdeltaError

if TYPE_CHECKING:
    from typing import BinaryIO

__all__ = [
    "atomic_output",
    "create_file",
    "discard_written",
    "fsync_dir",
    "link_written",
    "naming",
    "pid_alive",
    "remove_stale_temps",
    "write_atomic",
    "write_unnamed",
]

_PROC_FD = "/proc/self/fd"
# O_TMPFILE answers these where the file system (or kernel) has no unnamed files
_NO_TMPFILE = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT})


def _tmp_name(base: str) -> str:
    return f".{base}.tmp-{os.getpid()}-{os.urandom(6).hex()}"


def remove_stale_temps(path: str | os.PathLike[str]) -> list[str]:
    """Remove the temporary names :func:`atomic_output` gave ``path``'s new versions in
    writers that are gone (``.BASE.tmp-PID-HEX``, PID no longer running: a writer killed
    between its link and its rename). A name of a running writer is left alone.

    Returns:
        the names removed.
    """
    import re  # (not imported by a command that removes nothing)

    directory, base = os.path.split(os.path.abspath(path))
    stale = re.compile(rf"\.{re.escape(base)}\.tmp-(\d+)-[0-9a-f]{{12}}")
    removed = []
    with os.scandir(directory) as it:
        names = [e.name for e in it if e.name.startswith(f".{base}.tmp-")]
    for name in names:
        m = stale.fullmatch(name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))
                removed.append(name)
    return removed


def _open_dir(directory: str) -> int:
    return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _open_unnamed(dir_fd: int, mode: int) -> int | None:
    """An ``O_TMPFILE`` file in ``dir_fd``, or ``None`` where there is none."""
    if not hasattr(os, "O_TMPFILE") or not os.path.isdir(_PROC_FD):
        return None
    try:
        return os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in _NO_TMPFILE:
            return None
        raise


def _open_new(dir_fd: int, base: str, mode: int) -> tuple[int, str]:
    """A new file under a fresh temporary name (never an existing file or a symlink)."""
    flags = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_RDWR | os.O_CLOEXEC
    while True:
        name = _tmp_name(base)
        try:
            return os.open(name, flags, mode, dir_fd=dir_fd), name
        except FileExistsError:
            continue


def fsync_dir(directory: str | int) -> None:
    """``fsync`` a directory (by path or descriptor), making renames in it durable."""
    if isinstance(directory, int):
        os.fsync(directory)
        return
    fd = _open_dir(directory)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_unnamed(fd: int, dir_fd: int, name: str) -> None:
    """Give the ``O_TMPFILE`` file ``fd`` the name ``name`` (fails if it exists)."""
    os.link(f"{_PROC_FD}/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)


#: the output's buffer: a stream's pieces (a record's header, then its data) are written
#: ~120 KiB at a time, not each by a system call (below glibc's 128 KiB mmap threshold:
#: heap memory, not pages mapped and faulted in afresh for each output)
_BUFFER = 120 << 10
#: a write's errors that are the output's, wherever the caller's block wrote to it: the
#: file is named in them (a full disk said only "No space left on device")
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, mode: int = 0o644,
                  durable: bool = True) -> Iterator[BinaryIO]:
    """A new file that replaces ``path`` when the block succeeds (see the module docstring).

    Args:
        path: the file to create or replace. A symlink at ``path`` itself is replaced by the
            file, not followed. A device or FIFO is written directly (the caller named it).
        mode: permission bits of a new file (the umask applies).
        durable: ``fsync`` the file and the directory (False: still renamed into place only
            on success, but left to the kernel's write-back, as ``btrfs send -f`` does).

    Raises:
        BtrdeltaError: ``path`` is a directory, or its directory does not exist.
    """
    path = os.fspath(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise BtrdeltaError("is a directory, not a file to write", path=path)
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        with open(path, "wb") as special:  # a device or FIFO the caller asked for
            yield special
        return
    directory, base = os.path.split(os.path.abspath(path))
    try:
        dir_fd = _open_dir(directory)
    except FileNotFoundError:
        raise BtrdeltaError("directory does not exist", path=directory) from None
    tmp: str | None = None
    try:
        try:
            fd = _open_unnamed(dir_fd, mode)
            if fd is None:
                fd, tmp = _open_new(dir_fd, base, mode)
        except OSError as exc:  # named '.' or a temporary name: say the file asked for
            raise OSError(exc.errno, exc.strerror, path) from None
        block = False
        try:
            with os.fdopen(fd, "w+b", buffering=_BUFFER) as f:
                block = True
                yield f
                block = False
                f.flush()
                if tmp is None:
                    tmp = _tmp_name(base)
                    _link_unnamed(f.fileno(), dir_fd, tmp)
                if durable:  # (after the link: see _sync_linked)
                    os.fsync(f.fileno())
            os.rename(tmp, base, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            tmp = None
            if durable:
                os.fsync(dir_fd)
        except OSError as exc:  # (a write's, a flush's, an fsync's: they name no file)
            if not block or exc.errno in _FULL:
                _name(exc, path)
            raise
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
        os.close(dir_fd)


def _name(exc: OSError, path: str) -> None:
    """Raise ``exc`` naming ``path`` if it names no file."""
    if exc.filename is None:
        raise OSError(exc.errno, exc.strerror, path) from None


@contextlib.contextmanager
def naming(path: str) -> Iterator[None]:
    """An ``OSError`` of the block that names no file (a write's, a flush's, an
    ``fsync``'s) names ``path``, what it was writing (a full disk said only "No space left
    on device", not where)."""
    try:
        yield
    except OSError as exc:
        _name(exc, path)
        raise


def write_atomic(path: str | os.PathLike[str], data: bytes | memoryview, *,
                 mode: int = 0o644, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` through :func:`atomic_output`."""
    with atomic_output(path, mode=mode, durable=durable) as f:
        f.write(data)


def write_unnamed(dir_fd: int, name: str, data: bytes | bytearray | memoryview, *,
                  mode: int = 0o444) -> tuple[int, str | None]:
    """Write ``data`` to a new file in ``dir_fd`` that has no final name yet: an unnamed
    file (``O_TMPFILE``), or where there is none a fresh temporary name derived from
    ``name``. Nothing is ``fsync``-ed: :func:`link_written` names it once the caller made
    it durable (``fsync``, or one ``syncfs`` for many files).

    Returns:
        ``(descriptor, temporary name or None)``; the caller owns the descriptor.
    """
    tmp: str | None = None
    fd = _open_unnamed(dir_fd, mode)
    if fd is None:
        fd, tmp = _open_new(dir_fd, name, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        discard_written(fd, tmp, dir_fd)
        raise
    return fd, tmp


def link_written(fd: int, tmp: str | None, dir_fd: int, name: str, *,
                 sync: bool = False) -> bool:
    """Give a file from :func:`write_unnamed` its name ``name`` (never replacing one), then
    close it and drop its temporary name. ``sync``: ``fsync`` it once named (an unnamed
    file's ``fsync`` before its link persists nothing on btrfs: see the module docstring).

    Returns:
        ``True`` if named, ``False`` if ``name`` already existed (left untouched).
    """
    try:
        if tmp is None:
            _link_unnamed(fd, dir_fd, name)
        else:
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        if sync:
            os.fsync(fd)
    except FileExistsError:
        return False
    finally:
        discard_written(fd, tmp, dir_fd)
    return True


def discard_written(fd: int, tmp: str | None, dir_fd: int) -> None:
    """Close a file from :func:`write_unnamed` and remove its temporary name, if any (an
    unnamed file vanishes with its last descriptor)."""
    os.close(fd)
    if tmp is not None:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)


def create_file(dir_fd: int, name: str, data: bytes | bytearray | memoryview, *,
                mode: int = 0o444) -> bool:
    """Durably create ``name`` in ``dir_fd`` holding ``data``, unless it already exists.

    The data is written to an unnamed (or freshly named temporary) file and ``fsync``-ed
    before the file gets its name, so ``name`` never refers to a partial file. The
    directory is *not* ``fsync``-ed: callers creating many files do that once
    (:func:`fsync_dir`).

    Returns:
        ``True`` if created, ``False`` if ``name`` already existed (left untouched).
    """
    fd, tmp = write_unnamed(dir_fd, name, data, mode=mode)
    try:
        os.fsync(fd)
    except BaseException:
        discard_written(fd, tmp, dir_fd)
        raise
    return link_written(fd, tmp, dir_fd, name, sync=tmp is None)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (in this PID namespace): the owner of a temporary
    name that carries its pid still works on it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
