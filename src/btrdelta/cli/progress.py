"""Progress on standard error: one implementation for every command.

Shown by default when standard error is a terminal, never with ``-q``, and also into a file
or pipe with ``--progress``. On a terminal it is a ``tqdm`` bar (bytes or items, rate,
percentage and ETA when the total is known, one line redrawn in place); elsewhere it is a
plain line every few seconds (no carriage returns, no escape codes: a log file stays
readable), the first at the first update (a job that starts slowly is seen to have begun).
:meth:`Progress.message` prints a line (e.g. ``At snapshot B``) without tearing the bar.
The library code reports through callbacks (``on_progress(done, total)``) and never sees
this class.
"""

from __future__ import annotations

import io
import os
import sys
import time

from .. import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse
    from typing import Any, TextIO

__all__ = ["Phases", "Progress", "add_progress_options", "add_quiet_option", "progress_wanted"]

#: seconds between plain lines when standard error is not a terminal (the first is at once)
_PLAIN_EVERY = 5.0


def add_quiet_option(parser: argparse.ArgumentParser) -> None:
    """``-q/--quiet``, spelled the same in every command that says what it did: the command
    then prints nothing but errors (on standard error) and what ``--json`` asks for."""
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="print nothing but errors (no progress, no summary)")


def add_progress_options(parser: argparse.ArgumentParser, *, verbose: bool = False) -> None:
    """``-q/--quiet`` and ``--progress`` (and ``-v/--verbose`` when the command has more
    to say), spelled the same in every command."""
    add_quiet_option(parser)
    parser.add_argument("--progress", action="store_true",
                        help="show progress even when standard error is not a terminal "
                             "(plain lines, no escape codes)")
    if verbose:
        parser.add_argument("-v", "--verbose", action="count", default=0,
                            help="say more (repeat for even more)")


def progress_wanted(args: argparse.Namespace, stream: TextIO | None = None) -> bool:
    """Progress is shown with ``--progress``, or on a terminal unless ``-q``."""
    if getattr(args, "quiet", False):
        return False
    if getattr(args, "progress", False):
        return True
    return (stream or sys.stderr).isatty()


def _width(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return 80  # not a real terminal (a test's stand-in): tqdm measures it itself


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


class Progress:
    """Progress of one job: ``update(done, total)`` as it goes, ``close()`` at the end.

    Args:
        label: what is being done (``"receive"``).
        enabled: from :func:`progress_wanted`; a disabled progress prints nothing.
        unit: ``"B"`` (bytes, shown as KiB/MiB) or an item name (``"chunks"``).
        total: the total when known (percentage and ETA), else ``None``.
        stream: where to print (standard error).
        transient: the bar is cleared when done (a command whose output is the answer:
            ``tree-sum``), instead of staying as the job's last figures.
    """

    def __init__(self, label: str, *, enabled: bool, unit: str = "B", total: int | None = None,
                 stream: TextIO | None = None, transient: bool = False) -> None:
        self.enabled = enabled
        self.label = label
        self.unit = unit
        self.total = total
        self._stream = stream or sys.stderr
        self._bar: Any = None
        self._done = 0
        self._note = ""
        self._started = time.monotonic()
        self._last_line: float | None = None  # (no plain line yet: the first update's is)
        if enabled and self._stream.isatty():
            from tqdm import tqdm

            bytes_ = unit == "B"
            # a terminal that reports no width (a fresh pty, some serial consoles): 80
            dynamic = _width(self._stream) > 0
            self._bar = tqdm(
                total=total, desc=label, unit=unit, unit_scale=bytes_,
                unit_divisor=1024 if bytes_ else 1000, file=self._stream,
                dynamic_ncols=dynamic, ncols=None if dynamic else 80, mininterval=0.1,
                # and no height either: tqdm then draws nothing on standard error
                nrows=None if dynamic else 24, leave=not transient,
            )

    def update(self, done: int, total: int | None = None, note: str = "") -> None:
        """``done`` units so far (of ``total``, when it became known); ``note`` is shown
        after the figures (e.g. ``"12 files"``)."""
        if not self.enabled:
            return
        if self.total is not None and done > self.total and (total is None or done > total):
            total = done  # more than announced (retries, metadata): never past 100%
        if total is not None and total != self.total:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
        self._note = note
        if self._bar is not None:
            self._bar.update(done - self._done)
            if note:
                self._bar.set_postfix_str(note, refresh=False)
        else:
            now = time.monotonic()
            if self._last_line is None or now - self._last_line >= _PLAIN_EVERY:
                first = self._last_line is None
                self._last_line = now
                self._done = done
                self._print(self._line(done, now, rate=not first))
        self._done = done

    def message(self, text: str) -> None:
        """Print ``text`` as a line of its own (above the bar on a terminal). Shown even when
        progress is disabled unless ``quiet`` is what disabled it: callers decide."""
        if self._bar is not None:
            self._bar.write(text, file=self._stream)
        else:
            self._print(text)

    def print_out(self, text: str) -> None:
        """Print ``text`` (lines) on standard output; a bar on the same terminal is cleared
        first and drawn again after (else the text would follow the bar on its line)."""
        if self._bar is None:
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        from tqdm import tqdm

        with tqdm.external_write_mode(file=sys.stdout):
            sys.stdout.write(text)
            sys.stdout.flush()

    def close(self, summary: str | None = None) -> None:
        """End the bar (or print a last plain line); ``summary`` is printed after it."""
        if self.enabled:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            elif self._done:
                self._print(self._line(self._done, time.monotonic()))
            if summary:
                self._print(summary)
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self, done: int, now: float, rate: bool = True) -> str:
        """The figures; ``rate``: with the rate and ETA (not in the first line, at the
        start: its rate would be of a moment; nor while nothing is done)."""
        per_sec = done / max(now - self._started, 1e-9) if rate and done else 0.0
        if self.unit == "B":
            parts = [_human(done) + (f" of {_human(self.total)}" if self.total else "")]
            if per_sec:
                parts.append(f"{_human(per_sec)}/s")
        else:
            parts = [f"{done} {self.unit}" + (f" of {self.total}" if self.total else "")]
        if self.total:
            parts.append(f"{100.0 * done / self.total:.0f}%")
            if per_sec:
                parts.append(f"ETA {(self.total - done) / per_sec:.0f}s")
        if self._note:
            parts.append(self._note)
        return f"{self.label}: {', '.join(parts)}"

    def _print(self, text: str) -> None:
        self._stream.write(text + "\n")
        self._stream.flush()


class Phases:
    """Progress of a job in phases: one display per phase, each counting from 0 under its
    own label (``clone fetch``: bytes of the image fetched, rate and ETA; ``clone check``:
    chunks looked at; ``install receive``). A phase does not come back once another began.

    Args:
        label: the job (``"clone"``), before each phase's name.
        enabled: from :func:`progress_wanted`.
        units: a phase's unit when not bytes (``{"check": "chunks"}``).
    """

    def __init__(self, label: str, enabled: bool, units: dict[str, str] | None = None) -> None:
        self.label = label
        self.enabled = enabled
        self.units = units or {}
        self.phase = ""
        self.current: Progress | None = None

    def __call__(self, phase: str, done: int, total: int | None, note: str = "") -> None:
        if phase != self.phase:
            self.close()
            self.phase = phase
            self.current = Progress(f"{self.label} {phase}", enabled=self.enabled,
                                    unit=self.units.get(phase, "B"), total=total)
        assert self.current is not None
        self.current.update(done, total=total, note=note)

    def message(self, text: str) -> None:
        """A line of its own (above the bar on a terminal)."""
        if self.current is not None:
            self.current.message(text)
        else:
            Progress(self.label, enabled=False).message(text)

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None

    def __enter__(self) -> Phases:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
