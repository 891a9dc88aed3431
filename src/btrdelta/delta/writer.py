"""Writing delta streams: framing, and the stream-wide zstd carrier for btrfs commands.

:class:`DeltaWriter` takes a ``write`` callable. Original btrfs commands given to
:meth:`DeltaWriter.command` are collected and emitted as ``ZCMDS`` records: each one is the
next piece of a single zstd frame that runs over the whole delta stream (long window,
long-distance matching), flushed at a block boundary so that every record decompresses on
its own to whole commands while still referring back to everything before it. With
``level=0`` commands are written as they are (uncompressed passthrough).

The patch metadata rides in the same frame: PWRITE, PENC and PATCH records whose patch
bytes fit in :data:`INNER_PATCH_MAX` (as CPATCH when they can) are framed with a zero CRC
and carried like btrfs commands, so their paths and sizes compress against the btrfs
commands around them; each ZCMDS record holds the CRC32C of what it inflates to. Carried
btrfs commands have their CRC field zeroed too (the expander recomputes it: 4
incompressible bytes saved per command), and repeated paths, orphan names, times and names
are folded (:mod:`.carrier`). Larger patches stay outside the carrier (PATCH + PDATA), as
patches are already compressed.

With ``background=True`` the compression of the carrier and every write run on one thread
of their own, in order, while the caller goes on folding commands (``delta make``: the
reader and the diff workers keep the other cores busy); :meth:`DeltaWriter.close` waits for
them and raises what they raised. The bytes written are the same either way. The ``xz``
carrier's pieces are compressed by LZMA2 encoders on ``workers`` threads of their own, a
block of pieces each (:mod:`.lanes`); the output thread writes their records in order.
"""

from __future__ import annotations

import os
import queue
import struct
import threading
from collections.abc import Callable
from typing import Any

import zstandard

from ..fs.sandbox import list_dir
from ..stream.constants import Cmd
from ..stream.crc import crc32c
from . import bcj
from .carrier import CarrierState, fold
from .encoding import can_compact, encode_item
from .format import (
    CARRIER_LZMA2,
    CARRIER_LZMA2_X86,
    CARRIER_ZSTD,
    DELTA_VERSION_WRITTEN,
    BtrfsCommand,
    DeltaEnd,
    DeltaItem,
    Patch,
    PatchData,
    PEncoded,
    PWrite,
    ZCommands,
    encode_delta_header,
)
from .options import DEFAULT_LEVEL

__all__ = ["DEFAULT_LEVEL", "DEFAULT_WINDOW_LOG", "INNER_PATCH_MAX", "DeltaWriter"]

_U16 = struct.Struct("<H")

#: largest patch carried inside the zstd carrier (bigger ones: PATCH + PDATA outside)
INNER_PATCH_MAX = 64 << 10

#: zstd window of the carrier (``--long=23``: 8 MiB, with long-distance matching; the
#: reader accepts up to 2**31)
DEFAULT_WINDOW_LOG = 23
#: hash and chain tables of the carrier (2**20 entries: 8 MiB each; 2**25 / 2**22 took 50 MB
#: more peak memory for 0.02% of size on the Debian upgrade pair)
CARRIER_TABLE_LOG = 20
#: raw command bytes gathered before a ZCMDS record is cut (with zstd worker threads: a
#: flush waits for every job, so pieces are larger to keep the threads busy)
ZCMDS_TARGET = 1 << 20
ZCMDS_TARGET_THREADED = 8 << 20
#: dictionary of the ``xz`` carrier (LZMA2 after the x86 converter, format 6), with which
#: each block's encoder (:data:`XZ_BLOCK`) is primed: 48 MiB. The encoder takes ~10x
#: that, the decoder that much. On the
#: Debian install pair (51 MB of stream) one encoder with 32 MiB cost 1.0% more than with
#: 64 MiB (raw ``xz --x86`` of the stream: 32 MiB 13,289,555 B, 48 MiB 13,152,173 B,
#: 64 MiB 13,151,650 B)
XZ_DICT = 48 << 20
#: ``xz`` carrier: LZMA2 ``-9`` without ``-e`` (install pair carrier: 12,987,120 B against
#: 12,985,281, 24.2 against 28.8 CPU s)
XZ_EXTREME = False
#: ``xz`` carrier: carried bytes compressed by one encoder, blocks on ``workers`` threads
#: (:mod:`.lanes`), each primed with the :data:`XZ_DICT` bytes before it: 2x the
#: dictionary, so the priming (~0.75x the CPU of compressing as much) adds at most ~37%
#: to a block's CPU. The install pair's 45.7 MiB carrier is one block: with 24 MiB blocks
#: (two) its carrier alone took 43.7 CPU s and 886 MiB instead of 30.1 s and 678 MiB, for
#: 0.01% less (load 4-7; docs/formats/delta-stream.md 7.9)
XZ_BLOCK = 96 << 20
#: most ``xz`` encoders running at once, whatever ``-j`` (each takes ~500 MB)
XZ_WORKERS_MAX = 4


#: ``--carrier auto``: carried file data (WRITE commands, bytes) from which the xz carrier
#: is chosen: where most of an update is new files, LZMA2 with a 64 MiB dictionary and the
#: x86 converter is 11% smaller than the zstd carrier (Debian install pair, 12.99 against
#: 14.57 MB); where the carrier holds metadata and small patches, zstd is within 0.5%
#: (upgrade, scipy; 0.7% smaller on the rebuilt release) and expands faster, and make
#: needs far less memory. Carried ENCODED_WRITEs do not count: their data is compressed
#: already (a ``--compressed-data`` stream), xz gains ~1% on it and costs the device
#: LZMA's inflation of all of it (install pair: 18.82 against 19.08 MB, receive 1.6-1.7
#: against 0.5-0.6 s of CPU)
AUTO_XZ_FROM = 8 << 20
#: ``auto``: output held while the choice is open (then zstd: a carrier of metadata)
AUTO_HOLD_MAX = 32 << 20
_WRITE = int(Cmd.WRITE)
#: a WRITE command of at least this many bytes whose data zstd's fastest level does not
#: shrink below :data:`RAW_RATIO` of it (random bytes, media, archives, encrypted data)
#: goes out as it is, a top-level btrfs command beside the carrier (every format reads
#: one there; the expansion passes it on unchanged), and does not count for ``auto``'s
#: choice of xz: LZMA2 ``-9`` and zstd ``-19`` spent 0.5 s of CPU per MiB of such data for
#: nothing (a 32 MiB file of random bytes in a ``device backup``: 16.5 s; session 30)
RAW_WRITE_MIN = 16 << 10
RAW_RATIO = 0.97


#: output tasks (a ZCMDS record to compress, records to write) waiting for the background
#: thread: with ZCMDS_TARGET, ~4 MiB of commands held at most
_BACKGROUND_DEPTH = 4


class _Background:
    """One thread running output tasks in the order they were given; the first exception a
    task raises is re-raised to the caller (later tasks are dropped)."""

    def __init__(self, depth: int = _BACKGROUND_DEPTH) -> None:
        self._tasks: queue.Queue[Callable[[], object] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="btrdelta-carrier", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            if self._error is None:
                try:
                    task()
                except BaseException as exc:  # re-raised in the caller's thread
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, task: Callable[[], object]) -> None:
        self._raise()
        self._tasks.put(task)

    def close(self) -> None:
        """Wait for every task; raise what one of them raised."""
        if self._thread.is_alive():
            self._tasks.put(None)
            self._thread.join()
        self._raise()


class DeltaWriter:
    """Serialize a delta stream to ``write``.

    Args:
        write: called with each piece (``bytes`` or ``memoryview``) in order.
        level: zstd level for carried btrfs commands; 0 writes them uncompressed.
        window_log: zstd window log of the carrier frame.
        threads: zstd worker threads for the carrier (0: compress in the caller's thread).
        carrier: ``zstd``, ``xz`` (raw LZMA2 after the x86 converter) or ``auto`` (xz once
            :data:`AUTO_XZ_FROM` bytes of uncompressed file data, WRITEs, are carried, else
            zstd; output is held until then, at most :data:`AUTO_HOLD_MAX`). Format 8 is
            written.
        background: compress and write on a thread of its own (call :meth:`close`).
        workers: LZMA2 encoders running at once (the xz carrier, :mod:`.lanes`: the bytes
            are the same for any number; at most :data:`XZ_WORKERS_MAX`).
        old_root: the old snapshot, whose directory listings UNLINKs may refer to.
    """

    def __init__(
        self,
        write: Callable[[Any], object],
        *,
        level: int = DEFAULT_LEVEL,
        window_log: int = DEFAULT_WINDOW_LOG,
        threads: int = 0,
        old_root: str | os.PathLike[str] | None = None,
        carrier: str = "zstd",
        background: bool = False,
        workers: int = 1,
    ) -> None:
        self._write = write
        #: what tells incompressible WRITEs (:data:`RAW_RATIO`): one a writer, a zstd
        #: context is not to be used by two threads at once (one of the module for every
        #: writer: deltas made at once in threads of one process crashed it, SIGSEGV)
        self._probe = zstandard.ZstdCompressor(level=1)
        workers = self._workers = max(1, min(workers, XZ_WORKERS_MAX))
        # with LZMA2 workers, the output thread waits for one block's pieces while the
        # next blocks' are being compressed: room for them
        self._bg = _Background(
            _BACKGROUND_DEPTH + (workers - 1) * (XZ_BLOCK // ZCMDS_TARGET)
            if carrier != "zstd" else _BACKGROUND_DEPTH) if background else None
        self.level = level
        #: carried bytes gathered for the next ZCMDS record, copied out of the commands: a
        #: list of their pieces kept every command's buffer alive, ~450 bytes of objects a
        #: command (the Debian upgrade's 2 MB held by ``auto`` until the end took 20 MiB)
        self._pending = bytearray()
        self._target = ZCMDS_TARGET_THREADED if threads and carrier == "zstd" else ZCMDS_TARGET
        self._pending_len = 0
        self._cobj: Any = None
        self._zstd_params = (window_log, threads)
        #: the previous path and times, for folding carried commands; names of the old
        #: snapshot's directories
        self._state = CarrierState()
        if old_root is not None:
            root = old_root
            self._state.lister = lambda path: list_dir(root, path)
        #: formats 5+ name the carrier's codec in every ZCMDS (format 4: zstd, unnamed)
        self._codec = (CARRIER_ZSTD, 0)
        #: bytes written so far
        self.bytes_written = 0
        #: bytes of btrfs commands carried (uncompressed size)
        self.raw_bytes = 0
        #: uncompressed file data (WRITE commands) carried
        self.carried_data = 0
        #: carrier bytes before the next piece (the x86 converter's base)
        self._carried = 0
        #: the carrier's codec (``auto`` until chosen, ``none`` without a carrier)
        self.carrier = carrier if level else "none"
        #: ``auto``, undecided: what would have been written, in order: ZCMDS pieces not
        #: yet compressed (their records, length) and records (their pieces, -1)
        self._held: list[tuple[list[Any], int]] | None = None
        self._held_bytes = 0
        if not level:
            self._emit([encode_delta_header(DELTA_VERSION_WRITTEN)])
        elif carrier == "auto":
            self._held = []
        else:
            self._start(carrier)

    def _start(self, carrier: str) -> None:
        """Set up the carrier's compressor and write the header (format 9)."""
        self.carrier = carrier
        if carrier == "xz":
            from .lanes import Lanes

            self._codec = (CARRIER_LZMA2_X86, XZ_DICT)
            self._cobj = Lanes(XZ_DICT, preset=min(self.level, 9), extreme=XZ_EXTREME,
                               workers=self._workers, block=XZ_BLOCK)
        else:
            window_log, threads = self._zstd_params
            params = zstandard.ZstdCompressionParameters.from_level(
                self.level, window_log=window_log, enable_ldm=True, threads=threads,
                chain_log=min(CARRIER_TABLE_LOG, window_log),
                hash_log=min(CARRIER_TABLE_LOG, window_log),
            )
            self._cobj = zstandard.ZstdCompressor(compression_params=params).compressobj()
        self._emit([encode_delta_header(DELTA_VERSION_WRITTEN)])

    def _decide(self, carrier: str) -> None:
        """``auto``: choose the carrier, then write what was held."""
        held, self._held = self._held, None
        assert held is not None
        self._start(carrier)
        for pieces, length in held:
            if length < 0:
                self._emit(pieces)
            else:
                self._cut(pieces, length)

    def close(self, failed: bool = False) -> None:
        """Wait for the background thread's writes (raising what they raised); ``failed``:
        the delta is abandoned, what ``auto`` held is dropped."""
        if self._held is not None and failed:
            self._held = None
        elif self._held is not None:
            self.flush()
            self._decide("zstd")
        try:
            if self._bg is not None:
                self._bg.close()
        finally:
            if self._codec[0] != CARRIER_ZSTD:
                self._cobj.close()

    def _emit(self, pieces: list[Any]) -> None:
        if self._held is not None:
            self._hold(pieces, -1, sum(len(p) for p in pieces))
        elif self._bg is not None:
            self._bg.submit(lambda: self._emit_now(pieces))
        else:
            self._emit_now(pieces)

    def _emit_now(self, pieces: list[Any]) -> None:
        write = self._write
        for piece in pieces:
            write(piece)
            self.bytes_written += len(piece)

    def command(self, raw: Any) -> None:
        """Carry one original btrfs command (its raw bytes, header and CRC included)."""
        self.raw_bytes += len(raw)
        if not self.level:
            self._emit([memoryview(raw)])
            return
        cmd = int(_U16.unpack_from(raw, 4)[0])
        if cmd == _WRITE:
            if len(raw) >= RAW_WRITE_MIN and \
                    len(self._probe.compress(raw)) >= RAW_RATIO * len(raw):
                self.flush()  # (the carried commands before it keep their place)
                self._emit([memoryview(raw)])
                return
            self.carried_data += len(raw)
            if self._held is not None and self.carried_data >= AUTO_XZ_FROM:
                self._decide("xz")  # the records gathered stay pending: the same cuts
        # the CRC field is zeroed (4 incompressible bytes; the expander recomputes it and
        # the carrier's own CRC32C covers the content), repeated paths, orphan names and
        # times are folded (:mod:`.carrier`)
        pending = self._pending
        for piece in fold(cmd, memoryview(raw), self._state):
            pending += piece
        self._pending_len = len(pending)
        if self._pending_len >= self._target:
            self.flush()
        elif self._held is not None and self._held_bytes + self._pending_len > AUTO_HOLD_MAX:
            self._decide("zstd")

    def flush(self) -> None:
        """Cut a ZCMDS record with the commands gathered so far."""
        if not self._pending:
            return
        pending, length = self._pending, self._pending_len
        self._pending = bytearray()
        self._pending_len = 0
        if self._held is not None:
            self._hold([pending], length, length)
        else:
            self._cut([pending], length)

    def _hold(self, pieces: list[Any], length: int, size: int) -> None:
        """``auto``, undecided: keep output for later; zstd once too much is held (a
        carrier of metadata, which zstd compresses about as well)."""
        assert self._held is not None
        self._held.append((pieces, length))
        self._held_bytes += size
        if self._held_bytes + self._pending_len > AUTO_HOLD_MAX:
            self._decide("zstd")

    def _cut(self, pending: list[Any], length: int) -> None:
        """Compress and write one ZCMDS record of ``pending`` (``length`` bytes)."""
        if self._codec[0] != CARRIER_ZSTD:
            task = self._lzma2(pending, length)
        else:
            def task() -> list[Any]:
                return self._compress(pending, length)
        if self._bg is not None:
            self._bg.submit(lambda: self._emit_now(task()))
        else:
            self._emit_now(task())

    def _compress(self, pending: list[Any], length: int) -> list[Any]:
        """The ZCMDS record of the carried pieces ``pending`` (``length`` bytes), zstd."""
        cobj = self._cobj
        raw = pending[0] if len(pending) == 1 else b"".join(pending)
        crc = crc32c(raw, 0)
        zdata = cobj.compress(raw) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        return encode_item(ZCommands(length, memoryview(zdata), crc, *self._codec))

    def _lzma2(self, pending: list[Any], length: int) -> Callable[[], list[Any]]:
        """LZMA2: the piece goes to the encoders' workers (:mod:`.lanes`) at once; the
        task returned waits for it and gives its ZCMDS record."""
        raw: Any = b"".join(pending)
        crc = crc32c(raw, 0)
        codec = self._codec
        # pieces with machine code go through the x86 converter (codec 3), others not
        # (codec 2): both continue the same LZMA2 stream
        conv = bytearray(raw)
        if bcj.worth_it(raw, bcj.encode(conv, self._carried)):
            raw = conv
        else:
            codec = (CARRIER_LZMA2, codec[1])
        self._carried += length
        future = self._cobj.submit(raw)

        def task() -> list[Any]:
            return encode_item(ZCommands(length, memoryview(future.result()), crc, *codec))
        return task

    def item(self, item: DeltaItem) -> None:
        """Write a delta record (flushes carried commands first, keeping the order)."""
        if isinstance(item, BtrfsCommand):
            self.command(item.raw)
            return
        omit: dict[str, bool] = {}
        if isinstance(item, Patch) and self.level:
            omit = {"omit_path": item.path == self._state.last_path,
                    "omit_base": item.base_path == item.path}
            self._state.last_path = item.path
        if self.level and (
            isinstance(item, (PWrite, PEncoded))
            or (isinstance(item, Patch) and (
                (item.data is not None and len(item.data) <= INNER_PATCH_MAX)
                or item.patch_len == 0
            ))
        ):
            compact = isinstance(item, Patch) and can_compact(item)
            pieces = encode_item(item, inner=True, compact=compact, **omit)
            for piece in pieces:
                self._pending += piece
            self._pending_len = len(self._pending)
            self.raw_bytes += sum(len(p) for p in pieces)
            if self._pending_len >= self._target:
                self.flush()
            return
        if isinstance(item, Patch) and item.data is not None:
            # too big for the carrier: the patch bytes go in PDATA records outside it
            self.flush()
            data = item.data
            item.data = None
            self._emit(encode_item(item, **omit))
            for i in range(0, len(data), 1 << 20):
                self._emit(encode_item(PatchData(data[i : i + (1 << 20)])))
            return
        self.flush()
        if type(item) is DeltaEnd and self._held is not None:
            self._decide("zstd")
        self._emit(encode_item(item, **omit))
