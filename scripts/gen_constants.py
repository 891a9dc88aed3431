"""Regenerate src/btrdelta/_constants.h, the numbers the C accelerators share with Python.

The C files (``stream/_speedups.c``, ``receive/_fastapply.c``, ``delta/_unfold.c``,
``chunk/_buzhash.c``, ``tree/_treewalk.c``, ``send/_blockhash.c``) include the header instead
of re-declaring command and attribute numbers, ioctl numbers, open flags, limits, casync's
chunker table and a sendshot record's block size; every value comes from the Python table
that owns it.
``python scripts/gen_constants.py`` rewrites the header; ``--check`` exits 1 if the
committed one is out of date (a test runs it). Rebuild the accelerators after a change
(``make venv``).
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Iterable
from pathlib import Path

from btrdelta.chunk import buzhash
from btrdelta.delta import carrier
from btrdelta.fs import btrfs, sandbox
from btrdelta.receive import encoded
from btrdelta.send import onepass
from btrdelta.stream import constants

HEADER = Path(__file__).resolve().parent.parent / "src/btrdelta/_constants.h"


def _enum(title: str, prefix: str, members: Iterable[enum.IntEnum], last: str) -> list[str]:
    items = sorted(members, key=int)
    out = [f"/* {title} */", "enum {"]
    out += [f"    {prefix}{m.name} = {int(m)}," for m in items]
    out += [f"    {prefix}{last} = {int(items[-1]) + 1}, /* one past the highest */", "};", ""]
    return out


def _flags(names: Iterable[str]) -> str:
    return "(" + " | ".join(names) + ")"


def header() -> str:
    """The text of ``_constants.h``."""
    out = [
        "/*",
        " * Numbers the C accelerators share with the Python code, generated from the Python",
        " * tables by scripts/gen_constants.py: do not edit (tests/test_constants_header.py",
        " * checks that this file is current).",
        " */",
        "#ifndef BTRDELTA_CONSTANTS_H",
        "#define BTRDELTA_CONSTANTS_H",
        "",
    ]
    out += _enum("send-stream commands (btrdelta.stream.constants.Cmd)", "C_",
                 constants.Cmd, "LAST")
    out += _enum("send-stream attributes (btrdelta.stream.constants.Attr)", "A_",
                 constants.Attr, "LAST")
    out += [
        "/* framing and versions (btrdelta.stream.constants) */",
        f"#define CMD_HEADER_SIZE {constants.CMD_HEADER_SIZE} /* u32 length, u16 command,"
        " u32 crc */",
        f"#define NVERSIONS {max(constants.SUPPORTED_VERSIONS) + 1}"
        " /* tables indexed by stream version */",
        f"#define COMPRESSION_MAX {max(int(c) for c in constants.Compression)}"
        " /* highest ENCODED_WRITE compression */",
        "",
        "/* largest decompressed ENCODED_WRITE extent (btrdelta.receive.encoded) */",
        f"#define MAX_UNENCODED {encoded.MAX_UNENCODED}u",
        "",
        "/* the blocks a sendshot record digests (btrdelta.send.onepass.BLOCK) */",
        f"#define SENDSHOT_BLOCK {onepass.BLOCK}",
        "",
        "/* ioctl request numbers (btrdelta.fs.btrfs.IOCTLS) */",
    ]
    out += [f"#define IOC_{name} 0x{number:08X}u" for name, number in btrfs.IOCTLS.items()]
    out += [
        "",
        "/* the safe path walk (btrdelta.fs.sandbox); the flags need <fcntl.h> */",
        f"#define DIR_FLAGS {_flags(sandbox.DIR_OPEN)}",
        f"#define PATH_FLAGS {_flags(sandbox.PATH_OPEN)}",
        f"#define DIRS_TRIM {sandbox.CACHE_MAX} /* cached directories before starting over */",
        f"#define WALK_KEEP {sandbox.WALK_KEEP} /* of one walk's directories, the deepest kept */",
        "",
        "/* TLV markers of carried commands in delta streams (btrdelta.delta.carrier) */",
        f"enum {{ SAME_PATH = 0x{carrier.SAME_PATH_MARK:04X}, ORPHAN = 0x{carrier.ORPHAN_TLV:04X},"
        f" TIMES = 0x{carrier.TIMES_TLV:04X},"
        f" NEXT_INO = 0x{carrier.NEXT_INO_TLV:04X}, NAMEREF = 0x{carrier.NAMEREF_TLV:04X},"
        f" OLDREF = 0x{carrier.OLDREF_TLV:04X}, OLDNAME = 0x{carrier.OLDNAME_TLV:04X} }};",
        "/* an OLDNAME reference: trailing components it may take off, names it may give */",
        f"#define OLDNAME_UP {carrier._OLDNAME_UP}",
        f"#define OLDNAME_DOWN {carrier._OLDNAME_DOWN}",
        "",
        "/* casync's chunker: window and buzhash table (btrdelta.chunk.buzhash); the table is",
        " * an initializer, so that only the file that uses it holds it */",
        f"#define BUZHASH_WINDOW {buzhash.WINDOW}",
        "#define BUZHASH_TABLE_INIT { \\",
    ]
    rows = [", ".join(f"0x{v:08x}" for v in buzhash.TABLE[i : i + 6])
            for i in range(0, len(buzhash.TABLE), 6)]
    out += [f"    {row}, \\" for row in rows]
    out += [
        "}",
        "",
        "#endif",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    text = header()
    if "--check" in argv:
        if not HEADER.exists() or HEADER.read_text() != text:
            print(f"{HEADER} is out of date: run python scripts/gen_constants.py",
                  file=sys.stderr)
            return 1
        return 0
    HEADER.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
