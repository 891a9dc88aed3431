"""The stream bytes a replication receiver reads from its connection (:class:`Inbox`).

The receive engine takes the stream's bytes from an inbox (:meth:`Inbox.take`) as it needs
them; the inbox reads DATA, CHECKPOINT and COMMIT messages, checks each segment's digest and
the chain of digests against its CHECKPOINT, and hands a verified CHECKPOINT to the
``acknowledge`` callback once every byte before it was taken (so every record before it is
applied). On a channel that can be read and written from two threads at once (pipes, plain
sockets: ``channel.concurrent``), a reading thread reads and verifies the messages ahead of
the engine (at most two segments and 2 MiB ahead: the sender has at most one segment
unacknowledged), so the sender's writes do not wait for the engine's system calls; the
engine applies with the GIL released (``_fastapply``) meanwhile. Elsewhere (TLS, whose
connection one thread at a time may use) the engine's thread reads the messages itself.

Owns reading and verifying the stream's messages for :mod:`.replica`; not the records (the
receive engine's), the partial transfer's files or the ACK (the ``acknowledge`` callback).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import blake3

from .._pool import Started
from ..errors import ProtocolError
from ..protocol import Checkpoint, Commit, Data, Plan, Refuse
from ..protocol.messages import segment_hasher
from .channels import MessageIO, PeerRefused

__all__ = ["Inbox", "chain_next"]


def chain_next(chain: str, digest: str) -> str:
    """The chain digest after a segment of ``digest`` (both hex)."""
    return blake3.blake3(bytes.fromhex(chain) + bytes.fromhex(digest)).hexdigest()


class _Verified:
    """A CHECKPOINT whose segment matched, and the chain digest after it."""

    __slots__ = ("chain", "cp")

    def __init__(self, cp: Checkpoint, chain: str) -> None:
        self.cp, self.chain = cp, chain


class Inbox:
    """The stream bytes of one conversation (see the module docstring).

    Args:
        io: the connection (after the ACCEPT).
        plan: the plan accepted.
        version: the protocol version (the segment digest's).
        at, segments, chain: where the stream starts (a resume: the partial transfer's).
        acknowledge: called with each verified CHECKPOINT once every byte before it is
            taken (the engine's thread).
        threaded: read ahead in a thread (the channel allows it).
    """

    def __init__(self, io: MessageIO, plan: Plan, version: int, at: int, segments: int,
                 chain: str, acknowledge: Callable[[Checkpoint], None], *,
                 threaded: bool = False) -> None:
        self.io, self.plan, self.version = io, plan, version
        self.acknowledge = acknowledge
        # the engine's side: taken, verified (the last CHECKPOINT taken), its chain
        self.chunks: deque[Any] = deque()  # read, not taken yet (bytes after END)
        self.consumed = self.verified = at
        self.segments, self.chain = segments, chain
        self.pending: Checkpoint | None = None  # verified, to acknowledge after END
        self.commit: Commit | None = None
        # the reading side: received, verified, its chain and the open segment's digest
        self._received = self._rverified = at
        self._rchain = chain
        self._seg = segment_hasher(version)
        #: stream bytes this conversation received
        self.added = 0
        self._limit = 2 * plan.segment + (1 << 20)
        # read ahead
        self._items: deque[Any] = deque()
        self._queued = 0
        self._ahead = 2 * plan.segment + (2 << 20)
        self._cond = threading.Condition()
        self._stopped = False
        self._threaded = threaded

    def start(self) -> None:
        """Start reading ahead (when threaded), once the ACCEPT is sent (the thread is not
        waited for: :class:`~btrdelta._pool.Started`)."""
        if self._threaded:
            Started(self._read_ahead, "read-ahead")

    # -- reading (the reading thread, or the engine's when not threaded) -----------------

    def _read(self) -> Any:
        """Read one message: DATA's bytes, a verified checkpoint, or the COMMIT."""
        msg = self.io.expect(Data, Checkpoint, Commit, Refuse)
        if isinstance(msg, Data):
            data = msg.data
            if self._received + len(data) - self._rverified > self._limit:
                raise ProtocolError(f"a segment longer than {self._limit} bytes")
            self._seg.update(data)
            self._received += len(data)
            self.added += len(data)
            return data
        if isinstance(msg, Checkpoint):
            return self._checkpoint(msg)
        if isinstance(msg, Refuse):
            raise PeerRefused(msg)
        if msg.size != self._rverified or msg.chain != self._rchain or \
                self._received != msg.size:
            raise ProtocolError("COMMIT does not match the stream received")
        return msg

    def _checkpoint(self, cp: Checkpoint) -> _Verified:
        digest = self._seg.hexdigest()
        if cp.offset != self._received or digest != cp.digest:
            raise ProtocolError(f"segment {cp.index} does not match its checkpoint "
                                f"(digest {digest[:16]}, announced {cp.digest[:16]})")
        chain = chain_next(self._rchain, digest)
        if chain != cp.chain:
            raise ProtocolError(f"segment {cp.index}: the chain of digests differs")
        self._seg = segment_hasher(self.version)
        self._rchain, self._rverified = chain, cp.offset
        return _Verified(cp, chain)

    def _read_ahead(self) -> None:
        """The reading thread: messages into ``_items`` until COMMIT or an error (kept
        last: every later :meth:`_pop` raises it)."""
        cond = self._cond
        try:
            while True:
                item = self._read()
                with cond:
                    while self._queued > self._ahead and not self._stopped:
                        cond.wait()
                    if self._stopped:
                        return
                    self._items.append(item)
                    if isinstance(item, Commit):
                        cond.notify_all()
                        return
                    if not isinstance(item, _Verified):
                        self._queued += len(item)
                    cond.notify_all()
        except BaseException as exc:  # handed to the engine's thread, raised there
            with cond:
                self._items.append(exc)
                cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        """End the stream with ``exc`` (another thread of the conversation failed: raised
        in the engine's thread where it takes bytes after those read before it)."""
        with self._cond:
            self._items.append(exc)
            self._cond.notify_all()

    def stop(self) -> None:
        """Stop reading ahead (the conversation is over)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    # -- taking (the engine's thread) ------------------------------------------------------

    def _pop(self) -> Any:
        """The next message read: bytes, a checkpoint (verified), or None (COMMIT)."""
        if not self._threaded:
            item = self._read()
        else:
            cond = self._cond
            with cond:
                while not self._items:
                    cond.wait()
                item = self._items[0]
                if isinstance(item, BaseException):
                    raise item
                self._items.popleft()
                if not isinstance(item, _Verified | Commit):
                    self._queued -= len(item)
                    cond.notify_all()
        if isinstance(item, _Verified):
            cp = item.cp
            self.chain, self.verified, self.segments = item.chain, cp.offset, cp.index + 1
            return cp
        if isinstance(item, Commit):
            self.commit = item
            return None
        return item

    def take(self) -> Any:
        """The next bytes of the stream (None after COMMIT); every record before them is
        applied.

        Raises:
            TransportError: the connection failed (the engine leaves its subvolume to a
                resume).
            ProtocolError: the sender lied or broke the protocol.
        """
        if self.pending is not None:
            raise ProtocolError("data after the stream's END")
        while not self.chunks and self.commit is None:
            got = self._pop()
            if isinstance(got, Checkpoint):
                self.acknowledge(got)
            elif got is not None:
                self.chunks.append(got)
        if not self.chunks:
            return None
        data = self.chunks.popleft()
        self.consumed += len(data)
        return data

    def wait_verified(self) -> None:
        """Until every byte taken is verified: END is applied only then (it gives the
        subvolume its final name); its CHECKPOINT is acknowledged after it (:meth:`rest`)."""
        while self.verified < self.consumed:
            got = self._pop()
            if isinstance(got, Checkpoint):
                self.pending = got
            elif got is None:
                raise ProtocolError("COMMIT before the last CHECKPOINT")
            else:
                self.chunks.append(got)

    def ack_end(self) -> None:
        """After END was applied: acknowledge its segment, unless bytes follow END (then
        :meth:`rest` says so)."""
        if not self.chunks and self.pending is not None:
            cp, self.pending = self.pending, None
            self.acknowledge(cp)

    def rest(self) -> bool:
        """After END was applied: acknowledge its segment (if :meth:`ack_end` did not);
        whether bytes follow END (the next message must be COMMIT)."""
        if self.chunks:
            return True
        self.ack_end()
        return self.commit is None and self._pop() is not None
