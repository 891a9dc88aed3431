"""``btrdelta image``: compress, clone, mount, nbd, info, verify and gc chunked images."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import types

from ..chunk.archive import HEADER_SIZE, decode_header
from ..chunk.chunker import ChunkerParams
from ..chunk.clone import clone, open_source, read_index
from ..chunk.compress import DEFAULT_LEVEL, compress_image
from ..chunk.store import ChunkStore, ImageReader, split_store_name
from ..errors import BtrdeltaError, ChecksumError
from ..transport.listen import ListenAddress, parse_listen, server_tls
from ..trust import load_private_key, load_public_key
from ._common import Progress, human_bytes, open_output, parse_size
from .http_options import add_http_options, http_config


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``image`` and its subcommands."""
    p = sub.add_parser(
        "image", help="chunked images: compress, clone over HTTP, mount, NBD export",
        description="Content-defined chunk archives of whole images (ext4, squashfs, erofs), "
        "cloned into a local chunk store reusing what it (and seeds) hold, exposed read-only "
        "through FUSE or NBD. Formats: docs/formats/chunk-archive.md, chunk-store.md.",
    )
    isub = p.add_subparsers(dest="image_command", metavar="SUBCOMMAND")
    def usage(_args: argparse.Namespace) -> int:
        p.print_help(sys.stderr)
        return 2

    p.set_defaults(func=usage)

    c = isub.add_parser("compress", help="chunk and compress an image into an archive")
    c.add_argument("-i", "--input", required=True, metavar="IMAGE", help="image file or device")
    c.add_argument("-o", "--output", required=True, metavar="ARCHIVE", help="archive to write")
    c.add_argument("--avg-chunk", type=parse_size, default=64 << 10, metavar="SIZE",
                   help="average chunk size (default 64K; min = avg/4, max = avg*4)")
    c.add_argument("--level", type=int, default=DEFAULT_LEVEL,
                   help=f"zstd level (default {DEFAULT_LEVEL}: compressed once, fetched often)")
    c.add_argument("--sign", metavar="KEY", help="Ed25519 private key (PEM) to sign with")
    c.add_argument("--threads", type=int, default=None, help="compression threads (default: CPUs)")
    c.add_argument("--progress", action="store_true", help="show progress on stderr")
    c.set_defaults(func=run_compress)

    cl = isub.add_parser("clone", help="clone an archive (path or URL) into a chunk store")
    cl.add_argument("source", metavar="SOURCE", help="archive path or http(s):// URL")
    cl.add_argument("target", metavar="STORE/NAME", help="chunk store directory and image name")
    cl.add_argument("--seed", action="append", default=[], metavar="FILE_OR_DEVICE",
                    help="a file or device that may hold chunks (repeatable)")
    cl.add_argument("--output", metavar="FILE_OR_DEVICE", help="also write the full image here")
    cl.add_argument("--dry-run", action="store_true", help="only say how much would be fetched")
    cl.add_argument("--key", metavar="PUBKEY", help="require a valid signature by this key (PEM)")
    cl.add_argument("--json", action="store_true", help="print the report as JSON")
    cl.add_argument("--progress", action="store_true", help="show progress on stderr")
    add_http_options(cl)
    cl.set_defaults(func=run_clone)

    m = isub.add_parser("mount", help="FUSE: expose an image in the store as one read-only file")
    m.add_argument("target", metavar="STORE/NAME")
    m.add_argument("mountpoint", metavar="MOUNTPOINT")
    m.set_defaults(func=run_mount)

    n = isub.add_parser("nbd", help="serve an image in the store over NBD (read-only)")
    n.add_argument("target", metavar="STORE/NAME")
    n.add_argument("--listen", default="127.0.0.1:10809", metavar="ADDR", type=_listen,
                   help="HOST:PORT, [IPV6]:PORT or unix:PATH (default 127.0.0.1:10809)")
    n.add_argument("--tls-cert", metavar="PEM",
                   help="serve TLS only (clients use nbds://) with this certificate")
    n.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    n.add_argument("--tls-client-ca", metavar="PEM",
                   help="also require a client certificate signed by this CA")
    n.epilog = ("example: btrdelta image nbd /var/lib/images/v2 --listen unix:/run/v2.sock & "
                "nbdinfo --map 'nbd+unix:///v2?socket=/run/v2.sock'")
    n.set_defaults(func=run_nbd)

    i = isub.add_parser("info", help="what an archive (path or URL) or description holds")
    i.add_argument("source", metavar="ARCHIVE|STORE/NAME")
    i.add_argument("--key", metavar="PUBKEY", help="also check the signature with this key")
    i.add_argument("--json", action="store_true", help="print JSON")
    add_http_options(i)
    i.set_defaults(func=run_info)

    v = isub.add_parser("verify", help="check an image in the store (every chunk's hash)")
    v.add_argument("target", metavar="STORE/NAME")
    v.add_argument("--key", metavar="PUBKEY", help="also check the description's signature")
    v.set_defaults(func=run_verify)

    g = isub.add_parser("gc", help="drop chunks no description in the store uses")
    g.add_argument("store", metavar="STORE")
    g.add_argument("--dry-run", action="store_true", help="only report")
    g.set_defaults(func=run_gc)


def _listen(text: str) -> ListenAddress:
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_compress(args: argparse.Namespace) -> int:
    """``image compress``."""
    params = ChunkerParams.from_avg(args.avg_chunk)
    key = load_private_key(args.sign) if args.sign else None
    progress = Progress(Progress.wanted(args), "compress: ")
    with open_output(args.output) as out:
        if out is sys.stdout.buffer:
            raise BtrdeltaError("compress needs a seekable output file (-o FILE)")
        report = compress_image(
            args.input, out, params=params, level=args.level, key=key, threads=args.threads,
            on_progress=lambda d, t: progress.update(f"{human_bytes(d)} / {human_bytes(t)}"),
        )
    progress.done()
    h = report.header
    print(f"{args.output}: {human_bytes(h.image_size)} image, {h.order_count} chunks "
          f"({h.chunk_count} distinct), archive {human_bytes(report.archive_size)}"
          f"{', signed' if h.signed else ''}")
    return 0


def run_clone(args: argparse.Namespace) -> int:
    """``image clone``."""
    store_dir, name = split_store_name(args.target)
    key = load_public_key(args.key) if args.key else None
    progress = Progress(Progress.wanted(args), "clone: ")
    source = open_source(args.source, http_config(args))
    try:
        report = clone(
            source, ChunkStore(store_dir), name, seeds=args.seed, output=args.output,
            dry_run=args.dry_run, public_key=key,
            on_progress=lambda phase, d, t: progress.update(f"{phase} {d}/{t}"),
        )
    finally:
        source.close()
    progress.done()
    if args.json:
        fields = ("image_size", "archive_size", "chunks", "from_store", "from_seeds", "fetched",
                  "fetch_bytes", "index_bytes", "missing_bytes", "spans", "requests",
                  "bytes_received", "full_download", "out_in_place", "out_from_seeds",
                  "out_from_store")
        print(json.dumps({f: getattr(report, f) for f in fields} | {"dry_run": args.dry_run}))
        return 0
    verb = "would fetch" if args.dry_run else "fetched"
    if report.full_download and args.dry_run:
        print(f"{args.target}: the server ignores Range requests: a clone would download the "
              f"whole archive ({human_bytes(report.archive_size)})")
        return 0
    n_fetch = report.chunks - report.from_store - report.from_seeds
    print(f"{args.target}: {report.chunks} chunks: {report.from_store} in store, "
          f"{report.from_seeds} from seeds, {verb} {n_fetch}"
          f" ({human_bytes(report.fetch_bytes)} + {human_bytes(report.index_bytes)} index); "
          f"{report.requests} requests, {human_bytes(report.bytes_received)} received"
          f"{' (server ignores Range: whole archive downloaded)' if report.full_download else ''}")
    if args.output:
        print(f"{args.output}: {human_bytes(report.out_in_place)} already in place, "
              f"{human_bytes(report.out_from_seeds)} copied from seeds, "
              f"{human_bytes(report.out_from_store)} from the store")
    return 0


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
    from ..chunk.fuse import mount_image  # imported late: needs libfuse

    store_dir, name = split_store_name(args.target)
    mount_image(ChunkStore(store_dir), name, args.mountpoint)
    return 0


def run_nbd(args: argparse.Namespace) -> int:
    """``image nbd`` (serves until SIGINT/SIGTERM)."""
    from ..chunk.nbd import NbdServer

    store_dir, name = split_store_name(args.target)
    store = ChunkStore(store_dir)
    _, index = store.read_description(name)
    tls = server_tls(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    reader = ImageReader(store, index)
    try:
        server = NbdServer(reader, name, args.listen, tls=tls)
    except BaseException:
        reader.close()
        raise
    thread = threading.Thread(target=server.serve_forever, name="nbd", daemon=True)
    thread.start()
    print(f"serving {name} ({human_bytes(reader.size)}) on {server.uri}", file=sys.stderr,
          flush=True)
    try:
        _wait_for_signal()
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
        reader.close()
    print(f"stopped: {human_bytes(server.bytes_read)} read", file=sys.stderr, flush=True)
    return 0


def run_info(args: argparse.Namespace) -> int:
    """``image info``."""
    key = load_public_key(args.key) if args.key else None
    if os.path.isfile(args.source) and not args.source.startswith(("http://", "https://")):
        with open(args.source, "rb") as f:
            head = f.read(HEADER_SIZE)
        header = decode_header(head, source=args.source)
        is_description = os.path.getsize(args.source) == (
            HEADER_SIZE + header.index_size + header.sig_size)
    else:
        is_description = False
    if is_description:
        store_dir, name = split_store_name(args.source)
        header, index = ChunkStore(store_dir).read_description(name, public_key=key)
        archive_size = header.archive_size
    else:
        source = open_source(args.source, http_config(args))
        try:
            header, index, _ = read_index(source, public_key=key)
        finally:
            source.close()
        archive_size = header.archive_size
    p = header.params
    distinct, compressed = sum(index.raw_sizes), sum(index.comp_sizes)
    info: dict[str, object] = {
        "kind": "description" if is_description else "archive",
        "version": header.version, "image_size": header.image_size,
        "image_blake3": header.image_digest.hex(), "chunks": header.order_count,
        "distinct_chunks": header.chunk_count, "distinct_bytes": distinct,
        "compressed_bytes": compressed, "archive_size": archive_size,
        "index_bytes": header.index_size, "signed": header.signed,
        "signature_checked": key is not None,
        "chunker": {"min": p.min_size, "avg": p.avg_size, "max": p.max_size,
                    "normalization": p.normalization, "seed": p.seed},
    }
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{args.source}: chunk {info['kind']} v{header.version}")
    print(f"  image      {human_bytes(header.image_size)} ({header.image_size} bytes), "
          f"BLAKE3 {header.image_digest.hex()}")
    print(f"  chunks     {header.order_count} ({header.chunk_count} distinct, "
          f"{human_bytes(distinct)} -> {human_bytes(compressed)} zstd)")
    print(f"  chunker    FastCDC min {p.min_size} avg {p.avg_size} max {p.max_size}")
    print(f"  archive    {human_bytes(archive_size)}, index {human_bytes(header.index_size)}")
    sig = "signed" if header.signed else "unsigned"
    print(f"  signature  {sig}{' (verified)' if key is not None else ''}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """``image verify``."""
    store_dir, name = split_store_name(args.target)
    store = ChunkStore(store_dir)
    if args.key:
        store.read_description(name, public_key=load_public_key(args.key))
    report = store.verify(name)
    if not report.ok:
        first = (report.bad or report.missing)[0].hex()
        raise ChecksumError(
            f"{len(report.missing)} chunk(s) missing, {len(report.bad)} damaged "
            f"(first: {first})", path=args.target)
    print(f"{args.target}: OK, {report.chunks} chunks")
    return 0


def run_gc(args: argparse.Namespace) -> int:
    """``image gc``."""
    report = ChunkStore(args.store).gc(dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{args.store}: {verb} {report.removed} chunks ({human_bytes(report.removed_bytes)}), "
          f"kept {report.kept}")
    return 0



