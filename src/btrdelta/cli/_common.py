"""Helpers shared by subcommands: opening inputs and outputs, progress on stderr."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import BinaryIO

from ..errors import BtrdeltaError


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
