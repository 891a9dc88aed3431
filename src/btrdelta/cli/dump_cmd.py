"""``btrdelta dump``: print a send stream like ``btrfs receive --dump`` (or as JSON lines)."""

from __future__ import annotations

import argparse

from ._common import examples
from ._input import add_input, dump_stream, input_name, open_input


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``dump``."""
    p = sub.add_parser(
        "dump",
        help="print the commands of a send stream",
        description=(
            "Print every command of a btrfs send stream, one per line. The text is byte for "
            "byte what `btrfs receive --dump` of the btrfs-progs installed here prints "
            "(--progs-version: another's), including its stop after the first END; --all "
            "continues through concatenated streams. Timestamps are local time (TZ)."
        ),
        epilog=examples("btrfs send -p /snap/A /snap/B | btrdelta dump | head",
                        "btrdelta dump --json A-B.stream | jq -c 'select(.cmd == \"write\")'"),
    )
    add_input(p)
    p.add_argument("--json", action="store_true",
                   help="JSON lines: one object per command (paths as path or path_b64)")
    p.add_argument("--all", action="store_true",
                   help="dump every concatenated stream, not only the first")
    p.add_argument("--progs-version", type=_progs_version, metavar="VERSION",
                   help="print as this btrfs-progs version's receive --dump does (e.g. 6.2: "
                   "up to 6.9 xattr values are raw and encoded writes have commas; from "
                   "6.9.1 they are escaped; default: the installed btrfs, else the newest)")
    p.set_defaults(func=run)


def _progs_version(text: str) -> tuple[int, ...]:
    from ..stream.dump import parse_progs_version

    try:
        return parse_progs_version(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """Dump the stream."""
    name = input_name(args)
    with open_input(name) as f:
        dump_stream(f, name, as_json=args.json, all_streams=args.all,
                    progs=args.progs_version)
    return 0
