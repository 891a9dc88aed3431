"""``btrdelta verify``: check the framing and every CRC of a stream."""

from __future__ import annotations

import argparse

from ..stream import StreamReader
from ..stream.sink import VerifySink, feed
from ..update.identify import Kind
from ._common import add_input, human_bytes, input_name, open_input, sniff_input


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``verify``."""
    p = sub.add_parser(
        "verify",
        help="check a stream's framing and every CRC32C",
        description=(
            "Read a whole send stream (every concatenated stream in it), check every header, "
            "command length, attribute and CRC32C. Prints one line and exits 0 when it is "
            "sound; otherwise prints one line naming the offset and record and exits non-zero."
        ),
    )
    add_input(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Verify the stream."""
    name = input_name(args)
    with open_input(name) as f:
        _, f = sniff_input(f, name, Kind.SEND_STREAM)
        reader = StreamReader(f, source=name)
        sink = VerifySink()
        feed(reader.events(), sink)
        size = reader.parser.offset
    if not args.quiet:
        print(f"{name}: OK, {sink.streams} stream(s), {sink.records} commands, "
              f"{human_bytes(size)}")
    return 0
