"""``btrdelta stat``: what a stream contains, in numbers."""

from __future__ import annotations

import argparse
import json

from ..stream import StreamReader
from ..stream.constants import Compression
from ..stream.stats import collect_stats
from ..update.identify import Kind
from ._common import add_json, examples, human_bytes
from ._input import add_input, input_name, open_input, print_delta_stats, sniff_input


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``stat``."""
    p = sub.add_parser(
        "stat",
        help="summarize a stream: commands, data bytes, compression, files touched",
        description=(
            "Read a whole send stream and print per-command counts, bytes of file data "
            "(plain and compressed), bytes cloned, and the number of files touched. A delta "
            "stream: the stream it expands to, patched files and bytes saved per codec."
        ),
        epilog=examples("btrdelta stat A-B.stream", "btrfs send /snap/A | btrdelta stat",
                        "btrdelta stat --json A-B.delta"),
    )
    add_input(p)
    add_json(p, "the statistics")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the statistics."""
    name = input_name(args)
    with open_input(name) as f:
        what, f = sniff_input(f, name, Kind.SEND_STREAM, Kind.DELTA_STREAM)
        if what.kind is Kind.DELTA_STREAM:  # patched files and bytes saved per codec
            from ..delta.stats import delta_stats_of_file

            delta = delta_stats_of_file(f, source=name)
            print_delta_stats(delta, name, as_json=args.json)
            return 0
        reader = StreamReader(f, source=name)
        st = collect_stats(reader.events())
        st.size = reader.parser.offset
    if args.json:
        print(json.dumps({"kind": "stream", **st.as_json()}))
        return 0
    print(f"stream:        {name} ({human_bytes(st.size)}, {st.size} bytes)")
    print(f"streams:       {st.streams} (version {', '.join(map(str, st.versions))})")
    for sv in st.subvolumes:
        kind = "snapshot" if "parent_uuid" in sv else "subvol"
        line = f"  {kind} {sv['name']} uuid={sv['uuid']} transid={sv['ctransid']}"
        if "parent_uuid" in sv:
            line += f" parent={sv['parent_uuid']}"
        print(line)
    print(f"commands:      {st.records}")
    for cmd, n in sorted(st.commands.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {cmd:<16}{n:>10}")
    print(f"file data:     {human_bytes(st.data_bytes)} ({st.data_bytes} bytes)")
    print(f"  plain write: {human_bytes(st.write_bytes)}")
    if st.encoded_bytes or st.encoded_file_bytes:
        ratio = st.encoded_file_bytes / st.encoded_bytes if st.encoded_bytes else 0.0
        print(
            f"  compressed:  {human_bytes(st.encoded_bytes)} carried for "
            f"{human_bytes(st.encoded_file_bytes)} of file data ({ratio:.2f}x)"
        )
        for comp, n in sorted(st.encoded_by_compression.items()):
            try:
                cname = Compression(comp).name.lower()
            except ValueError:
                cname = str(comp)
            print(f"    {cname:<10} {human_bytes(n)}")
    if st.clone_bytes:
        print(f"cloned:        {human_bytes(st.clone_bytes)} (referenced, not carried)")
    print(f"files touched: {st.files_touched}")
    return 0
