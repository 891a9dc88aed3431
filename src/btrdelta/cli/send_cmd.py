"""``btrdelta send``: make a btrfs send stream from directory trees (full or incremental)."""

from __future__ import annotations

import os
import stat
import time

from .. import TYPE_CHECKING
from .._malloc import keep_freed_memory
from ..errors import BtrdeltaError, UsageError
from ..send.store import DEFAULT_STORE
from ._common import (
    Quick,
    add_json,
    human_bytes,
    json_line,
    json_needs_stdout,
    meant,
    open_output,
    quick_parse,
    refuse_terminal_output,
    set_extra_hint,
)
from .progress import Progress, add_progress_options, progress_wanted

if TYPE_CHECKING:
    import argparse
    from uuid import UUID

    from ..send import SendStats, StreamIds
    from ..send.sendshot import Preloaded
    from ..update.signed import StreamSigner

#: ``--proto 0``: the highest version the kernel's ``btrfs send`` writes (outside debug
#: builds); version 3 adds only fs-verity, which this sender does not send, and btrfs-progs
#: 6.2 (Debian bookworm) refuses it ("stream version 3 not supported")
_HIGHEST = 2

_EPILOG = """\
examples:
  btrdelta send /build/v1 -f v1.stream
  btrdelta send -p /build/v1 /build/v2 -f v1-v2.stream --sign release.key   # + v1-v2.stream.sig
  btrdelta send -p /build/v1 -c /build/lib-2 /build/v2 | btrdelta receive /target
  btrdelta send --no-data -p /build/v1 /build/v2 | btrdelta dump   # what changed, no data
  btrdelta send --kernel -p /snap/A /snap/B -f A-B.stream           # runs btrfs send
  btrdelta send /data -f inc.stream --from-sendshot latest --record  # no old tree needed

btrfs send's options mean the same here: -p, -c (repeatable), -f FILE, --no-data,
--compressed-data, --proto N (0: the highest the kernel writes, 2), -q, -v."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``send``."""
    p = sub.add_parser(
        "send",
        help="make a send stream from a directory tree (incremental with -p)",
        description=(
            "Write a btrfs send stream that recreates NEW_DIR (full) or turns PARENT into "
            "NEW_DIR (incremental, with -p) on any receiver, the kernel's "
            "`btrfs receive` included. Works on plain directories on any filesystem: moved "
            "files become renames, changed files send only changed blocks, identical content "
            "becomes clones (from the parent, from NEW_DIR itself, or from a clone source "
            "given with -c). Subvolume UUIDs are derived from the trees, so the stream for "
            "the next version names this one as its parent, and a clone source is found by "
            "the receiver that received a full stream of it (with --parent-uuid btrfs: "
            "received from btrfs send). With --sign, a detached "
            "signature over the stream's content is written next to it (see `btrdelta sign`)."
        ),
        epilog=_EPILOG,
    )
    p.add_argument("new_dir", metavar="NEW_DIR",
                   help="the tree to send; a symlink given here (or as PARENT, CLONE_SRC) is "
                        "followed, as du, find -H and tree-sum take their arguments: the "
                        "stream is of the tree it leads to, named after it")
    p.add_argument("-p", "--parent", metavar="PARENT", help="the tree the receiver already has")
    p.add_argument("-c", "--clone-src", action="append", default=[], metavar="CLONE_SRC",
                   help="another tree the receiver has (received from a full stream of it): "
                        "whole files found there are sent as clones (repeatable; btrfs "
                        "send -c; without -p the stream is still a full one)")
    p.add_argument("-f", "-o", "--output", dest="output", metavar="FILE", default="-",
                   help="write the stream to FILE ('-': standard output, the default)")
    p.add_argument("--proto", type=int, choices=(0, 1, 2, 3), default=None,
                   help="stream version (default 1, or 2 with compressed data; 0: the "
                        "highest the kernel's btrfs send writes, 2; 3 adds nothing sent "
                        "from a tree, and btrfs-progs 6.2 cannot receive it)")
    p.add_argument("--compressed-data", action="store_true",
                   help="send data compressed (ENCODED_WRITE, proto 2+): btrfs send passes "
                        "extents compressed on disk, btrdelta compresses as btrfs would "
                        "(--compress, default zstd)")
    p.add_argument("--compress", choices=("zstd", "zlib", "none"), default=None,
                   help="compression of ENCODED_WRITE data, zstd, zlib or none (proto 2+; "
                        "default none, or zstd with --compressed-data)")
    p.add_argument("--no-data", action="store_true",
                   help="send no file data: each changed range is an update_extent record "
                        "(btrfs send --no-data: shows what changed; cannot update a receiver)")
    p.add_argument("--quick", action="store_true",
                   help="trust equal size and mtime at the same path as unchanged (like rsync)")
    p.add_argument("--name", help="subvolume name in the stream (default: basename of NEW_DIR)")
    p.add_argument("--kernel", action="store_true",
                   help="the trees are read-only btrfs snapshots: run `btrfs send` instead")
    p.add_argument("--record", action="store_true",
                   help="also record a sendshot of what was sent (what the receiver will "
                        "hold), the base of later --from-sendshot sends")
    p.add_argument("--from-sendshot", metavar="ID", dest="from_sendshot",
                   help="incremental against a sendshot (an id, a unique prefix, the name it "
                        "was sent as, or 'latest': the newest of this source); the old tree "
                        "is not needed")
    p.add_argument("--store", metavar="DIR",
                   help=f"the sendshot store (default {DEFAULT_STORE})")
    p.add_argument("--no-snapshot", action="store_true",
                   help="read a writable btrfs subvolume live instead of from a temporary "
                        "read-only snapshot")
    p.add_argument("--parent-uuid", metavar="UUID[:CTRANSID]|btrfs",
                   help="the UUID (and ctransid) the receiver knows the parent by, e.g. the "
                        "UUID a kernel send of it named; 'btrfs': take it from the parent "
                        "subvolume as btrfs send does (received UUID, else UUID), and the -c "
                        "clone sources' UUIDs too")
    p.add_argument("--sign", metavar="KEY",
                   help="also write a detached Ed25519 signature of the stream (FILE.sig)")
    p.add_argument("--signature", metavar="SIG",
                   help="where to write the signature (default FILE.sig; needed with stdout)")
    add_json(p, "what was sent")
    add_progress_options(p, verbose=True)
    set_extra_hint(p, _two_trees)
    p.set_defaults(func=run)


#: the options of :func:`add_parser` for :func:`quick_args` (tests/cli/test_quick.py checks
#: them against the parser)
_QUICK: Quick = {
    **dict.fromkeys(("-p", "--parent"), ("parent", "store", None)),
    **dict.fromkeys(("-c", "--clone-src"), ("clone_src", "append", None)),
    **dict.fromkeys(("-f", "-o", "--output"), ("output", "store", None)),
    "--proto": ("proto", "store", {str(v): v for v in (0, 1, 2, 3)}),
    "--compressed-data": ("compressed_data", "true", None),
    "--compress": ("compress", "store", {v: v for v in ("zstd", "zlib", "none")}),
    "--no-data": ("no_data", "true", None),
    "--quick": ("quick", "true", None),
    "--name": ("name", "store", None),
    "--kernel": ("kernel", "true", None),
    "--record": ("record", "true", None),
    "--from-sendshot": ("from_sendshot", "store", None),
    "--store": ("store", "store", None),
    "--no-snapshot": ("no_snapshot", "true", None),
    "--parent-uuid": ("parent_uuid", "store", None),
    "--sign": ("sign", "store", None),
    "--signature": ("signature", "store", None),
    "--json": ("json", "true", None),
    **dict.fromkeys(("-q", "--quiet"), ("quiet", "true", None)),
    "--progress": ("progress", "true", None),
    **dict.fromkeys(("-v", "--verbose"), ("verbose", "count", None)),
}
_DEFAULTS: dict[str, object] = {
    "new_dir": None, "parent": None, "clone_src": [], "output": "-", "proto": None,
    "compressed_data": False, "compress": None, "no_data": False, "quick": False,
    "name": None, "kernel": False, "record": False, "from_sendshot": None, "store": None,
    "no_snapshot": False, "parent_uuid": None, "sign": None, "signature": None,
    "json": False, "quiet": False, "progress": False, "verbose": 0,
}


def quick_args(words: list[str]) -> argparse.Namespace | None:
    """The words after ``send`` as :func:`add_parser`'s parser reads them, when they are
    plain (:func:`~._common.quick_parse`; None: the parser reads them)."""
    ns = quick_parse(words, _QUICK, ("new_dir",), _DEFAULTS)
    if ns is not None:
        ns.func = run
    return ns


def _two_trees(args: argparse.Namespace, extra: list[str], words: list[str]) -> str | None:
    """``send OLD NEW`` (as ``diff OLD NEW``): one tree is sent, the old one is -p's;
    ``send TREE FILE`` (as ``cp``): the stream goes to -o."""
    if len(extra) != 1 or extra[0].startswith("-") or args.parent:
        return None
    import shlex  # (this hint only: not imported by every send)

    if args.output == "-" and not os.path.isdir(extra[0]):
        at = len(words) - 1 - words[::-1].index(extra[0])
        return f"write the stream to a file with -o: {meant('btrdelta send', words, {at: '-o'})}"
    old, new = shlex.quote(args.new_dir), shlex.quote(extra[0])
    return (f"send takes one tree; for the changes from {old} to {new}, give the old one "
            f"with -p: btrdelta send -p {old} {new}")


def _options(args: argparse.Namespace) -> tuple[int, str | None]:
    """(stream version, compression) from --proto, --compress and --compressed-data."""
    compress = args.compress or ("zstd" if args.compressed_data else "none")
    compress_ = None if compress == "none" else compress
    if args.proto == 0:
        version = _HIGHEST
    elif args.proto is not None:
        version = args.proto
    else:
        version = 2 if compress_ or args.compressed_data else 1
    if (compress_ or args.compressed_data) and version < 2:
        raise UsageError("compressed data needs --proto 2 or later")
    if args.kernel and args.compress not in (None, "none"):
        raise UsageError("--kernel sends what btrfs stores: use --compressed-data, not "
                         "--compress")
    json_needs_stdout(args, args.output)
    return version, compress_


def _keep_freed_buffers() -> None:
    """Buffers up to 32 MiB from the heap, 8 MiB of freed ones kept there (not each a fresh
    mmap: a small --from-sendshot made ~500 page faults fewer; docs/performance.md), set
    through the stream accelerator's ``mallopt`` (without it, not: importing ctypes would
    cost more than the faults, ~1.4 ms)."""
    try:
        from ..stream._speedups import mallopt
    except ImportError:
        return
    keep_freed_memory(trim=8 << 20, mallopt=mallopt)


def run(args: argparse.Namespace) -> int:
    """Send."""
    _keep_freed_buffers()
    args.new_dir, args.parent = _followed(args.new_dir), args.parent and _followed(args.parent)
    args.clone_src = [_followed(src) for src in args.clone_src]
    version, compress = _options(args)
    refuse_terminal_output(args.output)  # before the progress display starts
    signer = None
    if args.sign:
        from ..update.signed import StreamSigner

        signer = StreamSigner.start(args.sign, args.signature, args.output)
    progress = Progress("send", enabled=progress_wanted(args))
    if args.verbose:
        progress.message(f"At subvol {args.new_dir}")
    started = time.monotonic()
    try:
        if args.record or args.from_sendshot:
            report = _send_sendshot(args, version, compress, progress, signer)
        elif not args.kernel and not args.parent:
            report = _send_full(args, version, compress, progress, signer)
        else:
            report = _send(args, version, compress, progress, signer)
    finally:
        progress.close()
    if signer is not None:
        signer.finish()
    report["seconds"] = round(time.monotonic() - started, 3)
    if args.json:
        print(json_line(report))
    elif args.verbose or progress_wanted(args):
        records = f"{report['records']} records, " if report["records"] is not None else ""
        progress.message(f"{report['output']}: {records}"
                         f"{human_bytes(int(str(report['bytes'])))} in "
                         f"{report['seconds']:.1f}s")
    if report["sendshot"] is not None and not args.quiet and not args.json:
        progress.message(f"sendshot {report['sendshot']}")
    return 0


def _followed(path: str) -> str:
    """``path``, or where it leads where it is a symlink (the links inside a tree are sent
    as links)."""
    return os.path.realpath(path) if os.path.islink(path) else path


def _report(args: argparse.Namespace, version: int) -> dict[str, object]:
    """The ``--json`` report with nothing known yet (docs/cli-json.md)."""
    return {
        "output": args.output, "version": version, "kernel": args.kernel,
        "no_data": args.no_data, "uuid": None, "parent_uuid": None, "records": None,
        "bytes": 0, "files": None, "bytes_read": None, "data_bytes": None,
        "cloned_bytes": None, "sendshot": None, "from_sendshot": None}


def _send_sendshot(args: argparse.Namespace, version: int, compress: str | None,
                   progress: Progress, signer: StreamSigner | None) -> dict[str, object]:
    """``--record`` / ``--from-sendshot``: the source frozen, the base a record. The send's
    modules (~4 ms of CPU) are imported, and the base record is loaded (~5 ms of the small
    tree of ``benchmarks sendshot``), while the kernel snapshots a live subvolume."""
    from ..send.live import frozen

    if args.parent or args.kernel or args.parent_uuid or args.clone_src or args.no_data:
        raise UsageError("--record/--from-sendshot take no -p, -c, --parent-uuid, --no-data "
                         "or --kernel (the base is the sendshot)")
    report = _report(args, version)
    written = [0]
    early: list[Preloaded] = []

    def meanwhile(lineage: UUID | None) -> None:
        """The send's modules imported; the base loaded while a snapshot is made."""
        from ..send.sendshot import Preloaded
        from ..send.store import SendshotStore

        if args.from_sendshot is not None:
            early.append(Preloaded(SendshotStore(args.store or DEFAULT_STORE),
                                   args.from_sendshot, args.new_dir))
            early[0].load(lineage)

    def made(snapshot: bytes) -> None:
        """The change sweep since the base chosen, if chosen yet (the snapshot's thread)."""
        if early:
            early[0].sweep(snapshot)

    with frozen(os.path.abspath(os.fsencode(args.new_dir)), snapshot=not args.no_snapshot,
                meanwhile=meanwhile, made=made) as fz:
        from ..send.sendshot import send_with_sendshots
        from ..send.store import SendshotStore

        store = SendshotStore(args.store or DEFAULT_STORE)
        with open_output(args.output, durable=False) as out:
            write = out.write if signer is None else signer.wrap(out.write)

            def counted(data: bytes) -> None:
                written[0] += len(data)
                write(data)

            result = send_with_sendshots(
                counted, args.new_dir, store=store, from_sendshot=args.from_sendshot,
                record=args.record, snapshot=not args.no_snapshot, version=version,
                compress=compress, name=os.fsencode(args.name) if args.name else None,
                on_progress=lambda st: progress.update(
                    st.bytes_read, note=f"{st.phase}: {st.files_scanned} files"),
                # like the stream (open_output(durable=False)), the record is not waited for on
                # the disk: a missing or damaged newest record is absent to --from-sendshot
                # latest (docs/formats/sendshot.md §4)
                durable=False, tree=fz, preloaded=early[0] if early else None,
            )
    if result.warning:
        progress.message(f"btrdelta send: warning: {result.warning}")
    sent_name = args.name or os.path.basename(os.path.abspath(args.new_dir))
    if result.base is not None and os.fsencode(sent_name) == result.base.head.name:
        # a receiver holds the base under this name: its `receive` into the same directory
        # would fail ("File exists") after the whole stream had been read
        progress.message(
            f"btrdelta send: note: the stream names its subvolume {sent_name!r} like its base "
            "does: receive it into another directory, or name each send (--name "
            f"{sent_name}.$(date +%Y%m%dT%H%M))")
    st = result.stats
    report.update(uuid=result.stream_uuid, parent_uuid=result.parent_uuid,
                  records=st.records, bytes=written[0], files=st.files_scanned,
                  bytes_read=st.bytes_read, data_bytes=st.data_bytes,
                  cloned_bytes=st.cloned_bytes,
                  sendshot=result.recorded.digest if result.recorded is not None else None,
                  from_sendshot=result.base.digest if result.base is not None else None)
    return report


def _parent_ids(args: argparse.Namespace) -> StreamIds | None:
    """``--parent-uuid``: the parent's identity as the receiver knows it."""
    from uuid import UUID

    from ..send import StreamIds

    text = args.parent_uuid
    if text is None:
        return None
    if not args.parent:
        raise UsageError("--parent-uuid needs -p PARENT")
    if text == "btrfs":
        uuid, ctransid = _btrfs_ids(args.parent, "parent")
        return StreamIds(parent_uuid=uuid, parent_ctransid=ctransid, clone_ids=tuple(
            _btrfs_ids(src, "clone source") for src in args.clone_src or ()))
    uuid_text, _, stamp = text.partition(":")
    try:
        return StreamIds(parent_uuid=UUID(uuid_text), parent_ctransid=int(stamp or 0))
    except ValueError:
        raise UsageError(f"--parent-uuid: not UUID[:CTRANSID]: {text!r}") from None


def _tmpdir() -> str | None:
    """Where large temporary files go: $TMPDIR, else /var/tmp (meant for them; /tmp is
    often in memory)."""
    return os.environ.get("TMPDIR") or ("/var/tmp" if os.path.isdir("/var/tmp") else None)


def _btrfs_ids(path: str, what: str) -> tuple[UUID, int]:
    """The UUID and ctransid btrfs send names the subvolume ``path`` by (``--parent-uuid
    btrfs``): its received UUID, else its UUID."""
    from ..send.live import frozen

    with frozen(path, snapshot=False) as fz:
        if fz.info is None or fz.stream_uuid is None:
            raise BtrdeltaError(f"--parent-uuid btrfs: the {what} is not a btrfs subvolume",
                                path=path)
        return fz.stream_uuid, fz.info.ctransid


def _send_full(args: argparse.Namespace, version: int, compress: str | None,
               progress: Progress, signer: StreamSigner | None) -> dict[str, object]:
    """A full stream (no -p, no -c), in bounded memory (:class:`~..send.full.FullSend`)."""
    from ..send.full import FullSend

    report = _report(args, version)

    def show(stats: SendStats) -> None:
        progress.update(stats.bytes_read, note=f"{stats.phase}: {stats.files_scanned} files")

    # the spool of a stream to a pipe goes to _tmpdir()
    sender = FullSend(args.new_dir, version=version, compress=compress, no_data=args.no_data,
                      name=os.fsencode(args.name) if args.name else None, on_progress=show,
                      tmpdir=_tmpdir(), clone_sources=args.clone_src or ())
    with open_output(args.output, durable=False) as out:
        # a new regular file takes the records directly (the first is written last)
        direct = signer is None and args.output not in (None, "-") and out.seekable() \
            and stat.S_ISREG(os.fstat(out.fileno()).st_mode) and out.tell() == 0
        records, nbytes = sender.write_to(out.write if signer is None else signer.wrap(out.write),
                                          out if direct else None)
    assert sender.header is not None
    st = sender.stats
    report.update(uuid=str(sender.header.uuid), records=records, bytes=nbytes,
                  files=st.files_scanned, bytes_read=st.bytes_read, data_bytes=st.data_bytes,
                  cloned_bytes=st.cloned_bytes)
    return report


def _send(args: argparse.Namespace, version: int, compress: str | None, progress: Progress,
          signer: StreamSigner | None) -> dict[str, object]:
    """Write an incremental stream (or pass the kernel's through); the report."""
    from ..send import kernel_send, send_records
    from ..stream import StreamWriter

    report = _report(args, version)
    with open_output(args.output, durable=False) as out:
        write = out.write if signer is None else signer.wrap(out.write)
        if args.kernel:
            report["bytes"] = kernel_send(
                write, args.new_dir, args.parent, version=0 if args.proto == 0 else version,
                compressed=args.compressed_data, clone_sources=args.clone_src,
                no_data=args.no_data)
            return report
        writer = StreamWriter(write, version)
        last: list[SendStats] = []

        def show(stats: SendStats) -> None:
            last[:] = [stats]
            progress.update(stats.bytes_read, note=f"{stats.phase}: {stats.files_scanned} "
                            f"files, {human_bytes(writer.bytes_written)} sent")

        name = os.fsencode(args.name) if args.name else None
        records = send_records(args.new_dir, args.parent, version=version, compress=compress,
                               quick=args.quick, name=name, on_progress=show,
                               clone_sources=args.clone_src or (), no_data=args.no_data,
                               ids=_parent_ids(args), tmpdir=_tmpdir())
        head = next(records)
        report["uuid"] = str(getattr(head, "uuid", ""))
        report["parent_uuid"] = str(getattr(head, "clone_uuid", "")) or None
        writer.write(head)
        for rec in records:
            writer.write(rec)
    report.update(records=writer.records, bytes=writer.bytes_written)
    if last:
        st = last[0]
        report.update(files=st.files_scanned, bytes_read=st.bytes_read,
                      data_bytes=st.data_bytes, cloned_bytes=st.cloned_bytes)
    return report
