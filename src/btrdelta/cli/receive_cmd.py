"""``btrdelta receive``: apply a send stream below a directory, like ``btrfs receive``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from ..receive import ReceivedSubvol, receive, uses_btrfs
from ..stream.constants import MAGIC
from ..stream.reader import Event, StreamReader
from ._common import Progress, human_bytes, open_input


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``receive``."""
    p = sub.add_parser(
        "receive",
        help="apply a send stream to a directory (any filesystem) or btrfs",
        description=(
            "Apply a btrfs send stream below DEST with ordinary system calls. On btrfs each "
            "subvolume is a real subvolume (snapshot of the local parent, received UUID set, "
            "read-only at the end), interchangeable with `btrfs receive`; on other "
            "filesystems it is a directory and DEST/.btrdelta-subvols.json records what was "
            "received. Paths never leave the subvolume (confinement is always on); a failed "
            "receive leaves nothing under the subvolume's final name. A delta stream "
            "(`btrdelta delta make`) is applied directly against the local parent: each old "
            "file is verified before it is patched, each new content after; on btrfs, files "
            "whose content did not change are reflinked from the parent instead of written "
            "again."
        ),
        epilog="examples: btrfs send -p /snap/A /snap/B | btrdelta receive /target; "
               "btrdelta receive -f A-B.delta /target (a delta stream; A was received there)",
    )
    p.add_argument("-f", "--file", dest="file", metavar="FILE", default="-",
                   help="read the stream from FILE (default '-': standard input)")
    p.add_argument("dest", nargs="?", metavar="DEST", help="directory to receive into")
    p.add_argument("-e", dest="stop_at_end", action="store_true",
                   help="stop after the first END (of concatenated streams)")
    p.add_argument("-E", "--max-errors", type=int, default=1, metavar="N",
                   help="stop after N failed commands (0: never; default 1)")
    p.add_argument("--dump", action="store_true",
                   help="print the stream instead of applying it (same as `btrdelta dump`)")
    p.add_argument("--dry-run", action="store_true",
                   help="parse the stream and resolve paths, parents and clone sources; "
                        "write nothing")
    p.add_argument("--backend", choices=("auto", "btrfs", "dir"), default="auto",
                   help="btrfs subvolumes or plain directories (default: by DEST's filesystem)")
    p.add_argument("--fileattr", action="store_true",
                   help="apply FILEATTR inode flags with chattr equivalents (btrfs receive "
                        "ignores them)")
    p.add_argument("--force-decompress", action="store_true",
                   help="decompress ENCODED_WRITE data even where btrfs could store it as is")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="progress on stderr")
    p.set_defaults(func=run)


def _is_send_stream(f: BinaryIO) -> bool:
    """Whether ``f`` starts with the send-stream magic, looked at without consuming it.

    A seekable file is read and rewound; a buffered pipe is peeked. ``False`` when that
    cannot be told without reading (the caller then sniffs the input the general way).
    """
    want = len(MAGIC)
    peek = getattr(f, "peek", None)
    try:
        if peek is not None:
            return bytes(peek(want)[:want]) == MAGIC
        if f.seekable():
            pos = f.tell()
            head = f.read(want)
            f.seek(pos)
            return head == MAGIC
    except (OSError, ValueError):
        pass
    return False


def open_events(
    f: BinaryIO, name: str, dest: Path | None = None, backend: str = "auto"
) -> Iterable[Event]:
    """The events to apply, from the input file (the one place the input is decoded).

    A plain stream is its :class:`StreamReader` (``receive`` takes its decoded batches
    whole). A delta stream (``btrdelta delta make``) is expanded on the fly against the
    local parent of its snapshot (see :func:`btrdelta.delta.expand_events`).
    """
    if _is_send_stream(f):
        # the common case: no wrapper around the input, no import of the delta package
        return StreamReader(f, source=name)
    from ..delta.expand import delta_parent, expand_events, sniff

    is_delta, f = sniff(f)
    if is_delta and dest is not None:
        # reflinks where the destination has them (a clone that must be copied costs more
        # than the write it stands for)
        return expand_events(f, delta_parent(dest, backend), source=name,
                             clone_same=uses_btrfs(dest, backend))
    return StreamReader(f, source=name).events()


def run(args: argparse.Namespace) -> int:
    """Receive the stream."""
    if args.dump:
        from . import dump_cmd

        return dump_cmd.run(argparse.Namespace(file=args.file, input=None, json=False,
                                               all=False))
    if not args.dest:
        print("btrdelta receive: error: DEST is required (unless --dump)", file=sys.stderr)
        return 2
    progress = Progress(Progress.wanted(args) and args.verbose > 0, "receive: ")

    def on_progress(records: int, nbytes: int) -> None:
        progress.update(f"{records} records, {human_bytes(nbytes)}")

    def on_subvol(done: ReceivedSubvol) -> None:
        kind = "snapshot" if done.parent_uuid else "subvol"
        print(f"At {kind} {done.name}", file=sys.stderr)

    def on_warning(msg: str) -> None:
        print(f"btrdelta receive: warning: {msg}", file=sys.stderr)

    with open_input(args.file) as f:
        events = open_events(f, args.file, Path(args.dest), args.backend)
        try:
            done = receive(
                events, Path(args.dest),
                stop_at_end=args.stop_at_end,
                max_errors=args.max_errors, dry_run=args.dry_run, backend=args.backend,
                apply_fileattr=args.fileattr, force_decompress=args.force_decompress,
                on_progress=on_progress, on_warning=on_warning, on_subvol=on_subvol,
                # a delta stream is expanded in a helper thread while C applies records
                read_ahead=not isinstance(events, StreamReader),
            )
        finally:
            progress.done()
    if args.dry_run:
        print(f"dry run: {len(done)} subvolume(s) would be received", file=sys.stderr)
    return 0
