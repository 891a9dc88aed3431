"""Tell what an input is from its first bytes, without consuming them.

One look at the start of a file or pipe says whether it is a btrfs send stream, a btrdelta
delta stream, a chunk archive or store description, or something btrdelta does not read
itself but can name (zstd-, xz-, gzip-, bzip2- or lz4-compressed data, nothing at all), so
that an error says "this is zstd-compressed" instead of "bad magic". The returned file reads
the input from its very first byte, whether the input could be rewound or not (a pipe).
"""

from __future__ import annotations

import enum
import io

from .. import TYPE_CHECKING
from .._value import Value
from ..errors import StreamFormatError
from ..stream.constants import MAGIC as STREAM_MAGIC

if TYPE_CHECKING:
    from typing import Any, BinaryIO

__all__ = ["Identified", "Kind", "identify", "identify_bytes"]


class Kind(enum.Enum):
    """What an input holds."""

    SEND_STREAM = "btrfs send stream"
    DELTA_STREAM = "btrdelta delta stream"
    CHUNK_ARCHIVE = "btrdelta chunk archive or store description"
    EMPTY = "empty input"
    COMPRESSED = "compressed data"
    UNKNOWN = "unknown data"


#: compressed containers users pipe btrfs streams through, by their magic numbers
_COMPRESSED = (
    (b"\x28\xb5\x2f\xfd", "zstd", "zstd -dc"),
    (b"\xfd7zXZ\x00", "xz", "xz -dc"),
    (b"\x1f\x8b", "gzip", "gzip -dc"),
    (b"BZh", "bzip2", "bzip2 -dc"),
    (b"\x04\x22\x4d\x18", "lz4", "lz4 -dc"),
    (b"\x89LZO\x00\r\n\x1a\n", "lzop", "lzop -dc"),
)
#: bytes looked at: at least the longest magic (checked by the tests)
PEEK = 32


class Identified(Value, frozen=True):
    """The verdict on an input's first bytes."""

    kind: Kind
    #: for COMPRESSED, the container ("zstd"); else empty
    container: str = ""
    #: a command that undoes the container ("zstd -dc")
    undo: str = ""

    def describe(self) -> str:
        """``'zstd-compressed data'``, ``'a btrfs send stream'``..."""
        if self.kind is Kind.COMPRESSED:
            return f"{self.container}-compressed data"
        what: str = self.kind.value
        return what if self.kind in (Kind.EMPTY, Kind.UNKNOWN) else f"a {what}"

    def refuse(self, wanted: str, *, source: str | None = None) -> StreamFormatError:
        """The one-line error for an input that is not ``wanted`` (e.g. 'a send stream')."""
        hint = ""
        if self.kind is Kind.COMPRESSED:
            hint = f": decompress it first (`{self.undo} FILE | btrdelta ...`)"
        elif self.kind is Kind.CHUNK_ARCHIVE:
            hint = " (use `btrdelta image clone`)"
        elif self.kind is Kind.DELTA_STREAM:  # (dump, delta make of one: what reads it)
            hint = (" (`btrdelta delta stat` tells what it holds; `btrdelta delta expand "
                    "--old OLD` gives its send stream)")
        return StreamFormatError(f"expected {wanted}, this is {self.describe()}{hint}",
                                 source=source, offset=0)


def identify_bytes(head: bytes) -> Identified:
    """Classify an input by its first bytes (at least :data:`PEEK` of them, when it has
    that many)."""
    if not head:
        return Identified(Kind.EMPTY)
    if head.startswith(STREAM_MAGIC):
        return Identified(Kind.SEND_STREAM)
    # the other formats' modules are imported only when needed (a plain stream's receive
    # never loads them)
    from ..delta.format import DELTA_MAGIC

    if head.startswith(DELTA_MAGIC):
        return Identified(Kind.DELTA_STREAM)
    # after the delta check: the archive module loads the signature code (~0.1 s)
    from ..chunk.archive import MAGIC as CHUNK_MAGIC

    if head.startswith(CHUNK_MAGIC):
        return Identified(Kind.CHUNK_ARCHIVE)
    for magic, name, undo in _COMPRESSED:
        if head.startswith(magic):
            return Identified(Kind.COMPRESSED, name, undo)
    return Identified(Kind.UNKNOWN)


class _Prefixed(io.RawIOBase):
    """A file that first returns ``prefix``, then the rest of ``f``."""

    def __init__(self, prefix: bytes, f: BinaryIO) -> None:
        super().__init__()
        self._prefix = memoryview(prefix)
        self._f = f

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if len(self._prefix):
            n = min(len(b), len(self._prefix))
            b[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        readinto = getattr(self._f, "readinto", None)
        if readinto is not None:
            return int(readinto(b) or 0)
        data = self._f.read(len(b))
        b[: len(data)] = data
        return len(data)


def _peek(f: BinaryIO) -> tuple[bytes, BinaryIO]:
    """The first :data:`PEEK` bytes of ``f`` and a file reading ``f`` from its start.

    A buffered pipe is peeked and a seekable file rewound (both come back as they are);
    anything else is read and wrapped so the bytes read come first.
    """
    peek = getattr(f, "peek", None)
    if peek is not None:
        try:
            head = bytes(peek(PEEK)[:PEEK])
            if len(head) >= PEEK or not head:
                return head, f
        except (OSError, ValueError):
            pass
        # a short peek (a pipe with less buffered): read the rest, below
    try:
        if peek is None and f.seekable():
            pos = f.tell()
            head = f.read(PEEK)
            f.seek(pos)
            return head, f
    except (OSError, ValueError):
        pass
    head = b""
    while len(head) < PEEK:
        more = f.read(PEEK - len(head))
        if not more:
            break
        head += more
    return head, io.BufferedReader(_Prefixed(head, f), 1 << 20)


def identify(f: BinaryIO) -> tuple[Identified, BinaryIO]:
    """What ``f`` holds, and a file that reads it from its first byte.

    Use the returned file afterwards, never ``f`` itself (``f`` may have been read).
    """
    head, f = _peek(f)
    return identify_bytes(head), f
