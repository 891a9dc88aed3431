"""A read-only FUSE file system exposing an image from a chunk store as one file.

``MOUNTPOINT/<NAME>`` is the image, bit for bit; reads map to ``pread`` on chunk files
(:class:`~btrdelta.chunk.store.ImageReader`). Then ``mount -o loop,ro MOUNTPOINT/NAME DIR``
mounts the ext4/squashfs/erofs inside. Built on ``mfusepy`` (ctypes over libfuse); libfuse
handles SIGINT/SIGTERM by leaving its loop and unmounting. Both libfuse 2 and libfuse 3
work (``mfusepy`` loads libfuse 2 when installed, else libfuse 3; :data:`LIBFUSE` says which).
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable
from typing import Any

import mfusepy

from ..errors import BtrdeltaError
from .store import ChunkStore, ImageReader

__all__ = ["LIBFUSE", "ImageFS", "check_can_mount", "mount_image"]

#: ``(major, minor)`` of the libfuse ``mfusepy`` loaded.
LIBFUSE: tuple[int, int] = (mfusepy.fuse_version_major, mfusepy.fuse_version_minor)

#: libfuse 3.12-3.16's fuse_main_real() takes an unset max_idle_threads (UINT_MAX, its
#: parser's default) for a value and says "Ignoring invalid max threads value 4294967295 >
#: max (100000)." on every mount (libfuse issue 1003): the value libfuse 3 had for a
#: default before 3.12, given explicitly. (libfuse 2 has no such option: a mount with it
#: would fail.)
_LOOP_OPTIONS: dict[str, int] = {"max_idle_threads": 10} if LIBFUSE[0] == 3 else {}

# libfuse 3's fuse_main_real() returns 8 whenever its loop ends with a non-zero result, and
# the loop's result is the signal number when SIGINT/SIGTERM stopped it: a normal stop
_FUSE3_LOOP_ENDED = 8


class ImageFS(mfusepy.Operations):  # type: ignore[misc]
    """FUSE operations: a root directory holding one read-only file.

    Args:
        reader: the image.
        name: the file name inside the mount point.
        mounted: called once the kernel has the mount (libfuse's init).
        on_error: called with the error of a read that fails (a chunk missing or damaged
            in the store: the read gets EIO), once per distinct error.
    """

    use_ns = True

    def __init__(self, reader: ImageReader, name: str,
                 mounted: Callable[[], object] | None = None,
                 on_error: Callable[[Exception], object] | None = None) -> None:
        self.reader = reader
        self.name = name
        self.mounted = mounted
        self.on_error = on_error
        self._said: set[str] = set()
        self.path = "/" + name
        now = time.time_ns()
        self._times = {"st_atime": now, "st_mtime": now, "st_ctime": now}

    def init(self, path: str) -> None:
        """The mount is up: say so."""
        if self.mounted is not None:
            self.mounted()

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        """Attributes of ``/`` and of the image file."""
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2, **self._times}
        if path == self.path:
            return {
                "st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": self.reader.size,
                "st_blocks": (self.reader.size + 511) // 512, **self._times,
            }
        raise mfusepy.FuseOSError(errno.ENOENT)

    def readdir(self, path: str, fh: int) -> list[str]:
        """The root lists the image file."""
        if path != "/":
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return [".", "..", self.name]

    def open(self, path: str, flags: int) -> int:
        """Open the image read-only."""
        if path != self.path:
            raise mfusepy.FuseOSError(errno.ENOENT)
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise mfusepy.FuseOSError(errno.EROFS)
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        """Bytes of the image."""
        if path not in (None, self.path):
            raise mfusepy.FuseOSError(errno.ENOENT)
        try:
            return self.reader.pread(size, offset)
        except Exception as exc:  # a missing chunk must surface as EIO, not kill libfuse
            if self.on_error is not None and str(exc) not in self._said:
                self._said.add(str(exc))  # (a set add: no lock needed)
                self.on_error(exc)
            raise mfusepy.FuseOSError(errno.EIO) from exc

    def statfs(self, path: str) -> dict[str, int]:
        """A small static answer (``df`` works)."""
        blocks = (self.reader.size + 4095) // 4096
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": blocks, "f_bfree": 0,
                "f_bavail": 0, "f_files": 2, "f_ffree": 0, "f_namemax": 255}


def check_can_mount(mountpoint: str, device: str = "/dev/fuse") -> None:
    """Refuse, with one line, what libfuse would refuse with a message and a crash.

    Raises:
        BtrdeltaError: the mount point is not a directory (or, with libfuse 2, not
            empty), or FUSE cannot be used by this user (no ``/dev/fuse``, or not
            writable: non-root users need it to be, or a setuid ``fusermount``, which
            libfuse 2 does not fall back to here).
    """
    if not os.path.isdir(mountpoint):
        what = "is not a directory" if os.path.exists(mountpoint) else "does not exist"
        raise BtrdeltaError(f"mount point {what}", path=mountpoint)
    if LIBFUSE[0] == 2:
        with os.scandir(mountpoint) as entries:
            if next(entries, None) is not None:  # libfuse 2 refuses it on two more lines
                raise BtrdeltaError("mount point is not empty", path=mountpoint)
    try:
        os.close(os.open(device, os.O_RDWR | os.O_CLOEXEC))
    except FileNotFoundError:
        raise BtrdeltaError("no FUSE device: load the fuse module (modprobe fuse)",
                            path=device) from None
    except PermissionError:
        who = "root" if os.geteuid() == 0 else f"user {os.geteuid()}"
        raise BtrdeltaError(f"FUSE is not available to {who}: mounting needs read-write "
                            "access to the FUSE device (run as root, or grant access)",
                            path=device) from None


def mount_image(store: ChunkStore, name: str, mountpoint: str, *, debug: bool = False,
                mounted: Callable[[int], object] | None = None,
                on_error: Callable[[Exception], object] | None = None) -> None:
    """Serve ``name`` at ``mountpoint`` until unmounted or SIGINT/SIGTERM (blocks);
    ``mounted(size)`` is called once the mount is up, ``on_error(exc)`` when a read fails
    (see :class:`ImageFS`).

    Raises:
        BtrdeltaError: see :func:`check_can_mount`; or libfuse failed to mount (it said why
            on standard error).
    """
    _, index = store.read_description(name)
    check_can_mount(mountpoint)
    reader = ImageReader(store, index)
    try:
        mfusepy.FUSE(
            ImageFS(reader, name, None if mounted is None else lambda: mounted(reader.size),
                    on_error),
            mountpoint, foreground=True, ro=True, debug=debug,
            fsname=f"btrdelta:{name}", subtype="btrdelta", nothreads=False,
            **_LOOP_OPTIONS,
        )
    except RuntimeError as exc:
        if not (LIBFUSE[0] == 3 and exc.args == (_FUSE3_LOOP_ENDED,)):
            raise BtrdeltaError("FUSE mount failed (see libfuse's message above)",
                                path=mountpoint) from None
    finally:
        reader.close()
