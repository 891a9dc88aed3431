"""The receiving side of replication (``btrdelta replicate --serve DEST`` / ``--listen``).

A destination directory holds received subvolumes (btrfs subvolumes, or directories with
the registry elsewhere), its state ``DEST/.btrdelta-replica.json`` (its id, and the
sendshot each subvolume was received as) and at most one partial transfer: its temporary
subvolume (``.btrdelta-tmp-<uuid>-partial``) and ``DEST/.btrdelta-partial/`` (``meta.json``:
how far it is acknowledged; ``progress``: the records applied). One conversation at a
time: each holds an exclusive ``flock`` on ``DEST/.btrdelta-replica.lock``, another process
is refused ``busy`` (and reads the state again once it holds the lock). A holder whose
conversation is over (a sender cut off: its partial transfer is being written out) says
``closing``; the next receiver waits for it instead of refusing a sender re-run at once
(:mod:`.replicalock`).

:meth:`Replica.serve` runs one conversation (:class:`~btrdelta.protocol.Connection`, role
receiver): HELLO, HOLDINGS, a PLAN checked against what is held, then the stream. A thread
applies the stream's records as their bytes arrive with :func:`btrdelta.receive.receive`
(straight into the temporary subvolume: nothing is written twice), after checking the
stream is the one planned (its UUID, name and parent, clones only from the parent or
itself); END only once its segment is verified. A segment is acknowledged once its digest
and the chain of digests match its CHECKPOINT and its records are applied. The complete
subvolume takes its final name only after the COMMIT (size and chain) matched, DEST was
written out (``syncfs``: its data on the disk before any name does) and the state names its
sendshot; then DEST is written out again and COMMITTED sent: what the sender is told it
holds survives a power cut. A sender that refuses, lies or is cut off after
END leaves no subvolume under its final name (one cut off leaves it complete under its
temporary name, the partial transfer acknowledged to the stream's end and marked
``complete``: the next PLAN resumes there and only the COMMIT is sent).

A cut connection or a killed sender or receiver leaves the temporary subvolume: the next
PLAN for the same session resumes after the last acknowledged segment, skipping the records
the progress file counts (the one after them is looked at: see
:func:`~btrdelta.receive.resume.already_applied`). A peer that lies (bad CRC or digest,
unknown or misplaced messages, a stream for another base) gets a typed REFUSE, the partial
transfer is dropped and nothing is applied; a failure of this side's (a full disk, a bug:
:func:`~.partial.peers_fault`) keeps it, as a cut does, the peer told why (but not the
:data:`~.partial.OWN_FAILURES`-th in a row at one point: that drops it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

from .. import TYPE_CHECKING, errors
from .._pool import Started
from .._value import Value
from ..errors import BtrdeltaError, ProtocolError, StreamFormatError, TransportError, warn
from ..fs.atomic import discard_written, link_written, pid_alive, write_atomic, write_unnamed
from ..fs.btrfs import delete_subvolume, is_btrfs, subvol_info, syncfs
from ..fs.remove import remove_tree
from ..fs.sandbox import check_name
from ..protocol import (
    Accept,
    Ack,
    Checkpoint,
    Committed,
    Connection,
    Held,
    Hello,
    Holdings,
    Partial,
    Plan,
    Refuse,
)
from ..protocol.messages import spoken
from ..stream.records import Clone, End, Snapshot, Subvol
from .channels import Channel, MessageIO, PeerRefused
from .inbox import Inbox, chain_next
from .partial import (
    META,
    META_VERSION,
    OWN_FAILURES,
    PARTIAL_DIR,
    PROGRESS,
    AckWriter,
    Damaged,
    PartialTransfer,
    peers_fault,
)
from .replicalock import lock_dest, say_closing

if TYPE_CHECKING:
    from ..receive import ReceivedSubvol
    from ..receive.resume import ResumePoint
    from ..receive.subvolumes import PendingSubvol
    from ..stream.reader import Event

__all__ = ["PARTIAL_DIR", "STATE_FILE", "Replica", "ServeResult", "chain_next"]

STATE_FILE = ".btrdelta-replica.json"
_ZERO_CHAIN = bytes(32).hex()
_TMP_PREFIX = ".btrdelta-tmp-"


class ServeResult(Value):
    """How one conversation ended."""

    #: "committed", "refused" (by either side), "interrupted" (resumable), "failed",
    #: "busy" (another process receives into DEST: refused before anything was read)
    outcome: str
    message: str = ""
    received: ReceivedSubvol | None = None
    #: bytes of stream this conversation added to the spool
    received_bytes: int = 0
    #: "interrupted": a transfer had begun (its PLAN accepted) and is kept for the next
    #: run to resume; else nothing began and nothing is kept
    kept: bool = False


class _Events:
    """The records of the inbox's bytes, in batches (a :class:`~btrdelta.receive.receiver.
    BatchedEvents`), checked to be the planned stream: its first record is ``SUBVOL`` (full)
    or ``SNAPSHOT`` with the plan's UUID, name and parent; a ``CLONE`` names only the new
    subvolume or the parent. A resumed stream starts after its header (``version``)."""

    def __init__(self, inbox: Inbox, version: int, tmp: bytes,
                 acks: AckWriter | None = None) -> None:
        from ..stream.reader import StreamParser

        self.inbox, self.tmp, self.acks = inbox, tmp, acks
        self.parser = StreamParser(source="replication stream", may_modify_input=True)
        self.first = not version
        if version:
            self.parser.begin(version)

    def _decoded(self) -> Iterator[list[Event]]:
        from ..stream.reader import EOF, NEED_DATA

        parser, take = self.parser, self.inbox.take
        while True:
            batch = parser.take_batch()
            if batch:
                yield batch
                continue
            ev = parser.next_event()
            if ev is NEED_DATA:
                data = take()
                parser.feed(data if data is not None else b"")
            elif ev is EOF:
                return
            else:
                yield [ev]

    def batches(self) -> Iterator[list[Event]]:
        plan = self.inbox.plan
        allowed = {plan.uuid, plan.parent_uuid}
        for batch in self._decoded():
            for ev in batch:
                kind = ev.__class__
                if kind is Subvol or kind is Snapshot:
                    if not self.first:
                        raise ProtocolError("a second subvolume in the stream")
                    self.first = False
                    rec: Any = ev
                    want = Snapshot if plan.parent_uuid is not None else Subvol
                    if kind is not want or rec.uuid != plan.uuid or \
                            os.fsdecode(rec.path) != plan.name or (
                            kind is Snapshot and rec.clone_uuid != plan.parent_uuid):
                        raise ProtocolError("the stream is not the planned one (a stream for "
                                            "another base or subvolume)")
                elif kind is Clone and ev.clone_uuid not in allowed:  # type: ignore[union-attr]
                    raise ProtocolError("the stream clones from a subvolume outside its base")
                elif kind is End:
                    self.inbox.wait_verified()
            yield batch

    def __iter__(self) -> Iterator[Event]:
        for batch in self.batches():
            yield from batch

    def acknowledge_end(self) -> None:
        """END applied: its segment's ACK is queued now, unless bytes follow END (then
        :meth:`after_end` says so)."""
        if not self.parser._in.avail:
            self.inbox.ack_end()

    def after_end(self) -> bool:
        """Whether bytes follow the END the applier stopped at (END's segment acknowledged:
        every ACK sent)."""
        more = bool(self.parser._in.avail) or self.inbox.rest()
        self.drain()
        return more

    def drain(self) -> None:
        """Until every ACK queued is sent."""
        if self.acks is not None:
            self.acks.drain()


def _uses_btrfs(dest: Path, backend: str) -> bool:
    """:func:`btrdelta.receive.uses_btrfs`; for ``"auto"`` (the usual case) without
    importing the receive engine, which is imported while the sender plans, after the
    HOLDINGS are out (:func:`_engine`)."""
    if backend != "auto":
        from ..receive import uses_btrfs

        return uses_btrfs(dest, backend)
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return is_btrfs(fd)
    finally:
        os.close(fd)


def _engine() -> None:
    """Import the receive engine (the stream's parser, the applier): a receiver sends its
    HELLO and HOLDINGS first (the sender waits for them), then imports this while the
    sender plans and makes the stream's first records."""
    import btrdelta.receive.resume
    import btrdelta.receive.subvolumes
    import btrdelta.stream.reader  # noqa: F401


def _encoded(state: dict[str, Any]) -> bytes:
    """The bytes of the replica state file."""
    return (json.dumps(state, indent=1, sort_keys=True) + "\n").encode()


class Replica:
    """A replication destination.

    Args:
        dest: an existing directory.
        backend: ``"auto"``, ``"btrfs"`` or ``"dir"`` (as :func:`btrdelta.receive.receive`).
        on_warning: called with a message for anything discarded (a damaged partial
            transfer; default: ``warnings.warn``).
    """

    def __init__(self, dest: str | os.PathLike[str], *, backend: str = "auto",
                 on_warning: Callable[[str], None] | None = None) -> None:
        self.dest = Path(dest)
        self.warn = on_warning or warn
        if not self.dest.is_dir():
            import shlex

            raise BtrdeltaError(f"destination {dest} " + (
                "is not a directory" if os.path.lexists(dest) else
                f"does not exist (make it first: mkdir -p {shlex.quote(os.fspath(dest))})"))
        self.backend = backend
        self.btrfs = _uses_btrfs(self.dest, backend)
        #: a new DEST's state file being made durable (:meth:`_create`)
        self._syncing: tuple[Started, list[BaseException]] | None = None
        self.state = self._load()

    # -- state ----------------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        p = self.dest / STATE_FILE
        try:
            # never through a symlink, never blocked by a FIFO, never more than 16 MiB read
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            with open(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise ValueError("not a regular file")
                doc = json.loads(f.read(16 << 20))
            if not isinstance(doc, dict) or not isinstance(doc.get("id"), str):
                raise ValueError("no id")
            doc.setdefault("received", {})
            return doc
        except FileNotFoundError:
            doc = {"version": 1, "id": uuid4().hex, "received": {}}
            if not self._create(_encoded(doc)):
                return self._load()  # another receiver made it meanwhile: its id is DEST's
            return doc
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise StreamFormatError("damaged replica state: a symlink", source=str(p)) from None
        except (ValueError, RecursionError) as exc:  # (json's messages are one line)
            raise StreamFormatError(f"damaged replica state: {exc}", source=str(p)) from None

    def _create(self, data: bytes) -> bool:
        """Create the state file of a new DEST holding ``data``, unless another receiver
        did meanwhile (False: the link decides, and its id is DEST's).

        As :func:`~btrdelta.fs.atomic.create_file`: the bytes are ``fsync``-ed before the
        file is named (where that persists them), then the named file (btrfs persists an
        unnamed file's bytes only once it is linked) and DEST: those two ``fsync``s by a
        thread, waited for before the ACCEPT (:meth:`_durable`), the first point where
        anything depends on them, not before the HELLO (in 15 of 35 traced replications
        to a new DEST at load 9-14 the sender waited 2-130 ms for the HOLDINGS)."""
        fd = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            wfd, tmp = write_unnamed(fd, STATE_FILE, data, mode=0o644)
            try:
                os.fsync(wfd)
            except BaseException:
                discard_written(wfd, tmp, fd)
                raise
            if not link_written(wfd, tmp, fd, STATE_FILE):
                return False
            errors: list[BaseException] = []
            dir_fd = os.dup(fd)

            def sync() -> None:
                try:
                    if tmp is None:
                        named = os.open(STATE_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                        dir_fd=dir_fd)
                        try:
                            os.fsync(named)
                        finally:
                            os.close(named)
                    os.fsync(dir_fd)
                except BaseException as exc:  # raised again by _durable()
                    errors.append(exc)
                finally:
                    os.close(dir_fd)

            self._syncing = (Started(sync, "state-sync"), errors)
            return True
        finally:
            os.close(fd)

    def settle(self) -> None:
        """Until the thread :meth:`_create` started for a new DEST's state file has ended
        (raises what its ``fsync`` calls raised): :meth:`_durable`, for a daemon before it
        waits for connections, when that thread is the only other one it can have.
        CPython 3.11 can lose the call of a signal's handler when another thread takes the
        GIL after the signal and before the main thread checks for it, and the main thread
        then stays in ``accept()`` (SIGTERM ignored until the next)."""
        self._durable()

    def _durable(self) -> None:
        """Until the state file :meth:`_create` made is durable (raises what its two
        ``fsync`` calls raised)."""
        if self._syncing is not None:
            thread, errors = self._syncing
            thread.join()
            self._syncing = None
            if errors:
                raise errors[0]

    def _save(self, doc: dict[str, Any]) -> None:
        """Replace the state file whole: an unnamed (or fresh, never followed) temporary
        file, ``fsync``, rename, ``fsync`` of DEST; after a power cut it is the old state or
        the new one, never a torn one (that would refuse every later transfer)."""
        write_atomic(self.dest / STATE_FILE, _encoded(doc))

    @property
    def ident(self) -> str:
        """This destination's id (the sender keeps a cursor per id)."""
        return str(self.state["id"])

    def _partial(self, version: int | None) -> dict[str, Any] | None:
        """The partial transfer's meta, when it can be resumed (digested in protocol
        ``version`` when given; its temporary subvolume there once a segment was). A
        damaged one (``meta.json`` torn or not ours, or the progress file counting fewer
        records than it) is discarded, with a warning: the transfer starts again."""
        partial = PartialTransfer(self.dest, self.backend)
        try:
            doc = partial.load()
            if doc is not None and doc.get("offset") and partial.applied() < doc["records"]:
                raise Damaged(f"{PROGRESS} counts fewer records than {META}")
        except Damaged as exc:
            self.warn(f"discarded a damaged partial transfer ({partial.path / META}: "
                      f"{exc}); the next transfer starts again")
            partial.drop()
            return None
        if doc is None or (version is not None and doc.get("protocol", 1) != version):
            return None  # (its digests are another version's: it cannot be resumed)
        if doc.get("offset") and not os.path.isdir(self.dest / str(doc.get("tmp"))):
            return None
        return doc

    def holdings(self, version: int | None = None) -> Holdings:
        """What DEST holds: its subvolumes and a partial transfer (one whose segments were
        digested as in protocol ``version``, when given)."""
        held: list[Held] = []
        received = self.state.get("received", {})
        if self.btrfs:
            for entry in sorted(os.scandir(self.dest), key=lambda e: e.name):
                if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False) or \
                        entry.stat(follow_symlinks=False).st_ino != 256:
                    continue  # (readdir's inode of a subvolume is its id: stat it)
                fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    info = subvol_info(fd)
                finally:
                    os.close(fd)
                held.append(Held(entry.name, info.uuid, info.received_uuid, info.stransid,
                                 received.get(entry.name)))
        else:
            from ..receive import Registry

            held += [Held(e.name, e.uuid, e.uuid, e.ctransid, received.get(e.name))
                     for e in Registry(self.dest).entries() if (self.dest / e.name).is_dir()]
        part = self._partial(version)
        partial = None
        if part is not None:
            partial = Partial(part["session"], int(part["offset"]), int(part["segments"]),
                              str(part["chain"]))
        return Holdings(tuple(held), partial)

    # -- one conversation -----------------------------------------------------------------

    def _check_plan(self, plan: Plan, holdings: Holdings) -> Refuse | None:
        try:
            check_name(os.fsencode(plan.name), "subvolume name")
        except errors.UnsafePathError as exc:
            return Refuse("refused", f"unsafe subvolume name: {exc}")
        if plan.name.startswith("."):
            return Refuse("refused", "hidden subvolume names are not allowed")
        size = len(os.fsencode(plan.name))  # (refused here, not after the whole stream)
        if size > os.pathconf(self.dest, "PC_NAME_MAX"):
            return Refuse("refused", f"a subvolume name of {size} bytes: longer than the "
                                     "destination's filesystem takes")
        if os.path.lexists(self.dest / plan.name):
            return Refuse("exists", f"{plan.name} already exists in the destination")
        if plan.parent_uuid is not None and not any(
                (h.received_uuid or h.uuid) == plan.parent_uuid for h in holdings.held):
            return Refuse("no-common-base", f"no subvolume {plan.parent_uuid} here")
        part = holdings.partial
        if plan.kind == "resume" and (part is None or part.session != plan.session
                                      or part.offset != plan.offset
                                      or part.segments != plan.segments):
            return Refuse("protocol", "no such partial transfer to resume")
        held = PartialTransfer(self.dest, self.backend)
        if plan.kind == "resume" and not held.holds(plan.name, plan.uuid, plan.ctransid,
                                                    plan.parent_uuid):
            held.drop()  # (a stream made again from a changed directory: a new one follows)
            return Refuse("diverged", "the resumed stream is not the partial transfer's "
                                      "(another subvolume name, UUID, ctransid or base)")
        if plan.kind != "resume" and plan.offset:
            return Refuse("protocol", "a new transfer starts at offset 0")
        return None

    def serve(self, ch: Channel, *, peer: str = "peer") -> ServeResult:
        """Run one conversation on ``ch`` (see the module docstring)."""
        conn = Connection("receiver", source=peer)
        io = MessageIO(ch, conn)
        inbox: Inbox | None = None
        acks: AckWriter | None = None
        partial = PartialTransfer(self.dest, self.backend)
        cut = kept = False
        lock: int | None = None
        try:
            io.send(Hello("receiver", spoken(), ("encoded",), self.ident, str(self.dest)))
            io.expect(Hello)
            lock, holder = lock_dest(self.dest)
            if lock is None:
                busy = Refuse("busy", f"{self.dest} is receiving another transfer (process "
                                      f"{holder or '?'}): try again when it ends")
                io.send(busy)
                return ServeResult("busy", f"{busy.code}: {busy.message}")
            self.state = self._load()  # (another process may have received since)
            holdings = self.holdings(io.conn.version)
            io.send(holdings)
            _engine()
            msg = io.expect(Plan, Refuse)
            if isinstance(msg, Refuse):
                return ServeResult("refused", f"{msg.code}: {msg.message}")
            plan = msg
            refusal = self._check_plan(plan, holdings)
            if refusal is not None:
                io.send(refusal)
                return ServeResult("refused", f"{refusal.code}: {refusal.message}")
            inbox, events, point, progress, meta = self._start(io, plan, partial)
            acks = events.acks
            self._durable()  # (a new DEST's state file)
            io.send(Accept(plan.session))
            inbox.start()
            if point is None:
                # a new transfer's first meta, durable before its temporary subvolume is
                # made (it names it): written while the sender sends its first segment
                partial.save(meta, durable=True)
            if point is not None and meta.get("complete"):
                got = self._commit_complete(events, point)
            else:
                got = self._receive(events, point, progress, meta, partial)
            events.drain()
            partial.drop()
            self._write_out()  # (the final name on the disk before the sender hears of it)
            io.send(Committed(got.name, got.uuid))
            return ServeResult("committed", received=got, received_bytes=inbox.added)
        except PeerRefused as exc:
            if inbox is not None:
                partial.drop()
            return ServeResult("refused", str(exc))
        except TransportError as exc:  # (PeerClosed too)
            cut = inbox is not None
            return ServeResult("interrupted", str(exc), kept=cut,
                               received_bytes=inbox.added if inbox else 0)
        except Exception as exc:  # (a damaged state file, a bug: the peer hears it, raised)
            if acks is not None:
                acks.drain(check=False)  # (nothing else writes while it does)
            kept, note = self._kept(partial, exc) if inbox is not None else (False, "")
            if inbox is not None and not kept:
                partial.drop()
            self._refuse(io, exc, note)
            if not isinstance(exc, ProtocolError | OSError):
                raise
            return ServeResult("failed", str(exc))
        finally:
            if self._syncing is not None:  # (a new DEST's state file: its fsyncs end with
                self._syncing[0].join()  # the conversation, one refused before the ACCEPT too)
            if lock is not None:  # (the conversation is over: a receiver may wait for us)
                say_closing(lock)
            if acks is not None:
                acks.drain(check=False)
            if inbox is not None:
                inbox.stop()
            if cut or kept:
                self._keep(partial)
            if lock is not None:
                os.close(lock)

    def _kept(self, partial: PartialTransfer, exc: Exception) -> tuple[bool, str]:
        """Whether a conversation's partial transfer is kept for a resume, as a cut's, after
        it failed with ``exc``: a failure of this side's (not :func:`~.partial.peers_fault`)
        but the :data:`~.partial.OWN_FAILURES`-th in a row at one point (resumed and failed
        there each time: a bug it meets); and what to add to the peer's REFUSE: that it
        is kept, or (also warned here) that it is dropped for the failures in a row."""
        if peers_fault(exc):
            return False, ""
        n = partial.own_failure(exc)
        if n < OWN_FAILURES:
            return True, " (its partial transfer is kept: the next run resumes it)"
        note = (f" (failed {n} times in a row at the same point of this transfer: its "
                f"partial transfer is dropped, the next run starts again)")
        self.warn(f"{self.dest}: {str(exc) or type(exc).__name__}{note}")
        return False, note

    @staticmethod
    def _refuse(io: MessageIO, exc: Exception, note: str = "") -> None:
        """Tell the peer why the conversation failed (if it still listens): ``protocol``
        when the peer broke it (:func:`~.partial.peers_fault`), else ``failed`` (this
        side's own: a full disk while applying the stream, a damaged state file, a bug)."""
        with contextlib.suppress(BtrdeltaError):
            io.send_raw(Refuse("protocol" if isinstance(exc, ProtocolError)
                               and peers_fault(exc) else "failed",
                               (str(exc)[:2000] or type(exc).__name__) + note))

    def _keep(self, partial: PartialTransfer) -> None:
        """A cut conversation leaves its partial transfer to a resume: DEST is written out
        (``syncfs``: the records applied, the progress count), then ``meta.json`` says so
        (no boot id), so that the transfer is resumed after a restart too. (One whose
        receiver was killed or lost its power keeps the boot id it was written in: after a
        restart what it counts may not be on the disk, and it is discarded; so is one whose
        write-out failed: a full disk.)"""
        try:
            doc = partial.load()
        except Damaged:
            return  # (the next conversation discards it and says why)
        if doc is None or not doc.get("boot"):
            return
        with contextlib.suppress(OSError):
            self._write_out()
            partial.save(doc, synced=True)

    def _record(self, pending: PendingSubvol, inbox: Inbox,
                written: Callable[[], None] | None = None) -> None:
        """The COMMIT read (size and chain checked): the subvolume is on the disk (DEST
        written out: ``written`` waits for the thread doing it, else it is done here) and
        the state names its sendshot, before the subvolume takes its final name."""
        commit = inbox.commit
        if commit is None:
            raise ProtocolError("no COMMIT after the stream's END")
        if written is not None:
            written()
        else:
            self._write_out()
        self.state.setdefault("received", {})[os.fsdecode(pending.name)] = \
            commit.sendshot or None
        self._save(self.state)

    def _write_out(self) -> None:
        """``syncfs`` of DEST: what was received (and the seal, the final name) is on the
        disk. Before the final name, so that a power cut never leaves a name on a tree
        whose data was still in memory (btrfs commits a rename without writing out the
        files' delayed allocations; ext4 too may commit it first); after it, before the
        COMMITTED, so that what the sender is told it holds survives a power cut: its
        cursor moves on, and prune deletes the sendshot it held before."""
        fd = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            syncfs(fd)
        finally:
            os.close(fd)

    def _receive(self, events: _Events, point: ResumePoint | None, progress: Any,
                 meta: dict[str, Any], partial: PartialTransfer) -> ReceivedSubvol:
        """Apply the stream as it is read (a cut leaves the subvolume to a resume); the
        complete subvolume takes its final name only after the sender's COMMIT."""
        from ..receive import receive

        replica = self

        class Committed:
            """Before the final name: END's segment acknowledged, then the COMMIT (size and
            chain checked) and the state naming its sendshot. A sender that refuses or lies
            here leaves nothing under the final name (the subvolume is removed); one cut off
            here (a TransportError) leaves the complete subvolume under its temporary name
            and the partial transfer marked complete, acknowledged to the stream's end: the
            next PLAN resumes there, with nothing to resend. END's segment is acknowledged
            before the seal (:meth:`before_seal`; the seal commits a transaction: 40-120 ms
            for Debian's ``/usr``), so that the sender's COMMIT comes while the subvolume is
            sealed; a cut meanwhile is raised after the seal, where it keeps the subvolume
            for a resume. The write-out started then is waited for however the receive ends
            (not left running past the command's end, which closes its descriptors 0, 1)."""

            def __init__(self) -> None:
                self.cut: TransportError | None = None
                self.writing: Started | None = None
                self.failed: list[BaseException] = []

            def before_seal(self, pending: PendingSubvol) -> None:
                try:
                    events.drain()  # (no ACK of an earlier segment saves its meta after)
                    meta["complete"] = True  # saved with END's ACK (the stream's end)
                    if events.inbox.pending is None:
                        partial.save(meta)  # (END's segment was acknowledged already)
                    events.acknowledge_end()
                except TransportError as exc:
                    self.cut = exc
                # DEST written out while the subvolume is sealed and the COMMIT comes
                self.writing = Started(self._write_out, "write-out")

            def _write_out(self) -> None:
                try:
                    replica._write_out()
                except BaseException as exc:  # raised again by written()
                    self.failed.append(exc)

            def written(self) -> None:
                """Until DEST is written out (here, when the seal was not this
                conversation's); then the partial transfer (complete) says so: a power
                cut from here on costs only the COMMIT again."""
                if self.writing is None:
                    self._write_out()
                else:
                    self.writing.join()
                if self.failed:
                    raise self.failed[0]
                partial.save(meta, synced=True)

            def __call__(self, pending: PendingSubvol) -> None:
                if self.cut is not None:
                    self.written()
                    raise self.cut
                if events.after_end():
                    self.written()
                    raise ProtocolError("data after the stream's END")
                replica._record(pending, events.inbox, self.written)

        try:
            got = receive(events, self.dest, stop_at_end=True, backend=self.backend,
                          progress=progress, resume=point, temp_name=events.tmp,
                          detach_on=(TransportError,), pre_commit=(committed := Committed()),
                          write_behind=True, detach_if=lambda exc: not peers_fault(exc))
        except (TransportError, ProtocolError):
            raise
        except BtrdeltaError as exc:
            raise ProtocolError(f"the stream cannot be applied: {exc}") from exc
        finally:  # (a COMMIT damaged or cut off after the seal: see Committed)
            if committed.writing is not None:
                committed.writing.join()
        if not got:
            raise ProtocolError("the stream held no subvolume")
        return got[0]

    def _commit_complete(self, events: _Events, point: ResumePoint) -> ReceivedSubvol:
        """Resume a transfer whose whole stream was applied and acknowledged (the cut came
        between END's ACK and the COMMIT): the next message must be the COMMIT (size and
        chain checked against the partial transfer's); then the state, the final name."""
        from ..receive.subvolumes import Subvolumes

        pending = point.pending
        try:
            if events.inbox.take() is not None:
                raise ProtocolError("data after the stream's END")
            with Subvolumes(self.dest, backend=self.backend) as subvols:
                return subvols.finish(pending, sealed=True, keep_on=(TransportError,),
                                      pre_commit=lambda p: self._record(p, events.inbox))
        finally:
            if not pending.done and pending.sandbox is not None:
                pending.sandbox.close()  # (kept for the next resume, or dropped)

    def _start(self, io: MessageIO, plan: Plan, partial: PartialTransfer
               ) -> tuple[Inbox, _Events, ResumePoint | None, Any, dict[str, Any]]:
        """The inbox and events of a new or resumed transfer (a resumed one goes on with the
        temporary subvolume the last conversation left, after the records it applied), the
        resume point, the progress mapping and the partial transfer's meta (``complete``:
        the whole stream was applied and acknowledged)."""
        from ..receive.resume import ResumePoint
        from ..receive.subvolumes import Subvolumes

        version = io.conn.version
        doc = self._partial(version) if plan.kind == "resume" else None
        point: ResumePoint | None = None
        if doc is not None and doc.get("offset"):
            tmp = str(doc["tmp"])
            with Subvolumes(self.dest, backend=self.backend) as subvols:
                pending = subvols.reopen(os.fsencode(plan.name), os.fsencode(tmp), plan.uuid,
                                         plan.ctransid, parent_uuid=plan.parent_uuid)
            point = ResumePoint(pending, int(doc["records"]), partial.applied())
            at, segments, chain = int(doc["offset"]), int(doc["segments"]), str(doc["chain"])
            stream_version = int(doc["stream_version"])
        else:
            partial.drop()  # an older transfer this sender abandoned, or one not begun
            self._sweep(plan.uuid)
            tmp = f"{_TMP_PREFIX}{plan.uuid.hex[:12]}-partial"
            at, segments, chain, stream_version = 0, 0, _ZERO_CHAIN, 0
        progress = partial.start()
        if point is None:
            progress[:8] = bytes(8)
        meta = {"version": META_VERSION, "protocol": version, "session": plan.session,
                "name": plan.name, "uuid": str(plan.uuid), "ctransid": plan.ctransid,
                "parent_uuid": str(plan.parent_uuid) if plan.parent_uuid else None,
                "base": plan.base, "segment": plan.segment, "offset": at,
                "segments": segments, "chain": chain, "records": point.first if point else 0,
                "stream_version": stream_version, "tmp": tmp,
                "complete": bool(point is not None and doc is not None and doc.get("complete"))}
        events: _Events

        def acknowledge(cp: Checkpoint) -> None:
            """Every record before the segment's end is applied: the meta names it (and how
            many records precede it) as where a resume starts, then the ACK."""
            meta.update(offset=cp.offset, segments=inbox.segments, chain=inbox.chain,
                        records=partial.applied(),
                        stream_version=events.parser.version or meta["stream_version"])
            if acks is not None:
                acks.put(dict(meta), Ack(cp.index, cp.offset))
                return
            partial.save(meta)
            io.send(Ack(cp.index, cp.offset))

        concurrent = getattr(io.ch, "concurrent", False)
        inbox = Inbox(io, plan, version, at, segments, chain, acknowledge, threaded=concurrent)
        acks = AckWriter(io, partial, inbox.fail) if concurrent else None
        events = _Events(inbox, stream_version, os.fsencode(tmp), acks)
        return inbox, events, point, progress, meta

    def _sweep(self, uuid: UUID) -> None:
        """Remove temporary subvolumes of ``uuid`` left by receivers that died."""
        prefix = f"{_TMP_PREFIX}{uuid.hex[:12]}-"
        for entry in os.scandir(self.dest):
            if not entry.name.startswith(prefix):
                continue
            pid = entry.name[len(prefix):]
            if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
                continue
            fd = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                if self.btrfs:
                    with contextlib.suppress(OSError):
                        delete_subvolume(fd, entry.name.encode())
                        continue
                with contextlib.suppress(OSError):
                    remove_tree(fd, entry.name)  # any depth: an unfinished, untrusted tree
            finally:
                os.close(fd)

