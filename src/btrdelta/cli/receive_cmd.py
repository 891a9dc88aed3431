"""``btrdelta receive``: apply a send stream below a directory, like ``btrfs receive``."""

from __future__ import annotations

import errno
import functools
import os
import sys
import time
from collections.abc import Callable

from .. import TYPE_CHECKING
from ..errors import ApplyError, BtrdeltaError, UsageError
from ..receive import ReceivedSubvol
from ..update.receive import receive_any
from ._common import Quick, add_json, parse_size, quick_parse
from ._input import dump_stream, input_position, input_size, open_input, refuse_url_input
from .progress import Progress, add_progress_options, progress_wanted

if TYPE_CHECKING:
    import argparse
    from pathlib import Path
    from typing import BinaryIO

_EPILOG = """\
examples:
  btrfs send -p /snap/A /snap/B | btrdelta receive /target
  btrdelta receive -f A-B.delta /target        # a delta stream; A was received there
  btrdelta receive A-B.stream /target          # the input as an argument ('-': stdin)
  btrdelta receive -f A-B.delta --key release.pub /target   # only if A-B.delta.sig is valid
  btrdelta receive -q --json -f A.stream /target            # scripts: the result as JSON

btrfs receive's options mean the same here: -f FILE, -e, -E N, -q, -C, -m ROOTMOUNT, --dump,
--force-decompress. Clone sources are looked for below DEST, parents too, then (btrfs)
anywhere on DEST's filesystem; with -m both only below ROOTMOUNT (DEST's btrfs).
Receiving needs root (file owners, subvolumes)."""


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
            "again (their old files verified in the background, before the subvolume gets "
            "its name; in a delta of a --compressed-data stream their extents are not "
            "recompressed, nor those of changed files whose new content has a digest, "
            "written as data, so the expanded stream's digest is checked only with --key, "
            "its command count and size always). Prints `At subvol NAME` / `At snapshot NAME` "
            "for each subvolume on standard error (not with -q), and progress on a terminal."
        ),
        epilog=_EPILOG,
    )
    p.add_argument("-f", "--file", dest="file", metavar="FILE", default=None,
                   help="read the stream from FILE (default '-': standard input)")
    p.add_argument("input", nargs="?", metavar="FILE",
                   help="the stream, instead of -f FILE ('-': standard input)")
    p.add_argument("dest", nargs="?", metavar="DEST", help="directory to receive into")
    p.add_argument("-e", dest="stop_at_end", action="store_true",
                   help="stop after the first END (of concatenated streams)")
    p.add_argument("-E", "--max-errors", type=_count, default=1, metavar="N",
                   help="stop after N failed commands (0: never; default 1)")
    p.add_argument("-C", "--chroot", action="store_true",
                   help="confine the receive to DEST (btrfs receive -C); always on here: every "
                        "path of the stream is resolved beneath the subvolume it belongs to")
    p.add_argument("-m", dest="search_root", metavar="ROOTMOUNT",
                   help="look for parents and clone sources below ROOTMOUNT (a directory of "
                        "DEST's btrfs, e.g. where its top level is mounted) instead of below "
                        "DEST (clone sources) or anywhere on DEST's btrfs (parents) "
                        "(btrfs receive -m)")
    p.add_argument("--dump", action="store_true",
                   help="print the stream instead of applying it (same as `btrdelta dump`)")
    p.add_argument("--dry-run", action="store_true",
                   help="parse the stream and resolve paths, parents and clone sources; "
                        "write nothing")
    p.add_argument("--backend", choices=("auto", "btrfs", "dir"), default="auto",
                   help="btrfs: real subvolumes (DEST on btrfs); dir: plain directories, "
                        "on any filesystem; auto (default): btrfs where DEST is on btrfs, "
                        "else dir")
    p.add_argument("--fileattr", action="store_true",
                   help="apply FILEATTR inode flags with chattr equivalents (btrfs receive "
                        "ignores them)")
    p.add_argument("--force-decompress", action="store_true",
                   help="decompress ENCODED_WRITE data even where btrfs could store it as is")
    p.add_argument("--max-file-size", type=parse_size, default=None,
                   metavar="SIZE",
                   help="delta streams: the largest file a patch may rebuild and the most "
                        "memory one record may take (default 256M; as delta expand)")
    p.add_argument("--key", action="append", metavar="PUBKEY",
                   help="require a signature by this Ed25519 public key (repeatable: any of "
                        "them); the subvolume gets its final name only after the signature "
                        "verified over the whole stream (exit 5 otherwise)")
    p.add_argument("--signature", metavar="SIG",
                   help="the detached signature (default: FILE.sig; needed for stdin)")
    add_json(p, "the subvolumes received")
    add_progress_options(p, verbose=True)
    p.set_defaults(func=run)


#: the options of :func:`add_parser` that :func:`quick_args` reads (tests/cli/test_quick.py
#: checks them against the parser; ``-E`` and ``--max-file-size``, whose values the parser
#: converts, and ``--key``, a list that starts as None, are left to it)
_QUICK: Quick = {
    **dict.fromkeys(("-f", "--file"), ("file", "store", None)),
    "-e": ("stop_at_end", "true", None),
    **dict.fromkeys(("-C", "--chroot"), ("chroot", "true", None)),
    "-m": ("search_root", "store", None),
    "--dump": ("dump", "true", None),
    "--dry-run": ("dry_run", "true", None),
    "--backend": ("backend", "store", {v: v for v in ("auto", "btrfs", "dir")}),
    "--fileattr": ("fileattr", "true", None),
    "--force-decompress": ("force_decompress", "true", None),
    "--signature": ("signature", "store", None),
    "--json": ("json", "true", None),
    **dict.fromkeys(("-q", "--quiet"), ("quiet", "true", None)),
    "--progress": ("progress", "true", None),
    **dict.fromkeys(("-v", "--verbose"), ("verbose", "count", None)),
}
_DEFAULTS: dict[str, object] = {
    "file": None, "input": None, "dest": None, "stop_at_end": False, "max_errors": 1,
    "chroot": False, "search_root": None, "dump": False, "dry_run": False, "backend": "auto",
    "fileattr": False, "force_decompress": False, "max_file_size": None, "key": None,
    "signature": None, "json": False, "quiet": False, "progress": False, "verbose": 0,
}


def quick_args(words: list[str]) -> argparse.Namespace | None:
    """The words after ``receive`` as :func:`add_parser`'s parser reads them, when they are
    plain (:func:`~._common.quick_parse`; None: the parser reads them): a receive then
    builds no parser and imports neither ``argparse`` nor ``gettext`` (~3-5 ms of the
    receiving thread's start, before its first record)."""
    for positionals in ((), ("input",), ("input", "dest")):
        ns = quick_parse(words, _QUICK, positionals, _DEFAULTS)
        if ns is not None:
            ns.func = run
            for dest in ("input", "dest"):  # (last, as the parser sets its positionals)
                value = getattr(ns, dest)
                delattr(ns, dest)
                setattr(ns, dest, value)
            return ns
    return None


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        from ._lean import argparse

        raise argparse.ArgumentTypeError(f"not a count: {text!r}")
    return value


def _signed_receiver(args: argparse.Namespace, name: str) -> Callable[..., list[ReceivedSubvol]]:
    """``receive --key``: the keys and the signature are read (and the signature checked)
    before the input is opened."""
    from ..trust import load_public_key, read_signature
    from ..update.signed import receive_signed, signature_path

    keys = [load_public_key(k) for k in args.key]
    sig_path = signature_path(name, args.signature)
    signature = read_signature(sig_path)
    return functools.partial(receive_signed, signature=signature, keys=keys,
                             signature_source=sig_path)


def _names(args: argparse.Namespace) -> tuple[str, str | None]:
    """(input, DEST) from ``-f``, ``[FILE] DEST``.

    Raises:
        UsageError: DEST is a file: the only argument (``receive A.stream``), or FILE is
            a directory too (``receive DEST A.stream``: the two swapped).
    """
    if args.dest is None and args.input is not None and not args.dump:
        args.dest, args.input = args.input, None  # `receive DEST`: the only argument is DEST
        if args.file is None and os.path.isfile(args.dest):
            import shlex  # (this mistake only)

            raise UsageError(f"{args.dest} is a file: give the directory to receive into "
                             f"too: btrdelta receive {shlex.quote(args.dest)} DEST")
    if args.input is not None and args.dest is not None and os.path.isdir(args.input) \
            and os.path.isfile(args.dest):
        import shlex

        raise UsageError(f"{args.input} is a directory and {args.dest} a file: the stream "
                         "comes first: btrdelta receive "
                         f"{shlex.quote(args.dest)} {shlex.quote(args.input)}")
    if args.file and args.input:
        raise UsageError("give the input either with -f or as an argument, not both")
    if args.dump and args.dest is not None:
        raise UsageError("--dump takes no DEST")
    if not args.dump and args.dest is None:
        raise UsageError("DEST is required (unless --dump)")
    name = str(args.file or args.input or "-")
    refuse_url_input(name, "receive", "--dump" if args.dump else str(args.dest))
    return name, args.dest


def run(args: argparse.Namespace) -> int:
    """Receive the stream."""
    name, dest = _names(args)
    if args.dump:
        with open_input(name) as f:
            dump_stream(f, name)
        return 0
    assert dest is not None
    if not os.path.isdir(dest):
        import shlex

        what = ("is not a directory" if os.path.lexists(dest) else
                f"does not exist (make it first: mkdir -p {shlex.quote(dest)})")
        raise BtrdeltaError(f"destination {what}", source=dest)
    if args.search_root is not None and not os.path.isdir(args.search_root):
        raise BtrdeltaError("-m: not a directory", source=args.search_root)
    receiver: Callable[..., list[ReceivedSubvol]] = receive_any
    if args.key:
        receiver = _signed_receiver(args, name)
    started = time.monotonic()
    with open_input(name) as f:
        done = _receive(args, receiver, f, name, dest)
    if args.json:
        import json

        print(json.dumps({
            "input": name, "dest": dest, "dry_run": args.dry_run,
            "seconds": round(time.monotonic() - started, 3),
            "subvolumes": [_subvol_json(s) for s in done],
        }))
    elif args.dry_run and not args.quiet:
        print(f"dry run: {len(done)} subvolume(s) would be received", file=sys.stderr)
    return 0


def _receive(args: argparse.Namespace, receiver: Callable[..., list[ReceivedSubvol]],
             f: BinaryIO, name: str, dest: str) -> list[ReceivedSubvol]:
    """Run ``receiver`` with progress (input bytes of a file: percentage and ETA; of a pipe:
    file data written) and the ``At subvol`` lines."""
    size = input_size(f)
    progress = Progress("receive", enabled=progress_wanted(args), total=size)

    def on_progress(records: int, nbytes: int) -> None:
        done = input_position(f) if size is not None else nbytes
        progress.update(done, note=f"{records} records")

    def on_subvol(sv: ReceivedSubvol) -> None:
        if args.quiet:
            return
        kind = "snapshot" if sv.parent_uuid else "subvol"
        progress.message(f"At {kind} {sv.name}")
        if args.verbose:
            parent = f" parent={sv.parent_uuid}" if sv.parent_uuid else ""
            progress.message(f"  uuid={sv.uuid} ctransid={sv.ctransid}{parent}: "
                             f"{sv.records} records, {sv.data_bytes} bytes of file data")

    def on_warning(msg: str) -> None:
        progress.message(f"btrdelta receive: warning: {msg}")

    try:
        return receiver(
            f, dest, source=name, stop_at_end=args.stop_at_end,
            max_errors=args.max_errors, dry_run=args.dry_run, backend=args.backend,
            apply_fileattr=args.fileattr, force_decompress=args.force_decompress,
            on_progress=on_progress, on_warning=on_warning, on_subvol=on_subvol,
            search_root=None if args.search_root is None else _path(args.search_root),
            max_file_size=args.max_file_size,
        )
    except ApplyError as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.errno in (errno.EPERM, errno.EACCES) \
                and os.geteuid() != 0:
            exc.message += (f" (running as uid {os.geteuid()}: receiving needs root, to set "
                            "file owners and make subvolumes)")
            exc.args = (exc.message,)
        raise
    finally:
        progress.close()


def _path(name: str) -> Path:
    from pathlib import Path

    return Path(name)


def _subvol_json(sv: ReceivedSubvol) -> dict[str, object]:
    return {
        "name": sv.name, "path": str(sv.path), "uuid": str(sv.uuid), "ctransid": sv.ctransid,
        "parent_uuid": str(sv.parent_uuid) if sv.parent_uuid else None,
        "parent_path": str(sv.parent_path) if sv.parent_path else None,
        "btrfs": sv.btrfs, "records": sv.records, "data_bytes": sv.data_bytes,
    }
