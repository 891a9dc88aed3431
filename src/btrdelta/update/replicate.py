"""The sending side of replication (``btrdelta replicate SOURCE DEST``).

:func:`replicate` runs one conversation over a :class:`~.channels.Channel` (a local child,
ssh, TCP/TLS): HELLO, the receiver's HOLDINGS, a PLAN chosen by
:func:`btrdelta.protocol.plan.choose` from the sendshot store (or a typed REFUSE), then the
stream in segments: :func:`btrdelta.send.sendshot.send_with_sendshots` (the base is the
chosen sendshot) makes it and its callbacks (:class:`_Wire`) send it as it comes, cut into
segments at record boundaries; each segment goes out as DATA messages and a CHECKPOINT (its
digest and the chain of digests). Segments are half the ``segment`` option and at most that
many bytes are unacknowledged on the wire (the next segment goes out while the receiver
applies the last), so a cut connection costs at most ``segment`` bytes again. COMMIT names
the size, the chain and the new sendshot; after COMMITTED the receiver's cursor moves to it
and sendshots of this source that no receiver needs are pruned. The cursor names the new
sendshot (in flight) before the COMMIT goes out: when the connection drops after the
receiver committed but before COMMITTED arrived, prune keeps it and the next conversation
adopts the subvolume the HOLDINGS list under the transfer's name (:meth:`_Sender._adopt`);
when they list neither it nor a partial transfer of it, the session is abandoned, its
snapshot and record deleted (:meth:`_Sender._abandon`). An incremental stream that changes
nothing (a plain directory sent again unchanged, the run after an adopted commit) gets a
REFUSE ``already-current`` in place of its COMMIT (:meth:`_Sender._unchanged`): a receiver
never holds one state twice because a run was repeated.

Resumable: a writable btrfs source is read from a read-only snapshot kept (next to it,
named ``.btrdelta-replicate-<session>-<store>-<pid>``) until the receiver committed (on a
first replication it is taken, and its walk started, while the receiver starts:
:class:`_Early`); the session, its snapshot, base and plan are kept in the receiver's
cursor (``inflight``). When
the receiver reports a partial transfer of that session, the same stream is made again from
the same snapshot and base, its segments up to the receiver's are checked against the
receiver's chain digest (``diverged`` if they differ) and not sent, and the stream goes on
from there. A sender killed after it took the snapshot but before a cursor named it leaves
the snapshot behind, as does one killed after COMMITTED, while the cursor moves on and
the snapshot is deleted: the next run of that source with that store deletes it
(:func:`_drop_leftovers`: the store's tag, a pid that is gone, no cursor naming it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any
from uuid import UUID, uuid4

from .._pool import Started
from .._value import Value
from ..errors import BtrdeltaError
from ..fs.atomic import pid_alive
from ..fs.btrfs import subvol_info, syncfs
from ..protocol import (
    Accept,
    Checkpoint,
    Commit,
    Committed,
    Hello,
    Holdings,
    Plan,
    Refuse,
)
from ..protocol.messages import max_data, segment_hasher, spoken
from ..protocol.plan import Known, choose
from ..send.cursors import SESSION_PREFIX
from ..send.live import drop_leftovers, drop_snapshot, frozen, keep_snapshot
from ..send.sendshot import send_with_sendshots
from ..send.store import SendshotStore, StoredSendshot
from ..send.walk import ScanStream
from ..stream.records import End, Record, Snapshot, Subvol
from ..stream.writer import Encoded
from .channels import Channel, MessageIO, PeerRefused
from .inbox import chain_next
from .outbox import Outbox

__all__ = ["DEFAULT_SEGMENT", "ReplicateResult", "replicate"]

DEFAULT_SEGMENT = 8 << 20
_ZERO_CHAIN = bytes(32).hex()
#: a session's snapshot: ``<prefix><session (16 hex)>-<store tag (8 hex)>-<pid>``
_SNAP_NAME = re.compile(rb"\.btrdelta-replicate-[0-9a-f]{16}-([0-9a-f]{8})-([0-9]+)")


class ReplicateResult(Value):
    """What one :func:`replicate` did."""

    #: "committed", "refused" (by either side) or "diverged" (start again without resuming)
    outcome: str
    kind: str = ""
    name: str = ""
    receiver: str = ""
    base: str | None = None
    sendshot: str | None = None
    #: stream bytes sent in this run, and of those the ones the receiver had before
    sent: int = 0
    resumed_from: int = 0
    size: int = 0
    message: str = ""
    pruned: int = 0
    #: the plan's estimate of the file data in the whole stream (bytes)
    estimate: int = 0
    #: the subvolume an earlier run's transfer committed as, that run cut before it saw the
    #: COMMITTED: adopted from the receiver's HOLDINGS (the cursor moved to it)
    adopted: str = ""


#: pieces of the stream shorter than this are copied together; longer ones (file data) are
#: kept as they are until sent
_SMALL = 64 << 10
#: stream bytes gathered before they are sent: in protocol version 3 below one DATA
#: message by more than a record (messages end at record boundaries), else 1 MiB
_GROUP_V3 = (1 << 20) - (192 << 10)
_GROUP = 1 << 20
#: the first DATA message's: the stream's header and first records go out at once (the
#: receiver makes the subvolume while the sender reads the first files), then twice as
#: many bytes a message up to the size above
_FIRST_GROUP = 64 << 10


def _owned(piece: Any) -> Any:
    """``piece`` if nothing can change it later (bytes, or a view of bytes), else a copy."""
    if type(piece) is bytes or (type(piece) is memoryview and type(piece.obj) is bytes):
        return piece
    return bytes(piece)


class _Diverged(Exception):
    """The stream made again differs from the part the receiver holds."""


class _Wire:
    """The stream as the sender makes it, sent in segments from its own callbacks (one
    thread: the bytes go out while the CPU's caches still hold them, the receiver works on
    the other core).

    The first record (the header) makes the PLAN (sent, then the ACCEPT awaited). Pieces
    are gathered (small ones copied into one buffer, file data kept as it is) and sent as
    DATA at record boundaries (a message each in protocol version 3); a segment ends at the first
    record boundary past the segment size, or at END: its digest (``segment_hasher`` of the
    protocol version) and the chain go out in a CHECKPOINT. The ``segment`` option is what a
    cut may cost again (the outbox's window): segments are half of it, so the next one goes
    out while the receiver applies the last one (a session begun with whole segments, by an
    earlier version, keeps them: its ``flight`` names no segment size). On a resume the
    segments the receiver holds are made and digested but not sent; the chain at their end
    must be the receiver's.
    """

    def __init__(self, owner: _Sender, flight: dict[str, Any], offset: int, segments: int,
                 chain_at: str, naming: _Naming | None = None) -> None:
        self.owner, self.io, self.flight = owner, owner.io, flight
        #: the cursor naming the new session, waited for before the first CHECKPOINT,
        #: then ``named``
        self.naming, self.named = naming, False
        self.resume_at, self.held, self.chain_at = offset, segments, chain_at
        self.window = owner.o.get("segment", DEFAULT_SEGMENT)
        self.size = flight.get("segment") or self.window
        self.version = self.io.conn.version
        self.limit = max_data(self.version)
        #: bytes gathered before a DATA message: the first ones small (the receiver starts
        #: on the header and the first records while the next are made), doubling up to
        #: the full size
        self.full = _GROUP_V3 if self.version >= 3 else _GROUP
        self.group = _FIRST_GROUP
        self.plan: Plan | None = None
        #: records that change something (not the header, not END): an incremental with
        #: none is the base again, not committed (:meth:`_Sender._unchanged`)
        self.changes = 0
        self._pieces: list[Any] = []
        self._small = bytearray()
        self._n = self._group = 0
        self._hash = segment_hasher(self.version)
        self._sender: Any = None
        self.chain, self.offset, self.index, self.at = _ZERO_CHAIN, 0, 0, 0
        self.out: Outbox | None = None

    def on_stream(self, sender: Any) -> None:
        self._sender = sender

    def write(self, piece: Any) -> None:
        n = len(piece)
        if n < _SMALL:
            self._small += piece
        else:
            if self._small:
                self._pieces.append(self._small)
                self._small = bytearray()
            self._pieces.append(_owned(piece))
        self._n += n
        self._group += n

    def on_record(self, rec: Record | Encoded) -> None:
        if self.plan is None:
            self._begin(rec)
        else:
            self.changes += rec.__class__ is not End
        if self._n >= self.size or rec.__class__ is End:
            self.end_segment()
        elif self._group >= self.group:
            self._send_group()

    def _begin(self, header: Record | Encoded) -> None:
        if not isinstance(header, Subvol | Snapshot):
            raise BtrdeltaError("the stream did not start with a subvolume")
        flight = self.flight
        parent = header.clone_uuid if isinstance(header, Snapshot) else None
        kind = "resume" if self.resume_at else ("incremental" if parent else "full")
        plan = Plan(kind, flight["session"], flight["name"], header.uuid,
                    header.ctransid, parent, flight.get("base") or "",
                    getattr(self._sender, "estimate", 0), self.size, self.resume_at,
                    self.held)
        o = self.owner.o
        # its writing thread starts while the PLAN and the ACCEPT cross (it writes nothing
        # before the first DATA, and stops at abort() when the receiver refuses)
        self.out = Outbox(self.io, threaded=o.get("threaded", True), ahead=self.window,
                          rate=o.get("rate_limit"), progress=o.get("on_progress"),
                          window=self.window)
        self.io.send(plan)
        self.plan = plan
        self.io.expect(Accept)

    @property
    def estimate(self) -> int:
        """The sender's estimate of the file data (after the stream: a full stream sent
        while its tree was walked gives 0, unknown, in its PLAN, and the whole figure
        here)."""
        return getattr(self._sender, "estimate", 0)

    @property
    def sent(self) -> int:
        """Stream bytes written in this conversation."""
        return self.out.sent if self.out is not None else 0

    def _send_group(self) -> None:
        if self._small:
            self._pieces.append(self._small)
            self._small = bytearray()
        pieces, size = self._pieces, self._group
        self._pieces, self._group = [], 0
        if self.group < self.full:
            self.group = min(self.group * 2, self.full)
        h = self._hash
        for piece in pieces:
            h.update(piece)
        if self.index < self.held:  # the receiver has it: not sent
            self.at += size
            return
        out = self.out
        assert out is not None
        for group in _messages(pieces, self.limit):
            out.data(self.at, group)
            self.at += sum(len(v) for v in group)

    def end_segment(self) -> None:
        """Send what is gathered and close the segment (nothing when it is empty)."""
        self._send_group()
        if not self._n:
            return
        digest = self._hash.hexdigest()
        self._hash = segment_hasher(self.version)
        self.chain = chain_next(self.chain, digest)
        end = self.offset + self._n
        self._n = 0
        index = self.index
        self.offset, self.index = end, index + 1
        if index < self.held:  # the receiver has it: check the chain at its end
            if self.index == self.held and self.chain != self.chain_at:
                raise _Diverged()
            return
        assert self.out is not None
        if self.naming is not None and not self.named:
            # the session is named before any segment can be acknowledged: a sender
            # killed before has nothing to resume from, and the receiver holds at most
            # this first segment, unacknowledged, which the next run sends again
            self.naming.wait()
            self.named = True
        self.out.checkpoint(Checkpoint(index, end, digest, self.chain))

    def finish(self) -> None:
        """Until every segment is written and acknowledged."""
        if self.out is not None:
            self.out.finish()

    def abort(self) -> None:
        """Stop writing (the stream failed)."""
        if self.out is not None:
            self.out.abort()


def _half(window: int) -> int:
    """The segment size for a window of ``window`` bytes: half of it (two segments in
    flight), at least 64 KiB."""
    return max(window // 2, 64 << 10)


def _messages(pieces: list[Any], limit: int) -> Iterator[list[memoryview]]:
    """``pieces`` cut into groups of at most ``limit`` bytes (views, nothing copied)."""
    group: list[memoryview] = []
    room = limit
    for piece in pieces:
        view = memoryview(piece)
        pos, n = 0, len(view)
        while pos < n:
            take = min(room, n - pos)
            group.append(view[pos:pos + take])
            pos += take
            room -= take
            if not room:
                yield group
                group, room = [], limit
    if group:
        yield group


def _known(records: list[StoredSendshot]) -> list[Known]:
    return [Known(r.digest, r.head.stream_uuid, r.head.stream_ctransid) for r in records]


def _store_tag(store: SendshotStore) -> bytes:
    """8 hex digits naming ``store`` (of its real path) in its session snapshots' names."""
    where = os.fsencode(os.path.realpath(store.path))
    return hashlib.blake2s(where, digest_size=4).hexdigest().encode()


def _session_snapshot(source: bytes, session: str, store: SendshotStore) -> bytes | None:
    name = b"%s%s-%s-%d" % (SESSION_PREFIX, session[:16].encode(), _store_tag(store),
                            os.getpid())
    return keep_snapshot(source, name)


def _where_now(source: bytes, inflight: dict[str, Any]) -> dict[str, Any] | None:
    """``inflight`` with its session's snapshot where it is now: the cursor names it by
    path, which a filesystem mounted elsewhere since (a device's disk checked on another
    machine after a power cut) or a renamed directory above the source made wrong; it is
    looked up by name next to or inside ``source``, where :func:`keep_snapshot` makes it.
    ``None``: the snapshot is gone (the transfer cannot go on from it)."""
    recorded = inflight.get("snapshot")
    if not recorded:
        return inflight
    name = os.path.basename(os.fsencode(recorded))
    path = source.rstrip(b"/") or b"/"
    for where in (os.path.dirname(path) or b".", path):
        if os.path.isdir(snap := os.path.join(where, name)):
            return {**inflight, "snapshot": os.fsdecode(snap)}
    return inflight if os.path.isdir(recorded) else None


def _drop_leftovers(source: bytes, uuid: UUID, store: SendshotStore) -> list[bytes]:
    """Delete the session snapshots of ``source`` (subvolume ``uuid``) that a sender of
    ``store`` killed between taking one and naming it in a cursor, or after its last cursor
    and before the snapshot's deletion, left behind; their paths.

    A leftover is a read-only snapshot of ``source`` (its parent UUID is ``uuid``) next to
    it or inside it, named with this store's tag and the pid of a process that is gone, that
    no cursor of the store names as its transfer in flight (by name: the source may be
    spelt another way). A sender still running (another receiver's) has a live pid, one
    killed after its cursor named the snapshot resumes from it. (Names of other stores, of
    other sources and of versions before session 10, which had no tag, are left alone.)
    """
    named = {os.path.basename(os.fsencode(f["snapshot"]))
             for c in store.cursors().values()
             if isinstance(f := c.get("inflight"), dict) and f.get("snapshot")}
    tag = _store_tag(store)

    def stale(name: bytes) -> bool:
        m = _SNAP_NAME.fullmatch(name) if name.startswith(SESSION_PREFIX) else None
        return (m is not None and m.group(1) == tag and name not in named
                and not pid_alive(int(m.group(2))))

    return drop_leftovers(source, uuid, stale)


class _Early:
    """A new session's snapshot, taken and its walk started while the receiver starts and
    says what it holds (a first replication of a writable subvolume can only be a full
    stream, or refused): the stream then goes on with the walk (:class:`ScanStream`, which
    publishes the tree directory by directory), and neither waits for the whole scan.
    Discarded (the walk stopped, the snapshot deleted) unless the plan adopts it."""

    def __init__(self, snap: bytes, session: str) -> None:
        self.snap, self.session = snap, session
        self.adopted = False
        try:
            self._walk: ScanStream | None = ScanStream(snap)
        except BtrdeltaError:  # the send walks again and says what is wrong
            self._walk = None

    @classmethod
    def start(cls, source: bytes, store: SendshotStore) -> _Early | None:
        """The early session of ``source``, or None when it is not a writable subvolume (or
        cannot be snapshotted now: a plan that needs it tries again and says why)."""
        session = uuid4().hex
        try:
            snap = _session_snapshot(source, session, store)
        except (BtrdeltaError, OSError):
            return None
        with contextlib.suppress(BtrdeltaError, OSError):
            store.seed()  # (a full stream's, made now rather than after the HOLDINGS)
        return cls(snap, session) if snap is not None else None

    def adopt(self) -> ScanStream | None:
        """The snapshot is the session's (the caller records it): its walk, going on."""
        self.adopted = True
        return self._walk

    def discard(self) -> None:
        """After the conversation: the walk stopped (over, unless the send failed), the
        snapshot deleted unless adopted."""
        if self._walk is not None:
            self._walk.close()
        if not self.adopted:
            drop_snapshot(self.snap)


class _Naming:
    """A new session's first cursor (``write``: naming the session, its snapshot and base),
    written and ``fsync``-ed by a thread of its own from the choice of the plan on, while
    the send sets up, the PLAN goes out, the ACCEPT comes back and the first segment's
    DATA go out (the first byte waited for it before: 0.05-0.24 s at load 9);
    :meth:`wait` before the first CHECKPOINT (nothing is acknowledged, so nothing can be
    resumed, before the session is named), ``undo`` (the cursor as it was) when the send
    fails before its PLAN."""

    def __init__(self, write: Callable[[], None], undo: Callable[[], None]) -> None:
        self._error: BaseException | None = None
        self.undo = undo  # the cursor as it was (the send failed before its PLAN)

        def run() -> None:
            try:
                write()
            except BaseException as exc:  # raised again by wait()
                self._error = exc

        self._thread = Started(run, "cursor-write")

    def wait(self) -> None:
        """Until the cursor is written (raises what writing it raised)."""
        self._thread.join()
        if self._error is not None:
            raise self._error

    def done(self) -> bool:
        """Whether the cursor was written (waits for the thread; never raises)."""
        self._thread.join()
        return self._error is None


class _Sender:
    """One conversation of the sending side (see :func:`replicate`)."""

    def __init__(self, source: str | os.PathLike[str], io: MessageIO, store: SendshotStore,
                 **options: Any) -> None:
        self.source = os.path.abspath(os.fsencode(source))
        self.io, self.store, self.o = io, store, options
        self.name = os.fsdecode(os.path.basename(self.source) or b"subvol")
        self.sessions: set[object] = set()  # (in flight: found or started by this one)

    def _cursor(self, digest: str | None, *, holds: bool = False, **extra: Any) -> None:
        """Set this receiver's cursor (:meth:`SendshotStore.edit_cursor`: under the store's
        lock): ``digest`` (with ``holds``: the record it now holds of this source), the one
        it holds of each other source kept (``sources``: one DEST receiving two sources),
        another conversation's transfer in flight kept (a session this one neither found
        nor started), where it is (the ``dest`` option) when given; None and no ``extra``
        or other source forgets it."""
        self.store.edit_cursor(self.rid, lambda now: self._edited(now, digest, holds, extra))

    def _edited(self, cursor: dict[str, Any], digest: str | None, holds: bool,
                extra: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        extra = dict(extra)  # (:meth:`_cursor`'s edit of the cursor now)
        sources = cursor.get("sources")
        sources = dict(sources) if isinstance(sources, dict) else {}
        old = cursor.get("digest")
        if old and old != digest and old not in sources.values():  # (a cursor of before)
            rec = next((r for r in self.store.records_list() if r.digest == old), None)
            if rec is not None and rec.head.source != self.source:
                sources[os.fsdecode(rec.head.source)] = old
        if holds:
            me = os.fsdecode(self.source)
            if digest:
                sources[me] = digest
            else:
                sources.pop(me, None)
        if sources:
            extra["sources"] = sources
        if "inflight" not in extra and isinstance(theirs := cursor.get("inflight"), dict) \
                and theirs.get("session") not in self.sessions:
            extra["inflight"] = theirs
        if self.o.get("dest") and (digest is not None or extra):
            extra["dest"] = self.o["dest"]
        return digest, extra

    # -- before the stream ------------------------------------------------------------

    def _mine(self, lineage: object) -> list[StoredSendshot]:
        return [r for r in self.store.records_list()
                if r.head.source == self.source or (lineage is not None
                                                     and r.head.subvol_uuid == lineage)]

    def _unchanged_since(self, generation: int) -> bool:
        """Whether the source subvolume was not written after transaction ``generation``.

        Its ctransid only moves when a transaction that changed it commits: the running one
        (writes of the last seconds) is committed first.
        """
        fd = os.open(self.source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if subvol_info(fd).ctransid > generation:
                return False
            syncfs(fd)
            return subvol_info(fd).ctransid <= generation
        finally:
            os.close(fd)

    def run(self) -> ReplicateResult:
        io = self.io
        io.send(Hello("sender", spoken(), (), self.store.path, os.fsdecode(self.source)))
        with frozen(self.source, snapshot=False) as fz:
            lineage, info = fz.lineage, fz.info
        if info is not None and not info.readonly:
            _drop_leftovers(self.source, info.uuid, self.store)
        records = self._mine(lineage)
        early = _Early.start(self.source, self.store) if not records and info is not None and \
            not info.readonly else None
        self.adopted = ""
        try:
            result = self._run(records, lineage, info, early)
        finally:
            if early is not None:
                early.discard()
        result.adopted = self.adopted
        return result

    def _run(self, records: list[StoredSendshot], lineage: object, info: Any,
             early: _Early | None) -> ReplicateResult:
        io = self.io
        hello: Hello = io.expect(Hello)
        holdings: Holdings = io.expect(Holdings)
        self.rid, self.holdings = hello.ident, holdings
        cursor = self.store.cursors().get(self.rid, {})
        inflight = cursor.get("inflight") or None
        self.sessions.add(inflight.get("session") if isinstance(inflight, dict) else None)
        found = _where_now(self.source, inflight) if inflight else None
        if inflight and self._adopt(found or inflight, holdings, records):
            cursor, inflight, found = self.store.cursors().get(self.rid, {}), None, None
            records = self._mine(lineage)  # (what the adoption's prune left)
        current = None
        if records and info is not None and records[-1].head.subvol_uuid == lineage and (
                self._unchanged_since(records[-1].head.generation)):
            current = records[-1].digest  # nothing written since its snapshot
        choice = choose(_known(records), holdings.held, name=self.name,
                        partial=holdings.partial,
                        inflight_session=found.get("session") if found else None,
                        current=current, allow_full=self.o.get("allow_full", False))
        if choice.kind == "refuse":
            io.send(Refuse(choice.code, choice.message))
            # (current: what a run killed between its last cursor and its prune left)
            pruned = self._prune(lineage) if choice.code == "already-current" else 0
            return ReplicateResult("refused", receiver=self.rid,
                                   message=f"{choice.code}: {choice.message}", pruned=pruned)
        if choice.kind == "resume":
            assert found is not None
            assert holdings.partial is not None
            return self._stream(found, holdings.partial.offset, holdings.partial.segments,
                                holdings.partial.chain)
        if inflight:  # an abandoned session (the receiver did not commit it; or its
            # snapshot gone: the receiver's partial transfer of it is dropped)
            self._abandon(found or inflight, choice.base.digest if choice.base else None)
        scanned: ScanStream | None = None
        snap: bytes | None
        if early is not None:
            session, snap = early.session, early.snap
            scanned = early.adopt()
        else:
            session = uuid4().hex
            snap = _session_snapshot(self.source, session, self.store)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        taken = {h.name for h in holdings.held}
        name, n = f"{self.name}.{stamp}", 1
        while name in taken:
            n += 1
            name = f"{self.name}.{stamp}_{n}"
        flight = {"session": session, "snapshot": os.fsdecode(snap) if snap else None,
                  "base": choice.base.digest if choice.base else None, "name": name,
                  "segment": _half(self.o.get("segment", DEFAULT_SEGMENT))}
        # the cursor names the session (written and fsync-ed by a thread) while the send
        # sets up, the PLAN goes out, the receiver accepts and the first segment goes out;
        # before its CHECKPOINT (a sender killed before it leaves no acknowledged segment
        # to resume from; the next run sends again, the receiver drops the transfer no
        # cursor names)
        if choice.base is None:
            self.store.seed()  # (made before the cursor's thread holds the store's lock)
        self.sessions.add(session)
        before = {k: v for k, v in cursor.items() if k in ("inflight", "name", "uuid")}
        naming = _Naming(
            lambda: self._cursor(cursor.get("digest"), inflight=flight),
            lambda: self._cursor(cursor.get("digest"), **before))
        return self._stream(flight, 0, 0, _ZERO_CHAIN, scanned, naming)

    # -- the stream -------------------------------------------------------------------

    def _stream(self, flight: dict[str, Any], offset: int, segments: int,
                chain_at: str, scanned: ScanStream | None = None,
                naming: _Naming | None = None) -> ReplicateResult:
        io = self.io
        wire = _Wire(self, flight, offset, segments, chain_at, naming)
        snap = flight.get("snapshot")
        try:
            result = send_with_sendshots(
                wire.write, os.fsencode(snap) if snap else self.source, store=self.store,
                from_sendshot=flight.get("base"), record=True, snapshot=False,
                version=self.o.get("version", 2), compress=self.o.get("compress"),
                name=os.fsencode(flight["name"]), on_record=wire.on_record,
                on_stream=wire.on_stream, source_name=self.source, scanned=scanned)
            wire.end_segment()
            if naming is not None and not wire.named:  # (a stream with no segment)
                naming.wait()
            assert wire.plan is not None
            unchanged = wire.plan.parent_uuid is not None and not wire.changes
            if not unchanged:
                # the cursor names the sendshot before the COMMIT, written while the
                # receiver applies the last segments and seals the subvolume
                flight = self._name_sendshot(flight, result)
            wire.finish()
        except _Diverged:
            wire.finish()
            io.send(Refuse("diverged", "the stream made again differs from the one "
                                       "the receiver holds a part of"))
            self._forget(flight)
            return ReplicateResult("diverged", "resume", flight["name"], self.rid,
                                   message="the regenerated stream differs")
        except BaseException as exc:
            wire.abort()
            if wire.resume_at and isinstance(exc, PeerRefused) and \
                    exc.refusal.code == "diverged":  # (the PLAN: the stream's name or UUID)
                self._forget(flight)
                return ReplicateResult("diverged", "resume", flight["name"], self.rid,
                                       message=exc.refusal.message)
            if naming is not None:
                named = naming.done()
                if named and wire.plan is None:
                    # (failed before the PLAN went out: the receiver never heard of the
                    # session, whose cursor is taken back)
                    naming.undo()
                    named = False
                if not named and flight.get("snapshot"):
                    # (no cursor names the session: nothing would drop it later)
                    drop_snapshot(os.fsencode(flight["snapshot"]))
            raise
        plan, chain, offset, sent = wire.plan, wire.chain, wire.offset, wire.sent
        assert plan is not None
        if unchanged:
            return self._unchanged(flight, result, plan, sent, offset)
        recorded = result.recorded.digest if result.recorded is not None else ""
        io.send(Commit(offset, chain, recorded))
        done: Committed = io.expect(Committed)
        # the snapshot is deleted (an ioctl, without the GIL: 30-40 ms for Debian's /usr)
        # while the cursor moves and the store is pruned: a sender killed in between
        # leaves the transfer in flight, which the next run adopts, or a snapshot no
        # cursor names, which the next run deletes (_drop_leftovers)
        snap = flight.get("snapshot")
        dropping = (Started(lambda: drop_snapshot(os.fsencode(snap)), "snapshot-drop")
                    if snap else None)
        try:
            self._cursor(recorded, holds=True, name=done.name, uuid=str(done.uuid))
            lineage = result.recorded.head.subvol_uuid if result.recorded else None
            pruned = self._prune(lineage)
        finally:
            if dropping is not None:
                dropping.join()
        return ReplicateResult("committed", plan.kind, done.name, self.rid, plan.base or None,
                               recorded, sent, plan.offset, offset, pruned=pruned,
                               estimate=wire.estimate or plan.estimate)

    def _unchanged(self, flight: dict[str, Any], result: Any, plan: Plan, sent: int,
                   size: int) -> ReplicateResult:
        """An incremental that changes nothing (only its SNAPSHOT and END: the source is
        the base again, e.g. a plain directory sent again, or the run after one whose
        commit was adopted) is not committed: a second copy of the same tree would be all
        it adds. REFUSE ``already-current`` instead of the COMMIT (the receiver removes
        the subvolume), the cursor stays on the base, the stream's record and the
        session's snapshot go, and the store is pruned as after a commit."""
        base = flight.get("base") or ""
        held = self._held(base)
        said = f"the receiver holds {held.name if held else base[:16]}, the current state"
        self.io.send(Refuse("already-current", said))
        extra = {"name": held.name, "uuid": str(held.uuid)} if held is not None else {}
        self._cursor(base or None, holds=True, **extra)
        if result.recorded is not None and result.recorded.digest != base:
            with contextlib.suppress(BtrdeltaError):
                self.store.delete(result.recorded.digest)
        if flight.get("snapshot"):
            drop_snapshot(os.fsencode(flight["snapshot"]))
        pruned = self._prune(result.recorded.head.subvol_uuid if result.recorded else None)
        return ReplicateResult("refused", plan.kind, "", self.rid, base or None, None, sent,
                               plan.offset, size, f"already-current: {said}", pruned,
                               plan.estimate)

    def _held(self, digest: str) -> Any:
        """The receiver's subvolume received as sendshot ``digest`` (by the digest its
        state names, else by the sendshot's stream UUID), or None."""
        record = next((r for r in self.store.records_list() if r.digest == digest), None)
        uuid = record.head.stream_uuid if record is not None else None
        return next((h for h in self.holdings.held if h.sendshot == digest or (
            uuid is not None and uuid in (h.received_uuid, h.uuid))), None)

    def _name_sendshot(self, flight: dict[str, Any], result: Any) -> dict[str, Any]:
        """The cursor names the sendshot the stream recorded (before the COMMIT: a cut
        after it, the receiver committing and its COMMITTED lost, keeps the sendshot from
        prune, and the next run adopts the subvolume from the HOLDINGS: :meth:`_adopt`);
        the flight naming it."""
        recorded = result.recorded.digest if result.recorded is not None else ""
        if not recorded or flight.get("sendshot") == recorded:
            return flight
        flight = {**flight, "sendshot": recorded}
        cursor = self.store.cursors().get(self.rid, {})
        self._cursor(cursor.get("digest"), inflight=flight)
        return flight

    def _prune(self, lineage: object) -> int:
        """Prune this source's sendshots no receiver needs (unless told not to)."""
        if not self.o.get("prune", True):
            return 0
        return len(self.store.prune(keep=1, only=lambda s: s.head.source == self.source
                                    or (lineage is not None
                                        and s.head.subvol_uuid == lineage)))

    def _adopt(self, inflight: dict[str, Any], holdings: Holdings,
               records: list[StoredSendshot]) -> bool:
        """Whether the transfer in flight was committed by the receiver although this side
        never saw its COMMITTED (the connection was cut after the COMMIT): the HOLDINGS
        list a subvolume under the transfer's name received as the sendshot it recorded
        (by the digest the receiver's state names, else by its received UUID). Then it
        is adopted as a COMMITTED would have been: the cursor moves to that sendshot, the
        session's snapshot goes, sendshots no receiver needs are pruned."""
        digest = inflight.get("sendshot")
        mine = {r.digest: r for r in records}
        if not digest or digest not in mine:
            return False
        stream_uuid = mine[digest].head.stream_uuid
        held = next((h for h in holdings.held if h.name == inflight.get("name") and (
            h.sendshot == digest or (h.sendshot is None and
                                     (h.received_uuid or h.uuid) == stream_uuid))), None)
        if held is None:
            return False
        if inflight.get("snapshot"):
            drop_snapshot(os.fsencode(inflight["snapshot"]))
        self._cursor(digest, holds=True, name=held.name, uuid=str(held.uuid))
        self._prune(mine[digest].head.subvol_uuid)
        self.adopted = held.name
        return True

    def _abandon(self, inflight: dict[str, Any], base: str | None) -> None:
        """Drop what an earlier run's session left that the receiver does not hold (not
        committed, no partial transfer to resume): its snapshot, and the sendshot it
        recorded (named in its cursor before its COMMIT, kept from prune until now) unless
        it is the base chosen now or a cursor names it."""
        if inflight.get("snapshot"):
            drop_snapshot(os.fsencode(inflight["snapshot"]))
        digest = inflight.get("sendshot")
        if digest and digest != base:
            with contextlib.suppress(BtrdeltaError):
                self.store.delete(digest)

    def _forget(self, flight: dict[str, Any]) -> None:
        cursor = self.store.cursors().get(self.rid, {})
        self._cursor(cursor.get("digest"))
        if flight.get("snapshot"):
            drop_snapshot(os.fsencode(flight["snapshot"]))


def replicate(source: str | os.PathLike[str], ch: Channel, *, store: SendshotStore,
              peer: str = "receiver", **options: Any) -> ReplicateResult:
    """Replicate ``source`` to the receiver at the other end of ``ch``.

    Options: ``dest`` (where the receiver is, kept in its cursor for ``sendshot list``),
    ``segment`` (bytes unacknowledged at most, what a cut may cost again: a
    CHECKPOINT every half of it; default 8 MiB), ``rate_limit`` (bytes/s),
    ``allow_full`` (send a full stream although the receiver holds other states of this
    source), ``version`` (stream version, default 2), ``compress`` (``"zstd"``: data as
    ENCODED_WRITE), ``prune`` (default True), ``on_progress(bytes, total)``.

    Raises:
        ProtocolError: the receiver broke the protocol or refused in the middle.
        TransportError: the connection failed (run again to resume).
    """
    from ..protocol import Connection

    conn = Connection("sender", source=peer)
    io = MessageIO(ch, conn)
    try:
        return _Sender(source, io, store, **options).run()
    except PeerRefused as exc:
        return ReplicateResult("refused", message=str(exc))


def parse_uuid(text: str) -> UUID:
    """A UUID from text (BtrdeltaError if it is not one)."""
    try:
        return UUID(text)
    except ValueError as exc:
        raise BtrdeltaError(f"not a UUID: {text!r}") from exc
