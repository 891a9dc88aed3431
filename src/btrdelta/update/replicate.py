"""The sending side of replication (``btrdelta replicate SOURCE DEST``).

:func:`replicate` runs one conversation over a :class:`~.channels.Channel` (a local child,
ssh, TCP/TLS): HELLO, the receiver's HOLDINGS, a PLAN chosen by
:func:`btrdelta.protocol.plan.choose` from the sendshot store (or a typed REFUSE), then the
stream in segments: a producer thread runs :func:`btrdelta.send.sendshot.send_with_sendshots`
(the base is the chosen sendshot) and cuts its output into segments at record boundaries;
each segment goes out as DATA messages and a CHECKPOINT (its BLAKE3 digest and the chain of
digests), and the next one only after the receiver acknowledged it, so a cut connection
costs at most one segment again. COMMIT names the size, the chain and the new sendshot; after
COMMITTED the receiver's cursor moves to it and sendshots of this source that no receiver
needs are pruned.

Resumable: a writable btrfs source is read from a read-only snapshot kept (next to it, named
``.btrdelta-replicate-<session>``) until the receiver committed; the session, its snapshot,
base and plan are kept in the receiver's cursor (``inflight``). When the receiver reports a
partial transfer of that session, the same stream is made again from the same snapshot and
base, its segments up to the receiver's are checked against the receiver's chain digest
(``diverged`` if they differ) and not sent, and the stream goes on from there.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from uuid import UUID, uuid4

from .._value import value_class
from ..errors import BtrdeltaError, ProtocolError
from ..fs.btrfs import subvol_info, syncfs
from ..protocol import (
    Accept,
    Ack,
    Checkpoint,
    Commit,
    Committed,
    Hello,
    Holdings,
    Plan,
    Refuse,
)
from ..protocol.messages import MAX_DATA, segment_hasher, spoken
from ..protocol.plan import Known, choose
from ..send.live import drop_snapshot, frozen, keep_snapshot
from ..send.sendshot import send_with_sendshots
from ..send.store import SendshotStore, StoredSendshot
from ..stream.records import Record, Snapshot, Subvol
from .channels import Channel, MessageIO, PeerRefused
from .replica import chain_next

__all__ = ["DEFAULT_SEGMENT", "ReplicateResult", "replicate"]

DEFAULT_SEGMENT = 8 << 20
_ZERO_CHAIN = bytes(32).hex()
_SNAP_PREFIX = b".btrdelta-replicate-"


@value_class
class ReplicateResult:
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


#: pieces of the stream shorter than this are copied together; longer ones (file data) are
#: kept as they are until sent
_SMALL = 64 << 10


def _owned(piece: Any) -> Any:
    """``piece`` if nothing can change it later (bytes, or a view of bytes), else a copy."""
    if type(piece) is bytes or (type(piece) is memoryview and type(piece.obj) is bytes):
        return piece
    return bytes(piece)


class _Segments:
    """The producer's output cut into segments at record boundaries (a bounded queue).

    A segment is queued as ``("segment", pieces, size, digest)``: the stream's pieces (small
    ones gathered into one buffer, file data not copied) and the digest of their bytes
    (``segment_hasher`` of the protocol ``version``), made here in the producer's thread;
    then ``("done", result)`` or
    ``("error", exc)``.
    """

    def __init__(self, size: int, version: int) -> None:
        self.size, self.version = size, version
        self.q: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=2)
        self._pieces: list[Any] = []
        self._small = bytearray()
        self._n = 0
        self.header: Record | None = None
        self.header_ready = threading.Event()
        self.stop = False
        #: the sender's estimate of the file data it sends (known with the header)
        self.estimate = 0
        self._sender: Any = None

    def on_stream(self, sender: Any) -> None:
        self._sender = sender

    def write(self, piece: Any) -> None:
        if self.stop:
            raise _Stopped()
        n = len(piece)
        if n < _SMALL:
            self._small += piece
        else:
            if self._small:
                self._pieces.append(self._small)
                self._small = bytearray()
            self._pieces.append(_owned(piece))
        self._n += n

    def on_record(self, rec: Record) -> None:
        if self.header is None:
            self.header = rec
            self.estimate = getattr(self._sender, "estimate", 0)
            self.header_ready.set()
        if self._n >= self.size:
            self.flush()

    def flush(self) -> None:
        if self._small:
            self._pieces.append(self._small)
            self._small = bytearray()
        if self._pieces:
            h = segment_hasher(self.version)
            for piece in self._pieces:
                h.update(piece)
            self._put(("segment", self._pieces, self._n, h.hexdigest()))
            self._pieces, self._n = [], 0

    def _put(self, item: tuple[Any, ...]) -> None:
        while not self.stop:
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        raise _Stopped()

    def finish(self, result: Any) -> None:
        self.flush()
        self._put(("done", result))

    def fail(self, exc: BaseException) -> None:
        self.header_ready.set()
        while True:
            try:
                self.q.put(("error", exc), timeout=0.2)
                return
            except queue.Full:
                if self.stop:
                    return


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


class _Stopped(Exception):
    """The conversation ended: the producer stops."""


def _known(records: list[StoredSendshot]) -> list[Known]:
    return [Known(r.digest, r.head.stream_uuid, r.head.stream_ctransid) for r in records]


def _session_snapshot(source: bytes, session: str) -> bytes | None:
    return keep_snapshot(source, _SNAP_PREFIX + session[:16].encode())


class _Sender:
    """One conversation of the sending side (see :func:`replicate`)."""

    def __init__(self, source: str | os.PathLike[str], io: MessageIO, store: SendshotStore,
                 **options: Any) -> None:
        self.source = os.path.abspath(os.fsencode(source))
        self.io, self.store, self.o = io, store, options
        self.name = os.fsdecode(os.path.basename(self.source) or b"subvol")

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
        hello: Hello = io.expect(Hello)
        holdings: Holdings = io.expect(Holdings)
        self.rid = hello.ident
        cursor = self.store.cursors().get(self.rid, {})
        inflight = cursor.get("inflight") or None
        with frozen(self.source, snapshot=False) as fz:
            lineage, info = fz.lineage, fz.info
        records = self._mine(lineage)
        current = None
        if records and info is not None and records[-1].head.subvol_uuid == lineage and (
                self._unchanged_since(records[-1].head.generation)):
            current = records[-1].digest  # nothing written since its snapshot
        choice = choose(_known(records), holdings.held, name=self.name,
                        partial=holdings.partial,
                        inflight_session=inflight.get("session") if inflight else None,
                        current=current, allow_full=self.o.get("allow_full", False))
        if choice.kind == "refuse":
            io.send(Refuse(choice.code, choice.message))
            return ReplicateResult("refused", receiver=self.rid,
                                   message=f"{choice.code}: {choice.message}")
        if choice.kind == "resume":
            assert inflight is not None
            assert holdings.partial is not None
            return self._stream(inflight, holdings.partial.offset, holdings.partial.segments,
                                holdings.partial.chain)
        if inflight and inflight.get("snapshot"):
            drop_snapshot(os.fsencode(inflight["snapshot"]))  # an abandoned session
        session = uuid4().hex
        snap = _session_snapshot(self.source, session)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        taken = {h.name for h in holdings.held}
        name, n = f"{self.name}.{stamp}", 1
        while name in taken:
            n += 1
            name = f"{self.name}.{stamp}_{n}"
        flight = {"session": session, "snapshot": os.fsdecode(snap) if snap else None,
                  "base": choice.base.digest if choice.base else None, "name": name}
        self.store.set_cursor(self.rid, cursor.get("digest"), inflight=flight)
        return self._stream(flight, 0, 0, _ZERO_CHAIN)

    # -- the stream -------------------------------------------------------------------

    def _producer(self, flight: dict[str, Any], seg: _Segments) -> threading.Thread:
        def run() -> None:
            try:
                snap = flight.get("snapshot")
                result = send_with_sendshots(
                    seg.write, os.fsencode(snap) if snap else self.source, store=self.store,
                    from_sendshot=flight.get("base"), record=True, snapshot=False,
                    version=self.o.get("version", 2), compress=self.o.get("compress"),
                    name=os.fsencode(flight["name"]), on_record=seg.on_record,
                    on_stream=seg.on_stream, source_name=self.source)
                seg.finish(result)
            except _Stopped:
                pass
            except BaseException as exc:
                seg.fail(exc)

        t = threading.Thread(target=run, name="btrdelta-replicate-send", daemon=True)
        t.start()
        return t

    def _plan(self, flight: dict[str, Any], seg: _Segments, offset: int,
              segments: int) -> Plan:
        header = seg.header
        if not isinstance(header, Subvol | Snapshot):
            raise BtrdeltaError("the stream did not start with a subvolume")
        parent = header.clone_uuid if isinstance(header, Snapshot) else None
        kind = "resume" if offset else ("incremental" if parent else "full")
        return Plan(kind, flight["session"], flight["name"], header.uuid, header.ctransid,
                    parent, flight.get("base") or "", seg.estimate,
                    self.o.get("segment", DEFAULT_SEGMENT),
                    offset, segments)

    def _stream(self, flight: dict[str, Any], offset: int, segments: int,
                chain_at: str) -> ReplicateResult:
        seg = _Segments(self.o.get("segment", DEFAULT_SEGMENT), self.io.conn.version)
        producer = self._producer(flight, seg)
        try:
            seg.header_ready.wait()
            if seg.header is None:
                raise seg.q.get()[1]
            plan = self._plan(flight, seg, offset, segments)
            io = self.io
            io.send(plan)
            io.expect(Accept)
            return self._segments(flight, plan, seg, chain_at)
        finally:
            seg.stop = True
            producer.join()

    def _segments(self, flight: dict[str, Any], plan: Plan, seg: _Segments,
                  chain_at: str) -> ReplicateResult:
        io = self.io
        chain, offset, index, sent = _ZERO_CHAIN, 0, 0, 0
        rate = self.o.get("rate_limit")
        progress: Callable[[int, int], None] | None = self.o.get("on_progress")
        started = time.monotonic()
        while True:
            item = seg.q.get()
            if item[0] != "segment":
                if item[0] == "error":
                    raise item[1]
                result = item[1]
                break
            _what, pieces, size, digest = item
            chain = chain_next(chain, digest)
            end = offset + size
            if index < plan.segments:  # the receiver has it: check, do not send
                offset, index = end, index + 1
                if index == plan.segments and chain != chain_at:
                    io.send(Refuse("diverged", "the stream made again differs from the one "
                                               "the receiver holds a part of"))
                    self._forget(flight)
                    return ReplicateResult("diverged", "resume", flight["name"], self.rid,
                                           message="the regenerated stream differs")
                continue
            at = offset
            for group in _messages(pieces, MAX_DATA):
                io.send_data(at, group)
                n = sum(len(v) for v in group)
                at += n
                sent += n
                if rate:
                    ahead = sent / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
            io.send(Checkpoint(index, end, digest, chain))
            ack: Ack = io.expect(Ack)
            if ack.index != index:
                raise ProtocolError(f"ACK of segment {ack.index}, expected {index}")
            offset, index = end, index + 1
            if progress is not None:
                progress(offset, 0)
        recorded = result.recorded.digest if result.recorded is not None else ""
        io.send(Commit(offset, chain, recorded))
        done: Committed = io.expect(Committed)
        self.store.set_cursor(self.rid, recorded, name=done.name, uuid=str(done.uuid))
        if flight.get("snapshot"):
            drop_snapshot(os.fsencode(flight["snapshot"]))
        pruned = 0
        if self.o.get("prune", True):
            lineage = result.recorded.head.subvol_uuid if result.recorded else None
            pruned = len(self.store.prune(keep=1, only=lambda s: s.head.source == self.source
                                          or (lineage is not None
                                              and s.head.subvol_uuid == lineage)))
        return ReplicateResult("committed", plan.kind, done.name, self.rid, plan.base or None,
                               recorded, sent, plan.offset, offset, pruned=pruned,
                               estimate=plan.estimate)

    def _forget(self, flight: dict[str, Any]) -> None:
        cursor = self.store.cursors().get(self.rid, {})
        self.store.set_cursor(self.rid, cursor.get("digest"))
        if flight.get("snapshot"):
            drop_snapshot(os.fsencode(flight["snapshot"]))


def replicate(source: str | os.PathLike[str], ch: Channel, *, store: SendshotStore,
              peer: str = "receiver", **options: Any) -> ReplicateResult:
    """Replicate ``source`` to the receiver at the other end of ``ch``.

    Options: ``segment`` (bytes per checkpoint, default 8 MiB), ``rate_limit`` (bytes/s),
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
