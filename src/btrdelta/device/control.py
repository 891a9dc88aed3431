"""Lay out a device and steer its boots: init, status, recover, mark-good, mark-bad,
rollback.

Owns: ``device init`` (factory base, slots, state subvolumes, state file), the status
report, recovery after an interrupted command (hidden work removed, a half-done install
undone, the state file brought in line with the boot truth), and the verdicts on a booted
root. Every writing command takes the device lock and recovers first.

Does not own: building roots (:mod:`.roots`), the boot switches (:mod:`.boot`), installs
(:mod:`.install`), factory reset and backups.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..fs import btrfs as sv
from ..tree.incremental import Digests
from ..update import heldsums
from .boot import (
    Trial,
    booted_root,
    call_hook,
    clear_trial,
    default_root,
    exhaust_trial,
    read_trial,
    set_default_root,
)
from .fetch import clear_work
from .layout import BOOTABLE, FACTORY, HIDDEN, SLOTS, DeviceError, Layout, open_device
from .reset import STATE_RESET, fresh_state_subvol, old_state_in_use
from .roots import Fetch, build_root, place_root
from .state import DeviceState, RootInfo, load_state, parse_state_spec, save_state

__all__ = [
    "DEFAULT_STATE",
    "init",
    "mark_bad",
    "mark_good",
    "recover",
    "rollback",
    "status",
]

#: state subvolumes made when ``init`` is given none
DEFAULT_STATE = ("etc:/etc:overlay", "var:/var:overlay", "home:/home:bind")


#: the top-level subvolume's id (the default of a fresh btrfs)
_TOP_LEVEL = 5

def init(
    fs: str | os.PathLike[str],
    factory: str | os.PathLike[str],
    *,
    state: list[str] | None = None,
    tries: int = 3,
    hook: str | None = None,
    expect_sum: str | None = None,
    force: bool = False,
    key: str | None = None,
    to: str | None = None,
    mirrors: Sequence[str] = (),
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Lay out device filesystem ``fs`` with ``factory`` (a tree, a full send stream, a
    repository URL: version ``to`` of it, with root key ``key``, or a chunk archive of a
    full stream) as its factory base and both slots, the state subvolumes and the state
    file; the default subvolume becomes slot ``a``.

    Raises:
        DeviceError: ``fs`` is already a device (without ``force``) or is not empty.
    """
    specs = [parse_state_spec(s) for s in (state if state is not None else DEFAULT_STATE)]
    if len({s.name for s in specs}) != len(specs):
        raise DeviceError("state subvolume names must differ")
    if tries < 1:
        raise DeviceError("tries must be at least 1")
    _check_factory(os.fspath(factory))
    with open_device(fs) as layout:
        _refuse_foreign(layout, force)
        with layout.lock():
            _prepare_empty(layout, force)
            return _init_locked(layout, factory, specs, tries, hook, expect_sum, key, to,
                                mirrors, on_progress)


def _init_locked(layout: Layout, factory: str | os.PathLike[str], specs: list[Any],
                 tries: int, hook: str | None, expect_sum: str | None, key: str | None,
                 to: str | None, mirrors: Sequence[str],
                 on_progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    """:func:`init` once the device is locked and its filesystem ready."""
    layout.roots.mkdir()
    layout.state_dir.mkdir()
    try:
        built = build_root(layout, factory, FACTORY, expect_sum=expect_sum,
                           keys=[key] if key else None, fetch=Fetch(to, tuple(mirrors)),
                           on_progress=on_progress)
        clear_work(layout)
        place_root(layout, built, FACTORY)
        for slot in SLOTS:
            layout.snapshot(layout.root(FACTORY), layout.root(slot), readonly=True)
            if built.entries is not None:  # (its digests: the factory's, kept)
                heldsums.save(layout.meta, Digests(layout.root(slot), built.tree_sum,
                                                   built.entries))
        for s in specs:
            fresh_state_subvol(layout, s, layout.state(s.name))
        st = DeviceState(tries=tries, hook=hook, state=specs)
        now = time.time()
        for name in BOOTABLE:
            st.roots[name] = RootInfo(built.release, str(built.uuid), built.tree_sum,
                                      now, "good", built.source)
        st.note("init", release=built.release, tree_sum=built.tree_sum)
        layout.sync()
        set_default_root(layout, SLOTS[0])
        save_state(layout, st)  # last: a device exists once its state file does
    except BaseException:
        # nothing to keep before the state file: a re-run needs no --force (a wrong
        # key, source or option, and Ctrl-C or SIGTERM, left roots/ and state/ as "an
        # unfinished init"); a download of the fetch area stays: the re-run resumes it
        if not layout.initialized():
            _undo_init(layout)
        raise
    call_hook(hook, "good", SLOTS[0])
    return status_of(layout, st)


def _check_factory(source: str) -> None:
    """A local factory that is missing or no full send stream (nor a tree, nor a chunk
    archive) is refused before anything is laid out: with --force the device's roots and
    state were deleted first, then 'No such file' or 'bad magic' left no device at all.

    Raises:
        DeviceError: ``source`` does not exist.
        StreamFormatError: it is a file of another kind (a delta, a tar, compressed).
    """
    from .fetch import source_kind

    if source == "-" or source_kind(source) != "local" or os.path.isdir(source):
        return
    if not os.path.exists(source):
        raise DeviceError(f"{source}: No such file or directory (the factory release: a "
                          "full send stream, a tree, a repository URL or a chunk archive)")
    from ..update.identify import PEEK, Kind, identify_bytes

    with open(source, "rb") as f:
        head = f.read(PEEK)
    what = identify_bytes(head)
    if what.kind is not Kind.SEND_STREAM:
        raise what.refuse("a full btrfs send stream (or a tree, a repository URL, a chunk "
                          "archive)", source=source)
    from ..stream.constants import CMD_HEADER, STREAM_HEADER_SIZE, Cmd

    if len(head) >= STREAM_HEADER_SIZE + CMD_HEADER.size and CMD_HEADER.unpack_from(
            head, STREAM_HEADER_SIZE)[1] == Cmd.SNAPSHOT:
        raise DeviceError(f"{source}: an incremental stream (btrfs send -p): the factory "
                          "release is received whole, from a full stream")


def _undo_init(layout: Layout) -> None:
    """Delete what an init that did not finish made (not its fetch area)."""
    with layout.fd() as fd:  # (btrfs refuses to delete the default subvolume)
        sv.set_default_subvolume(fd, _TOP_LEVEL)
    for p in (layout.roots, layout.state_dir):
        layout.delete(p, wait=True)


def _refuse_foreign(layout: Layout, force: bool) -> None:
    """Refuse (without ``force``) a filesystem that is not a device and holds another
    system or data; checked before the device lock, which makes ``.btrdelta``: a refused
    init leaves the filesystem as it was."""
    if force or layout.initialized():
        return
    with layout.fd() as fd:
        default = sv.default_subvolume(fd)
    if default != _TOP_LEVEL and default_root(layout) is None:
        # a host's own btrfs (snapper-style set-ups boot the default subvolume): init
        # would make roots/a the default, and that host's next boot would come up in it
        # (an init cut after its set-default left a root of its own: _prepare_empty)
        raise DeviceError(f"{layout.name}: its default subvolume is not the top level "
                          f"(subvolume id {default}: a system boots it); device init "
                          "makes roots/a the default (--force takes the filesystem over)")
    ours = {p.name for p in (layout.meta, layout.roots, layout.state_dir)}
    others = sorted(n for n in os.listdir(layout.top) if n not in ours)
    if others:
        # a host's own btrfs whose default is still the top level (its root mounted with
        # subvol=, as Debian's and Ubuntu's installers lay it out), or a disk of data:
        # init would make roots/a the default and lay the device out beside them
        listed = ", ".join(others[:3]) + (f" and {len(others) - 3} more"
                                           if len(others) > 3 else "")
        raise DeviceError(f"{layout.name} is not empty (it holds {listed}): device init "
                          "lays out an empty btrfs filesystem (--force lays the device out "
                          "beside what is there, which is kept)")


def _prepare_empty(layout: Layout, force: bool) -> None:
    ours = [layout.meta, layout.roots, layout.state_dir]
    if layout.initialized() and not force:
        raise DeviceError(f"{layout.name} is already a btrdelta device (--force lays it out "
                          "anew: every root and state subvolume is deleted)")
    present = [p for p in ours[1:] if os.path.lexists(p)]
    if present and not force:
        raise DeviceError(f"{layout.name} holds {', '.join(p.name for p in present)} from an "
                          "unfinished init (--force deletes them)")
    if force and layout.initialized() and (running := booted_root(layout)) is not None:
        raise DeviceError(f"{layout.name}: the running system booted from its root "
                          f"{running}: --force would delete the root and the state under "
                          "it; lay it out anew from a rescue system or another root")
    if force:
        # the default subvolume is a root, which btrfs refuses to delete (EPERM: --force on
        # a device failed after dropping its state file, and every re-run failed the same)
        with layout.fd() as fd:
            sv.set_default_subvolume(fd, _TOP_LEVEL)
        layout.state_file.unlink(missing_ok=True)
        clear_trial(layout)
        for p in ours[1:]:
            layout.delete(p, wait=True)
    layout.meta.mkdir(exist_ok=True)


def recover(layout: Layout, st: DeviceState, booted: str | None = None) -> list[str]:
    """Finish or undo what an interrupted command left; returns what was done.

    Hidden work in ``roots/`` goes; an install that did not reach its commit point loses
    its half-made slot; a factory reset is finished or undone, a rollback's intent dropped
    (noting whether it committed); what a cut reset or restore left is removed; a trial of
    the default root is cleared and a default still recorded ``new`` is recorded good (a
    mark-good cut short after its commit point); records of roots that no longer exist are
    dropped. Behind a boot hook, the trial of an install cut short after its commit point
    is told to the hook again in the same boot, dropped in a later one unless ``booted``
    (default: the running root) is its slot.
    """
    done: list[str] = []
    for entry in sorted(os.listdir(layout.roots)) if layout.roots.is_dir() else []:
        if entry.startswith(HIDDEN):
            layout.delete(layout.roots / entry, wait=True)
            done.append(f"removed unfinished {entry}")
    trial = read_trial(layout)
    default = default_root(layout)
    pending = st.pending or {}
    if pending.get("op") == "install":
        slot = str(pending.get("slot"))
        committed = (trial is not None and trial.slot == slot) or default == slot
        if not committed and slot in SLOTS and not _as_recorded(layout, st, slot):
            layout.delete(layout.root(slot), wait=True)
            st.roots.pop(slot, None)
            done.append(f"removed slot {slot} of an install cut short")
        elif st.hook and trial is not None and trial.slot == slot:
            done += _hook_after_cut(layout, st, pending, trial, booted)
            trial = read_trial(layout)
        st.pending = None
    elif pending.get("op") == "factory-reset":
        from .reset import finish_reset

        done += finish_reset(layout, st)
    elif pending.get("op") == "rollback":
        if _rolled_back(pending, trial, default):
            done.append(f"finished a rollback cut short (default {default})")
        st.pending = None
    leftovers = _restore_leftovers(layout)
    if pending.get("op") != "factory-reset" and os.path.lexists(layout.top / STATE_RESET) \
            and not old_state_in_use(layout):  # (kept until the next boot)
        leftovers.append(layout.top / STATE_RESET)  # a reset's prepared or old state
    for leftover in leftovers:
        try:
            layout.delete(leftover)
        except OSError:  # the old state of a reset or restore, in use by the running system
            continue
        done.append(f"removed {leftover.relative_to(layout.top)}, left by a command cut short")
    if trial is not None and trial.slot == default:
        clear_trial(layout)
        done.append(f"cleared the trial of {default}, already the default")
    info = st.roots.get(default) if default is not None else None
    if info is not None and info.verdict == "new":  # only mark-good makes a new root the default
        info.verdict = "good"
        st.note("mark-good", slot=default)
        done.append(f"recorded {default} as good (a mark-good cut short after its commit)")
    for name in list(st.roots):
        if not layout.is_subvolume(layout.root(name)):
            del st.roots[name]
            done.append(f"forgot root {name} (gone)")
    if done or pending:
        for what in done:
            st.note("recover", what=what)
        save_state(layout, st)
    return done


def _hook_after_cut(layout: Layout, st: DeviceState, pending: dict[str, Any],
                    trial: Trial, booted: str | None) -> list[str]:
    """An install cut short between its commit point and its end may not have told the
    boot hook (``try SLOT N``): the trial file is there, the bootloader may not know it.
    In the boot the install ran in nothing has booted since, so the hook is told now
    (``try`` sets the trial: telling it twice is telling it once) and the install recorded
    as made. In a later boot the bootloader either booted the slot (it was told, and counts
    the tries) or did not: told and the tries spent, never told, or (a rescue boot) told
    and not yet booted. The trial file goes and the hook hears ``cancel`` (harmless where
    it has no trial), so the state and the bootloader agree."""
    from ..update.partial import boot_id

    slot = trial.slot
    if pending.get("boot") and pending.get("boot") == boot_id():
        try:
            call_hook(st.hook, "try", slot, str(trial.left))
        except DeviceError as exc:
            clear_trial(layout)
            return [f"dropped the trial of {slot} (an install cut short before its end; "
                    f"{exc})"]
        info = st.roots.get(slot)
        st.note("install", slot=slot, release=info.release if info else None,
                tree_sum=info.tree_sum if info else None, tries=trial.left, boot=boot_id())
        return [f"told the boot hook of the trial of {slot} (an install cut short before "
                "its end)"]
    if (booted or booted_root(layout)) == slot:
        return []
    clear_trial(layout)
    try:  # (a bootloader that was told and did not boot it yet, e.g. a rescue boot: no more)
        call_hook(st.hook, "cancel", slot)
    except DeviceError as exc:
        return [f"dropped the trial of {slot}: the install was cut short before its end "
                f"(install it again; {exc})"]
    return [f"dropped the trial of {slot}: the install was cut short before its end and "
            "the boot hook may never have heard of it (install it again)"]


def _rolled_back(pending: dict[str, Any], trial: Trial | None, default: str | None) -> bool:
    """True when the rollback of intent ``pending`` reached its commit point."""
    cancel = pending.get("cancel")
    if cancel is not None:
        return trial is None or trial.slot != cancel or trial.left == 0
    return default == pending.get("to")


def _restore_leftovers(layout: Layout) -> list[Path]:
    """What a restore cut short leaves: its work directory, the swapped-out subvolume; and
    a backup cut short: its work directory (the stream and delta not yet put)."""
    from .backup import BACKUP_WORK, RESTORE_WORK, RESTORED, restored_in_use

    out = [layout.meta / w for w in (RESTORE_WORK, BACKUP_WORK)
           if os.path.lexists(layout.meta / w)]
    if layout.state_dir.is_dir():  # (the old one the running system uses: until next boot)
        out += [layout.state_dir / e for e in sorted(os.listdir(layout.state_dir))
                if e.startswith(RESTORED) and not restored_in_use(layout, e[len(RESTORED):])]
    return out


def _as_recorded(layout: Layout, st: DeviceState, name: str) -> bool:
    """True when root ``name`` holds what the state file records (its received UUID), or
    does not exist."""
    path = layout.root(name)
    if not os.path.lexists(path):
        return True
    info = st.roots.get(name)
    if info is None or not layout.is_subvolume(path):
        return False
    with layout.fd(path) as fd:
        got = sv.subvol_info(fd)
    return str(got.received_uuid or got.uuid) == info.uuid


def status_of(layout: Layout, st: DeviceState, booted: str | None = None) -> dict[str, Any]:
    """The status document (``device status --json``)."""
    trial = read_trial(layout)
    default = default_root(layout)
    booted = booted or booted_root(layout)
    next_boot = trial.slot if trial is not None and trial.left > 0 else default
    roots: dict[str, Any] = {}
    for name in BOOTABLE:
        path = layout.root(name)
        info = st.roots.get(name)
        roots[name] = {
            "present": layout.is_subvolume(path),
            **(vars(info) if info else {}),
            "default": name == default,
            "booted": name == booted,
        }
    return {
        "filesystem": layout.name,
        "default": default,
        "booted": booted,
        "next_boot": next_boot,
        "trial": None if trial is None else {"slot": trial.slot, "tries_left": trial.left,
                                             "boots": trial.done},
        "tries": st.tries,
        "hook": st.hook,
        "roots": roots,
        "state": [vars(s) | {"present": layout.is_subvolume(layout.state(s.name))}
                  for s in st.state],
        "pending": st.pending,
        "generation": st.generation,
        "log": st.log[-10:],
    }


def status(fs: str | os.PathLike[str], *, booted: str | None = None) -> dict[str, Any]:
    """The device's status (read only: nothing is recovered or written)."""
    with open_device(fs, readonly=True) as layout:
        return status_of(layout, load_state(layout), booted)


def _which(layout: Layout, slot: str | None, booted: str | None, *,
           ended: bool = False) -> str:
    """The root a verdict is about: ``slot``, else the booted one, else (/ does not tell)
    the root of a trial that has made boots; with ``ended`` also a trial whose tries ran
    out (mark-bad records the verdict on it; mark-good does not guess a root nobody
    booted successfully)."""
    if slot is not None:
        layout.root(slot)
        return slot
    running = booted or booted_root(layout)
    if running is not None:
        return running
    trial = read_trial(layout)
    if trial is not None and trial.done > 0 and (trial.left > 0 or ended):
        return trial.slot
    raise DeviceError("cannot tell which root is booted here: name it with --slot")


def mark_good(fs: str | os.PathLike[str], *, slot: str | None = None,
              booted: str | None = None) -> dict[str, Any]:
    """The booted root (or ``slot``) is good: it becomes the default subvolume (the commit
    point) and its trial ends (a pending trial of another slot, an install made since,
    stays; behind a hook, one installed in this boot)."""
    with open_device(fs) as layout, layout.lock():
        st = load_state(layout)
        recover(layout, st, booted)
        name = _which(layout, slot, booted)
        if not layout.is_subvolume(layout.root(name)):
            raise DeviceError(f"root {name} does not exist")
        trial = read_trial(layout)
        # a pending trial of another slot is an install made since (the health check's
        # mark-good of the running root came after it): it stays, and the hook, whose
        # "good" drops any trial, is told it again; behind a hook only one made in this
        # boot (a bootloader that counts the tries itself leaves the file's count as it
        # was: one tried already, run out, would be armed again at every mark-good)
        later = trial if trial is not None and trial.slot != name and trial.left > 0 and (
            not st.hook or _installed_this_boot(st, trial.slot)) else None
        set_default_root(layout, name)
        if later is None:
            clear_trial(layout)
        call_hook(st.hook, "good", name)
        if later is not None:
            try:
                call_hook(st.hook, "try", later.slot, str(later.left))
            except DeviceError:
                clear_trial(layout)  # the bootloader was not told it again: no trial at all
                raise
        st.root(name).verdict = "good"
        st.note("mark-good", slot=name)
        save_state(layout, st)
        return status_of(layout, st, booted)


def _installed_this_boot(st: DeviceState, slot: str) -> bool:
    """Whether the last install into ``slot`` was made in this boot (the log's ``boot``):
    no bootloader can have tried it yet."""
    from ..update.partial import boot_id

    last = next((e for e in reversed(st.log)
                 if e.get("event") == "install" and e.get("slot") == slot), None)
    return last is not None and bool(last.get("boot")) and last.get("boot") == boot_id()


def _fallback(layout: Layout, st: DeviceState, bad: str) -> str:
    """The root to go back to from ``bad``: the good root that was the default last before
    it (the log's mark-good, rollback, factory reset and init, newest first: after a
    factory reset from b, b rather than an older a), else a good slot, else the factory
    base."""
    made_default = {"mark-good": "slot", "rollback": "slot", "factory-reset": "root"}
    recent = [SLOTS[0] if e.get("event") == "init" else e.get(made_default.get(e.get("event"), ""))
              for e in reversed(st.log)]
    for name in dict.fromkeys([*recent, *SLOTS, FACTORY]):
        if name not in BOOTABLE or name == bad or not layout.is_subvolume(layout.root(name)):
            continue
        info = st.roots.get(name)
        if info is not None and info.verdict == "bad":
            continue
        if name != FACTORY and (info is None or info.verdict != "good"):
            continue
        return name
    raise DeviceError(f"no good root to go back to from {bad}")


def mark_bad(fs: str | os.PathLike[str], *, slot: str | None = None,
             booted: str | None = None) -> dict[str, Any]:
    """The booted root (or ``slot``) is bad: a pending trial of it ends (the next boot takes
    the default); if it is the default, the default goes back to the previous good root."""
    with open_device(fs) as layout, layout.lock():
        st = load_state(layout)
        recover(layout, st, booted)
        name = _which(layout, slot, booted, ended=True)
        trial = read_trial(layout)
        if trial is not None and trial.slot == name:
            exhaust_trial(layout)
            call_hook(st.hook, "cancel", name)
        if default_root(layout) == name:
            back = _fallback(layout, st, name)
            set_default_root(layout, back)
            call_hook(st.hook, "good", back)
            st.note("rollback", slot=back, reason=f"{name} marked bad")
        st.root(name).verdict = "bad"
        st.note("mark-bad", slot=name)
        save_state(layout, st)
        return status_of(layout, st, booted)


def rollback(fs: str | os.PathLike[str], *, booted: str | None = None) -> dict[str, Any]:
    """Go back: a pending trial is cancelled (the default boots next); without one, the
    default subvolume goes back to the other good slot (or the factory base)."""
    with open_device(fs) as layout, layout.lock():
        st = load_state(layout)
        cut = st.pending if (st.pending or {}).get("op") == "rollback" else None
        done = recover(layout, st, booted)
        if cut is not None and any(w.startswith("finished a rollback") for w in done):
            return status_of(layout, st, booted)  # a re-run does not go back twice
        trial = read_trial(layout)
        if trial is not None and trial.left > 0:
            st.pending = {"op": "rollback", "cancel": trial.slot}
            save_state(layout, st)
            exhaust_trial(layout)
            call_hook(st.hook, "cancel", trial.slot)
            st.note("rollback", slot=default_root(layout), reason=f"trial of {trial.slot} "
                    "cancelled")
        else:
            current = default_root(layout)
            if current is None:
                raise DeviceError("the default subvolume is not one of the roots")
            back = _fallback(layout, st, current)
            st.pending = {"op": "rollback", "from": current, "to": back}
            save_state(layout, st)
            set_default_root(layout, back)
            clear_trial(layout)
            call_hook(st.hook, "good", back)
            st.note("rollback", slot=back, reason=f"from {current}")
        st.pending = None
        save_state(layout, st)
        return status_of(layout, st, booted)
