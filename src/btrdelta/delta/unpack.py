"""The zstd carrier read back: ZCMDS pieces inflated, their records split and unfolded.

A delta stream's ZCMDS records are consecutive pieces of one zstd frame (:mod:`.writer`);
each inflates to whole carried records with a zero CRC field: btrfs commands in their
folded form (:mod:`.carrier`) and the delta records the carrier may hold (PATCH, PDATA,
PWRITE, PENC, CPATCH: ``stream.framing.RECORDS``). :meth:`CarrierReader.inflate` inflates
one piece, bounded (a hostile piece cannot inflate past what it declares by more than what
``_ZFEED`` compressed bytes give), and checks its CRC32C before any of it is used.
:meth:`CarrierReader.split` then yields the delta records, decoded, and the btrfs commands,
unfolded with their CRC put back: one by one, or (``grouped``, for the expansion) appended
to one group of bytes that the caller takes whole with :meth:`CarrierReader.take_group`.
There, the common forms are unfolded by the C module ``_unfold`` when it is live
(:mod:`btrdelta._native`); :func:`.carrier.unfold` does the rest and is the reference.

Errors are :class:`~btrdelta.errors.StreamFormatError` (a CRC mismatch:
:class:`~btrdelta.errors.ChecksumError`) without a location: the caller adds the index of
the delta record.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

from .. import TYPE_CHECKING, _native
from .._zstd import zstd
from ..errors import ChecksumError, StreamFormatError
from ..stream.constants import CMD_HEADER, CMD_HEADER_SIZE, MAX_PAYLOAD
from ..stream.crc import crc32c
from ..stream.framing import RECORDS, Place, legal, max_command
from . import bcj
from .carrier import CarrierState, unfold
from .encoding import decode_item
from .format import (
    BASES_VERSION,
    CARRIER_LZMA2_X86,
    CARRIER_ZSTD,
    DELTA_VERSION_NEWDIGEST,
    DELTA_VERSION_WRITTEN,
    INNER_RECORDS,
    NO_DIGEST,
    BtrfsCommand,
    DCmd,
    DeltaItem,
    HashAlgo,
    Patch,
    ZCommands,
    codec_refusal,
)

if TYPE_CHECKING:
    from typing import Any

__all__ = ["GROUP_COMMANDS", "GROUP_MAX", "MAX_ZCMDS_RAW", "CarrierReader"]

#: largest decompressed size one ZCMDS record may declare
MAX_ZCMDS_RAW = 64 << 20
#: the carrier window (zstd) or dictionary (LZMA2) always accepted (``delta make`` writes
#: 8 MiB / 32 MiB; a larger one is accepted up to the expansion's memory limit)
MIN_CARRIER_WINDOW = 32 << 20
#: carried commands gathered before :meth:`CarrierReader.split` hands them on (bytes, plus
#: at most one command): what unfolding may hold whatever the carrier declares
GROUP_MAX = 1 << 20
#: ... and at most this many commands: a receive then gets its first records while the
#: rest is unfolded (a delta of an update begins with thousands of UNLINKs and RENAMEs,
#: which the receiver would otherwise wait for: 0.1 s on the Debian pair when Python
#: unfolded them)
GROUP_COMMANDS = 256
#: the first group is handed on at this many commands, the next ones at twice as many as
#: the one before, up to GROUP_COMMANDS: the receiver, idle until then, starts sooner
_FIRST_GROUP = 16
#: compressed bytes fed to the inflater at a time (bounds the output of one call)
_ZFEED = 1024
_MAX_CMD = max_command(3)
#: the btrfs commands a carrier may hold (``legal(cmd, Place.CARRIER)`` as one lookup)
_CARRIED = frozenset(c for c in RECORDS if legal(c, Place.CARRIER))
_CRC_FIELD = struct.Struct("<I")
#: (ints: an IntEnum member's lookup is a Python call on 3.11)
_CPATCH, _BLAKE3_32 = int(DCmd.CPATCH), int(HashAlgo.BLAKE3_32)


class CarrierReader:
    """The carrier of one delta stream, read back.

    Args:
        lister: sorted entry names of a directory of the old snapshot (UNLINK references),
            ``None`` where there is none.
        on_head: called with a SUBVOL or SNAPSHOT command (number, raw bytes) as it goes
            into the group (the old root of what follows may change).
        max_size: the most one ZCMDS may inflate to (below the format's
            :data:`MAX_ZCMDS_RAW`) and the largest zstd window the carrier may ask for.
    """

    def __init__(
        self, lister: Callable[[bytes], list[bytes] | None] | None,
        on_head: Callable[[int, memoryview], None] | None = None,
        max_size: int = MAX_ZCMDS_RAW,
    ) -> None:
        #: the previous path, folded times, names and listings both sides follow
        self.state = CarrierState(lister=lister)
        self.on_head = on_head
        self.max_raw = min(max_size, MAX_ZCMDS_RAW)
        self.max_window = min(max(max_size, MIN_CARRIER_WINDOW), 1 << 31)
        self._dctx: Any = None
        self._lzma: Any = None
        #: bytes inflated from the carrier so far (the x86 converter's base)
        self._inflated = 0
        #: format version of the delta (from its ZCMDS records)
        self._format = DELTA_VERSION_WRITTEN
        #: carried btrfs commands gathered by :meth:`split` (``grouped``) and how many
        self.group = bytearray()
        self.count = 0
        #: the commands the group being gathered is handed on at
        self.group_commands = _FIRST_GROUP
        # the C path of unfolding (``_unfold.c``) when it is live, or None
        unfold_c = _native.live("unfold")
        self._unfold_c: Any = unfold_c.run if unfold_c is not None else None

    def inflate(self, item: ZCommands) -> bytearray:
        """The records a ZCMDS piece carries, inflated and checked against its CRC32C."""
        if item.raw_len > self.max_raw:
            raise StreamFormatError(
                f"ZCMDS declares {item.raw_len} bytes (limit {self.max_raw})")
        self._format = self.state.format = item.version or DELTA_VERSION_WRITTEN
        lzma2 = item.codec != CARRIER_ZSTD
        raw = self._inflate_lzma2(item) if lzma2 else self._inflate_zstd(item)
        if item.codec == CARRIER_LZMA2_X86:
            bcj.decode(raw, self._inflated)
        self._inflated += len(raw)
        if crc32c(raw, 0) != item.crc:
            raise ChecksumError("CRC32C mismatch of a ZCMDS record's content")
        return raw

    def _inflate_lzma2(self, item: ZCommands) -> bytearray:
        if self._lzma is None:
            from .lzma2 import Lzma2Decoder

            if item.dict_size > self.max_window:
                raise StreamFormatError(
                    f"the ZCMDS carrier asks for a {item.dict_size}-byte LZMA2 dictionary "
                    f"(limit {self.max_window}: --max-file-size)")
            self._lzma = Lzma2Decoder(item.dict_size)  # x86 branches: after it (.bcj)
        # one call, bounded by the declared length (+1 to see an overrun)
        out, used = self._lzma.decompress(item.zdata, item.raw_len + 1)
        if len(out) != item.raw_len or used != len(item.zdata):
            raise StreamFormatError(
                f"ZCMDS inflates to {len(out)} bytes from {used} of {len(item.zdata)}, "
                f"declares {item.raw_len}")
        return bytearray(out)

    def _inflate_zstd(self, item: ZCommands) -> bytearray:
        if self._dctx is None:  # the first piece: the frame header
            self._check_window(item.zdata)
            self._dctx = zstd.ZstdDecompressor(
                max_window_size=self.max_window).decompressobj()
        out: list[bytes] = []
        got = 0
        z = item.zdata
        try:
            for i in range(0, len(z), _ZFEED):
                piece = self._dctx.decompress(z[i : i + _ZFEED])
                got += len(piece)
                if got > item.raw_len:
                    raise StreamFormatError("ZCMDS inflates to more than it declares")
                out.append(piece)
        except zstd.ZstdError as exc:
            raise StreamFormatError(f"ZCMDS carrier is corrupt: {exc}") from exc
        if got != item.raw_len:
            raise StreamFormatError(f"ZCMDS inflates to {got} bytes, declares {item.raw_len}")
        return bytearray().join(out)

    def _check_window(self, head: memoryview) -> None:
        """Refuse a carrier frame whose window is over the limit, naming both."""
        try:
            window = zstd.get_frame_parameters(bytes(head[:18])).window_size
        except zstd.ZstdError as exc:
            raise StreamFormatError(f"ZCMDS carrier is corrupt: {exc}") from exc
        if window > self.max_window:
            raise StreamFormatError(
                f"the ZCMDS carrier asks for a {window}-byte zstd window "
                f"(limit {self.max_window}: --max-file-size)")

    def split(
        self, raw: bytearray, version: int, grouped: bool = False
    ) -> Iterator[DeltaItem | None]:
        """The records in inflated carrier bytes ``raw`` (which this may modify) of an
        embedded stream of ``version``: delta records decoded, btrfs commands unfolded with
        their CRC (yielded, or with ``grouped`` appended to :attr:`group`). With ``grouped``,
        ``None`` is yielded whenever the group holds :data:`GROUP_MAX` bytes or
        :data:`GROUP_COMMANDS` commands: the caller takes it (:meth:`take_group`), so
        memory stays bounded however much the carried commands unfold to, and the first
        commands go on before the last are unfolded."""
        if not version:
            raise StreamFormatError("btrfs commands before any STREAM record")
        mv = memoryview(raw)
        pos = 0
        limit = MAX_PAYLOAD[version]
        fast = self._unfold_c if grouped else None
        while pos < len(mv):
            if fast is not None:
                pos, n = fast(raw, pos, self.group, self.state, self._format, limit,
                              _MAX_CMD, GROUP_MAX, max(1, self.group_commands - self.count))
                self.count += n
                if len(self.group) >= GROUP_MAX or self.count >= self.group_commands:
                    yield None
                    continue
                if pos >= len(mv):
                    break
            if len(mv) - pos < CMD_HEADER_SIZE:
                raise StreamFormatError("carried commands end inside a command header")
            length, cmd, crc = CMD_HEADER.unpack_from(mv, pos)
            end = pos + CMD_HEADER_SIZE + length
            if cmd in INNER_RECORDS:
                yield self._record(cmd, mv, pos, end, crc)
            else:
                view = self._command(raw, cmd, pos, length, crc, limit)
                if not grouped:
                    yield BtrfsCommand(cmd, view)
                else:
                    if cmd <= 2 and self.on_head is not None:  # SUBVOL, SNAPSHOT
                        self.on_head(cmd, view)
                    self.group += view
                    self.count += 1
                    if len(self.group) >= GROUP_MAX or self.count >= self.group_commands:
                        yield None
            pos = end

    def _record(self, cmd: int, mv: memoryview, pos: int, end: int, crc: int) -> DeltaItem:
        """A carried delta record (zero CRC field: the piece's CRC covered it)."""
        if crc != 0 or end > len(mv):
            raise StreamFormatError(f"carried delta record {cmd} is invalid")
        sub = decode_item(cmd, mv, pos + CMD_HEADER_SIZE, end)
        if type(sub) is Patch:
            if cmd != _CPATCH and sub.hash_algo == _BLAKE3_32:
                raise StreamFormatError("a 4-byte digest outside a CPATCH")
            if sub.bases and self._format < BASES_VERSION:
                raise StreamFormatError(f"BASES in a format-{self._format} patch")
            why = codec_refusal(sub.codec, self._format)
            if why is not None:
                raise StreamFormatError(why)
            if sub.hash_algo == NO_DIGEST and self._format < DELTA_VERSION_NEWDIGEST:
                raise StreamFormatError(
                    f"a short CPATCH with a new digest in a format-{self._format} delta")
        return sub

    def _command(
        self, raw: bytearray, cmd: int, pos: int, length: int, crc: int, limit: int
    ) -> memoryview:
        """A carried btrfs command, unfolded, with its CRC32C put back."""
        end = pos + CMD_HEADER_SIZE + length
        if cmd not in _CARRIED or length > limit or end > len(raw):
            raise StreamFormatError(f"carried command {cmd} of length {length} is invalid")
        if crc != 0:
            raise StreamFormatError(f"carried command {cmd} has a non-zero CRC field")
        mv = memoryview(raw)
        buf = unfold(cmd, mv, pos, end, self.state, limit)
        # the CRC field is 0 in both forms: btrfs's CRC (seed 0, no final inversion) of
        # header + payload is one library call
        if buf is None:
            view = mv[pos:end]
            _CRC_FIELD.pack_into(raw, pos + 6, crc32c(view, 0xFFFFFFFF) ^ 0xFFFFFFFF)
            return view
        _CRC_FIELD.pack_into(buf, 6, crc32c(buf, 0xFFFFFFFF) ^ 0xFFFFFFFF)
        return memoryview(buf)

    def take_group(self) -> tuple[int, bytearray]:
        """The commands gathered so far (how many, their bytes); a new group starts (the
        one returned is never appended to again: records keep views of it)."""
        got = self.count, self.group
        self.group, self.count = bytearray(), 0
        self.group_commands = min(self.group_commands * 2, GROUP_COMMANDS)
        return got
