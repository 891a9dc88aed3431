"""Which root boots: the btrfs default subvolume, the boot-counting file, the boot hook.

Owns the two atomic switches of ``docs/device.md``:

* **the trial** (commit point of an install): one empty file ``.btrdelta/boot/try-SLOT+N``
  created with ``O_EXCL`` (a name appears or it does not). At each boot the initramfs
  renames it to ``try-SLOT+(N-1)-(DONE+1)`` (one atomic rename, synced) and boots
  ``roots/SLOT``; with ``+0`` left it boots the default subvolume instead. This is
  systemd's boot-counting scheme (``+LEFT-DONE``) applied to a file of the device's btrfs.
* **the default subvolume** (commit point of mark-good, rollback, factory reset):
  ``BTRFS_IOC_DEFAULT_SUBVOL``, one item of the root tree, committed atomically.

Also: reading both back, the booted root (from the running system's ``/``), the boot hook
(``HOOK try SLOT TRIES``, ``HOOK good SLOT``, ``HOOK cancel SLOT``) and :func:`select_root`,
the initramfs's decision in Python (``contrib/boot/initramfs.sh`` is the shell one).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..fs import btrfs as sv
from .layout import BOOTABLE, FACTORY, ROOTS, DeviceError, Layout

__all__ = [
    "Trial",
    "booted_root",
    "call_hook",
    "clear_trial",
    "default_root",
    "read_trial",
    "select_root",
    "set_default_root",
    "start_trial",
]

_TRY = re.compile(r"try-(a|b|factory)\+(\d+)(?:-(\d+))?")


@dataclass(frozen=True)
class Trial:
    """A pending trial boot: root ``slot`` with ``left`` boots to go, ``done`` made."""

    slot: str
    left: int
    done: int = 0
    name: str = ""

    @property
    def file_name(self) -> str:
        """``try-SLOT+LEFT`` or ``try-SLOT+LEFT-DONE``."""
        tail = f"-{self.done}" if self.done else ""
        return f"try-{self.slot}+{self.left}{tail}"


def read_trial(layout: Layout) -> Trial | None:
    """The pending trial, if any (several files: the one with boots left, first)."""
    try:
        names = sorted(os.listdir(layout.boot_dir))
    except FileNotFoundError:
        return None
    found = []
    for n in names:
        m = _TRY.fullmatch(n)
        if m:
            found.append(Trial(m[1], int(m[2]), int(m[3] or 0), n))
    if not found:
        return None
    found.sort(key=lambda t: t.left == 0)
    return found[0]


def clear_trial(layout: Layout) -> bool:
    """Remove every trial file; True if there was one. Synced."""
    removed = False
    try:
        names = os.listdir(layout.boot_dir)
    except FileNotFoundError:
        return False
    for n in names:
        if n.startswith("try-"):
            os.unlink(layout.boot_dir / n)
            removed = True
    if removed:
        layout.sync()
    return removed


def start_trial(layout: Layout, slot: str, tries: int) -> Trial:
    """Commit point of an install: ``slot`` boots next, at most ``tries`` times.

    The caller synced the slot before; this creates one empty file (``O_EXCL``) and syncs.
    """
    if tries < 1:
        raise DeviceError("tries must be at least 1")
    clear_trial(layout)
    layout.boot_dir.mkdir(parents=True, exist_ok=True)
    trial = Trial(slot, tries)
    fd = os.open(layout.boot_dir / trial.file_name,
                 os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    os.close(fd)
    layout.sync()
    return trial


def exhaust_trial(layout: Layout) -> Trial | None:
    """Set the pending trial's boots left to 0 (the next boot takes the default)."""
    trial = read_trial(layout)
    if trial is None or trial.left == 0:
        return trial
    spent = Trial(trial.slot, 0, trial.done)
    os.rename(layout.boot_dir / trial.name, layout.boot_dir / spent.file_name)
    layout.sync()
    return spent


def _root_name(layout: Layout, fd: int, subvol_id: int) -> str | None:
    rel = sv.subvol_path(fd, subvol_id)
    if rel is None:
        return None
    name = os.fsdecode(rel)
    prefix = f"{ROOTS}/"
    if name.startswith(prefix) and name[len(prefix):] in BOOTABLE:
        return name[len(prefix):]
    return None


def default_root(layout: Layout) -> str | None:
    """The root the default subvolume is (``None``: the default is not one of the roots)."""
    with layout.fd() as fd:
        return _root_name(layout, fd, sv.default_subvolume(fd))


def set_default_root(layout: Layout, name: str) -> None:
    """Make ``roots/NAME`` the default subvolume, durably (one atomic commit)."""
    sid = layout.subvol_id(layout.root(name))
    with layout.fd() as fd:
        sv.syncfs(fd)  # what the root holds is on disk before it is selected
        sv.set_default_subvolume(fd, sid)
        sv.syncfs(fd)


#: the running system's ``/`` (tests put a root mounted by ``device mount`` here)
RUNNING_ROOT = "/"


def booted_root(layout: Layout, running_root: str | None = None) -> str | None:
    """The root the running system booted, when its ``/`` (``running_root``, default
    :data:`RUNNING_ROOT`) is one of this filesystem's roots (same btrfs UUID, same
    subvolume); else ``None``."""
    running_root = RUNNING_ROOT if running_root is None else running_root
    try:
        rfd = os.open(running_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not sv.is_btrfs(rfd):
            return None
        with layout.fd() as fd:
            if sv.fs_uuid(rfd) != sv.fs_uuid(fd):
                return None
            return _root_name(layout, fd, sv.subvol_info(rfd).id)
    except OSError:
        return None
    finally:
        os.close(rfd)


def select_root(layout: Layout, *, count: bool = True) -> tuple[str | None, Trial | None]:
    """What the initramfs boots now: ``(root, trial)``; with ``count`` the trial's boot is
    spent first (renamed and synced), as ``contrib/boot/initramfs.sh`` does.

    ``root`` is ``None`` when the default subvolume is booted and is not one of the roots.
    """
    trial = read_trial(layout)
    if trial is not None and trial.left > 0 and (layout.roots / trial.slot).is_dir():
        if count:
            spent = Trial(trial.slot, trial.left - 1, trial.done + 1)
            os.rename(layout.boot_dir / trial.name, layout.boot_dir / spent.file_name)
            layout.sync()
            trial = spent
        return trial.slot, trial
    return default_root(layout), trial


def call_hook(hook: str | None, *args: str) -> None:
    """Run the boot hook (``HOOK ACTION SLOT [TRIES]``); a failure is an error."""
    if not hook:
        return
    try:
        proc = subprocess.run([hook, *args], capture_output=True, check=False, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DeviceError(f"boot hook {hook} {' '.join(args)}: {exc}") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise DeviceError(f"boot hook {hook} {' '.join(args)} failed "
                          f"(exit {proc.returncode}){': ' + err[-1] if err else ''}")


def root_path(layout: Layout, name: str | None) -> Path:
    """The directory of root ``name`` (``None``: the factory base)."""
    return layout.root(name or FACTORY)
