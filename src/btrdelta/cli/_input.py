"""The input of the commands that read a stream or a delta (``dump``, ``stat``, ``verify``,
``sign``, ``receive``, ``delta``): ``-f FILE`` or standard input (a URL refused with the
command that reads it), what it is, and the printers of what they read.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Iterator

from .. import TYPE_CHECKING
from ..errors import BtrdeltaError, UsageError
from ._common import human_bytes, naming_output, stdout_bytes

if TYPE_CHECKING:
    import argparse
    from typing import BinaryIO

    from ..update.identify import Identified, Kind


def add_input(parser: argparse.ArgumentParser, what: str = "stream") -> None:
    """Add ``-f/--file FILE`` (default ``-``, stdin) and an optional positional FILE."""
    parser.add_argument(
        "-f", "--file", dest="file", metavar="FILE", default=None,
        help=f"read the {what} from FILE ('-' or omitted: standard input)",
    )
    parser.add_argument("input", nargs="?", metavar="FILE",
                        help=f"the {what} (same as -f FILE)")


def input_name(args: argparse.Namespace) -> str:
    """The input named by ``-f`` or the positional argument (default ``-``).

    Raises:
        UsageError: both were given.
    """
    if args.file and args.input:
        # `delta make -f A-B.stream -`: the '-' meant as the output, standard output
        hint = (": the output is -o FILE ('-o -': standard output)"
                if args.input == "-" and "output" in vars(args) else "")
        raise UsageError(f"give the input either with -f or as an argument, not both{hint}")
    name = str(args.file or args.input or "-")
    refuse_url_input(name, args.command, "...", "-")
    return name


def refuse_url_input(name: str, command: str, *words: str) -> None:
    """A stream input given as an ``http(s)://`` URL (it said 'No such file or
    directory'): a usage error saying how to read it, ``btrdelta COMMAND WORDS`` the
    command line that reads standard input.

    Raises:
        UsageError: see above.
    """
    if name.startswith(("http://", "https://")) and not os.path.exists(name):
        import shlex

        piped = " ".join(["btrdelta", command, *map(shlex.quote, words)])
        raise UsageError(f"{name} is a URL: streams are read from a file or standard input; "
                         f"download it, or pipe it in: curl -fsS {shlex.quote(name)} | {piped}")


@contextlib.contextmanager
def open_input(name: str) -> Iterator[BinaryIO]:
    """Open ``name`` for binary reading; ``-`` is standard input.

    Raises:
        BtrdeltaError: standard input is a terminal.
        UsageError: ``name`` is a directory (a tree given where its stream is read).
        OSError: ``name`` cannot be opened.
    """
    if name == "-":
        if sys.stdin.isatty():
            raise BtrdeltaError("refusing to read a binary stream from a terminal (use -f FILE)")
        yield sys.stdin.buffer
        return
    if os.path.isdir(name):
        import shlex  # (this mistake only)

        raise UsageError(f"{name} is a directory, not a stream file (a stream of a tree: "
                         f"btrdelta send {shlex.quote(name)} -o FILE)")
    with open(name, "rb", buffering=0) as f:
        yield f


def input_size(f: BinaryIO) -> int | None:
    """The size of a regular file (what progress shows a percentage of), else ``None``."""
    try:
        st = os.fstat(f.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def input_position(f: BinaryIO) -> int:
    """How far ``f`` (a regular file) has been read: its descriptor's offset (0 if none)."""
    try:
        return os.lseek(f.fileno(), 0, os.SEEK_CUR)
    except (OSError, ValueError, AttributeError):
        return 0


def sniff_input(f: BinaryIO, name: str, *accept: Kind) -> tuple[Identified, BinaryIO]:
    """What input ``f`` is, and a file reading it from its start; refused with one line
    unless it is one of ``accept`` (unknown data passes: the parser then names the bad
    magic and its offset)."""
    from ..update.identify import Kind, identify

    what, f = identify(f)
    if what.kind not in accept and what.kind is not Kind.UNKNOWN:
        wanted = " or ".join(f"a {k.value}" for k in accept)
        raise what.refuse(wanted, source=name)
    return what, f


_installed: list[tuple[int, ...] | None] = []


def installed_progs() -> tuple[int, ...] | None:
    """The version of ``btrfs`` on ``PATH`` (``btrfs --version``, asked once), or None:
    the ``receive --dump`` format ``dump`` prints by default."""
    if not _installed:
        import subprocess

        from ..stream.dump import parse_progs_version

        try:
            out = subprocess.run(["btrfs", "--version"], capture_output=True, text=True,
                                 timeout=10, check=False).stdout
            _installed.append(parse_progs_version(out))
        except (OSError, ValueError, subprocess.SubprocessError):
            _installed.append(None)
    return _installed[0]


def dump_stream(f: BinaryIO, name: str, *, as_json: bool = False,
                all_streams: bool = False, progs: tuple[int, ...] | None = None) -> None:
    """Print the stream in ``f`` as ``btrfs receive --dump`` does (or as JSON lines) on
    standard output (``dump``, ``receive --dump``); ``progs``: the btrfs-progs version
    whose format (default: the installed one's)."""
    from ..stream import StreamReader
    from ..stream.dump import JsonDumpSink, TextDumpSink
    from ..stream.sink import feed
    from ..update.identify import Kind

    _, f = sniff_input(f, name, Kind.SEND_STREAM)
    out = stdout_bytes()
    sink = JsonDumpSink(out.write) if as_json else \
        TextDumpSink(out.write, progs=progs or installed_progs())
    with naming_output("standard output"):
        try:
            feed(StreamReader(f, source=name), sink, stop_at_end=not all_streams)
        finally:
            sink.close()  # what was read before an error is printed, as progs prints it
            out.flush()


def print_delta_stats(st: object, name: str, *, as_json: bool) -> None:
    """Print a :class:`~btrdelta.delta.stats.DeltaStats` (``delta stat``, ``stat``)."""
    import json

    from ..delta.stats import DeltaStats

    assert isinstance(st, DeltaStats)
    if as_json:
        print(json.dumps({"kind": "delta", **st.as_json()}))
        return
    print(f"delta stream:  {name} ({human_bytes(st.size)}, {st.size} bytes)")
    print(f"expands to:    {human_bytes(st.expanded_size)} ({st.expanded_commands} commands, "
          f"{st.streams} stream(s), version {', '.join(map(str, st.versions))})")
    print(f"carried:       {st.carried_commands} commands, {human_bytes(st.carried_raw_bytes)}"
          f" stored in {human_bytes(st.carried_stored_bytes)}")
    total = sum(st.patched_files.values())
    print(f"patched files: {total} ({st.regenerated_writes} writes and "
          f"{st.regenerated_encoded} compressed extents regenerated)")
    for codec in sorted(st.patched_files):
        print(f"  {codec:<9} {st.patched_files[codec]:>6} files  "
              f"{human_bytes(st.replaced_bytes[codec])} as {human_bytes(st.patch_bytes[codec])}"
              f" of patches, saved {human_bytes(st.saved_bytes[codec])}")
