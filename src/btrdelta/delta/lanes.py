"""The ``xz`` carrier compressed on several threads: blocks of pieces, each block's encoder
primed with the carrier bytes before it.

The ``xz`` carrier is one raw LZMA2 stream across the delta (format 5 and later,
``docs/formats/delta-stream.md``), cut into ZCMDS pieces at sync flushes. One encoder
compresses ~2 MB/s a core at ``-9``, so a delta of 50 MB of new files took half a minute.
Here consecutive pieces form *blocks* of ``block`` carrier bytes; each block has its own
encoder, run on a worker thread (liblzma releases the GIL), primed with the
``dict_size`` carrier bytes before it as a *preset dictionary*. A primed LZMA2
encoder's first chunk resets the coder state but not the dictionary, so its chunks go on
with the one stream: the reader's decoder, whose dictionary holds those bytes, decodes
them as it decodes one encoder's output, matches reaching back into earlier blocks.
Independent blocks (a dictionary reset each) were 2% larger on the Debian install pair
with two blocks, 4.7% with 8 MiB blocks; primed ones are within 0.01% of one encoder
(primed with only the 16 or 8 MiB before the second block: +1.1%, +1.35%). The price is
the priming and one encoder's memory (~500 MB at 48 MiB) per worker: a bt4 encoder indexes
each byte of its preset dictionary at ~0.75x the CPU of compressing it (Debian install
pair, two 24 MiB blocks primed with what came before: 16.1 and 27.6 CPU s; one encoder for
the whole 47.9 MB: 30.1-30.3 s; one thread each, load 4-7), so a block is twice the
dictionary (:data:`~.writer.XZ_BLOCK`: the priming adds at most ~37% to a block's CPU) and
only the last ``dict_size`` bytes of a block are kept to prime the next one.

The cut points depend only on the pieces, never on the number of workers: the bytes
written are the same for any ``-j``. Owns the blocks, the priming and the workers; not the
pieces' content or the x86 converter (:mod:`.writer`, :mod:`.bcj`).
"""

from __future__ import annotations

import queue
from collections import deque
from concurrent.futures import Future
from typing import Any

from .._futures import ThreadPoolExecutor
from .lzma2 import Lzma2Encoder

__all__ = ["Lanes"]

_Task = tuple[Any, "Future[bytes]"] | None


class _Block:
    """One encoder's pieces, fed in order to the worker that runs it."""

    __slots__ = ("preset", "tasks")

    def __init__(self, preset: bytearray | None) -> None:
        self.preset = preset
        self.tasks: queue.SimpleQueue[_Task] = queue.SimpleQueue()


class Lanes:
    """Compress carrier pieces with raw LZMA2, ``workers`` blocks at once.

    :meth:`submit` hands a piece (the bytes the decoder must produce, after any x86
    conversion) and returns the future of its compressed bytes (up to a sync flush);
    futures complete in any order across blocks, in order within one.
    """

    def __init__(self, dict_size: int, preset: int, extreme: bool, workers: int,
                 block: int) -> None:
        self.dict_size = dict_size
        self._preset = (preset, extreme)
        self._block_size = block
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers),
                                        thread_name_prefix="btrdelta-lzma2")
        #: the last carrier bytes (at least ``dict_size`` of them once there are): the
        #: next block's preset dictionary
        self._history: deque[Any] = deque()
        self._history_len = 0
        self._block: _Block | None = None
        self._block_len = 0

    def submit(self, data: Any) -> Future[bytes]:
        """Compress ``data`` (bytes-like, not modified afterwards) as the next piece."""
        if self._block is None or self._block_len >= self._block_size:
            self._open()
        assert self._block is not None
        future: Future[bytes] = Future()
        self._block.tasks.put((data, future))
        self._block_len += len(data)
        # only the block's last ``dict_size`` bytes can prime the next block: a piece that
        # ends earlier in it is not kept (blocks larger than the dictionary: a carrier
        # of one block holds no history at all)
        if self._block_size - self._block_len < self.dict_size:
            self._history.append(data)
            self._history_len += len(data)
            while self._history_len - len(self._history[0]) >= self.dict_size:
                self._history_len -= len(self._history.popleft())
        return future

    def _open(self) -> None:
        """Close the current block and start the next, primed with the history."""
        self._end_block()
        preset = None
        if self._history_len:
            preset = bytearray().join(self._history)
            del preset[:-self.dict_size]  # in place: no second copy of the window
        if self._block_size >= self.dict_size:  # the next preset lies in this block
            self._history.clear()
            self._history_len = 0
        self._block = _Block(preset)
        self._block_len = 0
        self._pool.submit(self._run, self._block)

    def _end_block(self) -> None:
        if self._block is not None:
            self._block.tasks.put(None)
            self._block = None

    def _run(self, block: _Block) -> None:
        """A worker: one block's encoder over its pieces (errors go to their futures)."""
        error: BaseException | None = None
        enc: Lzma2Encoder | None = None
        try:
            preset, extreme = self._preset
            enc = Lzma2Encoder(self.dict_size, preset=preset, extreme=extreme,
                               preset_dict=block.preset)
        except BaseException as exc:  # handed to every piece of the block
            error = exc
        block.preset = None
        while (task := block.tasks.get()) is not None:
            data, future = task
            if error is None:
                try:
                    assert enc is not None
                    future.set_result(enc.compress(data) + enc.flush())
                    continue
                except BaseException as exc:  # the piece and the rest of the block
                    error = exc
            future.set_exception(error)
        if enc is not None:
            enc.close()

    def close(self) -> None:
        """Finish the last block and wait for the workers."""
        self._end_block()
        self._pool.shutdown(wait=True)
