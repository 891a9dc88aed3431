"""``btrdelta receive``: apply a send stream below a directory, like ``btrfs receive``."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

from ..receive import ReceivedSubvol
from ..update.receive import receive_any
from ._common import Progress, dump_stream, human_bytes, open_input


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
               "btrdelta receive -f A-B.delta /target (a delta stream; A was received there); "
               "btrdelta receive -f A-B.delta --key release.pub /target (refused unless "
               "A-B.delta.sig is a valid signature by release.pub)",
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
    p.add_argument("--key", action="append", metavar="PUBKEY",
                   help="require a signature by this Ed25519 public key (repeatable: any of "
                        "them); the subvolume gets its final name only after the signature "
                        "verified over the whole stream (exit 5 otherwise)")
    p.add_argument("--signature", metavar="SIG",
                   help="the detached signature (default: FILE.sig; needed for stdin)")
    p.set_defaults(func=run)


def _signed_receiver(args: argparse.Namespace) -> Callable[..., list[ReceivedSubvol]]:
    """``receive --key``: the keys and the signature are read (and the signature checked)
    before the input is opened."""
    from ..trust import load_public_key, read_signature
    from ..update.signed import receive_signed, signature_path

    keys = [load_public_key(k) for k in args.key]
    sig_path = signature_path(args.file, args.signature)
    signature = read_signature(sig_path)
    return functools.partial(receive_signed, signature=signature, keys=keys,
                             signature_source=sig_path)


def run(args: argparse.Namespace) -> int:
    """Receive the stream."""
    if args.dump:
        with open_input(args.file) as f:
            dump_stream(f, args.file)
        return 0
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

    receiver: Callable[..., list[ReceivedSubvol]] = receive_any
    if args.key:
        receiver = _signed_receiver(args)
    with open_input(args.file) as f:
        try:
            done = receiver(
                f, args.dest, source=args.file,
                stop_at_end=args.stop_at_end,
                max_errors=args.max_errors, dry_run=args.dry_run, backend=args.backend,
                apply_fileattr=args.fileattr, force_decompress=args.force_decompress,
                on_progress=on_progress, on_warning=on_warning, on_subvol=on_subvol,
            )
        finally:
            progress.done()
    if args.dry_run:
        print(f"dry run: {len(done)} subvolume(s) would be received", file=sys.stderr)
    return 0
