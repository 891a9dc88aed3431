"""``device install``: rebuild the inactive slot from a release and boot it once.

The steps, in order (``docs/device.md`` has the crash analysis of each)::

    recover        hidden work of an earlier run removed, a half-made slot deleted
    pick           the slot that is neither the default nor the booted root
    held?          from a repository: the slot already holds the version wanted (its
                   content checked against the verified index, :func:`.fetch.slot_holds`):
                   intent, then on at COMMIT (nothing received or placed)
    intent         state file: {"pending": {"op": "install", "slot": S}}
    receive        roots/.staged-S: snapshot of the parent + the stream (a delta's old
                   files verified before they are patched), received UUID, read-only
    verify         tree-sum of the new root (against the release's when given)
    place          roots/S -> .old-S, .staged-S -> S, .old-S deleted; sync
    COMMIT         .btrdelta/boot/try-S+N created (O_EXCL) and synced: the next boot
                   takes S, at most N times, then the default again
    hook           HOOK try S N (a bootloader that counts boots itself)
    done           state file: pending cleared, S recorded "new"

Before COMMIT a crash leaves the device booting the default root exactly as before (the
new slot is never selectable); the next command (or a re-run) removes the half-made slot.
After COMMIT the trial is in place; a re-run from a repository finds the slot holding the
version and commits its trial again (nothing downloaded).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from ..errors import ApplyError, BtrdeltaError, MissingBaseError
from ..update.partial import boot_id
from .boot import (
    booted_root,
    call_hook,
    clear_trial,
    default_root,
    read_trial,
    start_trial,
)
from .control import recover
from .fetch import clear_work, slot_holds, source_kind
from .layout import SLOTS, DeviceError, Layout, is_enospc, open_device
from .roots import Built, Fetch, build_root, place_root
from .state import DeviceState, RootInfo, load_state, save_state

__all__ = ["InstallResult", "install", "pick_slot"]


@dataclass(frozen=True)
class InstallResult:
    """What an install did."""

    slot: str
    release: str
    uuid: str
    tree_sum: str
    tries: int
    records: int
    data_bytes: int
    seconds: float
    #: from a repository: hops applied, bytes downloaded (records, data_bytes: 0)
    hops: int = 0
    downloaded: int = 0
    #: the slot already held the version (from a repository): nothing received or placed
    kept: bool = False

    def to_json(self) -> dict[str, Any]:
        """As a JSON object."""
        return dict(vars(self))


def pick_slot(layout: Layout, st: DeviceState, booted: str | None) -> str:
    """The slot an install rebuilds: neither the default root nor the booted one; of two
    candidates the one not marked good, else the older."""
    default = default_root(layout)
    free = [s for s in SLOTS if s not in (default, booted)]
    if not free:
        trial = read_trial(layout)
        if trial is not None and trial.slot == booted:
            raise DeviceError(f"slot {booted} is booted on trial: mark it good or bad first")
        raise DeviceError(f"no slot to install into (default {default}, booted {booted})")

    def rank(s: str) -> tuple[bool, float]:
        info = st.roots.get(s)
        return (info is not None and info.verdict == "good"), (info.installed if info else 0)

    return sorted(free, key=rank)[0]


def install(
    fs: str | os.PathLike[str],
    source: str | os.PathLike[str],
    *,
    expect_sum: str | None = None,
    tries: int | None = None,
    booted: str | None = None,
    keys: list[str] | None = None,
    signature: str | None = None,
    to: str | None = None,
    mirrors: Sequence[str] = (),
    on_step: Callable[[str], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> InstallResult:
    """Install release ``source`` (a send stream, a delta stream, a directory tree, a
    repository URL or a chunk archive of a plain stream) into the inactive slot and make it
    the next boot, once, with ``tries`` boots.

    Args:
        fs: the device filesystem (top-level mount, block device or image).
        source: the release; a stream's parent is found among the roots by UUID; a tree
            is sent against the booted (else default) root.
        expect_sum: the release's tree-sum; the install fails if the new root differs.
        tries: boots the new slot gets before the default comes back (default: the
            state file's).
        booted: the booted root, when the running ``/`` does not tell (tests, rescue).
        keys: Ed25519 public key files: refuse a source not signed by one of them (a
            repository's root key, or an archive's signing key: one key).
        signature: the detached signature (default ``SOURCE.sig``).
        to: the repository version to install (default: the newest).
        mirrors: more URLs of the repository, tried in turn.
        on_step: called with each step's name (``receive``, ``verify``, ``place``,
            ``commit``, ``hook``, ``done``).
        on_progress: ``(records, bytes)`` while receiving.

    Raises:
        ApplyError: disk full or another system-call failure (nothing selected, space
            given back).
        ChecksumError: a delta's old file or the new root's tree-sum did not verify.
        SignatureError: ``keys`` given and the source is not signed by one of them.
        MissingBaseError: the stream's parent is not on the device.
    """
    step = on_step or (lambda _name: None)
    with open_device(fs) as layout, layout.lock():
        st = load_state(layout)
        recover(layout, st, booted)
        booted = booted or booted_root(layout)
        slot = pick_slot(layout, st, booted)
        n = tries if tries is not None else st.tries
        if n < 1:
            raise DeviceError("tries must be at least 1")
        built = _kept(layout, st, slot, os.fspath(source), expect_sum, to, mirrors, keys)
        kept = built is not None  # the slot holds the version: nothing to receive or place
        _intend(layout, st, slot)
        if built is None:
            step("receive")
            parent_name = booted or default_root(layout)
            parent = layout.root(parent_name) if parent_name else None
            try:
                built = build_root(layout, source, slot, parent=parent, expect_sum=expect_sum,
                                   keys=keys, signature=signature,
                                   fetch=_fetch(layout, st, slot, parent_name, to, mirrors),
                                   on_progress=on_progress)
            except BaseException as exc:
                _abandon(layout, st, slot)
                with contextlib.suppress(OSError, BtrdeltaError):  # the first error is news
                    clear_work(layout, resumable=not is_enospc(exc))
                if is_enospc(exc):
                    raise ApplyError(f"disk full while installing into slot {slot} (nothing "
                                     f"selected, space given back): {exc}") from exc
                if isinstance(exc, MissingBaseError) and \
                        source_kind(os.fspath(source)) == "local":
                    raise _not_on_device(exc, source, st) from exc
                raise
        _commit(layout, st, built, slot, n, step)
        clear_work(layout)
        return InstallResult(slot, built.release, str(built.uuid), built.tree_sum, n,
                             built.records, built.data_bytes, built.seconds,
                             hops=built.hops, downloaded=built.downloaded, kept=kept)


def _fetch(layout: Layout, st: DeviceState, slot: str, parent_name: str | None,
           to: str | None, mirrors: Sequence[str]) -> Fetch:
    """What a repository gives: version ``to``, the parent's release and tree-sum, the
    device's other roots with their recorded tree-sums (taken when one holds ``to``; not
    one marked bad, see :func:`_kept`)."""
    info = st.roots.get(parent_name) if parent_name else None
    holders = tuple((layout.root(name), held.tree_sum) for name, held in st.roots.items()
                    if name not in (slot, parent_name) and held.tree_sum
                    and held.verdict != "bad" and layout.is_subvolume(layout.root(name)))
    return Fetch(to, tuple(mirrors), info.release if info else None,
                 info.tree_sum if info else None, holders)


def _intend(layout: Layout, st: DeviceState, slot: str) -> None:
    """Write the intent; then a pending trial of ``slot`` is cancelled (a full disk that
    refuses the intent leaves the trial as it was)."""
    st.pending = {"op": "install", "slot": slot, "started": round(time.time(), 3),
                  "boot": boot_id()}
    try:
        save_state(layout, st)
    except OSError as exc:
        if not is_enospc(exc):
            raise
        raise ApplyError(f"{layout.name}: disk full before installing into slot {slot}: "
                         "cannot write the state file (nothing changed; free space, e.g. "
                         "in state/, and run it again)") from exc
    trial = read_trial(layout)
    if trial is not None and trial.slot == slot:
        clear_trial(layout)  # the slot of a pending trial is rebuilt: no boot of it
        call_hook(st.hook, "cancel", slot)


def _commit(layout: Layout, st: DeviceState, built: Built, slot: str, n: int,
            step: Callable[[str], None]) -> None:
    """Place the built root (unless it is the slot's own), commit the trial, tell the
    hook, record it."""
    step("place")
    if built.path != layout.root(slot):
        place_root(layout, built, slot)
    st.roots[slot] = RootInfo(built.release, str(built.uuid), built.tree_sum, time.time(),
                              "new", built.source)
    save_state(layout, st)
    step("commit")
    start_trial(layout, slot, n)
    step("hook")
    try:
        call_hook(st.hook, "try", slot, str(n))
    except DeviceError:
        clear_trial(layout)  # the bootloader was not told: no trial at all
        st.pending = None
        save_state(layout, st)
        raise
    st.pending = None
    st.note("install", slot=slot, release=built.release, tree_sum=built.tree_sum, tries=n,
            boot=boot_id())  # (mark-good keeps a trial made in this boot: control.mark_good)
    save_state(layout, st)
    step("done")


def _kept(layout: Layout, st: DeviceState, slot: str, source: str, expect_sum: str | None,
          to: str | None, mirrors: Sequence[str], keys: list[str] | None) -> Built | None:
    """The slot as its own build when it holds the repository's version wanted: the
    state file records it with that version's identity, and its content is that identity
    (:func:`.fetch.slot_holds`: the verified index, the slot's kept digests or every file
    read). A slot whose content differs is rebuilt, and so is one marked bad: the digests
    kept for it prove its content without reading it, not that its blocks still read (a
    boot that failed on a block gone bad would fail again), and a rebuild costs one
    download."""
    info = st.roots.get(slot)
    path = layout.root(slot)
    if source_kind(source) != "repository" or info is None or not info.tree_sum \
            or info.verdict == "bad" \
            or (expect_sum and expect_sum.lower() != info.tree_sum) \
            or not layout.is_subvolume(path):
        return None
    start = time.monotonic()
    try:
        res = slot_holds(layout, source, path, info.tree_sum, to=to, mirrors=mirrors,
                         keys=keys)
    except BaseException:
        with contextlib.suppress(OSError, BtrdeltaError):  # the first error is the news
            clear_work(layout, resumable=True)
        raise
    if res is None:
        return None
    return Built(path, res.target, UUID(info.uuid), info.tree_sum, 0, 0,
                 time.monotonic() - start, source, downloaded=res.received)


def _not_on_device(exc: MissingBaseError, source: str | os.PathLike[str],
                   st: DeviceState) -> MissingBaseError:
    """One line for a delta or incremental stream made against a root the device does not
    hold: which base it wants, which releases the device has."""
    m = _UUID.search(exc.message)
    held = ", ".join(f"{name} {info.release}" for name, info in sorted(st.roots.items()))
    return MissingBaseError(
        f"made against a root this device does not hold (parent subvolume "
        f"{m[0] if m else '?'}); its roots: {held or 'none'}. Install a full stream, or a "
        "delta or incremental stream made against one of them", source=os.fspath(source))


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _abandon(layout: Layout, st: DeviceState, slot: str) -> None:
    """After a failed receive: the intent is dropped (the old slot content, if any, was
    never touched: the receive worked on a staging name)."""
    try:
        st.pending = None
        st.note("install-failed", slot=slot)
        save_state(layout, st)
    except OSError:
        pass  # disk full may refuse this too: the next command's recovery cleans up
