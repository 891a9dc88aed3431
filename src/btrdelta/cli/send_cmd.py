"""``btrdelta send``: make a btrfs send stream from directory trees (full or incremental)."""

from __future__ import annotations

import argparse
import os
import time
from typing import TYPE_CHECKING

from ..errors import BtrdeltaError
from ..send.scan import TreeScan
from ._common import Progress, human_bytes, open_output

if TYPE_CHECKING:
    from ..send import SendStats
    from ..update.signed import StreamSigner


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``send``."""
    p = sub.add_parser(
        "send",
        help="make a send stream from a directory tree (incremental with --parent)",
        description=(
            "Write a btrfs send stream that recreates NEW_DIR (full) or turns PARENT into "
            "NEW_DIR (incremental, with --parent) on any receiver, the kernel's "
            "`btrfs receive` included. Works on plain directories on any filesystem: moved "
            "files become renames, changed files send only changed blocks, identical content "
            "becomes clones. Subvolume UUIDs are derived from the trees, so the stream for "
            "the next version names this one as its parent. With --sign, a detached "
            "signature over the stream's content is written next to it (see `btrdelta sign`)."
        ),
        epilog="examples: btrdelta send /build/v1 -o v1.stream; "
               "btrdelta send -p /build/v1 /build/v2 -o v1-v2.stream --sign release.key "
               "(also writes v1-v2.stream.sig)",
    )
    p.add_argument("new_dir", metavar="NEW_DIR", help="the tree to send")
    p.add_argument("-p", "--parent", metavar="OLD_DIR", help="the tree the receiver already has")
    p.add_argument("-o", "--output", metavar="FILE", default="-",
                   help="write the stream to FILE ('-': standard output, the default)")
    p.add_argument("--proto", type=int, choices=(1, 2, 3), default=None,
                   help="stream version (default 1, or 2 with --compress)")
    p.add_argument("--compress", choices=("zstd", "zlib", "none"), default="none",
                   help="send data as btrfs-compressed ENCODED_WRITE (v2+; default none)")
    p.add_argument("--quick", action="store_true",
                   help="trust equal size and mtime at the same path as unchanged (like rsync)")
    p.add_argument("--name", help="subvolume name in the stream (default: basename of NEW_DIR)")
    p.add_argument("--kernel", action="store_true",
                   help="both trees are read-only btrfs snapshots: run `btrfs send` instead")
    p.add_argument("--progress", action="store_true", help="show progress on stderr")
    p.add_argument("--sign", metavar="KEY",
                   help="also write a detached Ed25519 signature of the stream (OUTPUT.sig)")
    p.add_argument("--signature", metavar="SIG",
                   help="where to write the signature (default OUTPUT.sig; needed with stdout)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Send."""
    compress = None if args.compress == "none" else args.compress
    version = args.proto if args.proto is not None else (2 if compress else 1)
    if compress and version < 2:
        raise BtrdeltaError("--compress needs --proto 2 or later")
    signer = None
    if args.sign:
        from ..update.signed import StreamSigner

        signer = StreamSigner.start(args.sign, args.signature, args.output)
    progress = Progress(Progress.wanted(args), "send: ")
    started = time.monotonic()
    scan: TreeScan | None = None
    if not args.kernel:
        # start reading the trees (child process + threads) before the slow imports below
        scan = TreeScan(
            args.new_dir, args.parent,
            on_entry=lambda files, nbytes: progress.update(
                f"scan: {files} files, {human_bytes(nbytes)} scanned"
            ),
        )
    try:
        _send(args, version, compress, progress, started, scan, signer)
    finally:
        if scan is not None:
            scan.close()
    if signer is not None:
        signer.finish()
    return 0


def _send(args: argparse.Namespace, version: int, compress: str | None, progress: Progress,
          started: float, scan: TreeScan | None, signer: StreamSigner | None) -> None:
    """Write the stream (imports the encoder while ``scan`` reads the trees)."""
    from ..send import kernel_send, send_records
    from ..stream import StreamWriter

    with open_output(args.output) as out:
        write = out.write if signer is None else signer.wrap(out.write)
        if scan is None:
            n = kernel_send(write, args.new_dir, args.parent, version=version,
                            compressed=compress is not None)
            progress.done(f"{human_bytes(n)} from btrfs send")
            return
        writer = StreamWriter(write, version)

        def show(stats: SendStats) -> None:
            progress.update(
                f"{stats.phase}: {stats.files_scanned} files, "
                f"{human_bytes(stats.bytes_scanned)} scanned, "
                f"{human_bytes(stats.bytes_read)} read, "
                f"{human_bytes(writer.bytes_written)} emitted"
            )

        name = os.fsencode(args.name) if args.name else None
        for rec in send_records(args.new_dir, args.parent, version=version, compress=compress,
                                quick=args.quick, name=name, on_progress=show, scan=scan):
            writer.write(rec)
    progress.done(
        f"{writer.records} records, {human_bytes(writer.bytes_written)} in "
        f"{time.monotonic() - started:.1f}s"
    )
