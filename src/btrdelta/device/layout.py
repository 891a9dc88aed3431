"""Where things live on a device's btrfs filesystem (the layout of ``docs/device.md``).

Owns: the names of the layout (roots, slots, state subvolumes, metadata directory),
opening a device filesystem (a mounted top-level subvolume, a block device or an image file,
mounted privately for the time of one command), the device lock, and the low-level subvolume
steps every workflow shares (snapshot, delete and wait, move into place, sync).

Does not own: what the state file says (:mod:`.state`), boot selection (:mod:`.boot`),
workflows (install, reset, backup).

::

    FS (top-level subvolume, id 5)
    ├── .btrdelta/           metadata (plain directory, never booted)
    │   ├── state.json       the state file (JSON, written atomically)
    │   ├── mounts           what the initramfs mounts over the root (generated text)
    │   ├── boot/            boot counting: at most one file try-SLOT+LEFT[-DONE]
    │   ├── backups/NAME/    read-only snapshots: parents of the next incremental backup
    │   └── lock             flock(2) of every writing command
    ├── roots/               bootable read-only subvolumes
    │   ├── factory          the factory base
    │   ├── a, b             the two slots
    │   └── .staged-*, .old-*, .btrdelta-tmp-*   hidden work (never selected by a boot)
    └── state/               writable state subvolumes (etc, var, home, ...)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import BtrdeltaError
from ..fs import btrfs as sv

__all__ = [
    "BOOTABLE",
    "FACTORY",
    "SLOTS",
    "DeviceError",
    "Layout",
    "open_device",
]

SLOTS = ("a", "b")
FACTORY = "factory"
BOOTABLE = (*SLOTS, FACTORY)
META = ".btrdelta"
ROOTS = "roots"
STATE = "state"
_TOP_LEVEL = 5
#: prefixes of hidden work in roots/ and the top level (cleaned by recovery)
HIDDEN = (".staged-", ".old-", ".btrdelta-tmp-", ".state-")


class DeviceError(BtrdeltaError):
    """A device workflow refused or failed (wrong layout, slot in use, nothing to do)."""


class Layout:
    """Paths and descriptors of one device filesystem, top-level mounted at ``top``."""

    def __init__(self, top: Path, name: str | None = None) -> None:
        self.top = Path(top)
        #: the filesystem as the user named it (a device or image is mounted on a private
        #: directory whose name means nothing to them): for messages
        self.name = name if name is not None else str(top)
        self.meta = self.top / META
        self.roots = self.top / ROOTS
        self.state_dir = self.top / STATE
        self.state_file = self.meta / "state.json"
        self.mounts_file = self.meta / "mounts"
        self.boot_dir = self.meta / "boot"
        self.backups = self.meta / "backups"

    def root(self, name: str) -> Path:
        """The subvolume of bootable root ``name`` (``a``, ``b``, ``factory``)."""
        if name not in BOOTABLE:
            raise DeviceError(f"no root named {name!r} (one of {', '.join(BOOTABLE)})")
        return self.roots / name

    def state(self, name: str) -> Path:
        """The state subvolume ``name``."""
        return self.state_dir / name

    def initialized(self) -> bool:
        """True once ``device init`` finished (the state file exists)."""
        return self.state_file.is_file()

    # -- descriptors and subvolume steps ------------------------------------------------

    @contextlib.contextmanager
    def fd(self, path: Path | None = None) -> Iterator[int]:
        """A directory descriptor of ``path`` (default: the top level)."""
        fd = os.open(path or self.top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)

    def sync(self) -> None:
        """Commit everything written so far (one btrfs transaction)."""
        with self.fd() as fd:
            sv.syncfs(fd)

    def subvol_id(self, path: Path) -> int:
        """The subvolume id of ``path`` (a subvolume's root directory)."""
        with self.fd(path) as fd:
            return sv.subvol_info(fd).id

    def is_subvolume(self, path: Path) -> bool:
        """True when ``path`` is the root directory of a subvolume."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        return stat.S_ISDIR(st.st_mode) and st.st_ino == 256

    def snapshot(self, source: Path, dest: Path, *, readonly: bool) -> None:
        """Snapshot subvolume ``source`` to ``dest`` (same filesystem)."""
        with self.fd(source) as sfd, self.fd(dest.parent) as dfd:
            sv.create_snapshot(dfd, os.fsencode(dest.name), sfd, readonly=readonly)

    def create_subvolume(self, dest: Path) -> None:
        """An empty subvolume at ``dest``."""
        with self.fd(dest.parent) as dfd:
            sv.create_subvolume(dfd, os.fsencode(dest.name))

    def delete(self, path: Path, *, wait: bool = False) -> None:
        """Delete subvolume ``path`` (and subvolumes nested in it); with ``wait``, return
        only when btrfs gave its space back."""
        ids = self._delete_tree(path)
        if wait:
            self.wait_cleaned(ids)

    def wait_cleaned(self, ids: list[int] | None = None) -> None:
        """Wait until deleted subvolumes (default: every one waiting) gave their space
        back."""
        with self.fd() as fd:
            sv.wait_subvolumes_gone(fd, ids)

    def _delete_tree(self, path: Path) -> list[int]:
        if not os.path.lexists(path):
            return []
        if not self.is_subvolume(path):
            if os.path.isdir(path) and not os.path.islink(path):
                ids: list[int] = []
                for child in sorted(os.listdir(path)):
                    ids += self._delete_tree(path / child)
                shutil.rmtree(path, ignore_errors=True)
                return ids
            os.unlink(path)
            return []
        ids = []
        with self.fd(path) as fd:
            sid = sv.subvol_info(fd).id
        for dirpath, dirnames, _files in os.walk(path):
            for d in list(dirnames):
                p = Path(dirpath) / d
                if self.is_subvolume(p):
                    ids += self._delete_tree(p)
                    dirnames.remove(d)
        with self.fd(path.parent) as dfd:
            try:
                sv.delete_subvolume(dfd, os.fsencode(path.name))
            except OSError as exc:  # the ioctl's error names no path: name it (same type:
                exc.filename = str(path)  # callers skip a subvolume in use by its errno)
                raise
        return [*ids, sid]

    def rename(self, src: Path, dst: Path, *, replace: bool = False) -> None:
        """Rename within one directory; refuses to replace unless ``replace``."""
        if src.parent != dst.parent:
            os.rename(src, dst)
            return
        with self.fd(src.parent) as dfd:
            if replace:
                os.rename(src.name, dst.name, src_dir_fd=dfd, dst_dir_fd=dfd)
            else:
                sv.rename_noreplace(dfd, os.fsencode(src.name), os.fsencode(dst.name))

    def exchange(self, a: Path, b: Path) -> None:
        """Swap two names of one directory in one atomic step (``RENAME_EXCHANGE``)."""
        with self.fd(a.parent) as dfd:
            sv.rename_exchange(dfd, os.fsencode(a.name), os.fsencode(b.name))

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the device lock (one writing command at a time)."""
        self.meta.mkdir(exist_ok=True)
        fd = os.open(self.meta / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise DeviceError(f"{self.name}: another btrdelta device command is "
                                  "running") from exc
            yield
        finally:
            os.close(fd)


def _check_top(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if not sv.is_btrfs(fd):
            raise DeviceError(f"{path} is not on btrfs")
        if sv.subvol_info(fd).id != _TOP_LEVEL:
            raise DeviceError(f"{path} is not the top-level subvolume of its filesystem "
                              "(mount it with -o subvolid=5, or give the device)")
    finally:
        os.close(fd)


#: where a btrfs superblock carries its magic
_MAGIC_AT, _MAGIC = 0x10040, b"_BHRfS_M"


def _check_btrfs_magic(path: Path) -> None:
    """Refuse a block device or image that holds no btrfs, in one line naming what it
    holds (mount's own message says only "wrong fs type... dmesg(1) may have more")."""
    try:
        with open(path, "rb") as f:
            f.seek(_MAGIC_AT)
            magic = f.read(len(_MAGIC))
    except OSError as exc:
        raise DeviceError(f"{path}: {exc.strerror}") from exc
    if magic == _MAGIC:
        return
    holds = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        got = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", os.fspath(path)],
                             capture_output=True, text=True, check=False, timeout=30)
        if got.stdout.strip():
            holds = f" (it holds {got.stdout.split()[0]})"
    raise DeviceError(f"{path} is not a btrfs filesystem{holds}: a device's filesystem is "
                      "made with mkfs.btrfs, then laid out with btrdelta device init")


@contextlib.contextmanager
def open_device(fs: str | os.PathLike[str], *, readonly: bool = False) -> Iterator[Layout]:
    """The :class:`Layout` of device filesystem ``fs``.

    ``fs`` is a directory where the top-level subvolume is mounted, or a block device or
    image file: then its top level is mounted (``subvolid=5``) on a private directory for
    the time of the ``with`` block.
    """
    path = Path(fs)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DeviceError(f"{fs}: {exc.strerror}") from exc
    if stat.S_ISDIR(st.st_mode):
        _check_top(path)
        yield Layout(path, os.fspath(fs))
        return
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise DeviceError(f"{fs} is neither a directory, a block device nor an image file")
    _check_btrfs_magic(path)
    with _private_mount(path, readonly=readonly, regular=stat.S_ISREG(st.st_mode)) as mnt:
        yield Layout(mnt, os.fspath(fs))


#: private mount directories of device commands: ``<tmp>/btrdelta-device-XXXX``, each
#: with a sibling ``.lock`` that its command holds an flock on while it is mounted
_PRIVATE = "btrdelta-device-"


@contextlib.contextmanager
def _private_mount(path: Path, *, readonly: bool, regular: bool) -> Iterator[Path]:
    """The top level of ``path`` mounted on a private directory for the ``with`` block.

    A command killed inside it (SIGKILL, a crash) leaves the mount and its loop device:
    the next device command unmounts those whose lock nobody holds any more."""
    sweep_private_mounts()
    fd, lock = tempfile.mkstemp(prefix=_PRIVATE, suffix=".lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        mnt = Path(lock[:-len(".lock")])
        os.mkdir(mnt, 0o700)
        try:
            _mount(path, mnt, readonly=readonly, regular=regular)
            try:
                yield mnt
            finally:
                done = subprocess.run(["umount", "--", os.fspath(mnt)], capture_output=True,
                                      check=False)
                if done.returncode != 0:
                    subprocess.run(["umount", "-l", "--", os.fspath(mnt)], capture_output=True,
                                   check=False)
        finally:
            with contextlib.suppress(OSError):
                os.rmdir(mnt)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


#: how long a writable mount waits for a read-only loop device of the same image to go
_RO_LOOP_WAIT = 5.0


def _mount(path: Path, mnt: Path, *, readonly: bool, regular: bool) -> None:
    """Mount the top level of ``path`` on ``mnt``, writable unless ``readonly``.

    ``mount -o loop`` reuses a loop device that still holds the same image, and where that
    one is read-only (the previous command's ``ro`` mount, its autoclear not done yet: a
    ``device status`` just before) mounts read-only with only a warning: the command then
    failed at its first write ("Read-only file system"). Such a mount is undone and tried
    again until that loop device is gone; where that ``umount`` fails, the mount is
    detached (``umount -l``) and the command stops, saying so."""
    opts = "subvolid=5" + (",ro" if readonly else "") + (",loop" if regular else "")
    deadline = time.monotonic() + _RO_LOOP_WAIT
    while True:
        proc = subprocess.run(["mount", "-t", "btrfs", "-o", opts, "--", os.fspath(path),
                               os.fspath(mnt)], capture_output=True, check=False)
        if proc.returncode != 0:
            msg = proc.stderr.decode(errors="replace").strip().splitlines()
            raise DeviceError(f"{path}: cannot mount: {msg[-1] if msg else proc.returncode}")
        if readonly or not os.statvfs(mnt).f_flag & os.ST_RDONLY:
            return
        why = f"{path}: mounted read-only (write-protected, or a read-only loop device holds it)"
        done = subprocess.run(["umount", "--", os.fspath(mnt)], capture_output=True,
                              check=False)
        if done.returncode != 0:  # (not mounted again on it: stop, and let it go)
            subprocess.run(["umount", "-l", "--", os.fspath(mnt)], capture_output=True,
                           check=False)
            msg = done.stderr.decode(errors="replace").strip().splitlines()
            raise DeviceError(f"{why}, and its umount failed: "
                              f"{msg[-1] if msg else f'exit {done.returncode}'}")
        if time.monotonic() > deadline:
            raise DeviceError(why)
        time.sleep(0.05)


def sweep_private_mounts(tmp: str | None = None) -> list[str]:
    """Unmount and remove the private mounts of device commands that died holding them.

    Only entries this user owns count (the temporary directory is shared), and only those
    whose lock is free: a running command holds its own. Returns the directories removed."""
    tmp = tmp or tempfile.gettempdir()
    try:
        names = os.listdir(tmp)
    except OSError:
        return []
    swept = []
    for name in names:
        if name.startswith(_PRIVATE) and name.endswith(".lock"):
            mnt = os.path.join(tmp, name[:-len(".lock")])
            if _sweep_one(os.path.join(tmp, name), mnt):
                swept.append(mnt)
    return swept


def _sweep_one(lock: str, mnt: str) -> bool:
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_uid != os.getuid():
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # its command is still running
        with contextlib.suppress(OSError):
            st = os.lstat(mnt)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                return False
            if os.path.ismount(mnt) and subprocess.run(
                    ["umount", "--", mnt], capture_output=True, check=False).returncode != 0:
                return False  # busy: left for a later command
            os.rmdir(mnt)
        with contextlib.suppress(OSError):
            os.unlink(lock)
        return True
    finally:
        os.close(fd)


def is_enospc(exc: BaseException) -> bool:
    """True when ``exc`` (or its cause) is a full filesystem."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__  # type: ignore[assignment]
    return False
