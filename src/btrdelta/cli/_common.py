"""Helpers shared by subcommands: the parser class and help layout, inputs and outputs,
``--json``, sizes, and printers several commands share. Progress lives in :mod:`.progress`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace

from .. import TYPE_CHECKING
from ..errors import BtrdeltaError, UsageError
from ..fs.atomic import atomic_output

if TYPE_CHECKING:
    import argparse
    import signal
    from typing import Any, BinaryIO

    from ..update.identify import Identified, Kind

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


#: (compiled by the first check, in re's cache: ~1 M instructions of every start otherwise)
_HOST_PATH = r"(?:localhost|[\w-]+(?:\.[\w-]+)+|\[[0-9a-fA-F:]+\])(?::\d+)?(?:/.*)?"


def check_location(location: str, what: str = "URL") -> None:
    """A repository location (``URL``, ``--mirror``) that is no directory here and has no
    scheme but reads as ``host[:port]/path`` (``127.0.0.1:8000/app``, ``updates.example/app``)
    is a URL whose scheme was left out: a usage error naming the URL meant.

    A location that names one of the repository's files (``.../app/timestamp.json``, the
    ``index.html`` a browser shows) is a usage error naming the base URL meant (the client
    looked for ``.../timestamp.json/timestamp.json``: 'no signed repository here').

    Raises:
        UsageError: see above.
    """
    bare = location.split("?")[0].split("#")[0].rstrip("/")
    leaf = bare.rsplit("/", 1)[-1]
    if leaf in ("timestamp.json", "index.html") and "/" in bare \
            and not os.path.isdir(location):
        raise UsageError(f"{what} {location} names the repository's {leaf}: give the "
                         f"repository's base URL: {bare[:-len(leaf) - 1]}")
    if "://" in location or os.path.exists(location):
        return
    import re

    if re.fullmatch(_HOST_PATH, location):
        raise UsageError(f"{what} {location}: no such directory; a URL needs its scheme: "
                         f"http://{location} (or https://)")


def location(text: str) -> str:
    """An argument that is a path or an ``http(s)://`` URL (``type=`` of argparse): a
    ``file://`` URL is read as the path it names; any other ``scheme://`` is refused (it
    would otherwise be taken as a relative path, and a destination made under ``./ftp:``).

    Raises:
        argparse.ArgumentTypeError: see above.
    """
    import argparse
    import re

    if text.startswith(("http://", "https://")) or not re.match(r"[a-zA-Z][\w+.-]*://", text):
        return text
    from ..chunk.source import file_url_path

    if text.startswith("file://"):
        try:
            return file_url_path(text)
        except BtrdeltaError as e:
            raise argparse.ArgumentTypeError(f"{text}: {e.args[0]}") from None
    raise argparse.ArgumentTypeError(
        f"{text}: not a path or an http(s):// URL (file:// URLs are read as paths; "
        f"{text.split('://')[0]}:// is not supported here)")


def location_keeping_file_url(text: str) -> str:
    """:func:`location` for an argument where a ``file://`` URL of a directory means
    something else than its path (``device install FS file:///media/usb/os``: a
    repository; the path alone is a tree to install): checked, then kept as given."""
    path = location(text)
    return text if text.startswith("file://") else path


def check_not_url(path: str, what: str, hint: str) -> None:
    """``path`` (a local directory argument) given as a URL: the arguments swapped.

    Raises:
        UsageError: ``path`` has a scheme (``http://...``).
    """
    import re

    if re.match(r"[a-zA-Z][\w+.-]*://", path):
        raise UsageError(f"{what} {path} is a URL: {hint}")


def refuse_same_file(name: str, output: str | None, option: str = "-o") -> None:
    """The output named as the input file (``delta make -f X -o X``, ``image compress -i
    IMG -o IMG``): it would replace the input (outputs are written beside and renamed
    over), so a usage error instead.

    Raises:
        UsageError: ``output`` is the file ``name`` is.
    """
    if output in (None, "-") or name == "-":
        return
    try:
        same = os.path.samefile(name, output)
    except OSError:  # (either missing: said where it is opened)
        return
    if same:
        raise UsageError(f"{option} {output} is the input file: the output would replace it "
                         "(give it another name)")


def refuse_inside(inner: str, outer: str, words: str, *, mounts_apart: bool = False) -> None:
    """A directory argument that is another one or inside it where that mixes them up
    (``replicate SRC SRC/backup``, ``update REPO REPO``, ``repo add REPO V TREE`` with REPO
    in TREE): a usage error, ``words`` its text (``inner`` and ``outer`` are formatted in:
    ``{inner}``, ``{outer}``, ``{how}`` "is" or "is inside"). ``mounts_apart``: ``inner``
    below ``outer`` but on another filesystem (a mount point, a nested subvolume) is apart
    from it, as a send of ``outer`` leaves it out.

    Raises:
        UsageError: ``inner`` is ``outer`` or below it (symbolic links resolved).
    """
    a, b = os.path.realpath(inner), os.path.realpath(outer)
    if a != b and not a.startswith(b.rstrip(os.sep) + os.sep):
        return
    if a != b and mounts_apart:
        near = a  # (the nearest part of it that exists)
        while not os.path.exists(near) and near != b:
            near = os.path.dirname(near)
        try:
            if os.stat(near).st_dev != os.stat(b).st_dev:
                return
        except OSError:
            pass
    how = "is" if a == b else "is inside"
    raise UsageError(words.format(inner=inner, outer=outer, how=how))


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
