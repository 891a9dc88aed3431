"""Helpers shared by subcommands: the parser class and help layout, inputs and outputs,
``--json``, sizes, and printers several commands share. Progress lives in :mod:`.progress`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator, Sequence

from .. import TYPE_CHECKING
from ..errors import BtrdeltaError, UsageError
from ..fs.atomic import atomic_output
from ._lean import argparse

#: a command's hint after "unrecognized arguments": (arguments parsed, words left over,
#: the command's words) -> what was meant, or None
Hint = Callable[[argparse.Namespace, list[str], list[str]], "str | None"]

if TYPE_CHECKING:
    import signal
    from typing import Any, BinaryIO, NoReturn

    from ..update.identify import Identified, Kind
else:
    import _signal as signal  # (``signal`` without its enums: cli/__init__.py; built in)


def _message(message: str) -> str:
    return message


def _messages(singular: str, plural: str, n: int) -> str:
    return singular if n == 1 else plural


# argparse looks each of its messages up in gettext's default domain ("messages"): a search
# for a catalogue at every lookup, and the first one imports ``locale`` to normalize the
# language names (~1 ms, 5 M instructions, of every command's start: 6 lookups for a
# ``send``). btrdelta's own messages are English, and no catalogue of that domain is
# installed with Python: argparse's messages are taken as they are written.
argparse._ = _message  # type: ignore[attr-defined]
argparse.ngettext = _messages  # type: ignore[attr-defined]


class HelpFormatter(argparse.HelpFormatter):
    """Wraps each paragraph of a description or epilog; keeps indented lines (examples)
    as they are written. The width is the terminal's as argparse finds it, without its
    import of ``shutil`` (a few ms of every command's start)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         _columns() - 2 if width is None else width)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap  # (help only)

        out = []
        for block in text.strip("\n").split("\n\n"):
            lines = block.splitlines()
            if any(line.startswith("  ") for line in lines):
                out.append("\n".join(indent + line for line in lines))
            else:
                out.append(textwrap.fill(" ".join(block.split()), width,
                                         initial_indent=indent, subsequent_indent=indent))
        return "\n\n".join(out)


def _columns() -> int:
    """``shutil.get_terminal_size().columns``: $COLUMNS, else the terminal's, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class Parser(argparse.ArgumentParser):
    """The parser of every ``btrdelta`` command: a usage mistake is one line (naming the
    command and where to read more) and exit 2."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._intermixing = False
        #: the command's own words (after its name) of the parse under way
        self.words: list[str] = []
        #: what a command says after "unrecognized arguments: ..." (given the arguments
        #: parsed and the words left over), e.g. ``send OLD NEW``: give OLD with -p
        self.extra_hint: Hint | None = None
        #: what a command says after "the following arguments are required: ..." (given
        #: its words), e.g. ``delta make A-B.stream /snap/A``: give /snap/A with --old
        self.missing_hint: Callable[[list[str]], str | None] | None = None

    def error(self, message: str) -> NoReturn:
        if self.missing_hint is not None and message.startswith(
                "the following arguments are required"):
            hint = self.missing_hint(self.words)
            message += f"; {hint}" if hint else ""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None,
                         ) -> tuple[argparse.Namespace, list[str]]:
        """A command's positionals may come between its options (``receive A.stream -q
        DEST``, ``replicate /data --store S /backup``): plain argparse gives an optional
        positional nothing when an option follows its value, takes that value for the next
        positional, and then refuses the last word."""
        if self._intermixing:
            return super().parse_known_args(args, namespace)
        self.words = list(sys.argv[1:] if args is None else args)
        if self._subparsers is not None or not any(
                a.nargs in ("?", "*", "+") for a in self._get_positional_actions()):
            ns, extra = super().parse_known_args(args, namespace)
        else:
            self._intermixing = True
            try:
                ns, extra = self.parse_known_intermixed_args(args, namespace)
            finally:
                self._intermixing = False
        if extra and self._subparsers is None:
            # the command's own mistake, named by it (not by `btrdelta`), with its hint
            hint = (self.extra_hint(ns, extra, self.words) if self.extra_hint is not None
                    else None)
            self.error(f"unrecognized arguments: {' '.join(extra)}"
                       + (f"; {hint}" if hint else ""))
        return ns, extra


def set_extra_hint(parser: argparse.ArgumentParser, hint: Hint) -> None:
    """Say ``hint(args, extra, words)`` after a command's "unrecognized arguments" error."""
    if isinstance(parser, Parser):
        parser.extra_hint = hint


def set_missing_hint(parser: argparse.ArgumentParser,
                     hint: Callable[[list[str]], str | None]) -> None:
    """Say ``hint(words)`` after a command's "the following arguments are required"."""
    if isinstance(parser, Parser):
        parser.missing_hint = hint


def free_words(parser: argparse.ArgumentParser, words: Sequence[str]) -> list[int]:
    """The indexes of ``words`` that are neither options nor their values: what the
    command takes for positionals (``-`` included, after ``--`` all)."""
    free: list[int] = []
    take_value = False
    for i, word in enumerate(words):
        if take_value:
            take_value = False
        elif word == "--":
            free += range(i + 1, len(words))
            break
        elif word.startswith("-") and word != "-":
            action = parser._option_string_actions.get(word.split("=", 1)[0])
            take_value = (action is not None and action.nargs != 0 and "=" not in word
                          and not (word[1] != "-" and len(word) > 2))
        else:
            free.append(i)
    return free


def meant(prog: str, words: Sequence[str], before: dict[int, str]) -> str:
    """The command line ``prog words`` with ``before[i]`` inserted before ``words[i]``."""
    import shlex  # (hints only)

    out: list[str] = []
    for i, word in enumerate(words):
        if i in before:
            out.append(before[i])
        out.append(word)
    return f"{prog} {shlex.join(out)}"


def refuse_terminal_output(name: str | None) -> None:
    """Refuse, before any work, to write a binary stream to standard output (``-``,
    ``None``) when it is a terminal.

    Raises:
        BtrdeltaError: it is.
    """
    if name in (None, "-") and sys.stdout.isatty():
        raise BtrdeltaError("refusing to write a binary stream to a terminal (use -o FILE)")


def examples(*lines: str, note: str = "") -> str:
    """An ``examples:`` epilog (one command per line), with an optional paragraph after."""
    head = "example:" if len(lines) == 1 else "examples:"
    text = head + "\n" + "\n".join(f"  {line}" for line in lines)
    return f"{text}\n\n{note}" if note else text


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
        raise UsageError("give the input either with -f or as an argument, not both")
    return str(args.file or args.input or "-")


#: (compiled by the first check, in re's cache: ~1 M instructions of every start otherwise)
_HOST_PATH = r"(?:localhost|[\w-]+(?:\.[\w-]+)+|\[[0-9a-fA-F:]+\])(?::\d+)?(?:/.*)?"


def check_location(location: str, what: str = "URL") -> None:
    """A repository location (``URL``, ``--mirror``) that is no directory here and has no
    scheme but reads as ``host[:port]/path`` (``127.0.0.1:8000/app``, ``updates.example/app``)
    is a URL whose scheme was left out: a usage error naming the URL meant.

    Raises:
        UsageError: see above.
    """
    if "://" in location or os.path.exists(location):
        return
    if re.fullmatch(_HOST_PATH, location):
        raise UsageError(f"{what} {location}: no such directory; a URL needs its scheme: "
                         f"http://{location} (or https://)")


def check_not_url(path: str, what: str, hint: str) -> None:
    """``path`` (a local directory argument) given as a URL: the arguments swapped.

    Raises:
        UsageError: ``path`` has a scheme (``http://...``).
    """
    if re.match(r"[a-zA-Z][\w+.-]*://", path):
        raise UsageError(f"{what} {path} is a URL: {hint}")


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive number: {text!r}")
    return value


def add_jobs(parser: argparse.ArgumentParser, default: int | None, what: str) -> None:
    """``-j/--jobs N``: how many things run at once (threads, processes, connections)."""
    parser.add_argument("-j", "--jobs", type=positive_int, default=default, metavar="N",
                        help=what)


def add_json(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    """``--json``: print ``what`` as one JSON object on standard output
    (schemas: ``docs/cli-json.md``)."""
    parser.add_argument("--json", action="store_true",
                        help=f"print {what} as one JSON object on standard output "
                             "(docs/cli-json.md)")


def json_needs_stdout(args: argparse.Namespace, output: str | None) -> None:
    """Refuse ``--json`` when the payload itself goes to standard output."""
    if getattr(args, "json", False) and output in (None, "-"):
        raise UsageError("--json prints on standard output: write the stream to a file (-o)")


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


@contextlib.contextmanager
def open_output(name: str | None, *, binary: bool = True,
                durable: bool = True) -> Iterator[BinaryIO]:
    """Open ``name`` for binary writing; ``-``/``None`` is standard output.

    A file is written through :func:`btrdelta.fs.atomic.atomic_output`: an unnamed (or new,
    ``O_EXCL|O_NOFOLLOW``) file renamed into place only on success, so a failed run never
    leaves a half-written output behind and no planted symlink is written through;
    ``durable=False`` skips its ``fsync`` calls.
    """
    if name in (None, "-"):
        if binary:
            refuse_terminal_output(name)
        with naming_output("standard output"):
            yield sys.stdout.buffer
            sys.stdout.buffer.flush()
        return
    if os.path.isdir(name):
        raise BtrdeltaError("is a directory (give a file name)", source=name)
    with naming_output(name), atomic_output(name, durable=durable) as f:
        yield f


#: errors of a write that say the output is full (or too large for it), not where
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def naming_output(name: str) -> Iterator[None]:
    """A write to the output ``name`` that fails for want of space names it (a file
    object's ``write`` raises ``OSError`` without a file name: "No space left on
    device", but where?)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _FULL and exc.filename is None:
            exc.filename = name
        raise


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


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP ended the command as Ctrl-C does (``signum``: the exit code is
    128 + it, as a shell shows a command the signal killed)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def stop_on_signals() -> dict[int, Any]:
    """SIGTERM and SIGHUP end the command like Ctrl-C (:class:`Interrupted`, a
    ``KeyboardInterrupt``), so what it made for the run (temporary snapshots, partial files)
    is removed on the way out; not one ignored when the command started (``nohup``). Returns
    the handlers replaced (empty outside the main thread, where none can be set)."""
    old: dict[int, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                old[sig] = signal.signal(sig, _stop)
        except ValueError:  # not the main thread
            break
    return old


def _stop(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def default_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP at their default (those :func:`stop_on_signals` handles) while a
    C library runs that sets its own handlers only where a signal is at its default:
    libfuse's loop (a Python handler would wait for it to end, which it never does)."""
    old = {sig: signal.signal(sig, signal.SIG_DFL) for sig in (signal.SIGTERM, signal.SIGHUP)
           if signal.getsignal(sig) is _stop}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
