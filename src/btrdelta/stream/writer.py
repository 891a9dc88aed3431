"""Writing send streams.

:class:`StreamWriter` takes a ``write`` callable (a file's ``write``, a socket's
``sendall``, ``list.append``) and never opens anything itself. It writes the 17-byte header
before the first record and after every END (a record after END starts a new concatenated
stream, exactly as ``btrfs send A B`` lays them out), so that for every stream ``S``
``write(read(S)) == S`` byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .. import TYPE_CHECKING, _native
from ..errors import StreamFormatError
from .codec import encode_record, encode_stream_header
from .records import End, Event, Record, StreamHeader

if TYPE_CHECKING:
    from typing import Any

__all__ = ["Encoded", "StreamWriter", "write_stream"]

#: records encoded already (``_speedups.encode_inode``): the bytes before a piece of data,
#: the data (or None), the bytes after it, and how many records they are
Encoded = tuple[bytes, "Any", bytes, int]


class StreamWriter:
    """Serialize records (and stream headers) to a ``write`` callable.

    Args:
        write: called with each piece (``bytes`` or ``memoryview``) in order.
        version: protocol version of the streams to write (1, 2 or 3).
    """

    def __init__(self, write: Callable[[Any], object], version: int = 1) -> None:
        encode_stream_header(version)  # validates the version
        self._write = write
        self.version = version
        self._need_header = True
        # the C encoder of plain commands when it is live (btrdelta._native), else None
        # (getattr: a build of the C module older than this code runs the Python encoder)
        self._head: Callable[[Record, int], Any] | None = getattr(
            _native.live("speedups"), "encode_head", None)
        #: bytes written so far
        self.bytes_written = 0
        #: records written so far
        self.records = 0

    def start_stream(self, version: int | None = None) -> None:
        """Write a stream header now (for a new concatenated stream, possibly of another
        version)."""
        if version is not None:
            self.version = version
        header = encode_stream_header(self.version)
        self._write(header)
        self.bytes_written += len(header)
        self._need_header = False

    def write(self, rec: Record) -> None:
        """Append one record; refuses what the stream version cannot express.

        Its pieces go to ``write`` in order: the header and attributes (one piece with the C
        encoder, two without), then the data of a v2+ command (the record's own object).
        """
        got = self._head(rec, self.version) if self._head is not None else None
        pieces = encode_record(rec, self.version) if got is None else None
        if self._need_header:
            self.start_stream()
        write = self._write
        if got is not None:
            head, data = got
            write(head)
            n = len(head)
            if data is not None:
                write(data)
                n += len(data)
        else:
            assert pieces is not None
            n = 0
            for piece in pieces:
                write(piece)
                n += len(piece)
        self.bytes_written += n
        self.records += 1
        if type(rec) is End:
            self._need_header = True

    def write_encoded(self, enc: Encoded) -> None:
        """Append records encoded already for this version (never an END): their pieces go
        to ``write`` as they are (the data as its own piece)."""
        if self._need_header:
            self.start_stream()
        head, data, tail, count = enc
        write = self._write
        write(head)
        n = len(head)
        if data is not None:
            write(data)
            n += len(data)
        if tail:
            write(tail)
            n += len(tail)
        self.bytes_written += n
        self.records += count

    def write_event(self, ev: Event) -> None:
        """Append a header or a record as read by :meth:`StreamReader.events`."""
        if isinstance(ev, StreamHeader):
            self.start(ev)
        else:
            self.write(ev)

    # the RecordSink interface (btrdelta.stream.sink)

    def start(self, header: StreamHeader) -> None:
        """Begin a concatenated stream of ``header``'s version (only after an END)."""
        if not self._need_header:
            raise StreamFormatError("stream header in the middle of a stream (no END)")
        self.start_stream(header.version)

    def apply(self, rec: Record, index: int) -> None:
        """Append ``rec`` (:meth:`write`)."""
        self.write(rec)

    def close(self) -> None:
        """Nothing is held back: every piece was handed to ``write`` already."""


def write_stream(
    records: Iterable[Event], write: Callable[[Any], object], version: int = 1
) -> StreamWriter:
    """Write ``records`` (headers allowed) with a new :class:`StreamWriter`; returns it."""
    writer = StreamWriter(write, version)
    for ev in records:
        writer.write_event(ev)
    return writer
