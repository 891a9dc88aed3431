"""Removing a directory tree of any depth, without recursion and without following symlinks.

:func:`remove_tree` deletes ``name`` below a directory descriptor the way ``rm -rf`` does,
for trees an untrusted stream may have made: tens of thousands of levels (``shutil.rmtree``
recurses once per level and fails past ~1000 with ``RecursionError``), symlinks anywhere
(unlinked, never followed), and at most two descriptors open at a time whatever the depth.
It walks down with ``openat(O_DIRECTORY|O_NOFOLLOW)`` and back up through ``..``, checking
at every step up that ``..`` is the directory it came from (device and inode), so a tree
moved meanwhile makes it stop with an error rather than delete elsewhere.
:func:`remove_path` is the same for a path, where code would reach for ``shutil.rmtree``.

Knows nothing of subvolumes: a btrfs subvolume is deleted with its ioctl
(:func:`btrdelta.fs.btrfs.delete_subvolume`); a nested subvolume met here is an ordinary
directory that ``rmdir`` removes once it is empty (as ``rm -rf`` does).
"""

from __future__ import annotations

import errno
import os

__all__ = ["remove_path", "remove_tree"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(dir_fd: int, name: str | bytes) -> int | None:
    """``name`` in ``dir_fd`` opened as a directory, or ``None`` if it is not one."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            return None
        raise


def _first_subdir(fd: int) -> bytes | None:
    """Unlink every non-directory in ``fd`` up to its first subdirectory; that one's name."""
    with os.scandir(fd) as it:
        for entry in it:
            name = os.fsencode(entry.name)
            if entry.is_dir(follow_symlinks=False):
                return name
            try:
                os.unlink(name, dir_fd=fd)
            except IsADirectoryError:  # replaced by a directory meanwhile
                return name
            except FileNotFoundError:
                pass
    return None


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def remove_path(path: str | os.PathLike[str], *, ignore_errors: bool = False) -> None:
    """Delete ``path`` (a directory tree of any depth, or any other entry; a symlink itself).

    The path-based form of :func:`remove_tree`, for what ``shutil.rmtree`` would do.

    Args:
        path: what to delete; its parent directories are followed as usual.
        ignore_errors: a missing ``path`` or an entry that cannot go is no error (what
            could not be removed stays).

    Raises:
        OSError: ``path`` is missing or could not be removed (not with ``ignore_errors``).
    """
    try:
        parent = os.open(os.path.dirname(os.path.abspath(path)) or "/",
                         os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            remove_tree(parent, os.path.basename(os.path.abspath(path)))
        finally:
            os.close(parent)
    except OSError:
        if not ignore_errors:
            raise


def remove_tree(dir_fd: int, name: str | bytes) -> None:
    """Delete ``name`` (a directory tree, or any other entry) in ``dir_fd``.

    Raises:
        FileNotFoundError: ``name`` does not exist.
        OSError: an entry could not be removed, or the tree was moved while being removed.
    """
    fd = _open_dir(dir_fd, name)
    if fd is None:
        os.unlink(name, dir_fd=dir_fd)
        return
    #: names walked down from ``name`` and the identity of the directory each lies in
    trail: list[tuple[bytes, tuple[int, int]]] = []
    try:
        while True:
            sub = _first_subdir(fd)
            if sub is not None:
                child = _open_dir(fd, sub)
                if child is None:  # replaced by a non-directory meanwhile: next scan
                    continue
                trail.append((sub, _identity(fd)))
                os.close(fd)
                fd = child
                continue
            if not trail:
                break
            sub, expected = trail.pop()
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            if _identity(fd) != expected:
                raise OSError(errno.ESTALE, "directory moved while its tree was removed",
                              os.fsdecode(sub))
            os.rmdir(sub, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)
