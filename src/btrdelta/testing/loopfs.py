"""Loop-mounted filesystems for tests, the demo and benchmarks (needs root).

``with loop_fs("btrfs", size="512M", options="compress=zstd") as mnt:`` makes a sparse image
file (in /var/tmp unless ``workdir`` or ``$TMPDIR`` says otherwise), formats it, attaches it
with ``losetup -f``, mounts it under a fresh directory and, on exit (also on error or
Ctrl-C), unmounts, detaches and deletes everything. A registry of live
mounts is also cleaned at interpreter exit, so a crashed test does not leak loop devices.
``with mounted_image(image) as mnt:`` mounts an existing image file (a device image a virtual
machine uses next) and returns only once its filesystem is really gone.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["BtrfsUnavailable", "btrfs_available", "hold", "held", "loop_fs", "mounted_image",
           "release", "run"]

_LIVE: list[tuple[str, str, str]] = []  # (mountpoint, loopdev, image)
#: processes that keep files open on a mounted filesystem, by mountpoint (see :func:`hold`)
_HELD: dict[str, list[subprocess.Popen[bytes]]] = {}


def _image_dir() -> str:
    """Where images go when the caller names no directory: ``$TMPDIR`` if set, else
    /var/tmp, on the disk. An image holds as much as is written into it, up to its size (the
    send tests' session btrfs is 4G), and /tmp is a tmpfs in RAM on Debian 13, half the RAM:
    its 4 GiB filled there, and the runs' writes failed (session 33)."""
    return os.environ.get("TMPDIR") or "/var/tmp"


class BtrfsUnavailable(RuntimeError):
    """The machine cannot make and mount a loop btrfs (not root, no btrfs, no loop)."""


def run(*cmd: str | os.PathLike[str], cwd: str | os.PathLike[str] | None = None,
        input: bytes | None = None) -> str:
    """Run a command, raise with its stderr on failure, return its stdout as text."""
    proc = subprocess.run(
        [os.fspath(c) for c in cmd], cwd=cwd, input=input, capture_output=True, check=False
    )
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(
            proc.returncode, [os.fspath(c) for c in cmd], proc.stdout, proc.stderr
        )
    return proc.stdout.decode("utf-8", "replace")


def btrfs_available() -> str | None:
    """``None`` when loop-mounted btrfs works here, else the reason it does not."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("mkfs.btrfs") is None or shutil.which("btrfs") is None:
        return "btrfs-progs not installed"
    try:
        with open("/proc/filesystems") as f:
            if "btrfs" not in f.read():
                subprocess.run(["modprobe", "btrfs"], check=False, capture_output=True)
    except OSError:
        return "cannot read /proc/filesystems"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control"
    return None


def hold(mnt: str | os.PathLike[str], proc: subprocess.Popen[bytes]) -> None:
    """Keep ``proc`` (which holds files open under ``mnt``) alive until :func:`release`.

    ``proc`` must exit when its standard input reaches end of file. The filesystem cannot be
    unmounted while it runs, so :func:`loop_fs` releases the holders before it unmounts."""
    _HELD.setdefault(os.fspath(mnt), []).append(proc)


def held(mnt: str | os.PathLike[str]) -> bool:
    """Whether processes registered with :func:`hold` still keep files open under ``mnt``."""
    return bool(_HELD.get(os.fspath(mnt)))


def release(mnt: str | os.PathLike[str]) -> None:
    """End the holders of ``mnt``: close their standard input, wait (kill after 10 s)."""
    for proc in _HELD.pop(os.fspath(mnt), []):
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def _backs(dev: str, image: str) -> bool:
    """Whether loop device ``dev`` is attached to ``image`` (once detached, its number may be
    anyone's: another process's ``losetup -f``)."""
    try:
        with open(f"/sys/block/{os.path.basename(dev)}/loop/backing_file") as f:
            return f.read().rstrip("\n") == os.path.realpath(image)
    except OSError:
        return False


def _cleanup(mnt: str, dev: str, image: str) -> None:
    """Unmount, detach, delete; safe to run again when a run was interrupted (Ctrl-C also
    reaches ``umount``: the atexit handler finishes the job)."""
    release(mnt)
    if mnt and os.path.ismount(mnt):
        proc = subprocess.run(["umount", mnt], capture_output=True, check=False)
        if proc.returncode != 0:
            subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)
    if dev and _backs(dev, image):
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
    for remove, path in ((os.unlink, image), (os.rmdir, mnt), (os.rmdir, os.path.dirname(image))):
        with contextlib.suppress(OSError):
            remove(path)


@atexit.register
def _cleanup_all() -> None:
    while _LIVE:
        _cleanup(*_LIVE.pop())


@contextlib.contextmanager
def loop_fs(
    fstype: str = "btrfs",
    *,
    size: str = "512M",
    options: str | None = None,
    mkfs_args: tuple[str, ...] = (),
    workdir: str | os.PathLike[str] | None = None,
) -> Iterator[Path]:
    """Yield the mountpoint of a fresh loop-mounted filesystem of ``fstype``."""
    if fstype == "btrfs":
        reason = btrfs_available()
        if reason:
            raise BtrfsUnavailable(reason)
    base = tempfile.mkdtemp(prefix=f"btrdelta-{fstype}-",
                            dir=_image_dir() if workdir is None else workdir)
    image = os.path.join(base, "fs.img")
    mnt = os.path.join(base, "mnt")
    os.mkdir(mnt)
    dev = ""
    entry: tuple[str, str, str] | None = None
    try:
        with open(image, "wb") as f:
            f.truncate(_parse_size(size))
        mkfs = [f"mkfs.{fstype}"]
        if fstype == "btrfs":
            mkfs += ["-q", "-f"]
        elif fstype.startswith("ext"):
            mkfs += ["-q", "-F"]
        elif fstype == "xfs":
            mkfs += ["-q", "-f"]
        try:
            dev = run("losetup", "-f", "--show", image).strip()
            run(*mkfs, *mkfs_args, dev)
            cmd = ["mount", "-t", fstype]
            if options:
                cmd += ["-o", options]
            run(*cmd, dev, mnt)
        except (subprocess.CalledProcessError, FileNotFoundError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            raise BtrfsUnavailable(
                f"cannot make a loop {fstype}: {exc} {detail.decode(errors='replace')}"
            ) from exc
        entry = (mnt, dev, image)
        _LIVE.append(entry)
        yield Path(mnt)
    finally:
        forget_counters(mnt)
        _cleanup(mnt, dev, image)  # interrupted, the entry stays for the atexit handler
        if entry is not None and entry in _LIVE:
            _LIVE.remove(entry)
        shutil.rmtree(base, ignore_errors=True)


def forget_counters(mnt: str | os.PathLike[str]) -> None:
    """Remove the record counters (``/dev/shm/btrdelta-progress-DEV-INO``) of partial
    replications left on the filesystem at ``mnt`` (DESTs in its top subvolume): it is
    going away with them, or the machine restarts (tmpfs does not outlive a power cut)."""
    from ..update.partial import COUNTER_PREFIX, SHM

    try:
        if not os.path.ismount(mnt):  # (the directory's device would be another's)
            return
        prefix = f"{COUNTER_PREFIX}{os.stat(mnt).st_dev:x}-"
        for name in os.listdir(SHM):
            if name.startswith(prefix):
                os.unlink(os.path.join(SHM, name))
    except OSError:
        pass


def _loops_of(image: str | os.PathLike[str]) -> list[str]:
    """The loop devices backed by ``image``."""
    out = run("losetup", "-n", "-O", "NAME", "-j", image)
    return out.split()


@contextlib.contextmanager
def mounted_image(image: str | os.PathLike[str], *, options: str = "",
                  timeout: float = 120) -> Iterator[Path]:
    """Mount the filesystem image file ``image`` (``mount -o loop``) on ``IMAGE.mnt``; on exit
    unmount it and wait until no loop device backs the file any more.

    ``umount`` returns once the mount has left this mount namespace. A process that copied
    the mount table meanwhile (``unshare -m``, a browser's sandbox: on a shared machine, any
    other user's) keeps the filesystem alive, and its last commit reaches the file when that
    copy goes: possibly after the caller has copied a fresh image over it or booted a
    virtual machine on it. The loop device (autoclear) goes only with the filesystem."""
    mnt = Path(f"{image}.mnt")
    mnt.mkdir(exist_ok=True)
    run("mount", "-o", ",".join(["loop", *filter(None, [options])]), image, mnt)
    try:
        yield mnt
    finally:
        run("umount", mnt)
        deadline = time.monotonic() + timeout
        while _loops_of(image):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{image}: still attached {timeout:.0f} s after umount "
                                   "(a copy of the mount in another mount namespace)")
            time.sleep(0.1)


def _parse_size(size: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    size = size.strip().upper()
    if size and size[-1] in units:
        return int(float(size[:-1]) * units[size[-1]])
    return int(size)
