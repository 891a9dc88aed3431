"""``btrdelta dump``: print a send stream like ``btrfs receive --dump`` (or as JSON lines)."""

from __future__ import annotations

import argparse
import json
import sys

from ..stream import StreamHeader, StreamReader, TextDumper, record_to_json
from ..stream.records import End
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
    lines: list[str] = []
    with open_input(name) as f:
        reader = StreamReader(f, source=name)
        dumper = TextDumper()
        index = -1
        try:
            for ev in reader.events():
                if type(ev) is StreamHeader:
                    if args.json:
                        lines.append(json.dumps({"stream": ev.version, "offset": ev.offset}))
                        lines.append("\n")
                    continue
                index += 1
                if args.json:
                    lines.append(json.dumps(record_to_json(ev, index)))  # type: ignore[arg-type]
                    lines.append("\n")
                else:
                    text = dumper.line(ev)  # type: ignore[arg-type]
                    if text is not None:
                        lines.append(text)
                if type(ev) is End and not args.all:
                    break
                if len(lines) >= _FLUSH_EVERY:
                    out.write("".join(lines).encode("latin-1" if not args.json else "utf-8"))
                    lines.clear()
        finally:
            out.write("".join(lines).encode("latin-1" if not args.json else "utf-8"))
            out.flush()
    return 0
