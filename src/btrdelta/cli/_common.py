"""Helpers shared by subcommands: the parser class and help layout, outputs, ``--json``,
sizes, signals. The input of the commands that read a stream or a delta is :mod:`._input`'s,
the checks of path and URL arguments :mod:`._paths`'; progress lives in :mod:`.progress`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace

from .. import TYPE_CHECKING
from ..errors import BtrdeltaError, UsageError
from ..fs.atomic import atomic_output

if TYPE_CHECKING:
    import argparse
    import signal
    from typing import Any, BinaryIO, ClassVar


    #: a command's hint after "unrecognized arguments": (arguments parsed, words left
    #: over, the command's words) -> what was meant, or None
    Hint = Callable[[argparse.Namespace, list[str], list[str]], "str | None"]
else:
    import _signal as signal  # (``signal`` without its enums: cli/__init__.py; built in)


#: an option a command takes without building its parser (:func:`quick_parse`): option
#: string -> (dest, kind: ``store``, ``append``, ``true`` or ``count``, for a value the
#: words it may be and what each gives (None: any word))
Quick = dict[str, tuple[str, str, "dict[str, object] | None"]]


def quick_parse(words: Sequence[str], options: Quick, positionals: Sequence[str],
                defaults: dict[str, object]) -> argparse.Namespace | None:
    """A command's words as its argparse parser reads them, without building the parser
    (~2-5 ms of a small command's start, its first regular expressions compiled), when
    they are plain: each option spelled whole (``--store S``, ``--store=S``, ``-o F``), a
    value not starting with ``-``, the positionals given. None for anything else (an
    abbreviation, ``-qv``, ``-oF``, ``--``, a value or positional starting with ``-``,
    ``--help``, a mistake): the parser reads those, and says what is wrong.

    ``defaults``: every dest of the parser (but ``func``) and its default, in the parser's
    order (a list default is copied, as argparse does). tests/cli/test_quick.py checks a
    command's table against its parser, and the two readings against each other.
    """
    # (argparse's Namespace without importing argparse: the same attributes, ``vars`` and
    # equality)
    ns: argparse.Namespace = SimpleNamespace(  # type: ignore[assignment]
        **{k: list(v) if isinstance(v, list) else v for k, v in defaults.items()})
    given: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if not word.startswith("-"):
            given.append(word)
            continue
        name, eq, value = word.partition("=")
        spec = options.get(name)
        if spec is None or (eq and not name.startswith("--")):
            return None
        dest, kind, choices = spec
        if kind in ("store", "append"):
            if not eq:
                if i == len(words) or words[i].startswith("-"):
                    return None
                value = words[i]
                i += 1
            got: object = value
            if choices is not None:
                if value not in choices:
                    return None
                got = choices[value]
            if kind == "store":
                setattr(ns, dest, got)
            else:
                getattr(ns, dest).append(got)
        elif eq:
            return None
        elif kind == "true":
            setattr(ns, dest, True)
        else:
            setattr(ns, dest, getattr(ns, dest) + 1)
    if len(given) != len(positionals):
        return None
    for dest, word in zip(positionals, given, strict=True):
        setattr(ns, dest, word)
    return ns


def set_extra_hint(parser: argparse.ArgumentParser, hint: Hint) -> None:
    """Say ``hint(args, extra, words)`` after a command's "unrecognized arguments" error."""
    from ._parser import Parser

    if isinstance(parser, Parser):
        parser.extra_hint = hint


def set_missing_hint(parser: argparse.ArgumentParser,
                     hint: Callable[[list[str]], str | None]) -> None:
    """Say ``hint(words)`` after a command's "the following arguments are required"."""
    from ._parser import Parser

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


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        from ._lean import argparse

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


def json_line(obj: dict[str, object]) -> str:
    """``json.dumps(obj)``, made without importing :mod:`json` when ``obj`` is flat: its
    keys text, its values text, ``int``, finite ``float``, ``bool`` or ``None`` (a
    ``--json`` report of a small command). ``json``'s import compiles six regular
    expressions (``re`` with it): ~2.5 ms of a small ``send --json``. A string of printable
    ASCII without ``"`` or ``\\`` is written as it is (what ``json.dumps`` leaves of it),
    any other by the C function ``json.dumps`` uses (its extension module is loaded then:
    ~0.15 ms); anything else goes to ``json.dumps``."""
    parts = []
    for key, v in obj.items():
        if v is None or v is True or v is False:
            value = "null" if v is None else "true" if v else "false"
        elif type(v) is str:
            value = _json_text(v)
        elif type(v) is int or (type(v) is float and v - v == 0.0):  # (not NaN, not ±inf)
            value = repr(v)
        else:
            return _json_dumps(obj)
        if type(key) is not str:
            return _json_dumps(obj)
        parts.append(f"{_json_text(key)}: {value}")
    return "{" + ", ".join(parts) + "}"


def _json_text(s: str) -> str:
    """``s`` as a JSON string, as ``json.dumps`` writes it (``ensure_ascii``)."""
    if s.isascii() and s.isprintable() and '"' not in s and "\\" not in s:
        return f'"{s}"'
    try:
        from _json import encode_basestring_ascii
    except ImportError:  # (another interpreter)
        import json

        return json.dumps(s)
    return str(encode_basestring_ascii(s))


def _json_dumps(obj: object) -> str:
    import json

    return json.dumps(obj)


def json_needs_stdout(args: argparse.Namespace, output: str | None) -> None:
    """Refuse ``--json`` when the payload itself goes to standard output."""
    if getattr(args, "json", False) and output in (None, "-"):
        raise UsageError("--json prints on standard output: write the stream to a file (-o)")


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
            yield stdout_bytes()
            sys.stdout.buffer.flush()
        return
    if os.path.isdir(name):
        raise BtrdeltaError("is a directory (give a file name)", source=name)
    with naming_output(name), atomic_output(name, durable=durable) as f:
        yield f


class _WholeWrites:
    """Standard output's binary buffer whose ``write`` writes every byte or raises.

    Python 3.11's ``BufferedWriter.write`` of more than its buffer returns a short count,
    the rest dropped, when the reader of a pipe goes away during the ``write(2)`` (the
    kernel's partial count): ``btrdelta dump | head`` went on and exited 0. Written again
    from there, the next ``write(2)`` fails with ``EPIPE``: ``BrokenPipeError``, which
    :func:`btrdelta.cli.main` turns into exit 141 (128 + SIGPIPE), as ``btrfs receive
    --dump | head`` (killed by SIGPIPE) and Python 3.13 give."""

    def __init__(self, buffer: BinaryIO) -> None:
        self._buffer = buffer

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = self._buffer.write(view)
        while done < len(view):
            done += self._buffer.write(view[done:])
        return len(view)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._buffer, name)


def stdout_bytes() -> BinaryIO:
    """Standard output for bytes (:class:`_WholeWrites`)."""
    return _WholeWrites(sys.stdout.buffer)  # type: ignore[return-value]


#: errors of a write that say the output is full (or too large for it), not where
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def naming_output(name: str) -> Iterator[None]:
    """A write to the output ``name`` that fails for want of space names it (a file
    object's ``write`` raises ``OSError`` without a file name: "No space left on
    device", but where?)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in FULL and exc.filename is None:
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
    from ._lean import argparse

    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        value = int(float(t[:-1]) * _UNITS[t[-1]]) if t and t[-1] in _UNITS else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return value


def avg_chunk_size(text: str) -> int:
    """An argparse type: a ``--avg-chunk`` size (:func:`parse_size`) the chunker takes (one
    out of its range was exit 3, 'chunker avg_size 1 outside [256, 4194304]', as if an
    input were malformed)."""
    from ..chunk.chunker import ChunkerParams
    from ..errors import StreamFormatError
    from ._lean import argparse

    value = parse_size(text)
    try:
        ChunkerParams.from_avg(value)
    except StreamFormatError:
        raise argparse.ArgumentTypeError(
            f"not an average chunk size the chunker takes (256 to 4M): {text!r}") from None
    return value


def zstd_level(text: str) -> int:
    """An argparse type: a zstd level, -100 to 22 (what a repository's catalog accepts;
    ``image compress --level 99`` was an internal error, ``repo init --level 99`` made a
    repository every ``repo add`` then refused)."""
    from ._lean import argparse

    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not -100 <= value <= 22:
        raise argparse.ArgumentTypeError(f"not a zstd level (-100 to 22): {text!r}")
    return value


# -- signals -----------------------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP ended the command as Ctrl-C does (``signum``: the exit code is
    128 + it, as a shell shows a command the signal killed)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def stop_on_signals() -> dict[int, Any]:
    """SIGTERM and SIGHUP end the command like Ctrl-C (:class:`Interrupted`, a
    ``KeyboardInterrupt``), so what it made for the run (temporary snapshots, partial files)
    is removed on the way out; not one ignored when the command started (``nohup``). Ctrl-C
    (at Python's default) too, so that all three wait for a
    :class:`~btrdelta._pool.signals_held` block to end (a pool's submission: its locks).
    Returns the handlers replaced (empty outside the main thread, where none can be set)."""
    old: dict[int, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        try:
            now = signal.getsignal(sig)
            if (now is signal.default_int_handler if sig == signal.SIGINT
                    else now is not signal.SIG_IGN):
                old[sig] = signal.signal(sig, _stop)
        except ValueError:  # not the main thread
            break
    return old


def redelivering(previous: Callable[[Any], object]) -> Callable[[Any], None]:
    """A ``sys.unraisablehook`` that gives a signal's exception back to the main thread when
    it was raised where Python drops exceptions: in a finalizer (``__del__``, a weakref
    callback, a generator closed by the collector). Python printed "Exception ignored in"
    and a traceback, and the command went on as if no Ctrl-C or SIGTERM had come. The signal
    is sent again to the main thread by a thread of its own (:func:`_resend`), when its
    handler is one of :func:`resent` (the CLI's, ``replicate --every``'s). Anything else
    goes to ``previous``."""
    import _thread

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        signum = exc.signum if isinstance(exc, Interrupted) else int(signal.SIGINT)
        if isinstance(exc, KeyboardInterrupt) and signal.getsignal(signum) in _Handled.by:
            _thread.start_new_thread(_resend, (_thread.get_ident(), signum, _Handled.count))
            return
        previous(unraisable)

    return hook


class _Handled:
    """How many times a handler of :func:`resent` ran, and those handlers."""

    count = 0
    by: ClassVar[set[Callable[[int, Any], None]]] = set()


def resent(handler: Callable[[int, Any], None]) -> Callable[[int, Any], None]:
    """Signal handler ``handler``, counted and known to :func:`redelivering`: an exception
    it raises where Python drops it (a finalizer) is raised again, by the signal sent again
    to the main thread."""

    def run(signum: int, frame: Any) -> None:
        _Handled.count += 1
        handler(signum, frame)

    _Handled.by.add(run)
    return run


def _resend(thread: int, signum: int, seen: int) -> None:
    """Send ``signum`` to ``thread`` (the main one) until its handler ran (every 50 ms, for
    5 s at most). Sent from the main thread, the handler would run in the hook and be
    dropped again; a real signal, not ``_thread.interrupt_main``, so that a main thread
    waiting in a system call wakes; again, because one that comes as the main thread is
    about to enter a system call waits with it."""
    import time

    for _ in range(100):
        if _Handled.count != seen:
            return
        signal.pthread_kill(thread, signum)
        time.sleep(0.05)


def _interrupt(signum: int, _frame: object) -> None:
    pool = sys.modules.get("btrdelta._pool")  # (no block is open before it is imported)
    if pool is None or not pool.signal_held(signum):
        raise Interrupted(signum)


_stop = resent(_interrupt)


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
