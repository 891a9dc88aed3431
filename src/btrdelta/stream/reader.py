"""Reading send streams: a sans-I/O push parser and a pull reader over a binary file.

Strategy (h11-style): :class:`StreamParser` owns the parsing state; its input is a
:class:`~.framing.Framer` (the framing all formats share). The caller feeds bytes in any
split with :meth:`StreamParser.feed` (an empty feed means EOF) and pulls events with
:meth:`StreamParser.next_event`, which returns a :class:`StreamHeader`, a record,
``NEED_DATA`` or ``EOF``. A command that lies wholly inside one fed buffer is decoded in
place: its file data is a ``memoryview`` of the caller's buffer, which therefore must not be
modified after feeding. A command split across feeds is assembled once into a buffer of
exactly its size. :meth:`StreamParser.take_batch` decodes every whole command of the current
buffer at once (the C batch decoder when it is live, see :mod:`btrdelta._native`, else a
Python loop), leaving anything unusual to :meth:`~StreamParser.next_event`, which also makes
every error.

:class:`StreamReader` is the pull side: it reads large blocks from a file or pipe with
``readinto`` into fresh buffers and feeds the parser. Peak memory is a block plus the largest
command (the payload length is checked against the version's limit before any allocation),
whatever the stream size.

Several streams concatenated in one file (``btrfs send A B``) come out as a sequence:
each begins with a :class:`StreamHeader` event. EOF is clean only where a new stream header
could start (right after END), as in btrfs-progs.
"""

from __future__ import annotations

import struct
from collections.abc import Generator, Iterator

from .. import TYPE_CHECKING, _native
from ..errors import BtrdeltaError, StreamFormatError, UnsupportedVersionError
from .codec import _ZERO_CRC
from .constants import (
    CMD_HEADER,
    CMD_HEADER_SIZE,
    MAX_PAYLOAD,
    STREAM_HEADER_SIZE,
    SUPPORTED_VERSIONS,
    Cmd,
)
from .crc import crc32c
from .decode import decode_payload, decode_payload_fast, decode_stream_header, fast_decoder
from .framing import EOF, NEED_DATA, Framer, Framing, Sentinel, legal, send_place
from .records import End, Event, Record, StreamHeader

if TYPE_CHECKING:
    from typing import Any, BinaryIO, Literal

__all__ = ["EOF", "NEED_DATA", "SEND_FRAMING", "Event", "StreamHeader", "StreamParser",
           "StreamReader"]

_crc = crc32c
_CRC_FIELD = struct.Struct("<I")
_unpack_cmd = CMD_HEADER.unpack_from

#: the send stream's words for framing errors (see ``docs/formats/send-stream.md``)
SEND_FRAMING = Framing(
    eof="unexpected EOF in stream (no END command)",
    short_header="truncated command header",
    too_long="command length {length} exceeds the v{version} limit of {limit}",
    truncated="truncated command: {total} bytes announced, {avail} present",
    names={int(c): c.name for c in Cmd},
    max_payload=lambda cmd, version: MAX_PAYLOAD[version],
)


class _FastTable(dict[int, "Any"]):  # (a string: typing is not imported at run time)
    """Command number -> generated fast decoder for one stream version (filled on use;
    ``None`` for commands the version does not define)."""

    def __init__(self, version: int) -> None:
        super().__init__()
        self.version = version

    def __missing__(self, cmd: int) -> Any:
        ok = legal(cmd, send_place(self.version))
        dec = fast_decoder(cmd, self.version >= 2) if ok else None
        self[cmd] = dec
        return dec


_FAST_BY_VERSION = {ver: _FastTable(ver) for ver in SUPPORTED_VERSIONS}


class StreamParser:
    """Push parser for btrfs send streams (sans-I/O).

    Args:
        source: name used in error messages (a file name, ``-`` for stdin).
        verify_crc: check the CRC32C of every command (default on; turning it off is only
            for measuring and fuzzing the decoder, or for commands checked before).
        may_modify_input: allow the parser to zero the 4 CRC bytes of each command inside
            writable fed buffers (never file data); faster, for callers that own the buffers.
    """

    def __init__(
        self, *, source: str | None = None, verify_crc: bool = True, may_modify_input: bool = False
    ) -> None:
        self.source = source
        self.verify_crc = verify_crc
        self._in = Framer(SEND_FRAMING, source=source, verify_crc=verify_crc)
        # the pull reader owns its buffers: the CRC field of each command may then be zeroed
        # in place, so one CRC call covers header and payload (as btrfs-progs does)
        self._inplace = may_modify_input
        #: number of stream headers seen so far
        self.streams = 0
        self._expect_header = True
        self._ready: list[Event] = []  # decoded by the batch loop, not yet returned
        self._ready_pos = 0
        # the backend is picked once, when the parser is made (btrdelta._native)
        speedups = _native.live("speedups")
        #: the C batch decoder, or None (the Python loop)
        self._c_decode = speedups.decode_batch if speedups is not None else None
        #: one command outside a batch; with the C decoder these are rare (split across
        #: reads, unusual layouts), not worth generating a Python fast decoder (~2 ms each)
        self._decode_one = decode_payload_fast if speedups is None else decode_payload

    # -- input -------------------------------------------------------------------------

    def feed(self, data: Any) -> None:
        """Give the parser more bytes; ``b""`` marks the end of input."""
        self._in.feed(data)

    def begin(self, version: int) -> None:
        """A stream of ``version`` starts here whose header is not in the input (a stream
        embedded in another format, such as a delta stream's STREAM record): the next
        bytes fed are its commands. Only where a header may come (before any input, after
        an END).

        Raises:
            StreamFormatError: the stream before has not ended, or ``version`` is not 1..3.
        """
        if not self._expect_header:
            self._in.fail(StreamFormatError("a stream begins before the END of the one before"))
        if version not in SUPPORTED_VERSIONS:
            self._in.fail(UnsupportedVersionError(f"unsupported stream version {version}"),
                          indexed=False)
        self._in.version = version
        self.streams += 1
        self._expect_header = False

    @property
    def version(self) -> int:
        """Protocol version of the stream being read (0 before the first header)."""
        return self._in.version

    @property
    def index(self) -> int:
        """Index of the next command (0-based, counted over the whole input)."""
        return self._in.index

    @property
    def offset(self) -> int:
        """Absolute byte offset of the next unparsed byte."""
        return self._in.offset

    @property
    def buffered(self) -> int:
        """Bytes fed and not parsed yet."""
        return self._in.avail

    def needed(self) -> int:
        """Bytes still missing to complete the item being parsed (a hint for readers)."""
        return self._in.needed(STREAM_HEADER_SIZE if self._expect_header else 0)

    # -- batches -----------------------------------------------------------------------

    def take_batch(self) -> list[Event]:
        """Decode and return every complete, ordinary command available now (maybe none).

        A fast path for pull readers: it never returns headers, errors or NEED_DATA; call
        :meth:`next_event` when it returns an empty list.
        """
        if self._ready_pos < len(self._ready) or self._expect_header or self._in.failed:
            return []
        batch: list[Event] = []
        if self._in.avail >= CMD_HEADER_SIZE:
            self._decode_batch(batch)
        return batch

    def _decode_batch(self, ready: list[Event]) -> None:
        """The batch decoder of this parser's backend (C or Python, same contract)."""
        if self._c_decode is not None:
            self._decode_batch_c(ready)
        else:
            self._decode_batch_py(ready)

    def _decode_batch_c(self, ready: list[Event]) -> None:
        """:meth:`_decode_batch_py` done by ``_speedups.decode_batch`` (same contract)."""
        cur, start = self._in.window()
        recs, pos, hit_end = self._c_decode(  # type: ignore[misc]
            cur, start, len(cur), self._in.version, self.verify_crc
        )
        if pos > start:
            ready += recs
            if hit_end:
                self._expect_header = True
            self._in.consume(pos - start, len(recs))

    def _decode_batch_py(self, ready: list[Event]) -> None:
        """Decode every complete, well-formed command in the current buffer at once.

        This is the hot loop of the Python backend: locals only, kernel-order fast
        decoders, CRC over views. It stops at anything unusual (split command, bad CRC,
        unexpected layout, END) and leaves it to :meth:`next_event`, which handles it one
        command at a time with full errors.
        """
        cur, start = self._in.window()
        pos = start
        limit = len(cur)
        maxp = MAX_PAYLOAD[self._in.version]
        verify = self.verify_crc
        inplace = self._inplace and not cur.readonly
        fast = _FAST_BY_VERSION[self._in.version]
        append = ready.append
        before = len(ready)
        crc = _crc
        zero = _ZERO_CRC
        while pos + 10 <= limit:
            length, cmd, stored = _unpack_cmd(cur, pos)
            end = pos + 10 + length
            if length > maxp or end > limit:
                break
            if verify:
                if inplace:
                    cur[pos + 6 : pos + 10] = zero
                    ok = crc(cur[pos:end], 0xFFFFFFFF) ^ 0xFFFFFFFF == stored
                    if not ok:
                        cur[pos + 6 : pos + 10] = _CRC_FIELD.pack(stored)
                else:
                    ok = (
                        crc(cur[pos + 10 : end], crc(zero, crc(cur[pos : pos + 6], 0xFFFFFFFF)))
                        ^ 0xFFFFFFFF
                    ) == stored
                if not ok:
                    break
            decoder = fast[cmd]
            rec = decoder(cur, pos + 10, end) if decoder is not None else None
            if rec is None:
                if verify and inplace:  # the slow path re-reads this command
                    cur[pos + 6 : pos + 10] = _CRC_FIELD.pack(stored)
                break
            append(rec)
            pos = end
            if rec.__class__ is End:
                self._expect_header = True
                break
        if pos > start:
            self._in.consume(pos - start, len(ready) - before)

    # -- events ------------------------------------------------------------------------

    def next_event(self) -> Event | Literal[Sentinel.NEED_DATA, Sentinel.EOF]:
        """Return the next header or record, ``NEED_DATA`` or ``EOF``.

        Raises:
            StreamFormatError: the bytes are not a valid stream (with offset and record).
        """
        ready = self._ready
        if self._ready_pos < len(ready):
            ev = ready[self._ready_pos]
            self._ready_pos += 1
            return ev
        if ready:
            ready.clear()
            self._ready_pos = 0
        if self._in.failed is not None:
            raise self._in.failed
        if self._expect_header:
            return self._next_header()
        if self._in.avail >= CMD_HEADER_SIZE:
            self._decode_batch(ready)
            if ready:
                self._ready_pos = 1
                return ready[0]
        return self._next_command()

    def _next_header(self) -> StreamHeader | Literal[Sentinel.NEED_DATA, Sentinel.EOF]:
        fr = self._in
        if fr.avail < STREAM_HEADER_SIZE:
            if not fr.eof:
                return NEED_DATA
            if not fr.avail:
                if self.streams:
                    return EOF
                fr.fail(StreamFormatError("empty stream is not a valid send stream"),
                        indexed=False)
            fr.fail(StreamFormatError("truncated stream header"), indexed=False)
        start = fr.offset
        try:
            version = decode_stream_header(fr.peek(STREAM_HEADER_SIZE))
        except BtrdeltaError as exc:
            fr.fail(exc, indexed=False)
        fr.consume(STREAM_HEADER_SIZE, 0)
        fr.version = version
        self.streams += 1
        self._expect_header = False
        return StreamHeader(version, start)

    def _next_command(self) -> Record | Literal[Sentinel.NEED_DATA]:
        """One command by the general decoder (the one that names every error)."""
        fr = self._in
        frame = fr.next_frame()
        if frame is NEED_DATA:
            return NEED_DATA
        cmd, mv, start, length = frame
        try:
            rec = self._decode_one(cmd, mv, start + CMD_HEADER_SIZE,
                                   start + CMD_HEADER_SIZE + length, fr.version)
        except BtrdeltaError as exc:
            fr.fail(exc, cmd=cmd)
        fr.consume(CMD_HEADER_SIZE + length)
        if type(rec) is End:
            self._expect_header = True
        return rec

    def __iter__(self) -> Iterator[Event]:
        """Events available now (stops at ``NEED_DATA`` or ``EOF``)."""
        while True:
            ev = self.next_event()
            if ev is NEED_DATA or ev is EOF:
                return
            yield ev


class StreamReader:
    """Pull reader over a binary file or pipe.

    Iterating yields records (headers skipped); :meth:`events` also yields a
    :class:`StreamHeader` before each concatenated stream.

    Args:
        file: a binary file object with ``readinto`` (a file, a pipe, ``sys.stdin.buffer``).
        source: name for error messages.
        block_size: bytes per read.
        verify_crc: check every command's CRC32C.
    """

    def __init__(
        self,
        file: BinaryIO,
        *,
        source: str | None = None,
        block_size: int = 1 << 20,
        verify_crc: bool = True,
    ) -> None:
        self.file = file
        self.parser = StreamParser(source=source, verify_crc=verify_crc, may_modify_input=True)
        self.block_size = block_size

    @property
    def version(self) -> int:
        """Version of the stream being read."""
        return self.parser.version

    def _fill(self) -> None:
        parser = self.parser
        size = max(self.block_size, parser.needed())
        # a fresh block each time: records keep views of the block they came from (and
        # reusing free blocks measured slower: +25% system time on a 2 GiB stream)
        buf = bytearray(size)
        n = self.file.readinto(buf)  # type: ignore[attr-defined]
        if not n:
            parser.feed(b"")
        else:
            parser.feed(memoryview(buf)[:n])

    def _iterate(self, headers: bool) -> Iterator[Event]:
        for batch in self.batches():
            # a header comes alone (from next_event), never inside a decoded batch
            if headers or batch[0].__class__ is not StreamHeader:
                yield from batch

    def events(self) -> Iterator[Event]:
        """Yield stream headers and records until the input ends."""
        return self._iterate(True)

    def batches(self) -> Generator[list[Event], None, None]:
        """Yield stream headers and records in lists, as decoded.

        A list holds the commands of at most one read block (and of a command split across
        blocks, a header, or one command the batch decoder left to the Python path): a
        consumer that handles a batch at a time saves the per-event iteration and keeps
        about one block of file data alive.
        """
        parser = self.parser
        next_event = parser.next_event
        take_batch = parser.take_batch
        while True:
            batch = take_batch()
            if batch:
                yield batch
                continue
            ev = next_event()
            if ev is NEED_DATA:
                self._fill()
            elif ev is EOF:
                return
            else:
                yield [ev]

    def __iter__(self) -> Iterator[Record]:
        return self._iterate(False)  # type: ignore[return-value]


def iter_records(file: BinaryIO, *, source: str | None = None) -> Iterator[Record]:
    """Records of every stream in ``file`` (headers skipped)."""
    return iter(StreamReader(file, source=source))
