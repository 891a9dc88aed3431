"""Paths longer than ``PATH_MAX``: :func:`short_path` names them in fewer bytes.

The kernel refuses a path of ``PATH_MAX`` (4096) bytes or more with ``ENAMETOOLONG``
before it looks at any component, but a tree may hold deeper entries (each name is at
most 255 bytes, the depth is not bounded: ``mkdir`` relative to a directory makes them,
and ``btrdelta receive`` of a stream holding such paths, which the kernel's send refuses
to write). A directory on the way is opened through a chain of
descriptors (``openat`` of parts of the path, each shorter than ``PATH_MAX``) and the
entry named ``/proc/self/fd/N/REST``: a path every call takes, those without a
descriptor form too (``listxattr``, ``getxattr``). Symlinks are followed where the
original path would follow them (in the directories on the way, never for the last
component of a caller's ``O_NOFOLLOW`` or ``follow_symlinks=False``). A path shorter
than ``PATH_MAX`` is used as it is. :func:`listdir_at` lists a directory by its parent's
descriptor and its name.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["PATH_MAX", "listdir_at", "short_path"]

#: the kernel's limit of a path's length, its terminating NUL included
PATH_MAX = 4096
#: the longest ``/proc/self/fd/N/`` prefix (N of up to 10 digits)
_PROC_PREFIX = len(b"/proc/self/fd/4294967295/")


def short_path(path: bytes) -> contextlib.AbstractContextManager[bytes]:
    """``path`` itself when the kernel takes it, else ``/proc/self/fd/N/REST`` with ``N``
    a descriptor (``O_PATH``) of a directory on the way, open until the block ends.

    Raises:
        OSError: a directory on the way cannot be reached (``ENOENT``, ``ENOTDIR``,
            ``EACCES``), or a single name is longer than the kernel allows.
    """
    return contextlib.nullcontext(path) if len(path) < PATH_MAX else _reach(path)


@contextlib.contextmanager
def _reach(path: bytes) -> Iterator[bytes]:
    fd = -1
    rest = path
    try:
        while len(rest) + _PROC_PREFIX >= PATH_MAX:
            # the longest head of whole components the kernel takes at once
            cut = rest.rfind(b"/", 0, PATH_MAX - _PROC_PREFIX)
            if cut <= 0:
                raise OSError(36, os.strerror(36), path)  # ENAMETOOLONG: one huge name
            head, rest = rest[:cut], rest[cut + 1:].lstrip(b"/")
            if fd >= 0:
                head = b"/proc/self/fd/%d/%s" % (fd, head.lstrip(b"/") or b".")
            nfd = os.open(head, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            if fd >= 0:
                os.close(fd)
            fd = nfd
        yield b"/proc/self/fd/%d/%s" % (fd, rest)
    finally:
        if fd >= 0:
            os.close(fd)


def listdir_at(dir_fd: int, name: bytes) -> list[bytes]:
    """The entries of directory ``name`` (not followed if a symlink) of ``dir_fd``."""
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                 dir_fd=dir_fd)
    try:
        return [os.fsencode(n) for n in os.listdir(fd)]
    finally:
        os.close(fd)
