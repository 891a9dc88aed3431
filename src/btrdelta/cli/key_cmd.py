"""``btrdelta key generate|show``: Ed25519 signing keys (``btrdelta.trust``)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import UsageError
from ..trust import generate_key, key_id, load_public_key, public_key_text, save_key_pair
from ._common import examples
from .progress import add_quiet_option

_EPILOG = """\
examples:
  btrdelta key generate -o release        # release.key (private, 0600) + release.pub
  btrdelta send /build/v2 -p /build/v1 -o v1-v2.stream --sign release.key
  btrdelta receive -f v1-v2.stream /data --key release.pub    # checks v1-v2.stream.sig
  btrdelta key show release.pub           # key ID and the one-line public key

Key files are PEM (PKCS#8 private, SubjectPublicKeyInfo public), the same as
`openssl genpkey -algorithm ed25519`. A public key may also be given as an OpenSSH line
(`ssh-ed25519 AAAA...`) or as the base64 of its 32 bytes (what `key show` prints).
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``key`` and its subcommands."""
    p = sub.add_parser(
        "key",
        help="generate and show Ed25519 signing keys",
        description=(
            "Ed25519 keys for signing send streams, delta streams and image archives. The "
            "private key signs (`send --sign`, `delta make --sign`, `sign`, `image compress "
            "--sign`); the public key is what devices trust (`receive --key`, `verify "
            "--key`, `image clone --key`)."
        ),
        epilog=_EPILOG,
    )

    def usage(_args: argparse.Namespace) -> int:
        p.print_help(sys.stderr)
        return 2

    p.set_defaults(func=usage)
    ksub = p.add_subparsers(dest="key_command", metavar="SUBCOMMAND")
    g = ksub.add_parser(
        "generate", help="make a new key pair: NAME.key (private) and NAME.pub",
        description="Write a new Ed25519 key pair: NAME.key (private, mode 0600) and "
                    "NAME.pub (public). Existing files are never overwritten.",
        epilog=examples("btrdelta key generate -o /secure/release",
                        "btrdelta key generate -o release --json"),
    )
    g.add_argument("-o", "--output", required=True, metavar="NAME",
                   help="write NAME.key and NAME.pub (a NAME ending in .key or .pub "
                        "names the same pair)")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    add_quiet_option(g)
    g.set_defaults(func=run_generate)
    s = ksub.add_parser(
        "show", help="print a key's ID and its public key",
        description="Print the key ID (SHA-256 of the 32 public-key bytes, the `key_id` of "
                    "signatures) and the public key as one base64 line. FILE may be a "
                    "private or a public key.",
        epilog=examples("btrdelta key show release.pub", "btrdelta key show --json release.key"),
    )
    s.add_argument("key", metavar="FILE", help="a private or public key file")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=run_show)


def run_generate(args: argparse.Namespace) -> int:
    """``key generate``."""
    stem = args.output.removesuffix(".key").removesuffix(".pub")  # -o release.key: release
    if os.path.isdir(stem) or not os.path.basename(stem):  # (-o DIR wrote DIR.key, DIR/ .key)
        raise UsageError(f"-o {args.output} names a directory: -o names the pair without its "
                         f"suffix, e.g. -o {os.path.join(stem, 'release')} (release.key and "
                         "release.pub there)")
    key = generate_key()
    private, public = f"{stem}.key", f"{stem}.pub"
    save_key_pair(key, private, public)
    kid = key_id(key)
    if args.json:
        print(json.dumps({"key_id": kid, "private_key": private, "public_key": public,
                          "public_key_base64": public_key_text(key)}))
    elif not args.quiet:
        print(f"key {kid}")
        print(f"private: {private} (keep it secret)")
        print(f"public:  {public}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    """``key show``."""
    pub = load_public_key(args.key)
    kid = key_id(pub)
    if args.json:
        print(json.dumps({"key_id": kid, "algorithm": "ed25519",
                          "public_key_base64": public_key_text(pub)}))
    else:
        print(f"key_id     {kid}")
        print("algorithm  ed25519")
        print(f"public     {public_key_text(pub)}")
    return 0
