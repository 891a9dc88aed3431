"""``device mount`` and ``device diff``: a read-only root with the state subvolumes over it.

Owns: mounting a root as the initramfs does (``contrib/boot/btrdelta-boot.sh mount``): the
root read-only, each ``overlay`` state subvolume as an overlayfs whose lower layer is the
root's directory and whose upper is ``state/NAME/upper``, each ``bind`` state subvolume
bind-mounted; and reading an overlay's upper directory back as changes against the root
(added, modified, deleted through a whiteout, replaced through an opaque directory).

Does not own: which root boots (:mod:`.boot`), the state subvolumes' life (:mod:`.reset`).
"""

from __future__ import annotations

import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .boot import select_root
from .layout import DeviceError, Layout, open_device
from .state import load_state

__all__ = ["Change", "diff", "mount"]

_OPAQUE = b"trusted.overlay.opaque"


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise DeviceError(f"{' '.join(cmd)}: {err[-1] if err else proc.returncode}")


def _root_name(layout: Layout, root: str | None) -> str:
    if root is not None:
        layout.root(root)
        return root
    name, _trial = select_root(layout, count=False)
    if name is None:
        raise DeviceError("the default subvolume is not one of the roots: name one")
    return name


def mount(fs: str | os.PathLike[str], target: str | os.PathLike[str], *,
          root: str | None = None, state: bool = True) -> dict[str, object]:
    """Mount root ``root`` (default: the one the next boot takes, without spending a try)
    read-only on ``target``, with the state subvolumes over it. ``umount -R TARGET``
    undoes it.

    Returns:
        ``{"root": NAME, "mounts": [(mode, path), ...], "skipped": [path, ...]}``: the
        state subvolumes not mounted because the root has no directory at their path.
    """
    target = Path(target)
    if not target.is_dir():
        raise DeviceError(f"{target} is not a directory" if target.exists() else
                          f"{target} does not exist (make it first: mkdir -p {target})")
    if os.path.ismount(target):  # mounting again would stack a second root over the first
        raise DeviceError(f"{target} is a mount point already (umount -R {target} first)")
    with os.scandir(target) as entries:
        if any(True for _ in entries):
            raise DeviceError(f"{target} is not empty: device mount needs an empty directory")
    with open_device(fs) as layout:
        st = load_state(layout)
        name = _root_name(layout, root)
        real = _inside(layout.top, f"roots/{name}", f"roots/{name}")
        _run("mount", "--bind", "-o", "ro", str(real), str(target))
        done: list[tuple[str, str]] = []
        skipped: list[str] = []
        try:
            for s in st.state if state else []:
                where = _inside(target, s.path.lstrip("/"), f"root {name}: {s.path}")
                sub = _inside(layout.top, f"state/{s.name}", f"state/{s.name}")
                if not where.is_dir() or not sub.is_dir():
                    skipped.append(s.path)
                    continue
                if s.mode == "overlay":
                    upper, work = (_inside(layout.top, f"state/{s.name}/{d}",
                                           f"state/{s.name}/{d}") for d in ("upper", "work"))
                    _run("mount", "-t", "overlay", "overlay", "-o",
                         f"lowerdir={where},upperdir={upper},workdir={work}", str(where))
                else:
                    _run("mount", "--bind", str(sub), str(where))
                done.append((s.mode, s.path))
        except BaseException:
            subprocess.run(["umount", "-R", str(target)], capture_output=True, check=False)
            raise
        return {"root": name, "mounts": done, "skipped": skipped}


def _inside(top: Path, rel: str, what: str) -> Path:
    """``top/rel`` as mount(8) resolves it (following symlinks), refused when that leaves
    ``top``: a state path that is a symlink in the root (``/home -> /var/home``), or a
    state subvolume's ``upper`` that is one on the device, mounted over (or wrote into)
    the directory of the machine running the command."""
    real = Path(os.path.realpath(top / rel))
    if not real.is_relative_to(os.path.realpath(top)):
        raise DeviceError(f"{what} leads out of {top} (to {real}, through a symbolic "
                          "link): not mounted")
    return real


@dataclass(frozen=True)
class Change:
    """One change an overlay holds: ``A`` added, ``M`` modified (content or metadata
    copied up), ``D`` deleted (whiteout), ``R`` directory replaced (opaque)."""

    kind: str
    path: str

    def line(self) -> str:
        """``M /etc/passwd``."""
        return f"{self.kind} {self.path}"


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _opaque(path: bytes) -> bool:
    try:
        return os.getxattr(path, _OPAQUE, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _walk_upper(upper: bytes, lower: bytes, show: bytes, out: list[Change]) -> None:
    for entry in sorted(os.listdir(upper)):
        up = os.path.join(upper, entry)
        low = os.path.join(lower, entry)
        name = os.fsdecode(os.path.join(show, entry))
        st = os.lstat(up)
        if _is_whiteout(st):
            out.append(Change("D", name))
            continue
        try:
            lst: os.stat_result | None = os.lstat(low)
        except FileNotFoundError:
            lst = None
        if stat.S_ISDIR(st.st_mode):
            if lst is None:
                out.append(Change("A", name + "/"))
            elif _opaque(up):
                out.append(Change("R", name + "/"))
            elif stat.S_ISDIR(lst.st_mode):
                _walk_upper(up, low, os.path.join(show, entry), out)
                continue
            else:
                out.append(Change("M", name + "/"))
            continue
        out.append(Change("A" if lst is None else "M", name))


def diff(fs: str | os.PathLike[str], *, root: str | None = None) -> list[Change]:
    """What the overlay state subvolumes change in root ``root`` (default: the next boot's):
    their upper directories read against the root."""
    with open_device(fs, readonly=True) as layout:
        st = load_state(layout)
        name = _root_name(layout, root)
        out: list[Change] = []
        for s in st.state:
            if s.mode != "overlay":
                continue
            upper = _inside(layout.top, f"state/{s.name}/upper", f"state/{s.name}/upper")
            if upper.is_dir():  # (read as mount would use them: never out of the device)
                lower = _inside(layout.root(name), s.path.lstrip("/"), f"root {name}: {s.path}")
                _walk_upper(os.fsencode(upper), os.fsencode(lower), os.fsencode(s.path), out)
        return out
