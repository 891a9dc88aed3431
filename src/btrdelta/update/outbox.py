"""The messages a replication sender makes during the stream, and their writing
(:class:`Outbox`).

The sender's thread makes the stream (reads, digests, encodes) and hands each DATA message
(:meth:`Outbox.data`, as buffers to write in order: nothing joined) and CHECKPOINT
(:meth:`Outbox.checkpoint`) to the outbox. On a channel that can be read and written from
two threads at once (``channel.concurrent``: pipes, plain sockets) and on TLS too (the
writing thread is then the only one using the connection until :meth:`Outbox.finish`), a
writing thread writes them and, after each CHECKPOINT, waits for its ACK before it writes
the next segment's bytes: at most one segment is unacknowledged on the wire, as before,
while the sender's thread already makes the next one (at most ``ahead`` bytes made and not
written). Without the thread (``threaded=False``) each call writes, and a CHECKPOINT waits
for its ACK, in the caller's thread.

Owns the writing order, the wait for ACKs, the rate limit and progress reports; not the
stream's segmentation (``update.replicate``'s) or the messages' bytes (``protocol``'s).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ProtocolError
from ..protocol import Ack, Checkpoint
from .channels import MessageIO

__all__ = ["Outbox"]


class Outbox:
    """DATA and CHECKPOINT messages written in order (see the module docstring).

    Args:
        io: the connection (after the ACCEPT).
        threaded: write from a thread of its own.
        ahead: bytes made and not written yet the sender's thread may be ahead by.
        rate: bytes per second at most (None: no limit).
        progress: called with the stream offset of each acknowledged CHECKPOINT (and 0).
    """

    def __init__(self, io: MessageIO, *, threaded: bool, ahead: int,
                 rate: float | None = None,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.io, self.ahead, self.rate, self.progress = io, ahead, rate, progress
        #: data bytes written
        self.sent = 0
        self._started = time.monotonic()
        self._items: deque[Any] = deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._done = False
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="replicate-outbox",
                                            daemon=True)
            self._thread.start()

    # -- the sender's thread --------------------------------------------------------------

    def data(self, offset: int, pieces: Sequence[Any]) -> None:
        """Send ``Data(offset, b"".join(pieces))`` (the pieces must not change later)."""
        frame = self.io.conn.send_data(offset, pieces)
        size = sum(len(p) for p in pieces)
        if self._thread is None:
            self._pace(size)
            self.io.write_frame(frame)
            self.sent += size
            return
        self._put(("data", frame, size), size)

    def checkpoint(self, cp: Checkpoint) -> None:
        """Send ``cp``; its ACK is awaited before the next segment's bytes are written."""
        frame = self.io.conn.send(cp)
        if self._thread is None:
            self.io.ch.write(frame)
            self._acked(cp)
            return
        self._put(("checkpoint", frame, cp), len(frame))

    def finish(self) -> None:
        """Until everything is written and every CHECKPOINT acknowledged (the caller's
        thread may use the connection again after it).

        Raises:
            whatever writing or an ACK raised (TransportError, ProtocolError, PeerRefused).
        """
        if self._thread is None:
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
        io = self.io
        try:
            while True:
                item = self._next()
                if item is None:
                    return
                kind, frame, extra = item
                if kind == "data":
                    self._pace(extra)
                    io.write_frame(frame)
                    self.sent += extra
                    size = extra
                else:
                    io.ch.write(frame)
                    size = len(frame)
                    self._acked(extra)
                with self._cond:
                    self._queued -= size
                    self._cond.notify_all()
        except BaseException as exc:  # raised again in the sender's thread
            with self._cond:
                self._error = exc
                self._cond.notify_all()
