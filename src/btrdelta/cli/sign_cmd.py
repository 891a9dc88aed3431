"""``btrdelta sign``: a detached signature for a send stream or a delta stream."""

from __future__ import annotations

import argparse
import json

from ._common import add_json, examples
from ._input import add_input, input_name, open_input
from .progress import add_quiet_option


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``sign``."""
    p = sub.add_parser(
        "sign",
        help="sign a send stream or delta stream (detached FILE.sig)",
        description=(
            "Write a detached Ed25519 signature over the content of a send stream (e.g. one "
            "`btrfs send` made) or a delta stream. The content is the plain send stream; "
            "for a delta stream, the stream it expands to (the size and BLAKE3 digest its "
            "DEND record carries). So the same signature verifies a stream, its delta and "
            "the delta's expansion (`verify --key`, `receive --key`). The stream is checked "
            "while it is read (framing and CRCs; for a delta its records)."
        ),
        epilog=examples("btrfs send -p /snap/A -f A-B.stream /snap/B",
                        "btrdelta sign A-B.stream --key release.key     # writes A-B.stream.sig",
                        "btrdelta receive -f A-B.stream --key release.pub /target"),
    )
    add_input(p)
    p.add_argument("--key", required=True, metavar="KEY", help="Ed25519 private key")
    p.add_argument("-o", "--signature", metavar="SIG",
                   help="write the signature to SIG (default FILE.sig; needed for stdin)")
    add_json(p, "the signature's fields")
    add_quiet_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Sign."""
    from ..trust import CONTEXT_STREAM, load_private_key, sign, write_signature
    from ..update.signed import payload_digest, signature_path

    name = input_name(args)
    sig_path = signature_path(name, args.signature)
    key = load_private_key(args.key)  # before reading: a bad key fails at once
    with open_input(name) as f:
        info = payload_digest(f, source=name)
    sig = sign(key, info.content, CONTEXT_STREAM)
    write_signature(sig, sig_path)
    if args.json:
        print(json.dumps({"signature_file": sig_path, "kind": info.kind, **sig.to_json()}))
    elif not args.quiet:
        print(f"{sig_path}: {info.kind} signed by key {sig.key_id[:16]}, content "
              f"{info.content}")
    return 0
