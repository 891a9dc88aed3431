"""The btrfs send-stream format as pure code: tables, records, codec, reader, writer, dump.

Nothing in this package opens a file, a socket or a process: readers take a binary file
object or fed bytes, writers take a ``write`` callable.
"""

from .codec import btrfs_crc32c, decode_payload, encode_record, encode_stream_header
from .constants import MAGIC, Attr, Cmd, Compression
from .dump import TextDumper, record_to_json
from .reader import EOF, NEED_DATA, StreamHeader, StreamParser, StreamReader, iter_records
from .records import *  # noqa: F403
from .records import RECORD_TYPES, Record
from .writer import StreamWriter, write_stream

__all__ = [
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
