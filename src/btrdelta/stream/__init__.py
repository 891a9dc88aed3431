"""The btrfs send-stream format as pure code: tables, records, codec, reader, writer, dump.

Nothing in this package opens a file, a socket or a process: readers take a binary file
object or fed bytes, writers take a ``write`` callable.

The hot loops (batch decoding, dump rendering) have an optional C accelerator,
``_speedups``, built when a compiler is present; :data:`BACKEND` says which is live (``"c"``
or ``"python"``), and ``BTRDELTA_PURE_PYTHON=1`` forces the pure-Python code.
"""

from typing import TYPE_CHECKING, Any

from .codec import btrfs_crc32c, decode_payload, encode_record, encode_stream_header
from .constants import MAGIC, Attr, Cmd, Compression
from .reader import EOF, NEED_DATA, StreamHeader, StreamParser, StreamReader, iter_records
from .reader import _speedups as _c_speedups
from .records import *  # noqa: F403
from .records import RECORD_TYPES, Record
from .writer import StreamWriter, write_stream

if TYPE_CHECKING:
    from .dump import TextDumper, record_to_json

#: implementation of the hot loops in use: "c" (btrdelta.stream._speedups) or "python"
BACKEND = "c" if _c_speedups is not None else "python"

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
    # the dump renderer is imported on first use (it is not needed to read or receive)
    if name in ("TextDumper", "record_to_json"):
        from . import dump

        return getattr(dump, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _use_backend(name: str) -> None:
    """Make ``"c"`` or ``"python"`` the live implementation (tests run both)."""
    global BACKEND
    if name == "c" and _c_speedups is None:
        raise RuntimeError("the C accelerator btrdelta.stream._speedups is not built")
    from .dump import TextDumper

    c = name == "c"
    StreamParser._decode_batch = (
        StreamParser._decode_batch_c if c else StreamParser._decode_batch_py
    )
    TextDumper.render = (  # type: ignore[method-assign]
        TextDumper._render_c if c else TextDumper._render_py
    )
    BACKEND = name
