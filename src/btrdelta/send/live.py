"""Reading a tree that does not change while it is sent: read-only snapshots of live subvolumes.

:func:`frozen` gives the directory to read for a send source and what it is:

* a read-only btrfs subvolume: read as it is (its UUID is the stream's, as ``btrfs send``
  names it: the received UUID if it has one, else its own);
* a writable btrfs subvolume: a temporary read-only snapshot next to it (or inside it when
  its parent directory is on another filesystem), named ``.btrdelta-send-<pid>-<random>``,
  deleted when the ``with`` block ends, on success, on an error and on Ctrl-C alike (the CLI
  turns SIGTERM and SIGHUP into the same exception). One a killed sender left (``kill -9``,
  a power cut) is deleted by the next send of that subvolume: a read-only snapshot of it
  under such a name whose pid is gone and that no process holds (the sender keeps a shared
  ``flock`` on its snapshot's root while it reads). An error raised in the block that names
  a path in the snapshot names it in the subvolume instead: the snapshot is gone when the
  error is shown;
* anything else: the live tree, with a warning that the result is only as consistent as the
  tree was still while it was read.

Owns nothing but that lifecycle; the identity rules are :class:`Frozen`'s.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from functools import partial
from uuid import UUID

from .._value import Value
from ..errors import BtrdeltaError
from ..fs.atomic import pid_alive
from ..fs.btrfs import SubvolInfo, create_snapshot, delete_subvolume, subvol_info

__all__ = ["LIVE_WARNING", "Frozen", "drop_leftovers", "drop_snapshot", "frozen",
           "keep_snapshot", "subvolume_uuid"]

_SUBVOL_ROOT_INO = 256
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
#: prefix of the temporary snapshots (never sent, never a parent)
TMP_PREFIX = ".btrdelta-send-"
#: (compiled where a name has the prefix, in re's cache: not by every send)
_TMP_NAME = rb"\.btrdelta-send-([0-9]+)-[0-9a-f]{8}"
LIVE_WARNING = ("not a btrfs subvolume: the tree is read live, so the result is only as "
                "consistent as the tree was still while it was read")


class Frozen(Value):
    """The tree a send reads, and its identity."""

    #: the directory to read
    path: bytes
    #: the subvolume read (the snapshot), None when not a btrfs subvolume
    info: SubvolInfo | None
    #: a temporary snapshot made for this send (deleted afterwards)
    temporary: bool = False
    #: what to tell the user (the live-tree warning), or ""
    warning: str = ""

    @property
    def stream_uuid(self) -> UUID | None:
        """The UUID a stream of this tree names (as ``btrfs send``: received UUID, else
        UUID); None off btrfs."""
        if self.info is None:
            return None
        return self.info.received_uuid or self.info.uuid

    @property
    def lineage(self) -> UUID | None:
        """The subvolume the snapshot was taken of (its parent UUID), else its own UUID: two
        snapshots of one live subvolume share it."""
        if self.info is None:
            return None
        return self.info.parent_uuid or self.info.uuid

    @property
    def generation(self) -> int:
        """The newest transid any inode of the snapshot can carry (0 off btrfs)."""
        if self.info is None:
            return 0
        return max(self.info.ctransid, self.info.otransid)


def _subvol_of(path: bytes) -> SubvolInfo | None:
    # no statfs (through ctypes: ~5 ms of every send's start): the ioctl is btrfs's own
    # (ENOTTY elsewhere), asked only of a directory with a subvolume root's inode number
    fd = os.open(path, _DIR)
    try:
        if os.fstat(fd).st_ino != _SUBVOL_ROOT_INO:
            return None
        try:
            return subvol_info(fd)
        except OSError:
            return None
    finally:
        os.close(fd)


def subvolume_uuid(path: str | bytes | os.PathLike[str]) -> UUID | None:
    """The UUID of the btrfs subvolume whose root ``path`` is; None for anything else
    (including a path that cannot be opened)."""
    try:
        info = _subvol_of(os.path.abspath(os.fsencode(path)))
    except OSError:
        return None
    return None if info is None else info.uuid


@contextlib.contextmanager
def frozen(source: str | bytes | os.PathLike[str], *, snapshot: bool = True,
           meanwhile: Callable[[UUID | None], object] | None = None,
           made: Callable[[bytes], object] | None = None) -> Iterator[Frozen]:
    """The tree to read for ``source`` (see the module docstring).

    Args:
        source: a directory: a btrfs subvolume (read-only or writable) or any tree.
        snapshot: take a temporary snapshot of a writable subvolume (False: read it live).
        meanwhile: called once before the tree is given: in this thread while another one
            makes the snapshot (the kernel commits a transaction: 6-15 ms, the GIL released;
            the CLI imports the send's modules and loads the base record meanwhile), with
            the snapshot's :attr:`Frozen.lineage` (the subvolume's UUID), else at once, with
            None. The snapshot is deleted when it raises.
        made: called with the temporary snapshot's path once it is made, in the thread
            that made it (the CLI's change sweep: beside ``meanwhile``); it must not raise.

    Raises:
        BtrdeltaError: ``source`` is not a directory, or the snapshot cannot be made.
    """
    path = os.fsencode(source).rstrip(b"/") or b"/"
    if not os.path.isdir(path):
        raise BtrdeltaError("not a directory" if os.path.lexists(path) else "does not exist",
                            path=path)
    info = _subvol_of(path)
    if info is None or info.readonly or not snapshot:
        if meanwhile is not None:
            meanwhile(None)
        yield Frozen(path, info, warning="" if info is not None and info.readonly
                     else LIVE_WARNING)
        return
    _drop_leftovers(path, info.uuid)
    name = f"{TMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}".encode()
    src_fd = os.open(path, _DIR)
    try:
        where, dir_fd = _snapshot_next_to(
            path, name, src_fd, partial(meanwhile, info.uuid) if meanwhile is not None else None,
            made)
        try:
            snap = os.path.join(where, name)
            snap_fd = -1
            try:
                snap_fd = os.open(snap, _DIR | os.O_NOFOLLOW)
                fcntl.flock(snap_fd, fcntl.LOCK_SH)  # in use: not a leftover
                snap_info = subvol_info(snap_fd)
                try:
                    yield Frozen(snap, snap_info, temporary=True)
                except (BtrdeltaError, OSError) as exc:
                    _name_source(exc, snap, path)
                    raise
            finally:
                if snap_fd >= 0:
                    os.close(snap_fd)
                with contextlib.suppress(OSError):
                    delete_subvolume(dir_fd, name)
        finally:
            os.close(dir_fd)
    finally:
        os.close(src_fd)


def _name_source(exc: BtrdeltaError | OSError, snap: bytes, source: bytes) -> None:
    """An error naming a path in the temporary snapshot names it in ``source`` instead:
    the snapshot is gone once the error is shown."""
    attr = "path" if isinstance(exc, BtrdeltaError) else "filename"
    where = getattr(exc, attr, None)
    if isinstance(where, str | bytes):
        raw = os.fsencode(where)
        if raw == snap or raw.startswith(snap + b"/"):
            named = source + raw[len(snap):]
            setattr(exc, attr, named if isinstance(where, bytes) else os.fsdecode(named))


def _drop_leftovers(path: bytes, uuid: UUID) -> None:
    """Delete the temporary snapshots of the subvolume ``path`` that killed senders left:
    named ``.btrdelta-send-<pid>-<random>``, their pid gone (:func:`drop_leftovers`)."""
    def stale(name: bytes) -> bool:
        if not name.startswith(b".btrdelta-send-"):
            return False
        import re  # (not imported by a send that finds no leftover)

        m = re.fullmatch(_TMP_NAME, name)
        return m is not None and not pid_alive(int(m.group(1)))

    drop_leftovers(path, uuid, stale)


def drop_leftovers(path: bytes, uuid: UUID, stale: Callable[[bytes], bool]) -> list[bytes]:
    """Delete the snapshots that killed senders left of the subvolume ``path`` (UUID
    ``uuid``), next to it or inside it: each name ``stale(name)`` says is a leftover that
    is a read-only snapshot of it (parent UUID ``uuid``) no process holds a ``flock`` on (a
    sender in another PID namespace holds one while it reads). Anything else is left
    alone. Returns the paths deleted."""
    dropped: list[bytes] = []
    for where in (os.path.dirname(path) or b".", path):
        try:
            names = os.listdir(where)
        except OSError:
            continue
        for name in filter(stale, names):
            try:
                fd = os.open(os.path.join(where, name), _DIR | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                info = subvol_info(fd) if os.fstat(fd).st_ino == _SUBVOL_ROOT_INO else None
                if info is None or not info.readonly or info.parent_uuid != uuid:
                    continue
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # not a subvolume, or in use
                continue
            finally:
                os.close(fd)
            drop_snapshot(os.path.join(where, name))
            dropped.append(os.path.join(where, name))
    return dropped


def _snapshot_next_to(path: bytes, name: bytes, src_fd: int,
                      meanwhile: Callable[[], object] | None = None,
                      made: Callable[[bytes], object] | None = None) -> tuple[bytes, int]:
    """Make the read-only snapshot ``name`` in the parent directory of ``path`` (else, when
    that is another filesystem or not writable, inside ``path``); (directory, its fd).
    ``meanwhile``: called while the first snapshot is made, ``made`` with its path once it
    is made, in the thread that made it (:func:`frozen`)."""
    last: OSError | None = None
    for where in (os.path.dirname(path) or b".", path):
        try:
            dir_fd = os.open(where, _DIR)
        except OSError as exc:
            last = exc
            continue
        make = partial(_make, dir_fd, name, src_fd, os.path.join(where, name), made)
        try:
            failed = _made(make) if meanwhile is None else _beside(make, meanwhile)
        except BaseException:  # (``meanwhile``'s: the snapshot made beside it goes)
            with contextlib.suppress(OSError):
                delete_subvolume(dir_fd, name)
            os.close(dir_fd)
            raise
        meanwhile = None
        if failed is None:
            return where, dir_fd
        os.close(dir_fd)
        last = failed
    assert last is not None
    raise BtrdeltaError(f"cannot snapshot the subvolume: {last.strerror}", path=path) from last


def _make(dir_fd: int, name: bytes, src_fd: int, path: bytes,
          made: Callable[[bytes], object] | None) -> None:
    """The read-only snapshot ``name`` made; ``made(path)`` then."""
    create_snapshot(dir_fd, name, src_fd, readonly=True)
    if made is not None:
        made(path)


def _made(make: Callable[[], None]) -> OSError | None:
    """``make()``; its ``OSError`` returned."""
    try:
        make()
    except OSError as exc:
        return exc
    return None


def _beside(make: Callable[[], None], meanwhile: Callable[[], object]) -> OSError | None:
    """``make()`` in a thread while ``meanwhile()`` runs in this one; ``make``'s ``OSError``
    returned, any other error raised once both have ended (``meanwhile``'s first)."""
    import threading

    failed: list[BaseException] = []

    def run() -> None:
        try:
            make()
        except BaseException as exc:  # (given to the caller's thread)
            failed.append(exc)

    thread = threading.Thread(target=run, name="btrdelta-snapshot", daemon=True)
    thread.start()
    try:
        meanwhile()
    finally:
        thread.join()
    if failed and not isinstance(failed[0], OSError):
        raise failed[0]
    return failed[0] if failed else None  # type: ignore[return-value]



def keep_snapshot(source: str | bytes | os.PathLike[str], name: bytes) -> bytes | None:
    """A read-only snapshot ``name`` of the writable btrfs subvolume ``source`` that outlives
    this process (a resumable replication reads it again); its path, or None when
    ``source`` is not a writable subvolume (then it is read as it is). An existing snapshot
    of that name is reused."""
    path = os.fsencode(source).rstrip(b"/") or b"/"
    info = _subvol_of(path)
    if info is None or info.readonly:
        return None
    for where in (os.path.dirname(path) or b".", path):
        snap = os.path.join(where, name)
        if _subvol_of(snap) is not None if os.path.isdir(snap) else False:
            return snap
    src_fd = os.open(path, _DIR)
    try:
        where, dir_fd = _snapshot_next_to(path, name, src_fd)
        os.close(dir_fd)
        return os.path.join(where, name)
    finally:
        os.close(src_fd)


def drop_snapshot(path: bytes) -> None:
    """Delete a snapshot made by :func:`keep_snapshot` (nothing if it is gone)."""
    parent, name = os.path.split(path.rstrip(b"/"))
    try:
        fd = os.open(parent or b".", _DIR)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            delete_subvolume(fd, name)
    finally:
        os.close(fd)
