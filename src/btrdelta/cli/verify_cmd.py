"""``btrdelta verify``: check the framing and every CRC of a stream."""

from __future__ import annotations

import argparse

from ..stream import StreamReader
from ..stream.sink import VerifySink, feed
from ..update.identify import Kind
from ._common import add_input, human_bytes, input_name, open_input, sniff_input


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``verify``."""
    p = sub.add_parser(
        "verify",
        help="check a stream's framing and every CRC32C",
        description=(
            "Read a whole send stream (every concatenated stream in it), check every header, "
            "command length, attribute and CRC32C. Prints one line and exits 0 when it is "
            "sound; otherwise prints one line naming the offset and record and exits non-zero. "
            "With --key, also checks the detached signature (FILE.sig) over the stream's "
            "content without applying anything; a delta stream is then accepted too (its "
            "records are checked and the signature against the content its DEND record "
            "names, which expanding or receiving it checks)."
        ),
        epilog="examples: btrdelta verify A-B.stream; "
               "btrdelta verify --key release.pub A-B.delta (checks A-B.delta.sig)",
    )
    add_input(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.add_argument("--key", action="append", metavar="PUBKEY",
                   help="also require a valid signature by this Ed25519 public key "
                        "(repeatable: any of them); exit 5 if not")
    p.add_argument("--signature", metavar="SIG",
                   help="the detached signature (default: FILE.sig; needed for stdin)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Verify the stream."""
    name = input_name(args)
    if args.key:
        return _verify_signed(args, name)
    with open_input(name) as f:
        _, f = sniff_input(f, name, Kind.SEND_STREAM)
        reader = StreamReader(f, source=name)
        sink = VerifySink()
        feed(reader.events(), sink)
        size = reader.parser.offset
    if not args.quiet:
        print(f"{name}: OK, {sink.streams} stream(s), {sink.records} commands, "
              f"{human_bytes(size)}")
    return 0


def _verify_signed(args: argparse.Namespace, name: str) -> int:
    """``verify --key``: the stream (or delta stream) and its signature."""
    from ..trust import CONTEXT_STREAM, check_signature, load_public_key, read_signature, verify
    from ..update.signed import payload_digest, signature_path

    keys = [load_public_key(k) for k in args.key]
    sig_path = signature_path(name, args.signature)
    sig = read_signature(sig_path)
    check_signature(sig, keys, CONTEXT_STREAM, source=sig_path)  # before reading the input
    with open_input(name) as f:
        info = payload_digest(f, source=name)
    kid = verify(sig, keys, info.content, CONTEXT_STREAM, source=name)
    if not args.quiet:
        what = (f"{info.streams} stream(s), {info.commands} commands" if info.kind == "stream"
                else f"delta stream ({human_bytes(info.size)}) of {info.streams} stream(s), "
                     f"{info.commands} commands")
        print(f"{name}: OK, {what}, {human_bytes(info.content.size)}, signed by key "
              f"{kid[:16]}")
    return 0
