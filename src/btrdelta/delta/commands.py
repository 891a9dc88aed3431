"""The input of ``delta make``: a send stream's commands, each with its raw bytes.

``delta make`` needs, for every command, the record (to follow names and group a file's
data) and the exact bytes (carried as they are, or checked against the encoder so a WRITE
can be regenerated bit for bit). :class:`RawCommands` reads them with the framing every
format shares (:class:`~btrdelta.stream.framing.Framer`, the send stream's words for
errors): 1 MiB blocks are read into fresh buffers and fed to it, each command's CRC32C is
checked, its bytes are copied out of the block (a command waiting for a file's diff must
not keep a whole block alive) and decoded by the general decoder. The BLAKE3 digest and
size of everything read are what the delta's DEND record carries.
"""

from __future__ import annotations

from typing import BinaryIO

from ..errors import BtrdeltaError, StreamFormatError
from ..stream.constants import CMD_HEADER_SIZE, STREAM_HEADER_SIZE
from ..stream.decode import decode_payload, decode_stream_header
from ..stream.framing import NEED_DATA, Framer
from ..stream.reader import SEND_FRAMING
from ..stream.records import Record
from .oldfiles import hasher

__all__ = ["RawCommand", "RawCommands"]

_BLOCK = 1 << 20


class RawCommand:
    """One command: its number, its bytes (header, CRC and payload) and its record, whose
    values are views of those bytes."""

    __slots__ = ("cmd", "raw", "rec")

    def __init__(self, cmd: int, raw: bytearray, rec: Record) -> None:
        self.cmd = cmd
        self.raw = raw
        self.rec = rec


class RawCommands:
    """Commands of the btrfs stream(s) in ``f`` with their raw bytes, CRC-checked.

    Args:
        f: a binary file with ``readinto`` (a file, a pipe).
        source: name for error messages.
        algo: digest algorithm of :attr:`hash` (of every byte read).
    """

    def __init__(self, f: BinaryIO, source: str | None, algo: int) -> None:
        self.f = f
        self._in = Framer(SEND_FRAMING, source=source)
        self.hash = hasher(algo)
        #: number of stream headers read
        self.streams = 0

    @property
    def version(self) -> int:
        """Version of the stream being read."""
        return self._in.version

    @property
    def offset(self) -> int:
        """Bytes read so far (headers and whole commands)."""
        return self._in.offset

    @property
    def index(self) -> int:
        """Commands read so far (over all streams)."""
        return self._in.index

    def _fill(self, header: int = 0) -> None:
        buf = bytearray(max(_BLOCK, self._in.needed(header)))
        n = self.f.readinto(buf)  # type: ignore[attr-defined]
        if not n:
            self._in.feed(b"")
            return
        view = memoryview(buf)[:n]
        self.hash.update(view)
        self._in.feed(view)

    def header(self) -> int | None:
        """Read a stream header; its version, or ``None`` at a clean end of input."""
        fr = self._in
        while fr.avail < STREAM_HEADER_SIZE and not fr.eof:
            self._fill(STREAM_HEADER_SIZE)
        if fr.avail < STREAM_HEADER_SIZE:
            if not fr.avail and self.streams:
                return None
            fr.fail(StreamFormatError("empty stream" if not fr.avail else
                                      "truncated stream header"))
        try:
            version = decode_stream_header(fr.peek(STREAM_HEADER_SIZE))
        except BtrdeltaError as exc:
            fr.fail(exc)
        fr.consume(STREAM_HEADER_SIZE, 0)
        fr.version = version
        self.streams += 1
        return version

    def command(self) -> RawCommand:
        """The next command of the current stream (END included)."""
        fr = self._in
        while (frame := fr.next_frame()) is NEED_DATA:
            self._fill()
        cmd, mv, start, length = frame
        total = CMD_HEADER_SIZE + length
        buf = bytearray(mv[start : start + total])
        try:
            rec = decode_payload(cmd, memoryview(buf), CMD_HEADER_SIZE, total, fr.version)
        except BtrdeltaError as exc:
            fr.fail(exc, cmd=cmd)
        fr.consume(total)
        return RawCommand(cmd, buf, rec)
