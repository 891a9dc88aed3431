"""The lifecycle of received subvolumes in a destination directory, usable without an
:class:`~.applier.Applier`.

A subvolume is made under a hidden temporary name inside DEST (``.btrdelta-tmp-…``) and
gets its final name only when it is complete, so nothing incomplete is ever visible under
the final name and the parent is never touched:

* :meth:`Subvolumes.begin` creates it: empty, or a writable snapshot (btrfs) or copy
  (directory backend) of a parent, found by (received) UUID or given as a path;
* the caller fills it through :attr:`PendingSubvol.sandbox` (the applier applying records,
  or a device workflow writing files);
* :meth:`Subvolumes.finish` sets the received UUID and transid and makes it read-only (btrfs),
  runs the pre-commit hook, on the directory backend records it in the registry (under the
  final name, before the rename: see :mod:`.registry`), and renames it into place
  (``RENAME_NOREPLACE``); :meth:`Subvolumes.abort` removes it.

A receiver killed outright (``kill -9``, a power cut) cannot clean up: the first
:meth:`Subvolumes.begin` in a DEST removes the temporaries of dead receivers
(:meth:`Subvolumes.sweep`; a live one holds an ``flock`` on its temporary).

A pending subvolume ends exactly once: finish removes it on any failure (the hook raising
included), and abort after that, or twice, does nothing.

Two backends: ``btrfs`` (DEST on btrfs: real subvolumes, found through the UUID tree, as
``btrfs receive`` does, so the two tools can alternate) and ``dir`` (any other filesystem,
or forced: directories, found through :mod:`.registry`). Also the lookups a receive needs
before it starts: :func:`find_subvolume`, :func:`find_parent`, :func:`uses_btrfs`.

Knows nothing of applying records (that is :mod:`.applier`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

from .. import TYPE_CHECKING
from .._pool import StartedThread
from .._value import Value
from ..errors import ApplyError, BtrdeltaError, MissingParentError, UnsafePathError
from ..fs.atomic import pid_alive
from ..fs.btrfs import (
    create_snapshot,
    create_subvolume,
    delete_subvolume,
    find_subvolumes_by_uuid,
    is_btrfs,
    rename_noreplace,
    set_readonly,
    set_received,
    subvol_info,
)
from ..fs.copy import copy_tree
from ..fs.remove import remove_tree
from ..fs.sandbox import Sandbox, check_name

if TYPE_CHECKING:
    from ..stream.records import Snapshot
    from .registry import Registry

__all__ = [
    "TMP_PREFIX",
    "PendingSubvol",
    "PreCommit",
    "ReceivedSubvol",
    "Subvolumes",
    "find_parent",
    "find_subvolume",
    "uses_btrfs",
]


#: the temporary names of subvolumes being received start with this (never found as parents)
TMP_PREFIX = ".btrdelta-tmp-"
_TMP = TMP_PREFIX.encode()
#: the directory backend's registry (receive/registry.py), its temporary files included
_REGISTRY = b".btrdelta-subvols.json"
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class ReceivedSubvol(Value):
    """One subvolume a receive finished."""

    name: str
    path: Path
    uuid: UUID
    ctransid: int
    parent_uuid: UUID | None
    parent_path: Path | None
    #: True for a real btrfs subvolume, False for a directory (registry backend)
    btrfs: bool
    records: int = 0
    data_bytes: int = 0


class PendingSubvol:
    """A subvolume being made under its temporary name (see :meth:`Subvolumes.begin`)."""

    __slots__ = ("ctransid", "data_bytes", "done", "flag", "name", "parent_path",
                 "parent_uuid", "path", "records", "registering", "sandbox", "tmp", "uuid")

    def __init__(self, name: bytes, tmp: bytes, path: Path, uuid: UUID, ctransid: int,
                 parent_uuid: UUID | None, parent_path: Path | None) -> None:
        #: the final name (one component of DEST) and the temporary one
        self.name = name
        self.tmp = tmp
        #: the temporary directory itself (``DEST/tmp``)
        self.path = path
        self.uuid = uuid
        self.ctransid = ctransid
        self.parent_uuid = parent_uuid
        self.parent_path = parent_path
        #: its root directory, where the caller writes (None in a dry run)
        self.sandbox: Sandbox | None = None
        #: counters the caller keeps; :class:`ReceivedSubvol` reports them
        self.records = 0
        self.data_bytes = 0
        #: finished or aborted
        self.done = False
        #: the thread that made the snapshot ahead, to set the read-only flag
        self.flag: _ReadOnly | None = None
        #: its registry entry being written ahead (:meth:`Subvolumes.register_ahead`)
        self.registering: _Registering | None = None


#: what :meth:`Subvolumes.snapshot_ahead` is told: the (final) name, received UUID and
#: parent's (received) UUID of a SNAPSHOT record to come
Ahead = tuple[bytes, UUID, UUID]

#: called by :meth:`Subvolumes.finish` with the complete, read-only temporary subvolume
#: before it gets its final name; raising aborts it (e.g. a signature that does not verify)
PreCommit = Callable[[PendingSubvol], None]


class _ReadOnly:
    """The read-only flag of the subvolume open as ``fd``, set by a thread of its own once
    :meth:`begin` is called (the thread is started before, so its start overlaps whatever
    comes first): :meth:`wait_in_effect` returns as soon as the flag refuses changes,
    while its transaction still commits; :meth:`end` waits for the commit and raises what
    the ioctl raised."""

    #: seconds between two looks at the flag
    POLL = 1e-4

    def __init__(self, fd: int, first: Callable[[], None] | None = None,
                 name: str = "btrdelta-seal") -> None:
        self.fd = fd  # (may be set until begin())
        self._go = threading.Event()
        self._done = threading.Event()
        self._cancel = False
        self._error: BaseException | None = None
        self._first = threading.Event()
        self._first_ok = False
        self._thread = StartedThread(self._run, name, (first,))
        self._thread.start()

    def _run(self, first: Callable[[], None] | None) -> None:
        """``first``, then the flag once :meth:`begin` says so."""
        if first is not None:
            with contextlib.suppress(Exception):  # (its caller does it again and raises)
                first()
                self._first_ok = True
        self._first.set()
        try:
            self._go.wait()
            if not self._cancel:
                set_readonly(self.fd, True)
        except BaseException as exc:  # raised by end(), in the caller's thread
            self._error = exc
        finally:
            self._done.set()

    def first_done(self) -> bool:
        """Wait for the job given as ``first``; whether it succeeded."""
        self._first.wait()
        return self._first_ok

    def begin(self) -> None:
        """Set the flag now (in the thread)."""
        self._go.set()

    def wait_in_effect(self, was_writable: bool) -> None:
        """Return once the subvolume refuses changes, or the ioctl ended; raise its error
        if it failed. The flag is in the in-memory root item from the start of the ioctl,
        before its transaction commits, and the kernel checks that copy
        (``btrfs_permission``: EROFS for any write access; ``setattr`` and the xattr
        handlers check it too); ``faccessat(W_OK)`` of the root reads it without the lock
        the ioctl holds while it commits. Without ``was_writable`` (the root refused
        writes before the flag: not root, an immutable directory) the change cannot be
        seen: the ioctl is waited for."""
        fd, done, poll = self.fd, self._done, self.POLL
        if not was_writable:
            done.wait()
        while not done.is_set() and os.access(".", os.W_OK, dir_fd=fd):
            done.wait(poll)
        if self._error is not None:
            self.end()

    def end(self, raising: bool = True) -> None:
        """Wait for the ioctl (cancelled when :meth:`begin` was not called) and raise its
        error (once; not with ``raising=False``)."""
        if not self._go.is_set():
            self._cancel = True
            self._go.set()
        self._thread.join()
        error, self._error = self._error, None
        if error is not None and raising:
            raise error


class _Ahead:
    """A snapshot being made by a thread of its own (:meth:`Subvolumes.snapshot_ahead`),
    which then waits to set the subvolume's read-only flag (a :class:`_ReadOnly`: the
    seal then starts no thread)."""

    def __init__(self, name: bytes, uuid: UUID, parent: Path, tmp: bytes,
                 make: Callable[[], None]) -> None:
        self.name, self.uuid, self.parent, self.tmp = name, uuid, parent, tmp
        self.flag = _ReadOnly(-1, make, "btrdelta-snapshot")

    def made(self) -> bool:
        """Wait for it; whether it was made."""
        return self.flag.first_done()


def _stop_flag(pending: PendingSubvol) -> None:
    """Stop the thread left to set ``pending``'s read-only flag, if any (unused)."""
    flag, pending.flag = pending.flag, None
    if flag is not None:
        flag.end(raising=False)


class _Registering:
    """The registry entry of a directory subvolume written (two ``fsync``s) by a thread of
    its own while the tree is still filled and checked (:meth:`Subvolumes.register_ahead`):
    :meth:`result` waits for it before the rename, :meth:`undo` takes it back when
    anything before the rename failed. Until the rename nothing is under the entry's
    name, so the entry finds nothing (:mod:`.registry`: the leftover of a receiver killed
    before its rename)."""

    def __init__(self, subvols: Subvolumes, pending: PendingSubvol, ino: int) -> None:
        self._pending = pending
        self._registry: Registry | None = None
        self._error: BaseException | None = None
        self._thread = StartedThread(self._run, "btrdelta-register", (subvols, ino))
        self._thread.start()

    def _run(self, subvols: Subvolumes, ino: int) -> None:
        try:
            self._registry = subvols._register(self._pending, ino)
        except BaseException as exc:  # raised by result(), in the caller's thread
            self._error = exc

    def result(self) -> Registry:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._registry is not None
        return self._registry

    def undo(self) -> None:
        self._thread.join()
        if self._registry is not None:
            self._registry.remove(os.fsdecode(self._pending.name), self._pending.uuid)


def _seal(root_fd: int, pending: PendingSubvol, pre_commit: PreCommit | None,
          flag: _ReadOnly | None) -> None:
    """Seal btrfs subvolume ``pending`` (open as ``root_fd``) as ``btrfs receive`` does,
    received UUID and transid (a transaction commit), then the read-only flag (another),
    and run ``pre_commit`` on the sealed subvolume. With ``flag`` (the flag's thread, a
    :class:`_ReadOnly` of ``root_fd`` the caller started: a hook that says
    ``while_sealing``) the hook runs as soon as the flag is in effect, while the flag's
    transaction commits (1-7 ms of numpy's repository hop): from that moment the kernel
    refuses every change to the subvolume as it does after the commit, so the hook sees
    what it would see after it, but what the hook writes elsewhere may reach the disk
    before the flag does. A failed commit clears the flag again and raises here, after the
    hook (the subvolume is then removed, as for any error). Before the received UUID the
    flag cannot be set (the kernel refuses a received UUID on a read-only subvolume)."""
    if flag is None:
        set_received(root_fd, pending.uuid, pending.ctransid)
        set_readonly(root_fd, True)
        if pre_commit is not None:
            pre_commit(pending)
        return
    try:
        set_received(root_fd, pending.uuid, pending.ctransid)
        writable = os.access(".", os.W_OK, dir_fd=root_fd)
        flag.begin()
        flag.wait_in_effect(writable)
        if pre_commit is not None:
            pre_commit(pending)
    except BaseException:
        flag.end(raising=False)  # the first error is the one raised
        raise
    flag.end()


def uses_btrfs(dest: Path, backend: str = "auto") -> bool:
    """Whether a receive into ``dest`` with ``backend`` makes btrfs subvolumes.

    Raises:
        BtrdeltaError: ``backend="btrfs"`` and ``dest`` is not on btrfs.
    """
    if backend not in ("auto", "btrfs", "dir"):
        raise ValueError(f"unknown backend {backend!r}")
    if backend == "dir":
        return False
    fd = os.open(dest, _DIR)
    try:
        on_btrfs = is_btrfs(fd)
    finally:
        os.close(fd)
    if backend == "btrfs" and not on_btrfs:
        raise BtrdeltaError(f"{dest} is not on btrfs: the btrfs backend needs it (the directory "
                            "backend receives anywhere: --backend dir, or leave --backend out)")
    return on_btrfs


def find_subvolume(dest: Path, wanted: UUID, *, btrfs: bool,
                   search_root: Path | None = None, anywhere: bool = False) -> Path | None:
    """Directory of a received subvolume below ``dest`` (or below ``search_root``, on the
    same btrfs: ``btrfs receive -m``) with (received) UUID ``wanted``.

    ``anywhere`` (btrfs only, without ``search_root``; how a parent is looked up, as
    ``btrfs receive`` does): one elsewhere on ``dest``'s filesystem (reachable through its
    mount) will do when there is none below ``dest``; never one on another filesystem.
    Clone sources stay below DEST (or ``search_root``)."""
    if btrfs:
        below = Path(os.path.realpath(search_root or dest))
        anywhere = anywhere and search_root is None
        for p in find_subvolumes_by_uuid(dest, wanted):  # those below dest first
            if (anywhere or p.is_relative_to(below)) and not p.name.startswith(TMP_PREFIX):
                return p
        return None
    if search_root is not None:
        raise BtrdeltaError(f"{dest} is not on btrfs: parents are only looked for in it "
                            "(-m/search_root needs btrfs)")
    from .registry import Registry  # the directory backend only (json)

    found = Registry(dest).find(wanted)
    return found


def find_parent(dest: Path, snapshot: Snapshot, *, backend: str = "auto",
                search_root: Path | None = None,
                parents: dict[UUID, Path] | None = None) -> Path:
    """The local directory of the parent subvolume a SNAPSHOT record is based on.

    Args:
        dest: the receive destination directory.
        snapshot: the SNAPSHOT record (its ``clone_uuid`` names the parent).
        backend: ``"auto"`` (btrfs when DEST is on btrfs), ``"btrfs"`` or ``"dir"``.
        search_root: look below this directory of DEST's btrfs instead of below ``dest``.
        parents: parents found before, by (received) UUID: one there is taken as it is,
            one found here is added (see :class:`Subvolumes`).

    Raises:
        MissingParentError: no such subvolume below ``dest`` (``search_root``; on btrfs
            without ``search_root``: nor elsewhere on its filesystem, as ``btrfs receive``
            looks; a subvolume below ``dest`` comes first).
    """
    found = parents.get(snapshot.clone_uuid) if parents is not None else None
    if found is not None:
        return found
    found = find_subvolume(dest, snapshot.clone_uuid, btrfs=uses_btrfs(dest, backend),
                           search_root=search_root, anywhere=True)
    if found is None:
        raise MissingParentError(snapshot.clone_uuid, search_root or dest, path=snapshot.path)
    if parents is not None:
        parents[snapshot.clone_uuid] = found
    return found


class Subvolumes:
    """The subvolumes of destination directory ``dest``: find, begin, finish, abort.

    Args:
        dest: an existing directory.
        backend: ``"auto"`` (btrfs when ``dest`` is on btrfs), ``"btrfs"`` or ``"dir"``.
        dry_run: check names and find parents, create nothing.
        search_root: find parents and clone sources below this directory of ``dest``'s
            btrfs instead of below ``dest`` (``btrfs receive -m``; btrfs only).
        parents: parents found before, by (received) UUID (by the caller, or by the
            expansion of the delta stream being received: :func:`find_parent`): one there
            is taken as it is, one :meth:`begin` finds is added. A parent is then looked up
            in the UUID tree once a receive, not by each of them.
    """

    def __init__(self, dest: Path, *, backend: str = "auto", dry_run: bool = False,
                 search_root: Path | None = None,
                 parents: dict[UUID, Path] | None = None) -> None:
        self.dest = Path(dest)
        if not self.dest.is_dir():
            raise BtrdeltaError(f"destination {dest} is not a directory")
        #: real subvolumes (True) or directories and the registry (False)
        self.btrfs = uses_btrfs(self.dest, backend)
        if search_root is not None and not self.btrfs:
            raise BtrdeltaError(f"{dest} is not on btrfs: parents are only looked for in it "
                                "(-m/search_root needs btrfs)")
        self.search_root = search_root
        self.parents = parents
        self.dry_run = dry_run
        self._dest_fd = os.open(self.dest, _DIR)
        self._swept = False
        #: the snapshot :meth:`snapshot_ahead` is making, until :meth:`begin` takes it
        self._ahead: _Ahead | None = None

    def close(self) -> None:
        """Release the destination's descriptor (pending subvolumes are the caller's); a
        snapshot made ahead that :meth:`begin` did not take is deleted."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            if ahead.made():
                self._remove(ahead.tmp)
            ahead.flag.end(raising=False)
        if self._dest_fd >= 0:
            os.close(self._dest_fd)
            self._dest_fd = -1

    def __enter__(self) -> Subvolumes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def find(self, wanted: UUID, *, anywhere: bool = False) -> Path | None:
        """Directory of a subvolume of DEST (or of the search root) received as (else
        with UUID) ``wanted`` (``anywhere``: or elsewhere on DEST's btrfs when there is no
        search root, see :func:`find_subvolume`)."""
        return find_subvolume(self.dest, wanted, btrfs=self.btrfs, search_root=self.search_root,
                              anywhere=anywhere)

    def begin(
        self, name: bytes, uuid: UUID, ctransid: int, *, parent_uuid: UUID | None = None,
        parent: Path | None = None, tmp: bytes | None = None,
    ) -> PendingSubvol:
        """Start subvolume ``name`` under a temporary name: empty, or a writable snapshot
        (copy) of ``parent``, or of the subvolume found as ``parent_uuid``.

        Args:
            name: the final name, one component of DEST.
            uuid, ctransid: what :meth:`finish` records as its received UUID and transid.
            parent_uuid: the parent's (received) UUID, recorded; found in DEST when
                ``parent`` is not given.
            parent: the parent's directory (a subvolume on btrfs).
            tmp: the temporary name (default ``.btrdelta-tmp-<uuid>-<pid>``); one that ends
                otherwise (not a pid) is never swept: its owner keeps it across receives
                (:meth:`reopen`, :meth:`detach`).

        Raises:
            UnsafePathError: ``name`` is not one safe path component, or a name btrdelta
                reserves (``.btrdelta-tmp-*``, the registry's).
            ApplyError: DEST already has ``name``.
            MissingParentError: no subvolume ``parent_uuid`` in DEST.
            OSError: creating, snapshotting or copying failed (nothing is left behind).
        """
        check_name(name, "subvolume name")
        if name.startswith(_TMP) or _REGISTRY in name:
            raise UnsafePathError(f"subvolume name {os.fsdecode(name)!r} is reserved by btrdelta "
                                  "(its temporary subvolumes and registry)")
        if os.path.lexists(self.dest / os.fsdecode(name)):
            raise ApplyError(f"{self.dest / os.fsdecode(name)} already exists (received "
                             "before? delete it, or receive into another directory)",
                             op="subvol")
        if parent is None and parent_uuid is not None:
            known = self.parents
            parent = known.get(parent_uuid) if known is not None else None
            if parent is None:
                parent = self.find(parent_uuid, anywhere=True)
                if parent is None:
                    raise MissingParentError(parent_uuid, self.dest)
                if known is not None:
                    known[parent_uuid] = parent
        if not self.dry_run and not self._swept:
            self._swept = True
            self.sweep()
        if tmp is None:
            tmp = f"{TMP_PREFIX}{uuid.hex[:12]}-{os.getpid()}".encode()
        pending = PendingSubvol(name, tmp, self.dest / os.fsdecode(tmp), uuid, ctransid,
                                parent_uuid, parent)
        if self.dry_run:
            return pending
        fd = self._dest_fd
        flag = self._take_ahead(name, uuid, parent, tmp)
        if flag is None:
            self._make(tmp, parent, pending.path)
        try:
            pending.sandbox = Sandbox.open(tmp, dir_fd=fd)
            # held until the sandbox is closed: the temporary is not a dead receiver's
            fcntl.flock(pending.sandbox.root_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            if flag is not None:
                flag.end(raising=False)
            self.abort(pending)
            raise
        if flag is not None:
            flag.fd, pending.flag = pending.sandbox.root_fd, flag
        return pending

    def _make(self, tmp: bytes, parent: Path | None, path: Path) -> None:
        """Create temporary ``tmp`` (at ``path``): empty, or from ``parent``."""
        fd = self._dest_fd
        if parent is None:
            if self.btrfs:
                create_subvolume(fd, tmp)
            else:
                os.mkdir(tmp, 0o755, dir_fd=fd)
        elif self.btrfs:
            pfd = os.open(parent, _DIR)
            try:
                create_snapshot(fd, tmp, pfd)
            finally:
                os.close(pfd)
        else:
            try:
                copy_tree(parent, path)
            except BaseException:  # Ctrl-C: the partial copy goes too
                self._remove(tmp)
                raise

    def snapshot_ahead(self, ahead: Ahead | None) -> None:
        """Start making, in a thread, the writable snapshot that :meth:`begin` of ``name``
        (received UUID ``uuid``, default temporary name) from the parent ``parent_uuid``
        in :attr:`parents` (``ahead``: the three, or None: nothing) would make, before the
        stream's SNAPSHOT record is at hand (a delta stream's first records come after
        ~1 ms of expanding; the snapshot is a transaction commit of its own, 1.5-5 ms of
        numpy's repository hop). :meth:`begin`
        takes it when called with these and that parent, the same snapshot made earlier
        (the parent is a received, read-only subvolume); otherwise, or at :meth:`close`,
        it is deleted. The sweep of dead receivers' temporaries runs here, first. On the
        directory backend it is the parent's copy that is made ahead (``cp`` in its own
        process: ~3 ms of a regex release's hop, while the expansion works out the first
        batch, which holds the SNAPSHOT record and the library's patch; the read-only
        flag's part of the thread is then not used). Nothing happens in a dry run or for
        a parent not in :attr:`parents`."""
        if ahead is None:
            return
        name, uuid, parent_uuid = ahead
        parent = self.parents.get(parent_uuid) if self.parents is not None else None
        if self.dry_run or parent is None or self._ahead is not None:
            return
        if not self._swept:  # (before: the snapshot holds DEST's lock, which listing takes)
            self._swept = True
            self.sweep()
        tmp = f"{TMP_PREFIX}{uuid.hex[:12]}-{os.getpid()}".encode()
        self._ahead = _Ahead(name, uuid, parent, tmp,
                             lambda: self._make(tmp, parent, self.dest / os.fsdecode(tmp)))

    def _take_ahead(self, name: bytes, uuid: UUID, parent: Path | None,
                    tmp: bytes) -> _ReadOnly | None:
        """The snapshot made ahead when it is ``tmp`` as :meth:`begin` of these would make
        it (then begin takes it): its thread, to set the read-only flag; one that is not
        is deleted first."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        made = ahead.made()
        if made and (ahead.name, ahead.uuid, ahead.parent, ahead.tmp) == (name, uuid, parent,
                                                                          tmp):
            return ahead.flag
        if made:
            self._remove(ahead.tmp)
        ahead.flag.end(raising=False)
        return None

    def reopen(self, name: bytes, tmp: bytes, uuid: UUID, ctransid: int, *,
               parent_uuid: UUID | None = None) -> PendingSubvol:
        """The unfinished subvolume ``tmp`` of DEST that a receive left with :meth:`detach`,
        to go on filling it (and finish it as ``name``).

        Raises:
            UnsafePathError: ``name`` is not one safe path component.
            ApplyError: DEST already has ``name``.
            OSError: ``tmp`` cannot be opened or is locked by a live receiver.
        """
        check_name(name, "subvolume name")
        if os.path.lexists(self.dest / os.fsdecode(name)):
            raise ApplyError("destination subvolume already exists", op="subvol")
        pending = PendingSubvol(name, tmp, self.dest / os.fsdecode(tmp), uuid, ctransid,
                                parent_uuid, None)
        sandbox = Sandbox.open(tmp, dir_fd=self._dest_fd)
        try:
            fcntl.flock(sandbox.root_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            sandbox.close()
            raise
        pending.sandbox = sandbox
        return pending

    def register_ahead(self, pending: PendingSubvol, pre_commit: PreCommit | None) -> None:
        """On the directory backend, when ``pre_commit`` (the hook :meth:`finish` will be
        given) has a true ``register_ahead`` (and no false ``register``), start writing
        ``pending``'s registry entry now, in a thread (:class:`_Registering`), for
        :meth:`finish` to wait for before the rename (its ``fsync``s overlap the filling
        and the check instead of following them); taken back if ``pending`` is aborted or
        detached. Nothing on btrfs or in a dry run."""
        if self.btrfs or self.dry_run or pending.done or pending.registering is not None \
                or not getattr(pre_commit, "register_ahead", False) \
                or not getattr(pre_commit, "register", True):
            return
        assert pending.sandbox is not None
        pending.registering = _Registering(self, pending,
                                           os.fstat(pending.sandbox.root_fd).st_ino)

    def _entry(self, pending: PendingSubvol, register: bool) -> Registry | None:
        """``pending``'s registry entry before its rename: the one written ahead (waited
        for), else written now; none without ``register``."""
        ahead, pending.registering = pending.registering, None
        if ahead is not None:
            return ahead.result()
        assert pending.sandbox is not None
        return self._register(pending, os.fstat(pending.sandbox.root_fd).st_ino) \
            if register else None

    @staticmethod
    def _unregister(pending: PendingSubvol) -> None:
        """Take back the entry :meth:`register_ahead` wrote (or is writing)."""
        ahead, pending.registering = pending.registering, None
        if ahead is not None:
            with contextlib.suppress(Exception):  # (what failed is raised by the caller)
                ahead.undo()

    def detach(self, pending: PendingSubvol) -> None:
        """Leave ``pending`` unfinished under its temporary name (closed and unlocked),
        for :meth:`reopen`."""
        if pending.done:
            return
        pending.done = True
        self._unregister(pending)
        _stop_flag(pending)
        if pending.sandbox is not None:
            pending.sandbox.close()

    def finish(self, pending: PendingSubvol, *, pre_commit: PreCommit | None = None,
               keep_on: tuple[type[BaseException], ...] = (),
               sealed: bool = False) -> ReceivedSubvol:
        """Complete ``pending``: received UUID and transid, read-only (btrfs), then
        ``pre_commit(pending)``, then the final name (and a registry entry on the directory
        backend). A ``pre_commit`` with a ``before_seal`` method has it called with
        ``pending`` first, before the subvolume is made read-only: work the check will wait
        for may start there (nothing it sees is final yet). One whose ``while_sealing`` is
        true runs once the read-only flag is in effect, while the flag's transaction
        commits (a check that writes nothing elsewhere: see :func:`_seal`); the final name
        still comes after the commit. On any failure before the
        rename it is removed and the error raised, but when ``pre_commit`` raises one of
        ``keep_on``: then the complete subvolume is left under its temporary name
        (:meth:`detach`), for a later ``finish(..., sealed=True)`` of it :meth:`reopen`-ed
        (which skips ``before_seal``). A btrfs subvolume read-only with its received UUID
        already (sealed by a receiver killed before it was renamed) is not sealed again
        (the kernel refuses a received UUID on a read-only subvolume). A ``pre_commit``
        whose ``register`` is false leaves the directory backend's registry alone: a
        tree its caller finds again by itself, by content (``update``'s intermediate
        versions: the entry was 1.2-1.5 ms of two ``fsync``s a hop). In a dry run
        nothing happens (no hook either). One whose ``register_ahead`` is true has the
        entry written while it runs, if :meth:`register_ahead` did not start it before
        (taken back if anything before the rename fails).

        Raises:
            OSError: a system call failed (or what ``pre_commit`` raised).
        """
        if pending.done:
            raise ValueError("subvolume already finished or aborted")
        if not self.dry_run:
            try:
                sandbox = pending.sandbox
                assert sandbox is not None
                register = not self.btrfs and getattr(pre_commit, "register", True)
                self.register_ahead(pending, pre_commit)
                # (the flag's thread starts before before_seal gives other threads work)
                flag, pending.flag = pending.flag, None
                if not (self.btrfs and getattr(pre_commit, "while_sealing", False)):
                    if flag is not None:  # (sealed as before: its thread is stopped)
                        flag.end(raising=False)
                    flag = None
                elif flag is None:
                    flag = _ReadOnly(sandbox.root_fd)
                try:
                    before_seal = getattr(pre_commit, "before_seal", None)
                    if before_seal is not None and not sealed:
                        before_seal(pending)
                    if self.btrfs and not self._sealed(pending):
                        _seal(sandbox.root_fd, pending, pre_commit, flag)
                    elif pre_commit is not None:
                        pre_commit(pending)
                except keep_on:
                    self.detach(pending)
                    raise
                finally:
                    if flag is not None:
                        flag.end(raising=False)
                registry = self._entry(pending, register)  # (taken back if the rename fails)
                sandbox.close()
                try:
                    rename_noreplace(self._dest_fd, pending.tmp, pending.name)
                except BaseException:
                    if registry is not None:
                        registry.remove(os.fsdecode(pending.name), pending.uuid)
                    raise
            except BaseException:
                self._unregister(pending)
                self.abort(pending)
                raise
        pending.done = True
        return ReceivedSubvol(
            name=os.fsdecode(pending.name), path=self.dest / os.fsdecode(pending.name),
            uuid=pending.uuid, ctransid=pending.ctransid, parent_uuid=pending.parent_uuid,
            parent_path=pending.parent_path, btrfs=self.btrfs, records=pending.records,
            data_bytes=pending.data_bytes,
        )

    @staticmethod
    def _sealed(pending: PendingSubvol) -> bool:
        """Whether btrfs subvolume ``pending`` is read-only with its received UUID set."""
        assert pending.sandbox is not None
        info = subvol_info(pending.sandbox.root_fd)
        return info.readonly and info.received_uuid == pending.uuid

    def _register(self, pending: PendingSubvol, ino: int) -> Registry:
        """Record ``pending`` in the registry under its final name before the rename gives
        it that name (the rename keeps the inode the entry records): a crash after the
        rename leaves it registered, one before leaves nothing under the final name."""
        from .registry import Registry, RegistryEntry

        registry = Registry(self.dest)
        registry.add(RegistryEntry(os.fsdecode(pending.name), pending.uuid, pending.ctransid,
                                   pending.parent_uuid, ino=ino))
        return registry

    def sweep(self) -> list[str]:
        """Remove the temporary subvolumes of receivers that died (``kill -9``, a power
        cut): a ``.btrdelta-tmp-<uuid>-<pid>`` entry of DEST whose process is gone and that
        no one holds locked (a live receiver keeps an ``flock`` on its temporary's root, so
        one running in another PID namespace is left alone too). :meth:`begin` calls it
        once. Returns the names removed."""
        removed = []
        for entry in os.scandir(self._dest_fd):
            name = entry.name
            pid = name.rsplit("-", 1)[-1]
            if not name.startswith(TMP_PREFIX) or not pid.isdigit() or pid_alive(int(pid)):
                continue
            try:
                fd = os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=self._dest_fd)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # locked: its receiver is alive
            finally:
                os.close(fd)
            self._remove(name.encode())
            removed.append(name)
        return removed

    def _remove(self, tmp: bytes) -> None:
        """Delete temporary ``tmp`` of DEST (a subvolume, or any directory tree)."""
        with contextlib.suppress(OSError):
            if self.btrfs:
                try:
                    delete_subvolume(self._dest_fd, tmp)
                    return
                except OSError:
                    pass
            remove_tree(self._dest_fd, tmp)  # any depth (shutil.rmtree recurses)

    def abort(self, pending: PendingSubvol) -> None:
        """Remove ``pending`` (its temporary name); nothing once it is finished or aborted."""
        if pending.done:
            return
        pending.done = True
        self._unregister(pending)
        _stop_flag(pending)
        if pending.sandbox is not None:
            pending.sandbox.close()
        if not self.dry_run:
            self._remove(pending.tmp)
