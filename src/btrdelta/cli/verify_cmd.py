"""``btrdelta verify``: check the framing and every CRC of a stream."""

from __future__ import annotations

import argparse
import json
from typing import BinaryIO

from ..stream import StreamReader
from ..stream.records import Record
from ..stream.sink import VerifySink, feed
from ..update.identify import Kind
from ._common import add_json, examples, human_bytes
from ._input import add_input, input_name, input_position, input_size, open_input, sniff_input
from .progress import Progress, add_progress_options, progress_wanted


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``verify``."""
    p = sub.add_parser(
        "verify",
        help="check a stream's framing and every CRC32C",
        description=(
            "Read a whole send stream (every concatenated stream in it), check every header, "
            "command length, attribute and CRC32C (a delta stream: every record to its DEND; "
            "its patched content is checked when it is expanded or received). Prints one "
            "line and exits 0 when it is "
            "sound; otherwise prints one line naming the offset and record and exits non-zero. "
            "With --key, also checks the detached signature (FILE.sig) over the stream's "
            "content without applying anything; a delta stream is then accepted too (its "
            "records are checked and the signature against the content its DEND record "
            "names, which expanding or receiving it checks)."
        ),
        epilog=examples("btrdelta verify A-B.stream",
                        "btrfs send /snap/A | btrdelta verify -q && echo sound",
                        "btrdelta verify --key release.pub A-B.delta   # checks A-B.delta.sig",
                        "btrdelta verify --json A-B.stream"),
    )
    add_input(p)
    add_json(p, "the result")
    add_progress_options(p)
    p.add_argument("--key", action="append", metavar="PUBKEY",
                   help="also require a valid signature by this Ed25519 public key "
                        "(repeatable: any of them); exit 5 if not")
    p.add_argument("--signature", metavar="SIG",
                   help="the detached signature (default: FILE.sig; needed for stdin)")
    p.set_defaults(func=run)


class _Counting(VerifySink):
    """Counts records and shows progress every 4096 of them."""

    def __init__(self, progress: Progress, f: BinaryIO) -> None:
        super().__init__()
        self.progress = progress
        self.f = f

    def apply(self, rec: Record, index: int) -> None:
        self.records += 1
        if not self.records & 4095 and self.progress.enabled:
            self.progress.update(input_position(self.f), note=f"{self.records} commands")


def run(args: argparse.Namespace) -> int:
    """Verify the stream."""
    name = input_name(args)
    if args.key:
        return _verify_signed(args, name)
    with open_input(name) as f:
        progress = Progress("verify", enabled=progress_wanted(args), total=input_size(f))
        raw = f
        what, f = sniff_input(f, name, Kind.SEND_STREAM, Kind.DELTA_STREAM)
        if what.kind is Kind.DELTA_STREAM:
            return _verify_delta(args, name, f)
        reader = StreamReader(f, source=name)
        sink = _Counting(progress, raw)
        with progress:
            feed(reader.events(), sink)
        size = reader.parser.offset
    if args.json:
        print(json.dumps({"input": name, "ok": True, "kind": "stream", "streams": sink.streams,
                          "versions": sink.versions, "commands": sink.records, "bytes": size,
                          "content_bytes": size, "signed_by": None}))
    elif not args.quiet:
        print(f"{name}: OK, {sink.streams} stream(s), {sink.records} commands, "
              f"{human_bytes(size)}")
    return 0


def _verify_delta(args: argparse.Namespace, name: str, f: BinaryIO) -> int:
    """A delta stream: every record to its DEND (the patched content is checked when it is
    expanded or received, which needs the old snapshot)."""
    from ..update.signed import payload_digest

    info = payload_digest(f, source=name)
    if args.json:
        print(json.dumps({"input": name, "ok": True, "kind": "delta", "streams": info.streams,
                          "versions": None, "commands": info.commands, "bytes": info.size,
                          "content_bytes": info.content.size, "signed_by": None}))
    elif not args.quiet:
        print(f"{name}: OK, delta stream ({human_bytes(info.size)}) of {info.streams} "
              f"stream(s), {info.commands} commands, {human_bytes(info.content.size)}")
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
    if args.json:
        print(json.dumps({"input": name, "ok": True, "kind": info.kind,
                          "streams": info.streams, "versions": None, "commands": info.commands,
                          "bytes": info.size, "content_bytes": info.content.size,
                          "signed_by": kid}))
    elif not args.quiet:
        what = (f"{info.streams} stream(s), {info.commands} commands" if info.kind == "stream"
                else f"delta stream ({human_bytes(info.size)}) of {info.streams} stream(s), "
                     f"{info.commands} commands")
        print(f"{name}: OK, {what}, {human_bytes(info.content.size)}, signed by key "
              f"{kid[:16]}")
    return 0
