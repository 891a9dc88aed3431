"""Helpers shared by subcommands: opening inputs and outputs, progress on stderr."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO

from ..errors import BtrdeltaError

if TYPE_CHECKING:
    from ..update.identify import Identified, Kind


def add_input(parser: argparse.ArgumentParser, what: str = "stream") -> None:
    """Add ``-f/--file FILE`` (default ``-``, stdin) and an optional positional FILE."""
    parser.add_argument(
        "-f", "--file", dest="file", metavar="FILE", default=None,
        help=f"read the {what} from FILE ('-' or omitted: standard input)",
    )
    parser.add_argument("input", nargs="?", metavar="FILE", help=argparse.SUPPRESS)


def input_name(args: argparse.Namespace) -> str:
    """The input named by ``-f`` or the positional argument (default ``-``)."""
    if args.file and args.input:
        raise BtrdeltaError("give the input either with -f or as an argument, not both")
    return str(args.file or args.input or "-")


@contextlib.contextmanager
def open_input(name: str) -> Iterator[BinaryIO]:
    """Open ``name`` for binary reading; ``-`` is standard input."""
    if name == "-":
        if sys.stdin.isatty():
            raise BtrdeltaError("refusing to read a binary stream from a terminal (use -f FILE)")
        yield sys.stdin.buffer
        return
    with open(name, "rb", buffering=0) as f:
        yield f


@contextlib.contextmanager
def open_output(name: str | None, *, binary: bool = True) -> Iterator[BinaryIO]:
    """Open ``name`` for binary writing; ``-``/``None`` is standard output.

    A file is written under a temporary name and renamed into place only on success, so
    a failed run never leaves a half-written output behind.
    """
    if name in (None, "-"):
        if binary and sys.stdout.isatty():
            raise BtrdeltaError("refusing to write a binary stream to a terminal (use -o FILE)")
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    tmp = f"{name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class Progress:
    """Throttled one-line progress on stderr (only when enabled)."""

    def __init__(self, enabled: bool, label: str = "") -> None:
        self.enabled = enabled
        self.label = label
        self._last = 0.0
        self._shown = False

    @staticmethod
    def wanted(args: argparse.Namespace) -> bool:
        """Progress is shown with ``--progress``/``-v`` or when stderr is a terminal."""
        if getattr(args, "progress", False) or getattr(args, "verbose", 0):
            return True
        return sys.stderr.isatty()

    def update(self, text: str, *, force: bool = False) -> None:
        """Show ``text`` (at most ~10 times a second)."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        sys.stderr.write(f"\r{self.label}{text}\x1b[K")
        sys.stderr.flush()
        self._shown = True

    def done(self, text: str | None = None) -> None:
        """Finish the progress line."""
        if not self.enabled:
            return
        if text is not None:
            self.update(text, force=True)
        if self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """An argparse type: '64M' -> 67108864 (K, M, G, T suffixes, binary; 'KiB', 'MB' too)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        value = int(float(t[:-1]) * _UNITS[t[-1]]) if t and t[-1] in _UNITS else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return value


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


# -- printers shared by several commands ------------------------------------------------


def dump_stream(f: BinaryIO, name: str, *, as_json: bool = False,
                all_streams: bool = False) -> None:
    """Print the stream in ``f`` as ``btrfs receive --dump`` does (or as JSON lines) on
    standard output (``dump``, ``receive --dump``)."""
    from ..stream import StreamReader
    from ..stream.dump import JsonDumpSink, TextDumpSink
    from ..stream.sink import feed
    from ..update.identify import Kind

    _, f = sniff_input(f, name, Kind.SEND_STREAM)
    out = sys.stdout.buffer
    sink = JsonDumpSink(out.write) if as_json else TextDumpSink(out.write)
    try:
        feed(StreamReader(f, source=name).events(), sink, stop_at_end=not all_streams)
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
        print(f"  {codec:<8} {st.patched_files[codec]:>6} files  "
              f"{human_bytes(st.replaced_bytes[codec])} as {human_bytes(st.patch_bytes[codec])}"
              f" of patches, saved {human_bytes(st.saved_bytes[codec])}")


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP end the command like Ctrl-C (``KeyboardInterrupt``), so what it
    made for the run (temporary snapshots, partial files) is removed on the way out."""
    import signal

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
