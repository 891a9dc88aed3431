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
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

import zstandard

from ..fs.sandbox import list_dir
from ..stream.crc import crc32c
from . import bcj
from .carrier import CarrierState, fold
from .encoding import can_compact, encode_item
from .format import (
    CARRIER_LZMA2,
    CARRIER_LZMA2_X86,
    DELTA_VERSION_X86,
    BtrfsCommand,
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
#: dictionary of the ``xz`` carrier (LZMA2 after the x86 converter, format 6): 64 MiB, as
#: ``xz -9`` (the encoder at -9e takes ~10x that, the decoder that much). On the Debian
#: install pair (51 MB of stream) 32 MiB cost 1.0% more (raw ``xz --x86`` of the stream:
#: 32 MiB 13,289,555 B, 48 MiB 13,152,173 B, 64 MiB 13,151,650 B)
XZ_DICT = 64 << 20


class DeltaWriter:
    """Serialize a delta stream to ``write``.

    Args:
        write: called with each piece (``bytes`` or ``memoryview``) in order.
        level: zstd level for carried btrfs commands; 0 writes them uncompressed.
        window_log: zstd window log of the carrier frame.
        threads: zstd worker threads for the carrier (0: compress in the caller's thread).
        carrier: ``zstd`` (format 4) or ``xz`` (raw LZMA2, format 5).
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
    ) -> None:
        self._write = write
        self.level = level
        self._pending: list[Any] = []
        self._target = ZCMDS_TARGET_THREADED if threads and carrier == "zstd" else ZCMDS_TARGET
        self._pending_len = 0
        self._cobj: Any = None
        #: the previous path and times, for folding carried commands; names of the old
        #: snapshot's directories
        self._state = CarrierState()
        if old_root is not None:
            root = old_root
            self._state.lister = lambda path: list_dir(root, path)
        #: format 5 names the carrier's codec in every ZCMDS (format 4: zstd, unnamed)
        self._codec = (0, 0)
        if level and carrier == "xz":
            from .lzma2 import Lzma2Encoder

            self._codec = (CARRIER_LZMA2_X86, XZ_DICT)
            self._cobj = Lzma2Encoder(XZ_DICT, preset=min(level, 9), extreme=level >= 9)
        elif level:
            params = zstandard.ZstdCompressionParameters.from_level(
                level, window_log=window_log, enable_ldm=True, threads=threads,
                chain_log=min(CARRIER_TABLE_LOG, window_log),
                hash_log=min(CARRIER_TABLE_LOG, window_log),
            )
            self._cobj = zstandard.ZstdCompressor(compression_params=params).compressobj()
        #: bytes written so far
        self.bytes_written = 0
        #: bytes of btrfs commands carried (uncompressed size)
        self.raw_bytes = 0
        #: carrier bytes before the next piece (the x86 converter's base)
        self._carried = 0
        self._emit([encode_delta_header(DELTA_VERSION_X86 if self._codec[0] else 4)])

    def _emit(self, pieces: list[Any]) -> None:
        write = self._write
        for piece in pieces:
            write(piece)
            self.bytes_written += len(piece)

    def command(self, raw: Any) -> None:
        """Carry one original btrfs command (its raw bytes, header and CRC included)."""
        self.raw_bytes += len(raw)
        if self._cobj is None:
            self._emit([memoryview(raw)])
            return
        # the CRC field is zeroed (4 incompressible bytes; the expander recomputes it and
        # the carrier's own CRC32C covers the content), repeated paths, orphan names and
        # times are folded (:mod:`.carrier`)
        pieces = fold(int(_U16.unpack_from(raw, 4)[0]), memoryview(raw), self._state)
        self._pending += pieces
        self._pending_len += sum(len(p) for p in pieces)
        if self._pending_len >= self._target:
            self.flush()

    def flush(self) -> None:
        """Cut a ZCMDS record with the commands gathered so far."""
        if not self._pending:
            return
        cobj = self._cobj
        raw = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        crc = crc32c(raw, 0)
        codec = self._codec
        if codec[0] == CARRIER_LZMA2_X86:
            # pieces with machine code go through the x86 converter (codec 3), others
            # not (codec 2): both continue the same LZMA2 stream
            conv = bytearray(raw)
            if bcj.worth_it(raw, bcj.encode(conv, self._carried)):
                raw = conv
            else:
                codec = (CARRIER_LZMA2, codec[1])
        self._carried += self._pending_len
        if codec[0]:
            zdata = cobj.compress(raw) + cobj.flush()
        else:
            zdata = cobj.compress(raw) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        item = ZCommands(self._pending_len, memoryview(zdata), crc, *codec)
        self._pending = []
        self._pending_len = 0
        self._emit(encode_item(item))

    def item(self, item: DeltaItem) -> None:
        """Write a delta record (flushes carried commands first, keeping the order)."""
        if isinstance(item, BtrfsCommand):
            self.command(item.raw)
            return
        omit: dict[str, bool] = {}
        if isinstance(item, Patch) and self._cobj is not None:
            omit = {"omit_path": item.path == self._state.last_path,
                    "omit_base": item.base_path == item.path}
            self._state.last_path = item.path
        if self._cobj is not None and (
            isinstance(item, (PWrite, PEncoded))
            or (isinstance(item, Patch) and (
                (item.data is not None and len(item.data) <= INNER_PATCH_MAX)
                or item.patch_len == 0
            ))
        ):
            compact = isinstance(item, Patch) and can_compact(item)
            pieces = encode_item(item, inner=True, compact=compact, **omit)
            for piece in pieces:
                self._pending.append(piece)
                self._pending_len += len(piece)
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
        self._emit(encode_item(item, **omit))
