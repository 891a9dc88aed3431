"""``btrdelta image``: compress, clone, mount, nbd, info, verify and gc chunked images.

Thin: each subcommand parses its arguments, calls one function of
:mod:`btrdelta.update.clone` / :mod:`btrdelta.update.image` (or an export of
:mod:`btrdelta.chunk`), and prints the result.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading
import types

from .._optional import need
from ..chunk.compress import DEFAULT_LEVEL
from ..chunk.store import ChunkStore, ImageReader, VerifyReport, split_store_name
from ..errors import BtrdeltaError, ChecksumError, MissingBaseError, UsageError
from ..transport.listen import ListenAddress, parse_listen, server_tls
from ..trust import load_private_key, load_public_key
from ..update.clone import CloneReport, clone_image
from ..update.image import RepairReport, compress_archive, gc_store, image_info, verify_image
from ._common import (
    add_jobs,
    add_json,
    avg_chunk_size,
    default_signals,
    examples,
    free_words,
    human_bytes,
    meant,
    naming_output,
    set_missing_hint,
    zstd_level,
)
from ._paths import location, refuse_same_file
from .http_options import add_http_options, http_config
from .progress import (
    Phases,
    Progress,
    add_progress_options,
    add_quiet_option,
    progress_wanted,
)

_FORMATS = ("Formats: docs/formats/chunk-archive.md, chunk-store.md, casync.md. Archives are "
            "named *.bdar (the old *.cba names work too: readers go by content).")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``image`` and its subcommands."""
    p = sub.add_parser(
        "image", help="chunked images: compress, clone over HTTP, mount, NBD export",
        description="Content-defined chunk archives of whole images (ext4, squashfs, erofs), "
        "cloned into a local chunk store and/or straight onto a file or device, reusing what "
        "the store, the output and seeds hold; exposed read-only through FUSE or NBD. "
        "casync/desync .caibx indexes and .castr stores are read too. " + _FORMATS,
        epilog=examples(
            "btrdelta key generate -o release                 # once; release.pub to devices",
            "btrdelta image compress -i rootfs-v2.ext4 -o www/rootfs-v2.bdar --sign release.key",
            "btrdelta serve www                               # or any HTTP server (ranges)",
            "# on a device: fetch what the old image (the running slot) lacks",
            "btrdelta image clone http://server/rootfs-v2.bdar /var/lib/images/v2 \\",
            "    --seed /dev/mmcblk0p2 --key release.pub",
            "btrdelta image verify /var/lib/images/v2 --key release.pub",
            "btrdelta image clone http://server/rootfs-v2.bdar --output /dev/mmcblk0p3 \\",
            "    --seed /dev/mmcblk0p2 --key release.pub      # no store: onto slot B",
            "btrdelta image gc /var/lib/images                # chunks no image needs",
            note="Each subcommand's --help has more (mount, nbd, info)."),
    )
    isub = p.add_subparsers(dest="image_command", metavar="SUBCOMMAND")

    def usage(_args: argparse.Namespace) -> int:
        p.print_help(sys.stderr)
        return 2

    p.set_defaults(func=usage)
    _add_compress(isub)
    _add_clone(isub)
    _add_exports(isub)
    i = isub.add_parser("info", help="what an archive, description or casync index holds",
                        description="Say what an image archive (a path or an http(s) URL: "
                        "only its header and index are read), an image in a chunk store, or "
                        "a casync/desync .caibx index holds: the image's size and BLAKE3, "
                        "its chunks (distinct and total), the chunker's parameters, the "
                        "archive's size and whether it is signed (checked with --key).",
                        epilog=examples("btrdelta image info http://server/rootfs-v2.bdar",
                                        "btrdelta image info --json /var/lib/images/v2"))
    i.add_argument("source", metavar="ARCHIVE|STORE/NAME|INDEX.caibx", type=location,
                   help="an archive (path or URL), an image in a store, or a casync index")
    i.add_argument("--key", metavar="PUBKEY", help="also check the signature with this key")
    add_json(i, "what it holds")
    add_http_options(i)
    i.set_defaults(func=run_info)
    _add_verify(isub)
    g = isub.add_parser("gc", help="drop unused and damaged chunks and leftovers from a store",
                        description="Remove from the chunk store STORE every chunk that no "
                        "image description names, every chunk that one names but whose "
                        "size or content is wrong (a later clone or verify --repair fetches "
                        "it again), the temporary files of killed clones and the source "
                        "records of removed images. Delete an image first by removing its "
                        "description file (STORE/NAME). Takes the store's lock exclusively: "
                        "it waits for no clone unless given --wait.",
                        epilog=examples("btrdelta image gc /var/lib/images",
                                        "btrdelta image gc --dry-run --json /var/lib/images"))
    g.add_argument("store", metavar="STORE", help="chunk store directory")
    g.add_argument("--dry-run", action="store_true", help="only report")
    g.add_argument("--quick", action="store_true",
                   help="check kept chunks' sizes only, not their content")
    g.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for a clone or verify holding the store to finish "
                        "(default 0: fail at once, saying who holds it)")
    add_json(g, "the report")
    add_progress_options(g)
    g.set_defaults(func=run_gc)


def _add_exports(isub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    m = isub.add_parser(
        "mount", help="FUSE: expose an image in the store as one read-only file",
        description="Show image NAME of the chunk store STORE as the read-only file "
        "MOUNTPOINT/NAME (FUSE), read from the store's chunks (nothing is downloaded: clone "
        "the image first). Runs in the foreground until the mount point is unmounted "
        "(umount MOUNTPOINT; as a user fusermount -u) or the command is interrupted; says "
        "'mounted NAME ... as MOUNTPOINT/NAME' on standard error once the file is there, "
        "'unmounted MOUNTPOINT' at the end.",
        epilog=examples("btrdelta image mount /var/lib/images/v2 /run/img &",
                        "until mountpoint -q /run/img; do sleep 0.1; done",
                        "mount -o loop,ro /run/img/v2 /mnt      # the filesystem inside",
                        "umount /mnt /run/img                   # the command then ends"))
    m.add_argument("target", metavar="STORE/NAME", help="chunk store directory and image name")
    m.add_argument("mountpoint", metavar="MOUNTPOINT",
                   help="a directory; the image shows in it as MOUNTPOINT/NAME")
    add_quiet_option(m)
    m.set_defaults(func=run_mount)
    n = isub.add_parser(
        "nbd", help="serve an image in the store over NBD (read-only)",
        description="Serve image NAME of the chunk store STORE read-only over NBD (fixed "
        "newstyle, structured replies, block status: runs of zeros show as holes) to "
        "nbdinfo, nbdcopy, qemu or the kernel's nbd-client, read from the store's chunks "
        "(nothing is downloaded: clone the image first). Runs in the foreground until "
        "interrupted; says where it serves on standard error. A chunk damaged in the store "
        "fails the reads that need it (EIO) instead of serving wrong bytes.",
        epilog=examples("btrdelta image nbd /var/lib/images/v2 --listen unix:/run/v2.sock &",
                        "nbdinfo --map 'nbd+unix:///v2?socket=/run/v2.sock'"))
    n.add_argument("target", metavar="STORE/NAME", help="chunk store directory and image name")
    n.add_argument("--listen", default="127.0.0.1:10809", metavar="ADDR", type=_listen,
                   help="HOST:PORT, [IPV6]:PORT or unix:PATH (default 127.0.0.1:10809)")
    n.add_argument("--tls-cert", metavar="PEM",
                   help="serve TLS only (clients use nbds://) with this certificate")
    n.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    n.add_argument("--tls-client-ca", metavar="PEM",
                   help="also require a client certificate signed by this CA")
    add_quiet_option(n)
    n.set_defaults(func=run_nbd)


def _compress_meant(parser: argparse.ArgumentParser, words: list[str]) -> str | None:
    """``image compress IMAGE ARCHIVE`` (as ``cp``): the command with -i and -o."""
    missing = [o for o, long in (("-i", "--input"), ("-o", "--output"))
               if not any(w in (o, long) or w.startswith(f"{long}=") for w in words)]
    free = free_words(parser, words)
    if len(free) != len(missing):
        return None
    before = dict(zip(free, missing, strict=True))
    return f"name them: {meant('btrdelta image compress', words, before)}"


def _add_compress(isub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = isub.add_parser(
        "compress", help="chunk and compress an image into an archive",
        description="Cut IMAGE into content-defined chunks and write them, each "
        "zstd-compressed once, with their index into one archive file: put it on any HTTP "
        "server (`btrdelta serve`, nginx, a CDN) for `image clone`, which then downloads "
        "only the chunks a device lacks.",
        epilog=examples("btrdelta image compress -i rootfs-v2.ext4 -o "
                        "www/rootfs-v2.bdar --sign release.key"))
    c.add_argument("-i", "--input", required=True, metavar="IMAGE", help="image file or device")
    c.add_argument("-o", "--output", required=True, metavar="ARCHIVE",
                   help="archive to write (*.bdar)")
    c.add_argument("--avg-chunk", type=avg_chunk_size, default=64 << 10, metavar="SIZE",
                   help="average chunk size (default 64K; min = avg/4, max = avg*4)")
    c.add_argument("--level", type=zstd_level, default=DEFAULT_LEVEL,
                   help=f"zstd level (default {DEFAULT_LEVEL}: compressed once, fetched often)")
    c.add_argument("--sign", metavar="KEY", help="Ed25519 private key (PEM) to sign with")
    add_jobs(c, None, "compression threads (default: CPUs)")
    c.add_argument("--threads", dest="jobs", type=int, help=argparse.SUPPRESS)  # old name
    add_json(c, "what was written")
    add_progress_options(c)
    set_missing_hint(c, lambda words: _compress_meant(c, words))
    c.set_defaults(func=run_compress)


def _add_clone(isub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cl = isub.add_parser(
        "clone", help="clone an archive or casync index into a store and/or onto an output",
        description="Clone an image, fetching only the chunks that the store, the seeds and "
        "the output's old content lack. Give STORE/NAME (a chunk store), --output (a file or "
        "block device; no store needed), or both.",
        epilog="examples:\n"
        "  btrdelta image clone http://server/rootfs-v2.bdar /var/lib/images/v2 \\\n"
        "      --seed /dev/mmcblk0p2\n"
        "  btrdelta image clone http://server/rootfs-v2.bdar --output /dev/mmcblk0p3 \\\n"
        "      --seed /dev/mmcblk0p2          # no store: straight onto slot B\n"
        "  btrdelta image clone http://server/rootfs.caibx --output rootfs.img \\\n"
        "      --castr http://server/default.castr    # a casync/desync index and store",
    )
    cl.add_argument("source", metavar="SOURCE", type=location,
                    help="archive or .caibx (path or http(s) URL)")
    cl.add_argument("target", metavar="STORE/NAME", nargs="?",
                    help="chunk store directory and image name (optional with --output)")
    cl.add_argument("--output", metavar="FILE_OR_DEVICE",
                    help="write the image here (a device is updated in place, where it differs)")
    cl.add_argument("--seed", action="append", default=[], metavar="FILE_OR_DEVICE",
                    help="a file or device that may hold chunks (repeatable)")
    cl.add_argument("--castr", action="append", default=[], metavar="STORE", type=location,
                    help="casync chunk store (directory or URL) for a .caibx source, tried in "
                    "order (repeatable; default: default.castr next to the index)")
    cl.add_argument("--in-place", action="store_true",
                    help="update an existing output file in place instead of replacing it")
    cl.add_argument("--dry-run", action="store_true", help="only say how much would be fetched")
    cl.add_argument("--key", metavar="PUBKEY", help="require a valid signature by this key (PEM)")
    cl.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                    help="wait this long for a gc or repair holding the store to finish "
                         "(default 0: fail at once, saying who holds it)")
    add_json(cl, "the report")
    add_progress_options(cl)
    add_http_options(cl)
    cl.set_defaults(func=run_clone)


def _listen(text: str) -> ListenAddress:
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_verify(isub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    v = isub.add_parser(
        "verify", help="check an image in the store (every chunk's size and hash)",
        description="Check that every chunk image NAME needs is in the chunk store STORE "
        "with its size and hashing to its id (BLAKE3), and the description's signature "
        "with --key. Exit 6 when a chunk is missing, 5 when some are only damaged, naming "
        "the first. --repair drops the damaged chunks and fetches what is missing from the "
        "--seed files first, then from where the image was cloned from (or --source).",
        epilog="example: btrdelta image verify --repair /var/lib/images/v2 --seed /dev/mmcblk0p2")
    v.add_argument("target", metavar="STORE/NAME", help="chunk store directory and image name")
    v.add_argument("--key", metavar="PUBKEY", help="also check the description's signature")
    v.add_argument("--repair", action="store_true",
                   help="drop damaged chunks and fetch what is missing again")
    v.add_argument("--source", metavar="ARCHIVE", type=location,
                   help="where --repair fetches from (default: where the image was cloned from)")
    v.add_argument("--seed", action="append", default=[], metavar="FILE_OR_DEVICE",
                   help="a file or device --repair may take chunks from (repeatable)")
    v.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for the store's lock (default 0: fail at once, "
                        "saying who holds it)")
    add_json(v, "the report (also when it fails)")
    add_progress_options(v)
    add_http_options(v)
    v.set_defaults(func=run_verify)


#: why images take no '-' (streams do): every image command needs random access
_NO_STDIO = "images are read and written by ranges, not as a stream: give a file or a device"


def _no_stdio(option: str, value: str | None) -> None:
    """Refuse ``-`` (standard input or output) where an image is, in one line."""
    if value == "-":
        raise UsageError(f"{option} -: {_NO_STDIO}" + ("" if option in ("-i", "-o", "--output")
                                                         else " or an http(s) URL"))


def run_compress(args: argparse.Namespace) -> int:
    """``image compress``."""
    _no_stdio("-i", args.input)
    _no_stdio("-o", args.output)
    refuse_same_file(args.input, args.output)
    key = load_private_key(args.sign) if args.sign else None
    with naming_output(args.output), \
            Progress("compress", enabled=progress_wanted(args)) as progress:
        report = compress_archive(
            args.input, args.output, avg_chunk=args.avg_chunk, level=args.level, key=key,
            threads=args.jobs, on_progress=lambda d, t: progress.update(d, total=t),
        )
    h = report.header
    if args.json:
        print(json.dumps({"output": args.output, "image_size": h.image_size,
                          "chunks": h.order_count, "distinct_chunks": h.chunk_count,
                          "archive_size": report.archive_size, "signed": h.signed}))
        return 0
    if args.quiet:
        return 0
    chunks = "chunk" if h.order_count == 1 else "chunks"
    print(f"{args.output}: {human_bytes(h.image_size)} image, {h.order_count} {chunks} "
          f"({h.chunk_count} distinct), archive {human_bytes(report.archive_size)}"
          f"{', signed' if h.signed else ''}")
    return 0


_CLONE_FIELDS = ("kind", "image_size", "archive_size", "chunks", "from_store", "damaged",
                 "from_seeds", "fetched", "fetch_chunks", "fetch_bytes", "index_bytes",
                 "missing_bytes", "spans", "requests", "bytes_received", "full_download",
                 "out_in_place", "out_from_seeds", "out_from_store", "out_moved", "out_fetched")


def run_clone(args: argparse.Namespace) -> int:
    """``image clone``."""
    _no_stdio("SOURCE", args.source)
    _no_stdio("--output", args.output)
    if args.target is not None and args.target.startswith(("http://", "https://")):
        raise UsageError(f"STORE/NAME {args.target} is a URL: the source comes first: "
                         f"btrdelta image clone {shlex.quote(args.target)} "
                         f"{shlex.quote(args.source)}")
    key = load_public_key(args.key) if args.key else None
    with naming_output(_written(args)), \
            Phases("clone", progress_wanted(args), {"check": "chunks"}) as progress:
        report = clone_image(
            args.source, target=args.target, output=args.output, seeds=args.seed,
            castr=args.castr, dry_run=args.dry_run, public_key=key,
            in_place=args.in_place or None, wait=args.wait, config=http_config(args),
            on_progress=progress,
        )
    if args.json:
        print(json.dumps({f: getattr(report, f) for f in _CLONE_FIELDS}
                         | {"dry_run": args.dry_run}))
        return 0
    if not args.quiet:
        _print_clone(args, report)
    return 0


def _written(args: argparse.Namespace) -> str:
    """What a clone that runs out of space names (a chunk's ``pwrite`` says "No space left
    on device", not where): --output, else the store of STORE/NAME; with both, the one on
    the fuller filesystem (chunks go to the store, the image to --output)."""
    store = (os.path.dirname(os.path.normpath(args.target)) or ".") if args.target else None
    places = [p for p in (args.output, store) if p]
    if len(places) < 2:
        return places[0] if places else "the output"

    def free(path: str) -> int:
        try:
            st = os.statvfs(path if os.path.exists(path) else os.path.dirname(path) or ".")
        except OSError:
            return 1 << 62
        return st.f_bavail * st.f_frsize

    return min(places, key=free)


def _print_clone(args: argparse.Namespace, report: CloneReport) -> None:
    what = args.target or args.output
    if report.full_download and args.dry_run:
        print(f"{what}: the server ignores Range requests: a clone would download the "
              f"whole archive ({human_bytes(report.archive_size)})")
        return
    verb = "would fetch" if args.dry_run else "fetched"
    n_fetch = report.fetch_chunks
    damaged = f" ({report.damaged} damaged, dropped)" if report.damaged else ""
    # a casync store lists no sizes: its chunks are counted as they are uncompressed
    raw = " uncompressed" if report.kind == "casync" else ""
    print(f"{what}: {report.chunks} chunks: {report.from_store} in store{damaged}, "
          f"{report.from_seeds} from seeds, {verb} {n_fetch}"
          f" ({human_bytes(report.fetch_bytes)}{raw} + {human_bytes(report.index_bytes)} "
          f"index); "
          f"{report.requests} request{'' if report.requests == 1 else 's'}, "
          f"{human_bytes(report.bytes_received)} received"
          f"{' (server ignores Range: whole archive downloaded)' if report.full_download else ''}")
    if args.output and not args.dry_run:
        print(f"{args.output}: {human_bytes(report.out_in_place)} already in place, "
              f"{human_bytes(report.out_from_seeds)} copied from seeds, "
              f"{human_bytes(report.out_moved)} moved within it, "
              f"{human_bytes(report.out_from_store)} from the store, "
              f"{human_bytes(report.out_fetched)} from downloaded chunks")


def _wait_for_signal() -> None:
    stop = threading.Event()

    def on_signal(signum: int, frame: types.FrameType | None) -> None:
        stop.set()

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, on_signal) for s in signals}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_mount(args: argparse.Namespace) -> int:
    """``image mount`` (blocks until unmounted or signalled)."""
    need("mfusepy", "fuse")  # optional: ``[fuse]``
    from ..chunk.fuse import mount_image  # imported late: needs libfuse

    store_dir, name = split_store_name(args.target)
    where = f"{args.mountpoint.rstrip('/') or '/'}/{name}".replace('//', '/')

    def mounted(size: int) -> None:  # a foreground command that says nothing looks hung
        if not args.quiet:
            print(f"mounted {name} ({human_bytes(size)}, read-only) as {where}; "
                  f"umount {args.mountpoint} to end", file=sys.stderr, flush=True)

    def failed(exc: Exception) -> None:  # the reader gets EIO: say why, once per cause
        print(f"btrdelta image mount: error: {exc}; reads there fail (EIO)",
              file=sys.stderr, flush=True)

    with default_signals():  # libfuse's handlers: a clean unmount on SIGTERM/SIGHUP too
        mount_image(ChunkStore(store_dir), name, args.mountpoint, mounted=mounted,
                    on_error=failed)
    if not args.quiet:
        print(f"unmounted {args.mountpoint}", file=sys.stderr, flush=True)
    return 0


def run_nbd(args: argparse.Namespace) -> int:
    """``image nbd`` (serves until SIGINT/SIGTERM)."""
    from ..chunk.nbd import NbdServer

    store_dir, name = split_store_name(args.target)
    store = ChunkStore(store_dir)
    _, index = store.read_description(name)
    tls = server_tls(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    reader = ImageReader(store, index)

    def failed(exc: Exception) -> None:  # the client gets EIO and the message: say it here
        print(f"btrdelta image nbd: error: {exc}; reads there fail (EIO)",
              file=sys.stderr, flush=True)

    try:
        server = NbdServer(reader, name, args.listen, tls=tls, on_error=failed)
    except BaseException:
        reader.close()
        raise
    thread = threading.Thread(target=server.serve_forever, name="nbd", daemon=True)
    thread.start()
    if not args.quiet:
        print(f"serving {name} ({human_bytes(reader.size)}) on {server.uri}",
              file=sys.stderr, flush=True)
    try:
        _wait_for_signal()
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
        reader.close()
    if not args.quiet:
        print(f"stopped: {human_bytes(server.bytes_read)} read", file=sys.stderr, flush=True)
    return 0


def run_info(args: argparse.Namespace) -> int:
    """``image info``."""
    _no_stdio("SOURCE", args.source)
    key = load_public_key(args.key) if args.key else None
    info = image_info(args.source, public_key=key, config=http_config(args))
    if args.json:
        print(json.dumps(info))
        return 0
    chunker = info["chunker"]
    assert isinstance(chunker, dict)
    size = int(info["image_size"])  # type: ignore[call-overload]
    print(f"{args.source}: {info['kind']}" + (f" v{info['version']}" if "version" in info else ""))
    print(f"  image      {human_bytes(size)} ({size} bytes)"
          + (f", BLAKE3 {info['image_blake3']}" if "image_blake3" in info else ""))
    print(f"  chunks     {info['chunks']} ({info['distinct_chunks']} distinct, "
          f"{human_bytes(int(info['distinct_bytes']))})")  # type: ignore[call-overload]
    print(f"  chunker    {chunker['name']} min {chunker['min']} avg {chunker['avg']} "
          f"max {chunker['max']}")
    if "archive_size" in info:
        print(f"  archive    {human_bytes(int(info['archive_size']))}, "  # type: ignore[call-overload]
              f"index {human_bytes(int(info['index_bytes']))}")  # type: ignore[call-overload]
    sig = "signed" if info["signed"] else "unsigned"
    print(f"  signature  {sig}{' (verified)' if info['signature_checked'] else ''}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """``image verify`` (exit 6 when chunks are missing, 5 when only damaged ones are)."""
    key = load_public_key(args.key) if args.key else None
    if (args.source or args.seed) and not args.repair:
        raise BtrdeltaError("--source and --seed are for --repair")
    with Phases("verify", progress_wanted(args), {"check": "chunks"}) as progress:
        report, fix = verify_image(args.target, repair=args.repair, source=args.source,
                                   seeds=args.seed, public_key=key, wait=args.wait,
                                   config=http_config(args), on_progress=progress)
    if args.json:
        print(json.dumps(_verify_json(report, fix)))
    if report.ok:
        if not args.json and not args.quiet:
            fixed = f", {fix.repaired} chunk(s) repaired from {fix.source}" if fix else ""
            print(f"{args.target}: OK, {report.chunks} chunks{fixed}")
        return 0
    raise _verify_error(args.target, report, fix)


def _verify_json(report: VerifyReport, fix: RepairReport | None) -> dict[str, object]:
    out: dict[str, object] = {
        "ok": report.ok, "chunks": report.chunks,
        "missing": [d.hex() for d in report.missing],
        "damaged": {d.hex(): report.reasons.get(d, "content") for d in report.bad},
    }
    if fix is not None:
        out |= {"source": fix.source, "dropped": fix.dropped, "repaired": fix.repaired,
                "not_in_source": [d.hex() for d in fix.lacking]}
    return out


def _verify_error(target: str, report: VerifyReport, fix: RepairReport | None) -> BtrdeltaError:
    first = (report.missing or report.bad)[0].hex()
    what = f"{len(report.missing)} chunk(s) missing, {len(report.bad)} damaged (first: {first})"
    if fix is None:
        hint = "; `btrdelta image verify --repair` drops damaged chunks and fetches them again"
    elif fix.source is None:
        hint = ("; no source is recorded for this image: give --source ARCHIVE (the archive "
                "it was cloned from, path or URL) or --seed")
    elif fix.lacking:
        hint = f"; {len(fix.lacking)} of them are not in {fix.source}"
    else:
        hint = f"; still missing after fetching from {fix.source}"
    if report.missing:
        return MissingBaseError(what + hint, source=target)
    return ChecksumError(what + hint, source=target)


def run_gc(args: argparse.Namespace) -> int:
    """``image gc``."""
    with Phases("gc", progress_wanted(args), {"check": "chunks"}) as progress:
        report = gc_store(args.store, dry_run=args.dry_run, quick=args.quick, wait=args.wait,
                          on_progress=progress)
    if args.json:
        print(json.dumps({"removed": report.removed, "removed_bytes": report.removed_bytes,
                          "kept": report.kept, "damaged": report.damaged,
                          "leftovers": report.leftovers, "dry_run": args.dry_run}))
        return 0
    if args.quiet:
        return 0
    verb = "would remove" if args.dry_run else "removed"
    damaged = f" ({report.damaged} damaged)" if report.damaged else ""
    print(f"{args.store}: {verb} {report.removed} chunks{damaged} "
          f"({human_bytes(report.removed_bytes)}) and {report.leftovers} leftover file(s), "
          f"kept {report.kept}")
    return 0
