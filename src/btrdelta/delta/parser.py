"""Reading a delta stream (sans-I/O): bytes in, delta items out.

Strategy (h11-style, as :class:`~btrdelta.stream.StreamParser`): :class:`DeltaParser` owns
the state; its input is a :class:`~btrdelta.stream.framing.Framer`, the framing it shares
with send streams. The caller feeds bytes in any split (``b""`` marks the end) and pulls
items with :meth:`DeltaParser.next_item`, which returns an item, ``NEED_DATA`` or ``EOF``
(after ``DEND``: bytes after it are an error). Every record's CRC32C is checked before it is
decoded. The btrfs commands at the top level are framed, not decoded (the stream version
they need comes with ``STREAM``; the expansion decodes them). Items hold views of the fed
buffers, which must not be modified after feeding.

Whatever the input, the parser raises only :class:`~btrdelta.errors.StreamFormatError` (or
a subclass) carrying the source, the byte offset, the record index and the record's name.
:func:`iter_items` pulls items from a ``read`` callable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .. import TYPE_CHECKING
from ..errors import BtrdeltaError, StreamFormatError, UnsupportedVersionError
from ..stream.constants import CMD_HEADER_SIZE, MAX_PAYLOAD
from ..stream.framing import (
    EOF,
    NEED_DATA,
    RECORD_NAMES,
    Framer,
    Framing,
    Place,
    Sentinel,
    legal,
)
from .encoding import decode_item
from .format import (
    BASES_VERSION,
    CARRIER_CODECS,
    CARRIER_LZMA2,
    CARRIER_LZMA2_X86,
    CARRIER_ZSTD,
    DELTA_HEADER,
    DELTA_HEADER_SIZE,
    DELTA_MAGIC,
    DELTA_VERSIONS,
    MAX_DELTA_PAYLOAD,
    RETIRED_VERSIONS,
    BtrfsCommand,
    DeltaEnd,
    DeltaItem,
    HashAlgo,
    Patch,
    ZCommands,
    codec_refusal,
)

if TYPE_CHECKING:
    from typing import Any, Literal

__all__ = ["DELTA_FRAMING", "EOF", "NEED_DATA", "DeltaParser", "iter_items"]


def _max_payload(cmd: int, version: int) -> int:
    # btrfs commands keep the largest limit of a btrfs stream; delta records have their own
    return MAX_DELTA_PAYLOAD if cmd >= 200 else MAX_PAYLOAD[3]


#: the delta stream's words for framing errors
DELTA_FRAMING = Framing(
    eof="truncated delta stream (no DEND record)",
    short_header="truncated delta stream (no DEND record)",
    too_long="record length {length} exceeds {limit}",
    truncated="truncated record: {total} bytes announced",
    names=RECORD_NAMES,
    max_payload=_max_payload,
    unknown_by_number=True,
)


class DeltaParser:
    """Push parser for delta streams (sans-I/O): ``feed`` bytes, pull items.

    Args:
        source: name used in error messages.
    """

    def __init__(self, *, source: str | None = None) -> None:
        self.source = source
        self._in = Framer(DELTA_FRAMING, source=source)
        self._ended = False
        #: the carrier's (codec, dictionary size), from the first ZCMDS
        self._codec: tuple[int, int] | None = None

    @property
    def version(self) -> int:
        """Format version from the header (0 before it)."""
        return self._in.version

    @property
    def index(self) -> int:
        """Index of the next record (0-based)."""
        return self._in.index

    @property
    def offset(self) -> int:
        """Absolute offset of the next unparsed byte."""
        return self._in.offset

    def feed(self, data: Any) -> None:
        """Give the parser more bytes (kept as views: do not modify them after); ``b""``
        marks the end of input."""
        self._in.feed(data)

    def needed(self) -> int:
        """Bytes still missing for the next item (a read-size hint)."""
        return self._in.needed(0 if self._in.version else DELTA_HEADER_SIZE)

    def next_item(self) -> DeltaItem | Literal[Sentinel.NEED_DATA, Sentinel.EOF]:
        """The next item, ``NEED_DATA``, or ``EOF`` at the clean end (after ``DEND``).

        Raises:
            StreamFormatError: the bytes are not a valid delta stream (located).
        """
        fr = self._in
        if fr.failed is not None:
            raise fr.failed
        if not fr.version and self._header() is NEED_DATA:
            return NEED_DATA
        if self._ended:
            if fr.avail:
                fr.fail(StreamFormatError("data after the end of the delta stream"))
            return NEED_DATA if not fr.eof else EOF
        frame = fr.next_frame()
        if frame is NEED_DATA:
            return NEED_DATA
        cmd, mv, start, length = frame
        total = CMD_HEADER_SIZE + length
        item: DeltaItem
        if legal(cmd, Place.SEND):
            item = BtrfsCommand(cmd, mv[start : start + total])
        else:
            item = self._decode(cmd, mv, start, start + total)
        fr.consume(total)
        if type(item) is DeltaEnd:
            self._ended = True
        return item

    def _header(self) -> Literal[Sentinel.NEED_DATA] | None:
        fr = self._in
        if fr.avail < DELTA_HEADER_SIZE:
            if fr.eof:
                fr.fail(StreamFormatError("truncated or empty delta stream header"),
                        indexed=False)
            return NEED_DATA
        magic, version = DELTA_HEADER.unpack_from(fr.peek(DELTA_HEADER_SIZE))
        if magic != DELTA_MAGIC:
            fr.fail(StreamFormatError("bad magic, not a btrdelta delta stream"), indexed=False)
        if version in RETIRED_VERSIONS:
            fr.fail(UnsupportedVersionError(
                f"delta format version {version} is no longer read (it was never released): "
                "make the delta again with this btrdelta"), indexed=False)
        if version not in DELTA_VERSIONS:
            fr.fail(UnsupportedVersionError(f"unsupported delta format version {version}"),
                    indexed=False)
        fr.consume(DELTA_HEADER_SIZE, 0)
        fr.version = version
        return None

    def _decode(self, cmd: int, mv: memoryview, start: int, end: int) -> DeltaItem:
        """A delta record (200+) at ``mv[start:end]``, checked against the format."""
        fr = self._in
        try:
            item = decode_item(cmd, mv, start + CMD_HEADER_SIZE, end)
        except BtrdeltaError as exc:
            fr.fail(exc, cmd=cmd)
        if not legal(cmd, Place.DELTA) or (
            isinstance(item, Patch) and item.hash_algo == HashAlgo.BLAKE3_32
        ):
            fr.fail(StreamFormatError("CPATCH or 4-byte digest outside the carrier"), cmd=cmd)
        if isinstance(item, Patch):
            if item.bases and fr.version < BASES_VERSION:
                fr.fail(StreamFormatError(f"BASES in a format-{fr.version} PATCH"), cmd=cmd)
            why = codec_refusal(item.codec, fr.version)
            if why is not None:
                fr.fail(StreamFormatError(why), cmd=cmd)
        if type(item) is ZCommands:
            self._carrier(item)
        return item

    def _carrier(self, z: ZCommands) -> None:
        """Format 4: a zstd carrier, unnamed; formats 5 and 6: CODEC named on every ZCMDS
        (DICT with LZMA2 only; format 6 adds LZMA2 with x86 branches), the same all
        along."""
        fr = self._in
        z.version = fr.version
        if fr.version == 4:
            if z.codec or z.dict_size:
                fr.fail(StreamFormatError("CODEC or DICT in a format-4 ZCMDS"), cmd=201)
            z.codec = CARRIER_ZSTD
            return
        if z.codec not in CARRIER_CODECS[fr.version] or (
            (z.codec != CARRIER_ZSTD) != bool(z.dict_size)
        ):
            fr.fail(StreamFormatError(
                f"ZCMDS carrier codec {z.codec} / dictionary {z.dict_size} is invalid"), cmd=201)
        # format 6: LZMA2 pieces with and without the x86 converter (codecs 2 and 3) may
        # alternate, one LZMA2 stream with one dictionary
        kind = (CARRIER_LZMA2 if z.codec == CARRIER_LZMA2_X86 and fr.version >= 6
                else z.codec, z.dict_size)
        if self._codec is None:
            self._codec = kind
        elif self._codec != kind:
            fr.fail(StreamFormatError("ZCMDS records change the carrier's codec"), cmd=201)


def iter_items(
    read: Callable[[int], bytes], *, source: str | None = None, block_size: int = 1 << 20,
    parser: DeltaParser | None = None,
) -> Iterator[DeltaItem]:
    """Pull items from a ``read(n)`` callable (a file's ``read``) until the clean end."""
    p = parser if parser is not None else DeltaParser(source=source)
    while True:
        item = p.next_item()
        if item is NEED_DATA:
            p.feed(read(max(block_size, p.needed())))
            continue
        if item is EOF:
            return
        yield item
