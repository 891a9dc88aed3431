"""A replication receiver's partial transfer: ``DEST/.btrdelta-partial`` (:class:`PartialTransfer`).

``meta.json`` says how far the transfer is acknowledged (the plan, the acknowledged offset,
segments and chain, the records before that offset, the stream version and the temporary
subvolume's name); the records applied are counted in a u64 the applier stores through a
shared mapping after each record. :mod:`.replica` resumes from them, or discards them (a
damaged meta, one of an earlier boot) and starts again.

The mapped counter is a file in ``/dev/shm`` (tmpfs: it outlives a killed receiver, not a
restart), written once before it is mapped so that its page exists: a store into a
mapping of a file on DEST faults again after each write-back, and on a full btrfs that
fault cannot reserve space and kills the receiver with ``SIGBUS`` (no error, no cleanup).
``progress`` in DEST holds the count where it must outlive a restart: it is written and
``fsync``-ed before a meta that says "written out" (``synced``), and the tmpfs file is
removed then (a receiver cut off by its sender leaves none; only a killed one does, for the
resume that removes it with the partial transfer). Where ``/dev/shm`` cannot be used,
``progress`` itself is mapped, as before.

:class:`AckWriter` sends each ACK once the meta naming its segment is saved; whether a
failed conversation keeps its partial transfer for a resume: :func:`peers_fault`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import re
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from queue import SimpleQueue
from typing import Any
from uuid import UUID

from .. import TYPE_CHECKING
from .._pool import Started
from ..errors import BtrdeltaError
from ..fs.atomic import write_atomic
from ..fs.remove import remove_path

if TYPE_CHECKING:
    from ..protocol import Ack
    from .channels import MessageIO

__all__ = ["META", "META_VERSION", "OWN_FAILURES", "PARTIAL_DIR", "PROGRESS", "AckWriter",
           "Damaged", "PartialTransfer", "boot_id", "peers_fault"]

PARTIAL_DIR = ".btrdelta-partial"
META_VERSION = 2
PROGRESS = "progress"
#: where the record counter is mapped (tmpfs), and its name's start (then DEV-INO in hex)
SHM = "/dev/shm"
COUNTER_PREFIX = "btrdelta-progress-"
META = "meta.json"
#: the fields of ``meta.json`` the HOLDINGS offer, and their types; and those a resume
#: reads once a segment was acknowledged (``offset`` > 0)
_META_FIELDS: dict[str, type] = {"session": str, "offset": int, "segments": int, "chain": str}
_META_RESUME: dict[str, type] = {"records": int, "stream_version": int, "tmp": str}
#: failures of this side's (:func:`peers_fault` False) at one acknowledged offset after
#: which the partial transfer is dropped, not kept for another resume: a stream that meets a
#: receiver's bug each time (or a bug of the resume) would be resumed, and fail, forever
OWN_FAILURES = 3
#: the temporary subvolume of a partial transfer (12 hex of its UUID)
_PARTIAL_TMP = re.compile(r"\.btrdelta-tmp-[0-9a-f]{12}-partial")


def boot_id() -> str:
    """This boot's id (``/proc/sys/kernel/random/boot_id``; "" where there is none)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


class Damaged(Exception):
    """``meta.json`` is damaged (its text says how): the partial transfer is discarded."""


class PartialTransfer:
    """``DEST/.btrdelta-partial``: the transfer in progress. ``meta.json`` (the plan, the
    acknowledged offset, segments and chain, the records before that offset, the stream
    version and the temporary subvolume's name) and ``progress`` (the count of records
    applied, a u64 the applier stores through a shared mapping after each record)."""

    def __init__(self, dest: Path, backend: str) -> None:
        self.dest, self.backend = dest, backend
        self.path = dest / PARTIAL_DIR

    def counter(self) -> str | None:
        """The tmpfs file counting this partial transfer's records (named by the
        directory's device and inode: one per partial transfer), or None (no directory,
        no ``/dev/shm``)."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return None
        if not os.path.isdir(SHM):
            return None
        return f"{SHM}/{COUNTER_PREFIX}{st.st_dev:x}-{st.st_ino:x}"

    def load(self) -> dict[str, Any] | None:
        """The partial transfer's meta: None when there is none or it is an older
        receiver's (not resumable here).

        Raises:
            Damaged: ``meta.json`` is not one this receiver wrote whole (a symlink, not a
                regular file, not JSON, a field missing or of the wrong type).
        """
        p = self.path / META
        try:
            # never through a symlink, never blocked by a FIFO, never more than 1 MiB read
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise Damaged("a symlink" if exc.errno == errno.ELOOP else
                           exc.strerror or str(exc)) from None
        try:
            with open(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise Damaged("not a regular file")
                doc = json.loads(f.read(1 << 20))
        except (ValueError, RecursionError) as exc:  # (json's messages are one line)
            raise Damaged(f"not JSON ({exc})") from None
        except OSError as exc:
            raise Damaged(exc.strerror or str(exc)) from None
        if not isinstance(doc, dict):
            raise Damaged("not a JSON object")
        if doc.get("version") != META_VERSION:
            return None  # (an older receiver's spool: not resumable here)
        fields = _META_FIELDS | (_META_RESUME if doc.get("offset") else {})
        for key, kind in fields.items():
            value = doc.get(key)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise Damaged(f"{key!r} missing or not {kind.__name__}")
        tmp = doc.get("tmp")
        if tmp is not None and not (isinstance(tmp, str) and _PARTIAL_TMP.fullmatch(tmp)):
            raise Damaged(f"'tmp' is not a temporary subvolume's name: {str(tmp)[:80]!r}")
        if doc.get("boot") and doc["boot"] != boot_id():
            # the records it counts were applied but not written out before the machine
            # restarted (a power cut?): the disk may hold fewer than it says
            raise Damaged("left by a receiver of an earlier boot before it was written out")
        return doc

    def save(self, doc: dict[str, Any], *, synced: bool = False, durable: bool = False) -> None:
        """Replace ``meta.json`` whole (:func:`~btrdelta.fs.atomic.write_atomic`: a
        temporary file renamed into place: a killed receiver leaves the old meta or the new
        one, never a torn one). It names the boot it was written in (``boot``), unless
        ``synced``: everything it counts was written out.

        Only a ``synced`` meta, and the first of a transfer (``durable``: it names the
        temporary subvolume a later receiver must find to clean up), are ``fsync``-ed with
        their directory. The others, one per acknowledged segment, need not be: after a
        power cut a meta of the boot before is discarded whatever it says (the records it
        counts may not be on the disk), so their ``fsync``s bought nothing (4 x 128 MiB:
        270 of them per transfer)."""
        doc["boot"] = None if synced else boot_id()
        if synced:  # the count must outlive a restart as the meta does
            fd = os.open(self.path / PROGRESS,
                         os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                os.pwrite(fd, struct.pack("=Q", self.applied()), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        write_atomic(self.path / META, json.dumps(doc).encode(), mode=0o600,
                     durable=synced or durable)
        if synced:  # (``progress`` counts what it did; the next receiver maps a new one)
            self._forget_counter()

    def own_failure(self, exc: BaseException) -> int:
        """Count ``exc``, a failure of this side's, in ``meta.json`` (``failed``: the
        acknowledged offset and the failures there in a row; a segment acknowledged since
        starts again at 1): returns the count. 0: not counted, a failure of the machine
        (:data:`_LOCAL_ERRNOS`: a full disk is made room on, not started again) or no meta
        to count in (none, damaged, or it cannot be written: the disk is full)."""
        if _local(exc):
            return 0
        try:
            doc = self.load()
        except Damaged:
            return 0
        if doc is None:
            return 0
        last = doc.get("failed")
        count = 1
        if isinstance(last, list) and len(last) == 2 and last[0] == doc["offset"] and \
                isinstance(last[1], int):
            count = last[1] + 1
        doc["failed"] = [doc["offset"], count]
        try:
            self.save(doc)  # (this boot's: Replica._keep writes it out, then says so)
        except OSError:
            return 0
        return count

    def _forget_counter(self) -> None:
        counter = self.counter()
        if counter is not None:
            with contextlib.suppress(OSError):
                os.unlink(counter)

    def holds(self, name: str, uuid: UUID, ctransid: int, parent_uuid: UUID | None) -> bool:
        """Whether the partial transfer holds the start of the stream of subvolume ``name``
        (``uuid``, ``ctransid``, incremental from ``parent_uuid``): a resume must name it.
        Its first record was checked against the first PLAN and is not sent again, and the
        session id is in the HOLDINGS any peer allowed to connect reads: a resume naming
        another subvolume or base was taken (its records, cloning from that base, went on
        in the first one's subvolume, which then took the new name and received UUID)."""
        try:
            doc = self.load()
        except Damaged:
            return False
        parent = str(parent_uuid) if parent_uuid is not None else None
        return doc is not None and (doc.get("name"), doc.get("uuid"), doc.get("ctransid"),
                                    doc.get("parent_uuid")) == (name, str(uuid), ctransid,
                                                                parent)

    def applied(self) -> int:
        """The records applied: the tmpfs counter's, else (after a restart) ``progress``."""
        counter = self.counter()
        live = [counter] if counter is not None and os.path.exists(counter) else []
        for path in (*live, str(self.path / PROGRESS)):
            try:
                with open(path, "rb") as f:
                    return int(struct.unpack("=Q", f.read(8))[0])
            except (OSError, struct.error):
                pass
        return 0

    def start(self) -> Any:
        """The transfer's directory and its record counter (holding what :meth:`applied`
        says); returns the counter's mapping."""
        self.path.mkdir(exist_ok=True)
        count = struct.pack("=Q", self.applied())
        counter = self.counter()
        fd = -1
        if counter is not None:
            with contextlib.suppress(OSError):
                fd = os.open(counter, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                             0o600)
        if fd < 0:
            fd = os.open(self.path / PROGRESS,
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, 8)
            os.pwrite(fd, count, 0)  # the page exists before it is mapped (ENOSPC here)
            return mmap.mmap(fd, 8)
        finally:
            os.close(fd)

    def drop(self, tmp: str | None = None) -> None:
        """Remove the partial transfer and its temporary subvolume (every one, when
        ``meta.json`` is damaged and cannot name it: a DEST has one partial transfer)."""
        try:
            doc = self.load()
            names = {n for n in (tmp, doc.get("tmp") if doc else None) if n}
        except Damaged:
            names = {n for n in (tmp,) if n}
            names |= {n for n in os.listdir(self.dest) if _PARTIAL_TMP.fullmatch(n)}
        if names:
            from ..receive.subvolumes import PendingSubvol, Subvolumes

            with Subvolumes(self.dest, backend=self.backend) as subvols:
                for name in names:
                    if os.path.lexists(self.dest / name):
                        subvols.abort(PendingSubvol(b"", os.fsencode(name), self.dest / name,
                                                    UUID(int=0), 0, None, None))
        self._forget_counter()
        remove_path(self.path, ignore_errors=True)


class AckWriter:
    """The ACKs of one conversation, each written after the partial meta naming its
    segment's end is saved (:meth:`PartialTransfer.save`), by a thread of its own on a channel two
    threads may use at once: the applier goes on with the next segment meanwhile (two are
    in flight) instead of waiting for the meta at every segment. In order; a failure ends the
    stream in the applier's thread (``fail``) and every later :meth:`put` or
    :meth:`drain` raises it. :meth:`drain` before anything else is saved or written."""

    def __init__(self, io: MessageIO, partial: PartialTransfer,
                 fail: Callable[[BaseException], None]) -> None:
        self._io, self._partial, self._fail = io, partial, fail
        self._queue: SimpleQueue[tuple[dict[str, Any], Ack] | None] = SimpleQueue()
        self._thread: Started | None = None
        self.error: BaseException | None = None

    def put(self, doc: dict[str, Any], ack: Ack) -> None:
        """Save ``doc`` (a copy of the meta), then send ``ack``."""
        if self.error is not None:
            raise self.error
        if self._thread is None:  # (the applier does not wait for it to run)
            self._thread = Started(self._run, "ack-writer")
        self._queue.put((doc, ack))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.error is not None:
                continue  # (a failure: nothing more is saved or sent)
            try:
                self._partial.save(item[0])
                self._io.send(item[1])
            except BaseException as exc:  # raised again in the applier's thread
                self.error = exc
                self._fail(exc)

    def drain(self, *, check: bool = True) -> None:
        """Until every ACK queued is sent (``check``: raise what the thread raised)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if check and self.error is not None:
            raise self.error


#: failures of this machine, not of the stream, where applying a record meets them
_LOCAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM,
                           errno.EMFILE, errno.ENFILE})


def _local(exc: BaseException) -> bool:
    """Whether ``exc`` or one of its causes is an :class:`OSError` of
    :data:`_LOCAL_ERRNOS`."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in _LOCAL_ERRNOS:
            return True
        cause = cause.__cause__
    return False


def peers_fault(exc: BaseException) -> bool:
    """Whether the conversation failed because of what the peer sent (a damaged stream, a
    lying peer: its partial transfer is dropped), not because of this side (its disk full
    or failing, a bug: kept for a resume). An error applying a record is the stream's
    (ENOENT: it names a path that is not there) unless the system said the fault is here
    (:data:`_LOCAL_ERRNOS`); an :class:`OSError` of the receiver's own files and any
    exception that is no :class:`~btrdelta.errors.BtrdeltaError` (a bug) are this side's."""
    if isinstance(exc, OSError) or not isinstance(exc, BtrdeltaError):
        return False
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, OSError):
            return cause.errno not in _LOCAL_ERRNOS
        cause = cause.__cause__
    return True
