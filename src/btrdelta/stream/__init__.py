"""The btrfs send-stream format as pure code: tables, records, codec, reader, writer, dump.

Nothing in this package opens a file, a socket or a process: readers take a binary file
object or fed bytes, writers take a ``write`` callable.

The hot loops (batch decoding, dump rendering) have an optional C accelerator,
``_speedups``, built when a compiler is present. :mod:`btrdelta._native` picks the backend
(``BTRDELTA_PURE_PYTHON=1`` forces the pure-Python code; ``_native.use_backend`` switches the
parsers and dumpers made inside it); ``BACKEND`` says which is live now (``"c"`` or
``"python"``).
"""

from __future__ import annotations

from .. import TYPE_CHECKING, _native
from .codec import btrfs_crc32c, encode_record, encode_stream_header
from .constants import MAGIC, Attr, Cmd, Compression
from .framing import EOF, NEED_DATA
from .records import *  # noqa: F403
from .records import RECORD_TYPES, Record, StreamHeader
from .writer import StreamWriter, write_stream

if TYPE_CHECKING:
    from typing import Any

    from .decode import decode_payload
    from .dump import TextDumper, record_to_json
    from .reader import StreamParser, StreamReader, iter_records

    #: implementation of the hot loops in use now (a module attribute computed on access)
    BACKEND: str

__all__ = [
    "BACKEND",
    "EOF",
    "MAGIC",
    "NEED_DATA",
    "RECORD_TYPES",
    "Attr",
    "Cmd",
    "Compression",
    "Record",
    "StreamHeader",
    "StreamParser",
    "StreamReader",
    "StreamWriter",
    "TextDumper",
    "btrfs_crc32c",
    "decode_payload",
    "encode_record",
    "encode_stream_header",
    "iter_records",
    "record_to_json",
    "write_stream",
]


def __getattr__(name: str) -> Any:
    if name == "BACKEND":
        # implementation of the hot loops in use now: "c" (btrdelta.stream._speedups) or
        # "python" (see btrdelta._native)
        return "c" if _native.live("speedups") is not None else "python"
    # the dump renderer is imported on first use (it is not needed to read or receive),
    # and so are the reader and the decoder (they are not needed to write: a send)
    if name in ("TextDumper", "record_to_json"):
        from . import dump

        return getattr(dump, name)
    if name in ("StreamParser", "StreamReader", "iter_records"):
        from . import reader

        return getattr(reader, name)
    if name == "decode_payload":
        from .decode import decode_payload

        return decode_payload
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
