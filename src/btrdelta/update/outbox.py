"""The messages a replication sender makes during the stream, and their writing
(:class:`Outbox`).

The sender's thread makes the stream (reads, digests, encodes) and hands each DATA message
(:meth:`Outbox.data`, as buffers to write in order: nothing joined) and CHECKPOINT
(:meth:`Outbox.checkpoint`) to the outbox. On a channel that can be read and written from
two threads at once (``channel.concurrent``: pipes, plain sockets) and on TLS too (the
writing thread is then the only one using the connection until :meth:`Outbox.finish`), a
writing thread writes them while the sender's thread already makes what follows (at most
``ahead`` bytes made and not written). Without the thread (``threaded=False``) each call
writes in the caller's thread.

How much is unacknowledged on the wire: without a ``window``, a CHECKPOINT's ACK is awaited
right after it, before the next segment's first byte (one segment unacknowledged). With a
``window`` (bytes), the next segment's bytes go out while the receiver still applies the
last one: a DATA message is written only while the data bytes written after the last
acknowledged CHECKPOINT stay within the window (an ACK is read otherwise; with nothing
unacknowledged a message is always written). With segments of half the window, the
receiver holds the next segment when it acknowledges one (no pause of its applier at each
segment's end) and a cut still costs at most the window again.

Owns the writing order, the wait for ACKs, the rate limit and progress reports; not the
stream's segmentation (``update.replicate``'s) or the messages' bytes (``protocol``'s).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from .._pool import Started
from ..errors import ProtocolError
from ..protocol import Ack, Checkpoint
from .channels import MessageIO, PeerClosed, PeerRefused

__all__ = ["Outbox"]


class Outbox:
    """DATA and CHECKPOINT messages written in order (see the module docstring).

    Args:
        io: the connection (after the ACCEPT).
        threaded: write from a thread of its own.
        ahead: bytes made and not written yet the sender's thread may be ahead by.
        rate: bytes per second at most (None: no limit).
        progress: called with the stream offset of each acknowledged CHECKPOINT (and 0).
        window: data bytes written and not acknowledged at most (None: each CHECKPOINT's
            ACK awaited right after it).
    """

    def __init__(self, io: MessageIO, *, threaded: bool, ahead: int,
                 rate: float | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 window: int | None = None) -> None:
        self.io, self.ahead, self.rate, self.progress = io, ahead, rate, progress
        self.window = window
        #: data bytes written
        self.sent = 0
        #: CHECKPOINTs written and not acknowledged (with a window), with ``sent`` at each
        self._unacked: deque[tuple[Checkpoint, int]] = deque()
        #: ``sent`` at the last acknowledged CHECKPOINT
        self._acked_at = 0
        self._started = time.monotonic()
        self._items: deque[Any] = deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._done = False
        self._thread: Started | None = None
        if threaded:  # (not waiting for it to run: the sender goes on making the stream)
            self._thread = Started(self._run, "outbox-send")

    # -- the sender's thread --------------------------------------------------------------

    def data(self, offset: int, pieces: Sequence[Any]) -> None:
        """Send ``Data(offset, b"".join(pieces))`` (the pieces must not change later)."""
        try:
            frame = self.io.conn.send_data(offset, pieces)
        except ProtocolError:
            self._raise_theirs()
            raise
        size = sum(len(p) for p in pieces)
        if self._thread is None:
            self._write_data(frame, size)
            return
        self._put(("data", frame, size), size)

    def checkpoint(self, cp: Checkpoint) -> None:
        """Send ``cp``; its ACK is awaited before the next segment's bytes are written
        (with a ``window``: before data would leave more than the window unacknowledged)."""
        try:
            frame = self.io.conn.send(cp)
        except ProtocolError:
            self._raise_theirs()
            raise
        if self._thread is None:
            self._write_checkpoint(frame, cp)
            return
        self._put(("checkpoint", frame, cp), len(frame))

    def _raise_theirs(self) -> None:
        """Raise what the writing thread raised where the connection took no more of our
        messages because that thread read the peer's end of the conversation (a REFUSE
        among the ACKs: PeerRefused, not "DATA is not allowed now"). The thread sets its
        error just after the connection saw the message: waited for, briefly."""
        if self._thread is None or self.io.conn.phase != "done":
            return
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None, timeout=10)
            if self._error is not None:
                raise self._error

    def finish(self) -> None:
        """Until everything is written and every CHECKPOINT acknowledged (the caller's
        thread may use the connection again after it).

        Raises:
            whatever writing or an ACK raised (TransportError, ProtocolError, PeerRefused).
        """
        if self._thread is None:
            self._drain()
            return
        self._put(None, 0)
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop writing (the conversation failed in the sender's thread)."""
        with self._cond:
            self._done = True
            self._items.clear()
            self._cond.notify_all()

    def _put(self, item: Any, size: int) -> None:
        cond = self._cond
        with cond:
            while self._queued > self.ahead and self._error is None:
                cond.wait()
            if self._error is not None:
                raise self._error
            self._items.append(item)
            self._queued += size
            cond.notify_all()

    # -- writing (the writing thread, or the sender's) -----------------------------------

    def _pace(self, size: int) -> None:
        if self.rate:
            ahead = (self.sent + size) / self.rate - (time.monotonic() - self._started)
            if ahead > 0:
                time.sleep(ahead)

    def _write_data(self, frame: Sequence[Any], size: int) -> None:
        if self.window is not None:
            while self._unacked and self.sent + size - self._acked_at > self.window:
                self._ack_oldest()
        self._pace(size)
        self._write(self.io.write_frame, frame)
        self.sent += size

    def _write_checkpoint(self, frame: bytes, cp: Checkpoint) -> None:
        self._write(self.io.ch.write, frame)
        if self.window is None:
            self._acked(cp)
        else:
            self._unacked.append((cp, self.sent))

    def _write(self, write: Callable[[Any], None], frame: Any) -> None:
        """``write(frame)``; a peer that closed the connection after a REFUSE (a receiver
        that failed: a full disk) is :class:`PeerRefused` with its reason, not the broken
        pipe (which, under load, a write found before the ACKs' reading found the REFUSE:
        6 of 24 runs of test_replicate_fault's full disk, three at once on one CPU)."""
        try:
            write(frame)
        except PeerClosed:
            refusal = self.io.refusal()
            if refusal is None:
                raise
            raise PeerRefused(refusal) from None

    def _ack_oldest(self) -> None:
        cp, sent = self._unacked.popleft()
        self._acked(cp)
        self._acked_at = sent

    def _drain(self) -> None:
        """Read the ACKs still due (with a window)."""
        while self._unacked:
            self._ack_oldest()

    def _acked(self, cp: Checkpoint) -> None:
        ack: Ack = self.io.expect(Ack)
        if ack.index != cp.index:
            raise ProtocolError(f"ACK of segment {ack.index}, expected {cp.index}")
        if self.progress is not None:
            self.progress(cp.offset, 0)

    def _next(self) -> Any:
        cond = self._cond
        with cond:
            while not self._items and not self._done:
                cond.wait()
            if self._done:
                return None
            item = self._items.popleft()
            return item

    def _run(self) -> None:
        try:
            while True:
                item = self._next()
                if item is None:
                    if not self._done:  # finish(), not abort()
                        self._drain()
                    return
                kind, frame, extra = item
                if kind == "data":
                    self._write_data(frame, extra)
                    size = extra
                else:
                    size = len(frame)
                    self._write_checkpoint(frame, extra)
                with self._cond:
                    self._queued -= size
                    self._cond.notify_all()
        except BaseException as exc:  # raised again in the sender's thread
            with self._cond:
                self._error = exc
                self._cond.notify_all()
