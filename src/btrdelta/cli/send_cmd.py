"""``btrdelta send``: make a btrfs send stream from directory trees (full or incremental)."""

from __future__ import annotations

import argparse
import os
import time
from typing import TYPE_CHECKING

from ..errors import BtrdeltaError
from ..send.scan import TreeScan
from ..send.store import DEFAULT_STORE
from ._common import Progress, human_bytes, open_output, stop_on_signals

if TYPE_CHECKING:
    from ..send import SendStats, StreamIds
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
    p.add_argument("--record", action="store_true",
                   help="also record a sendshot of what was sent (what the receiver will "
                        "hold), the base of later --from-sendshot sends")
    p.add_argument("--from-sendshot", metavar="ID", dest="from_sendshot",
                   help="incremental against a sendshot (an id, a unique prefix, or 'latest': "
                        "the newest of this source); the old tree is not needed")
    p.add_argument("--store", metavar="DIR",
                   help=f"the sendshot store (default {DEFAULT_STORE})")
    p.add_argument("--no-snapshot", action="store_true",
                   help="read a writable btrfs subvolume live instead of from a temporary "
                        "read-only snapshot")
    p.add_argument("--parent-uuid", metavar="UUID[:CTRANSID]|btrfs",
                   help="the UUID (and ctransid) the receiver knows the parent by, e.g. the "
                        "UUID a kernel send of it named; 'btrfs': take it from the parent "
                        "subvolume as btrfs send does (received UUID, else UUID)")
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
    if args.record or args.from_sendshot:
        stop_on_signals()
        if args.parent or args.kernel or args.parent_uuid:
            raise BtrdeltaError("--record/--from-sendshot take no --parent, --parent-uuid or "
                                "--kernel (the base is the sendshot)")
        _send_sendshot(args, version, compress, progress, started, signer)
        if signer is not None:
            signer.finish()
        return 0
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


def _send_sendshot(args: argparse.Namespace, version: int, compress: str | None,
                   progress: Progress, started: float, signer: StreamSigner | None) -> None:
    """``--record`` / ``--from-sendshot``: the source frozen, the base a record."""
    import sys

    from ..send.sendshot import send_with_sendshots
    from ..send.store import SendshotStore

    store = SendshotStore(args.store or DEFAULT_STORE)
    with open_output(args.output) as out:
        write = out.write if signer is None else signer.wrap(out.write)
        result = send_with_sendshots(
            write, args.new_dir, store=store, from_sendshot=args.from_sendshot,
            record=args.record, snapshot=not args.no_snapshot, version=version,
            compress=compress, name=os.fsencode(args.name) if args.name else None,
            on_progress=lambda st: progress.update(
                f"{st.phase}: {st.files_scanned} files, {human_bytes(st.bytes_read)} read"),
        )
    if result.warning:
        print(f"btrdelta send: warning: {result.warning}", file=sys.stderr)
    base = f" against {result.base.digest[:12]}" if result.base is not None else ""
    rec = f", recorded {result.recorded.digest}" if result.recorded is not None else ""
    progress.done(f"sent {result.stream_uuid}{base}{rec} in "
                  f"{time.monotonic() - started:.1f}s ({result.reused} files not read)")
    if result.recorded is not None and not args.progress:
        print(f"sendshot {result.recorded.digest}", file=sys.stderr)


def _parent_ids(args: argparse.Namespace) -> StreamIds | None:
    """``--parent-uuid``: the parent's identity as the receiver knows it."""
    from uuid import UUID

    from ..send import StreamIds

    text = args.parent_uuid
    if text is None:
        return None
    if not args.parent:
        raise BtrdeltaError("--parent-uuid needs --parent")
    if text == "btrfs":
        from ..send.live import frozen

        with frozen(args.parent, snapshot=False) as fz:
            if fz.info is None:
                raise BtrdeltaError("--parent-uuid btrfs: the parent is not a btrfs subvolume",
                                    path=args.parent)
            uuid = fz.stream_uuid
            assert uuid is not None
            return StreamIds(parent_uuid=uuid, parent_ctransid=fz.info.ctransid)
    uuid_text, _, stamp = text.partition(":")
    try:
        return StreamIds(parent_uuid=UUID(uuid_text), parent_ctransid=int(stamp or 0))
    except ValueError as exc:
        raise BtrdeltaError(f"--parent-uuid: not UUID[:CTRANSID]: {text!r}") from exc


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
                                quick=args.quick, name=name, on_progress=show, scan=scan,
                                ids=_parent_ids(args)):
            writer.write(rec)
    progress.done(
        f"{writer.records} records, {human_bytes(writer.bytes_written)} in "
        f"{time.monotonic() - started:.1f}s"
    )
