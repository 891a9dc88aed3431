"""The Linux calls Python's ``os`` lacks: ``fstatfs``'s filesystem type, ``syncfs(2)``,
``fallocate(2)`` with a mode, ``renameat2(2)`` (``RENAME_NOREPLACE``, ``RENAME_EXCHANGE``).

``fs_type`` and ``renameat2`` go through the ``sweep`` C accelerator where it is built
(``fs/_sweep.c``): a receive calls both (is DEST on btrfs; the subvolume's final name), and
``ctypes`` took 1.3-1.7 ms of its start to import, against ~0.2 ms to load that module. The
rest, and both where the accelerator is not built, use libc through ``ctypes``, loaded on
first use. Errors are plain :class:`OSError` (``FileExistsError`` and the like), the file
name where one is given. :mod:`.btrfs` imports these names too.
"""

from __future__ import annotations

import functools
import os
import struct

from .. import TYPE_CHECKING, _native

if TYPE_CHECKING:
    from typing import Any, NoReturn

__all__ = ["fallocate", "fs_type", "rename_exchange", "rename_noreplace", "syncfs"]

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


@functools.cache
def _libc() -> Any:
    """libc through ctypes, loaded on first use (send and tree-sum never need it)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                               ctypes.c_uint]
    libc.syncfs.argtypes = [ctypes.c_int]
    return libc


def _raise_errno(filename: str | None = None) -> NoReturn:
    import ctypes

    err = ctypes.get_errno()
    if filename is None:
        raise OSError(err, os.strerror(err))
    raise OSError(err, os.strerror(err), filename)


def fs_type(fd: int) -> int:
    """``statfs.f_type`` of the filesystem holding ``fd``."""
    native = _native.live("sweep")
    if native is not None:
        return int(native.fs_type(fd))
    import ctypes

    buf = ctypes.create_string_buffer(128)
    if _libc().fstatfs(fd, buf) != 0:
        _raise_errno()
    return int(struct.unpack_from("<q", buf.raw, 0)[0])


def syncfs(fd: int) -> None:
    """``syncfs(2)``: write out the filesystem holding ``fd`` (on btrfs: flush delayed
    allocation and commit the transaction)."""
    if _libc().syncfs(fd) != 0:
        _raise_errno()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with a mode (``FALLOC_FL_*`` bits)."""
    if _libc().fallocate(fd, mode, offset, length) != 0:
        _raise_errno()


def _renameat2(dir_fd: int, src: bytes, dst: bytes, flags: int, name: bytes) -> None:
    """``renameat2`` inside one directory; the ``OSError`` names ``name``."""
    native = _native.live("sweep")
    if native is None:
        if _libc().renameat2(dir_fd, src, dir_fd, dst, flags) != 0:
            _raise_errno(os.fsdecode(name))
        return
    err = native.renameat2(dir_fd, src, dir_fd, dst, flags)
    if err:
        raise OSError(err, os.strerror(err), os.fsdecode(name))


def rename_noreplace(dir_fd: int, src: bytes, dst: bytes) -> None:
    """``renameat2(RENAME_NOREPLACE)`` inside one directory: fails if ``dst`` exists."""
    _renameat2(dir_fd, src, dst, _RENAME_NOREPLACE, dst)


def rename_exchange(dir_fd: int, a: bytes, b: bytes) -> None:
    """``renameat2(RENAME_EXCHANGE)`` inside one directory: swap ``a`` and ``b`` atomically
    (both must exist; directories and subvolumes alike)."""
    _renameat2(dir_fd, a, b, _RENAME_EXCHANGE, a)
