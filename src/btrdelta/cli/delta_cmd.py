"""``btrdelta delta make|expand|stat``: delta streams (file data as binary patches)."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from ..delta.codecs import AUTO, CODECS
from ..delta.options import DEFAULT_MAX_FILE_SIZE, MakeOptions
from ..errors import ChecksumError, MissingBaseError
from ..update.identify import Kind
from ._common import (
    add_jobs,
    add_json,
    examples,
    free_words,
    human_bytes,
    json_needs_stdout,
    meant,
    open_output,
    parse_size,
    set_extra_hint,
    set_missing_hint,
)
from ._input import (
    add_input,
    input_name,
    input_position,
    input_size,
    open_input,
    print_delta_stats,
    sniff_input,
)
from ._paths import refuse_same_file
from .progress import Progress, add_progress_options, progress_wanted


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``delta`` and its subcommands."""
    p = sub.add_parser(
        "delta",
        help="make, expand and inspect delta streams (file data as binary patches)",
        description=(
            "A delta stream is a btrfs send stream in which the data of files that exist in "
            "the old snapshot is replaced by binary patches against them; everything else is "
            "carried zstd-compressed. `delta expand` gives back the original stream byte for "
            "byte; `btrdelta receive` applies delta streams directly."
        ),
        epilog=examples(
            "btrfs send -p /snap/A /snap/B | btrdelta delta make --old /snap/A | "
            "btrdelta receive /target",
            "btrdelta delta make -f A-B.stream --old /snap/A -o A-B.delta --sign release.key",
            "btrdelta delta expand -f A-B.delta --old /snap/A -o A-B.stream",
            "btrdelta delta stat A-B.delta",
            note="A-B.delta.sig verifies A-B.stream, A-B.delta and the delta's expansion.",
        ),
    )

    def usage(_args: argparse.Namespace) -> int:
        p.print_help(sys.stderr)
        return 2

    p.set_defaults(func=usage)
    dsub = p.add_subparsers(dest="delta_command", metavar="SUBCOMMAND")
    _add_make(dsub)
    _add_expand(dsub)
    _add_stat(dsub)


#: ``delta make --codec``: what each codec is and which install expands it
_CODEC_HELP = (
    f"patch codec. auto (default): per file the smallest of {' and '.join(AUTO)} (large "
    "files with a good first patch skip the second) or, carried uncompressed in the delta's "
    "compressed carrier, of hdiff-raw (HDiffPatch's raw diff) and edits2 (a few byte edits), "
    "and for patches of 512 bytes and more (not of compressed extents) hdiff-lzma (the raw "
    "diff in one LZMA2 stream: "
    "numpy 1.26.3 -> 1.26.4 28.5 KB instead of 29.9, regex 2024.9.11 -> 2024.11.6 102 KB "
    "instead of 110, bsdiff of the trees' tars 24.4 and 109); a device expanding HDiffPatch "
    "patches (hdiff, hdiff-raw, hdiff-lzma) needs btrdelta[hdiff]. bsdiff, "
    "zstd: every patch applies with the core install (scipy 1.13.0 -> 1.13.1: hdiff 325 KB, "
    "bsdiff 382 KB, zstd 516 KB; bsdiff the slowest to make). edits, edits2: only files "
    "with a few byte edits are patched, others are carried whole"
)


def _add_make(dsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    codecs = sorted({"auto", *(c.name for c in CODECS.values())})
    m = dsub.add_parser(
        "make", help="btrfs stream + old snapshot -> delta stream",
        description="Read a btrfs send stream and the old snapshot it applies to; write a "
        "delta stream in which the data of files that exist in the old snapshot are binary "
        "patches against them. Progress on a terminal (percentage and ETA when the input "
        "is a file); a summary with -v. Memory: about 64 MiB + 4x the largest file "
        "diffed (old or new; files are read whole), plus the xz carrier's encoders when "
        "it is chosen (see --carrier): HDiffPatch indexes an old file at 4 bytes a byte, "
        "so an old file above 8 MiB is diffed in windows (at least 3, at most 8 MiB of "
        "the new file each), each against the old part it lines up with +-1.5 MiB "
        "(scipy 1.13.0 -> 1.13.1, a 35 MB library: peak 174 MB, goal 207; its patch 0.7% "
        "larger).",
        epilog=examples(
            "btrdelta delta make -f A-B.stream --old /snap/A -o A-B.delta",
            "btrfs send -p /snap/A /snap/B | btrdelta delta make --old /snap/A -o A-B.delta",
            "btrdelta delta make -q --json -f A-B.stream --old /snap/A -o A-B.delta"),
    )
    add_input(m)
    m.add_argument("--old", required=True, metavar="OLD_DIR",
                   help="the old snapshot (the stream's parent) as a directory")
    m.add_argument("-o", "--output", default="-", metavar="DELTA",
                   help="write the delta stream to DELTA (default '-': standard output)")
    m.add_argument("--codec", default="auto", choices=codecs, help=_CODEC_HELP)
    m.add_argument("--max-file-size", type=parse_size, default=MakeOptions.max_file_size,
                   metavar="SIZE",
                   help="do not diff files larger than SIZE (default 256M; a warning names "
                        "those carried whole): a device expanding or receiving the delta "
                        "needs --max-file-size as large")
    add_jobs(m, MakeOptions().jobs, "diff threads (default: number of CPUs)")
    m.add_argument("--level", type=int, default=MakeOptions.level, metavar="L",
                   help="zstd level of carried data, 0 = uncompressed (default 19); with "
                        "the xz carrier, xz's preset (above 9: 9; the dictionary stays 48 "
                        "MiB): --carrier xz --level 5 (nice_len 32) took 14%% less CPU for "
                        "a 0.76%% larger delta on the Debian install of 27 packages")
    m.add_argument("--no-recompress", dest="recompress", action="store_false",
                   help="carry compressed extents (ENCODED_WRITE) as they are instead of "
                        "regenerating them by recompression")
    m.add_argument("--carrier", choices=("auto", "zstd", "xz"), default=MakeOptions.carrier,
                   help="compressor of carried data (new files, metadata, small patches). "
                        "auto (default): xz once 8 MiB of file data (WRITEs) is carried (an "
                        "update that is mostly new files), else zstd; the compressed "
                        "extents of a --compressed-data stream do not count (xz gains ~1%% "
                        "on them, and the device would pay LZMA's inflation of all of "
                        "them). zstd: -19, 8 MiB window; fast to make and to expand. xz: "
                        "raw LZMA2 -9, 48 MiB dictionary, on up to 4 threads (-j) of ~500 "
                        "MB each: smaller, slower. On a Debian install of 27 packages (50 "
                        "MB diffed, mostly new files): xz 12.98 MB, make 35-38 CPU s and "
                        "787 MB, expand 37 MB of stream a CPU second; zstd 14.57 MB "
                        "(+12%%), 18-20 CPU s and 90 MB, expand 150-170; zstd --level "
                        "11 15.99 MB (+23%%), 4.5-4.7 CPU s and 84 MB. No choice has the "
                        "size, the speed and the memory at once; on an upgrade (mostly "
                        "patches) they differ by 0.4%%. Each writes format 10 "
                        "(docs/formats/delta-stream.md 7.9-7.10)")
    m.add_argument("--verify", action="store_true",
                   help="expand the delta made against --old before exiting 0 (as long as "
                        "a delta expand; without it the delta's structure, patch lengths "
                        "and command counts are checked, which costs little)")
    add_json(m, "a summary (sizes, patched files, seconds)")
    add_progress_options(m, verbose=True)
    m.add_argument("--sign", metavar="KEY",
                   help="also write a detached Ed25519 signature (DELTA.sig) over the content: "
                        "the plain stream read, which the delta expands to")
    m.add_argument("--signature", metavar="SIG",
                   help="where to write the signature (default DELTA.sig; needed with stdout)")
    _add_hints(m, "make", "delta")
    m.set_defaults(func=run_make)


def _add_hints(parser: argparse.ArgumentParser, sub: str, what: str) -> None:
    """A new user's ``delta make A-B.stream /snap/A`` (the old snapshot without --old) and
    ``delta make A-B.stream --old /snap/A A-B.delta`` (the output without -o): exit 2 with
    the command line meant."""
    prog = f"btrdelta delta {sub}"

    def missing(words: list[str]) -> str | None:
        free = free_words(parser, words)
        dirs = [i for i in free if os.path.isdir(words[i])]
        if "--old" in words or len(dirs) != 1:
            return None
        return f"give the old snapshot with --old: {meant(prog, words, {dirs[0]: '--old'})}"

    def extra(args: argparse.Namespace, left: list[str], words: list[str]) -> str | None:
        if len(left) != 1 or left[0].startswith("-") or args.output != "-":
            return None
        at = len(words) - 1 - words[::-1].index(left[0])
        return f"write the {what} to a file with -o: {meant(prog, words, {at: '-o'})}"

    set_missing_hint(parser, missing)
    set_extra_hint(parser, extra)


def _add_expand(dsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    e = dsub.add_parser(
        "expand", help="delta stream + old snapshot -> the btrfs stream",
        description="Turn a delta stream back into the btrfs send stream it was made from, "
        "bit for bit, using the old snapshot. Progress on a terminal (percentage and ETA "
        "when the input is a file).",
        epilog=examples(
            "btrdelta delta expand -f A-B.delta --old /snap/A -o A-B.stream",
            "btrdelta delta expand --old /snap/A < A-B.delta | btrfs receive /target"),
    )
    add_input(e, "delta stream")
    e.add_argument("--old", required=True, metavar="OLD_DIR", help="the old snapshot")
    e.add_argument("-o", "--output", default="-", metavar="STREAM",
                   help="write the btrfs stream to STREAM (default '-': standard output)")
    e.add_argument("--max-file-size", type=parse_size, default=DEFAULT_MAX_FILE_SIZE,
                   metavar="SIZE",
                   help="the largest file a patch may rebuild and the most memory one record "
                        "may take: a patch's old and new content, a carrier piece, the "
                        "carrier's window (default 256M, delta make's default)")
    add_json(e, "a summary (sizes, seconds)")
    add_progress_options(e, verbose=True)
    _add_hints(e, "expand", "stream")
    e.set_defaults(func=run_expand)


def _add_stat(dsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = dsub.add_parser(
        "stat", help="patched files and bytes saved per codec",
        description="What a delta stream holds: the stream it expands to, carried commands, "
        "patched files and the bytes each codec saved.",
        epilog=examples("btrdelta delta stat A-B.delta", "btrdelta delta stat --json A-B.delta"),
    )
    add_input(s, "delta stream")
    add_json(s, "the statistics")
    s.set_defaults(func=run_stat)


def _old_dir(path: str) -> None:
    """The old snapshot must be a directory (exit 6, a missing delta base, otherwise)."""
    if not os.path.isdir(path):
        what = "not found" if not os.path.lexists(path) else "not a directory"
        raise MissingBaseError(f"old snapshot {what}", path=path)


def run_make(args: argparse.Namespace) -> int:
    """``delta make``."""
    from .._malloc import return_freed_memory
    from ..delta.make import make_delta

    return_freed_memory()  # peak memory is a goal: whole files are read for diffing
    json_needs_stdout(args, args.output)
    _old_dir(args.old)
    opts = MakeOptions(
        codec=args.codec, max_file_size=args.max_file_size, jobs=args.jobs, level=args.level,
        recompress=args.recompress, verify="full" if args.verify else "cheap",
        carrier=args.carrier,
    )
    name = input_name(args)
    refuse_same_file(name, args.output)
    signer = None
    if args.sign:  # cryptography and OpenSSL: ~10 MB of memory, only when signing
        from ..update.signed import StreamSigner

        signer = StreamSigner.start(args.sign, args.signature, args.output)
    t0 = time.monotonic()
    with open_input(name) as f, open_output(args.output) as out:
        size = input_size(f)
        progress = Progress("delta make", enabled=progress_wanted(args), total=size)

        def on_progress(nin: int, nout: int) -> None:
            progress.update(nin, note=f"{human_bytes(nout)} out")

        if signer is not None:
            f = signer.reader(f)  # hashes the plain stream: the content the delta expands to
        _, f = sniff_input(f, name, Kind.SEND_STREAM)
        src: BinaryIO = f if isinstance(f, io.BufferedReader) else io.BufferedReader(
            f, 1 << 20  # type: ignore[type-var]
        )
        with progress:
            stats = make_delta(src, args.old, out.write, opts, source=name,
                               on_progress=on_progress)
        if signer is not None:
            signer.finish()
    secs = time.monotonic() - t0
    for line in stats.warnings:
        print(f"delta make: warning: {line}", file=sys.stderr)
    if args.json:
        print(json.dumps({**stats.as_json(), "seconds": round(secs, 3)}))
    elif args.verbose or (progress_wanted(args) and not args.quiet):
        ratio = stats.output_bytes / stats.input_bytes if stats.input_bytes else 0.0
        print(
            f"delta make: {human_bytes(stats.input_bytes)} -> {human_bytes(stats.output_bytes)}"
            f" ({ratio:.1%}), {stats.patched_files} files patched, {secs:.1f}s",
            file=sys.stderr,
        )
    return 0


def _checked_old(old: str) -> Callable[[Any], str]:
    """``--old`` as the expansion's old root, checked when first needed: a btrfs subvolume
    that is not the parent of a SNAPSHOT the delta names is refused (exit 6, both UUIDs),
    as ``delta make`` refuses it, rather than fail at the first old file that differs."""
    from ..delta.parent import check_parent, old_subvolume

    info = old_subvolume(old)

    def root(head: Any) -> str:
        parent = getattr(head, "clone_uuid", None)  # (a SUBVOL: a full stream, no parent)
        if info is not None and parent is not None:
            check_parent(info, parent, old)
        return old

    return root


def run_expand(args: argparse.Namespace) -> int:
    """``delta expand``."""
    from ..delta.expand import expand_to, open_delta

    json_needs_stdout(args, args.output)
    _old_dir(args.old)
    name = input_name(args)
    refuse_same_file(name, args.output)
    t0 = time.monotonic()
    with open_input(name) as f, open_output(args.output) as out:
        size = input_size(f)
        progress = Progress("delta expand", enabled=progress_wanted(args), total=size)
        written = 0
        raw = f

        def write(data: bytes) -> None:
            nonlocal written
            out.write(data)
            written += len(data)
            progress.update(input_position(raw) if size is not None else written,
                            note=f"{human_bytes(written)} out")

        _, f = sniff_input(f, name, Kind.DELTA_STREAM)
        with progress:
            try:
                n = expand_to(open_delta(f, source=name), _checked_old(args.old), write,
                              max_file_size=args.max_file_size, source=name)
            except ChecksumError as exc:
                if exc.message.startswith("old file"):  # not the delta's own damage
                    exc.message += (f" (is {args.old} the snapshot the delta was made "
                                    "against, unchanged?)")
                    exc.args = (exc.message,)
                raise
    secs = time.monotonic() - t0
    in_bytes = size  # unknown for a pipe
    if args.json:
        print(json.dumps({"input_bytes": in_bytes, "output_bytes": n,
                          "seconds": round(secs, 3)}))
    elif args.verbose:
        read = human_bytes(in_bytes) if in_bytes is not None else "stdin"
        print(f"delta expand: {read} -> {human_bytes(n)}, {secs:.1f}s", file=sys.stderr)
    return 0


def run_stat(args: argparse.Namespace) -> int:
    """``delta stat``."""
    from ..delta.stats import delta_stats_of_file

    name = input_name(args)
    with open_input(name) as f:
        _, f = sniff_input(f, name, Kind.DELTA_STREAM)
        st = delta_stats_of_file(f, source=name)
    print_delta_stats(st, name, as_json=args.json)
    return 0
