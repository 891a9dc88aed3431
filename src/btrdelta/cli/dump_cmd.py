"""``btrdelta dump``: print a send stream like ``btrfs receive --dump`` (or as JSON lines)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import BinaryIO

from ..stream import StreamHeader, StreamReader, TextDumper, record_to_json
from ..stream.records import End, Record
from ._common import add_input, input_name, open_input

_FLUSH_EVERY = 4096


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``dump``."""
    p = sub.add_parser(
        "dump",
        help="print the commands of a send stream",
        description=(
            "Print every command of a btrfs send stream, one per line. The text is byte for "
            "byte what `btrfs receive --dump` (btrfs-progs 6.2) prints, including its stop "
            "after the first END; --all continues through concatenated streams. Timestamps "
            "are local time (TZ)."
        ),
        epilog="example: btrfs send -p /snap/A /snap/B | btrdelta dump | head",
    )
    add_input(p)
    p.add_argument("--json", action="store_true",
                   help="JSON lines: one object per command (paths as path or path_b64)")
    p.add_argument("--all", action="store_true",
                   help="dump every concatenated stream, not only the first")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Dump the stream."""
    name = input_name(args)
    out = sys.stdout.buffer
    with open_input(name) as f:
        reader = StreamReader(f, source=name)
        if args.json:
            _dump_json(reader, out, args.all)
        else:
            _dump_text(reader, out, args.all)
    return 0


def _dump_text(reader: StreamReader, out: BinaryIO, all_streams: bool) -> None:
    dumper = TextDumper()
    batch: list[Record] = []
    try:
        for rec in reader:
            batch.append(rec)
            if rec.__class__ is End and not all_streams:
                break
            if len(batch) >= _FLUSH_EVERY:
                out.write(dumper.render(batch).encode("latin-1"))
                batch.clear()
    finally:
        # what was read before an error is printed, as progs prints it
        out.write(dumper.render(batch).encode("latin-1"))
        out.flush()


def _dump_json(reader: StreamReader, out: BinaryIO, all_streams: bool) -> None:
    lines: list[str] = []
    index = -1
    try:
        for ev in reader.events():
            if isinstance(ev, StreamHeader):
                lines.append(json.dumps({"stream": ev.version, "offset": ev.offset}))
                continue
            index += 1
            lines.append(json.dumps(record_to_json(ev, index)))
            if type(ev) is End and not all_streams:
                break
            if len(lines) >= _FLUSH_EVERY:
                out.write(("\n".join(lines) + "\n").encode())
                lines.clear()
    finally:
        if lines:
            out.write(("\n".join(lines) + "\n").encode())
        out.flush()
