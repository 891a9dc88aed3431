"""``device factory-reset``: fresh state subvolumes and the factory base, by subvolume swap.

The steps (no reflash, no partition erase)::

    prepare   .state-reset/ holds a fresh subvolume for each state subvolume (an empty
              overlay upper = the release's own files; an empty bind directory), or a
              writable snapshot of it for those kept (--keep), and a generation marker
    intent    state file: {"pending": {"op": "factory-reset", "to": ROOT, "generation": G}}
    COMMIT    renameat2(RENAME_EXCHANGE) of .state-reset and state: one atomic step swaps
              every state subvolume at once; synced
    finish    ROOT becomes the default subvolume, any trial is cleared, the old state
              (now .state-reset) is deleted, or kept until the next boot when the
              running system booted from this device in the boot that reset it (its
              overlays and bind mounts use it); state file: pending cleared

A power cut before COMMIT leaves the old state and the old root (recovery deletes the
prepared state); after it, the new state is in place and the next ``device`` command
finishes the root switch (:func:`finish_reset`, called by recovery).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from ..update.partial import boot_id
from .boot import booted_root, call_hook, clear_trial, default_root, set_default_root
from .layout import FACTORY, DeviceError, Layout, open_device
from .state import DeviceState, StateSubvol, save_state

__all__ = ["STATE_RESET", "factory_reset", "finish_reset", "fresh_state_subvol",
           "old_state_in_use"]

#: where the new state subvolumes are prepared (top level)
STATE_RESET = _PREPARED = ".state-reset"
_MARK = ".btrdelta-generation"
#: in the old state a reset swapped out: the boot whose running system still uses it
_IN_USE = ".btrdelta-in-use-by-boot"


def old_state_in_use(layout: Layout, boot: str | None = None) -> bool:
    """Whether ``.state-reset`` is the old state of a reset made in this boot (``boot``,
    else its marker, names it) while the running system is one of this device's roots:
    its overlays and bind mounts use those subvolumes until the next boot (deleted under
    them, a bind-mounted /home became an empty directory where writes fail)."""
    if boot is None:
        try:
            boot = (layout.top / _PREPARED / _IN_USE).read_text().strip()
        except OSError:
            return False
    return bool(boot) and boot == boot_id() and booted_root(layout) is not None


def fresh_state_subvol(layout: Layout, s: StateSubvol, dest: os.PathLike[str]) -> None:
    """A new state subvolume ``dest``: empty; for an overlay, with ``upper`` and ``work``.
    What the mount shows as the directory (``upper``: an overlay's top directory shows its
    upper directory's own attributes; a bind's, the subvolume's root) takes mode, owner and
    times of the factory root's directory, not the caller's umask (077: a bound ``/home``
    was 0700 where the release's is 0755)."""
    path = shown = Path(dest)
    layout.create_subvolume(path)
    if s.mode == "overlay":
        shown = path / "upper"
        shown.mkdir()
        (path / "work").mkdir()
    like = layout.root(FACTORY) / s.path.lstrip("/")
    try:
        st = os.lstat(like)
    except FileNotFoundError:
        return
    os.chown(shown, st.st_uid, st.st_gid)
    os.chmod(shown, stat.S_IMODE(st.st_mode))
    os.utime(shown, ns=(st.st_atime_ns, st.st_mtime_ns))


def _generation(path: os.PathLike[str]) -> int | None:
    try:
        with open(os.path.join(path, _MARK)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _target(layout: Layout, st: DeviceState, to: str) -> str:
    if to == "factory":
        return FACTORY
    if to != "last-good":
        raise DeviceError(f"reset to {to!r}: expected factory or last-good")
    current = default_root(layout)
    if current is not None and st.root(current).verdict == "good":
        return current
    raise DeviceError("no last good slot to reset to (use --to factory)")


def factory_reset(
    fs: str | os.PathLike[str],
    *,
    keep: list[str] | None = None,
    to: str = "factory",
) -> dict[str, Any]:
    """Reset the device: every state subvolume fresh (except ``keep``, snapshotted as they
    are), and ``to`` (``factory`` or ``last-good``) the default root.

    Returns:
        A report: the root selected, the subvolumes reset and kept, and whether the old
        state is kept until the next boot (the running system booted from the device uses
        it; ``.state-reset``).
    """
    from .control import recover

    keep = list(keep or [])
    with open_device(fs) as layout, layout.lock():
        from .state import load_state

        st = load_state(layout)
        recover(layout, st)
        if old_state_in_use(layout):
            raise DeviceError("the running system still uses the state of the last factory "
                              "reset: reboot first")
        names = {s.name for s in st.state}
        unknown = [k for k in keep if k not in names]
        if unknown:
            raise DeviceError(f"no state subvolume {', '.join(unknown)} to keep "
                              f"(there are: {', '.join(sorted(names)) or 'none'})")
        target = _target(layout, st, to)
        gen = st.generation + 1
        prepared = layout.top / _PREPARED
        layout.delete(prepared, wait=True)
        prepared.mkdir()
        for s in st.state:
            if s.name in keep and layout.is_subvolume(layout.state(s.name)):
                layout.snapshot(layout.state(s.name), prepared / s.name, readonly=False)
            else:
                fresh_state_subvol(layout, s, prepared / s.name)
        (prepared / _MARK).write_text(f"{gen}\n")
        layout.sync()
        st.pending = {"op": "factory-reset", "to": target, "generation": gen,
                      "keep": keep, "boot": boot_id()}
        save_state(layout, st)
        layout.exchange(prepared, layout.state_dir)  # COMMIT
        layout.sync()
        finish_reset(layout, st)
        save_state(layout, st)
        return {"root": target, "reset": sorted(names - set(keep)), "kept": sorted(keep),
                "old_kept": os.path.lexists(prepared)}


def finish_reset(layout: Layout, st: DeviceState) -> list[str]:
    """Complete (after its commit point) or undo (before it) a pending factory reset."""
    pending = st.pending or {}
    gen = pending.get("generation")
    prepared = layout.top / _PREPARED
    done: list[str] = []
    if _generation(layout.state_dir) == gen:
        target = str(pending.get("to", FACTORY))
        set_default_root(layout, target)
        clear_trial(layout)
        call_hook(st.hook, "good", target)
        if old_state_in_use(layout, str(pending.get("boot") or "")):
            (prepared / _IN_USE).write_text(f"{pending['boot']}\n")
            done.append("old state kept until the next boot (the running system's mounts "
                        "use it)")
        else:
            try:
                layout.delete(prepared)
            except OSError as exc:  # btrfs refused: the next command
                done.append(f"old state kept until it is not in use ({exc.strerror})")
        st.note("factory-reset", root=target, kept=pending.get("keep", []))
        done.append(f"factory reset to {target}")
    else:
        layout.delete(prepared)
        done.append("undid a factory reset cut short before its commit")
    st.pending = None
    return done
