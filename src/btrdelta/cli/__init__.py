"""The ``btrdelta`` command: one entry point, one module per subcommand.

Every ``btrdelta/cli/<name>_cmd.py`` module is a subcommand, listed in :data:`COMMANDS`
(with its ``--help`` line); it exposes ``add_parser(sub)`` (registers its argparse parser and
sets ``func=run``) and ``run(args) -> int``; a run imports only the chosen one. Commands are
thin: parse, call the public API, format. Errors become one line on stderr and the exit code
of the error class (the table of ``btrdelta --help`` and the README, generated from
:func:`btrdelta.errors.exit_codes`); a usage mistake is one line and exit 2; ``--debug``
shows the traceback. Conventions every command follows (``_common``, ``progress``):
``-q/--quiet``, ``-v/--verbose``, ``--progress``, ``-j/--jobs``, ``--json`` (to standard
output), ``-`` for standard input/output, an example in every ``--help``.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
from collections.abc import Sequence

from .. import TYPE_CHECKING, __version__, _import_module, errors
from .._optional import OPTIONAL, missing
from ..errors import ApplyError, BtrdeltaError, exit_codes
from . import _lean  # noqa: F401  (first: ``uuid`` without ``platform``)
from ._common import FULL, Interrupted, redelivering, stop_on_signals

if TYPE_CHECKING:
    import argparse
    import signal
    from typing import NoReturn
else:
    # signal's functions and numbers without the three enums ``signal`` makes of them at
    # import (~3 M instructions of every command's start); the handlers compare alike
    import _signal as signal

__all__ = ["COMMANDS", "build_parser", "describe_os_error", "entry", "exit_codes_epilog", "main"]

def exit_codes_epilog() -> str:
    """The exit-code table of ``btrdelta --help`` (generated from :mod:`btrdelta.errors`)."""
    rows = "".join(f"  {code:>3}  {meaning}\n" for code, meaning in exit_codes())
    return f"exit codes:\n{rows}"


#: every command: name -> (its module under ``btrdelta.cli``, the line ``btrdelta --help``
#: shows). ``--help``, ``--version`` and a mistyped command list them without importing any
#: command module; tests/cli/test_entry.py checks them against the modules' own parsers.
COMMANDS: dict[str, tuple[str, str]] = {
    "delta": ("delta_cmd", "make, expand and inspect delta streams (file data as binary "
              "patches)"),
    "device": ("device_cmd", "A/B roots on btrfs: install by delta, boot counting, factory "
               "reset"),
    "dump": ("dump_cmd", "print the commands of a send stream"),
    "image": ("image_cmd", "chunked images: compress, clone over HTTP, mount, NBD export"),
    "key": ("key_cmd", "generate and show Ed25519 signing keys"),
    "receive": ("receive_cmd", "apply a send stream to a directory (any filesystem) or btrfs"),
    "replicate": ("replicate_cmd", "send SOURCE to DEST (local, ssh://, tcp://) against what "
                  "it holds"),
    "repo": ("repo_cmd", "versions repository: publish releases, deltas and a signed index"),
    "send": ("send_cmd", "make a send stream from a directory tree (incremental with -p)"),
    "sendshot": ("sendshot_cmd", "list, show, delete, prune, forget or create sendshot records"),
    "serve": ("serve_cmd", "serve a directory over HTTP with Range support (tests and demos)"),
    "sign": ("sign_cmd", "sign a send stream or delta stream (detached FILE.sig)"),
    "stat": ("stat_cmd", "summarize a stream: commands, data bytes, compression, files "
             "touched"),
    "tree-sum": ("treesum_cmd", "checksum a directory tree (content, metadata, xattrs, links)"),
    "update": ("update_cmd", "update DEST from a versions repository (cheapest path, "
               "verified)"),
    "verify": ("verify_cmd", "check a stream's framing and every CRC32C"),
}


def build_parser(only: str | None = None, *, listing: bool = False) -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered, or just ``only`` (a name of
    :data:`COMMANDS`: only its module is imported). ``listing``: every command by its name
    and help line only (no command module imported): enough for ``--help``, ``--version``
    and the error naming a mistyped command."""
    from ._parser import HelpFormatter, Parser

    parser = Parser(
        prog="btrdelta",
        description=(
            "Small, fast and safe updates from btrfs send streams: read, dump, verify, "
            "receive, send and delta-compress streams; chunk and clone whole images."
        ),
        epilog="examples:\n  btrdelta receive -f A-B.stream /data/updates\n"
               "  btrdelta send -p /build/v1 /build/v2 -f v1-v2.stream\n"
               "  btrdelta receive --help          # every command has its own help\n\n"
               + exit_codes_epilog(),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"btrdelta {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show a Python traceback on errors"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    if listing:
        for name, (_module, line) in COMMANDS.items():
            sub.add_parser(name, help=line, add_help=False)
        return parser
    names = [COMMANDS[only][0]] if only in COMMANDS else sorted({m for m, _ in COMMANDS.values()})
    for name in names:
        _import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


#: container allocations between collections of the youngest generation (``entry``)
_GC_YOUNG = 20_000


def entry() -> NoReturn:
    """The console script (and ``python -m btrdelta``): :func:`main`, then a quick exit.

    Interpreter finalization (clearing every module, final collections) costs ~10 ms, a
    measurable part of receiving a small incremental stream. When nothing is left to
    finalize — no other thread, no ``atexit`` handler — the process exits right after
    standard output and error are flushed.

    The youngest generation of the cycle collector is collected every
    :data:`_GC_YOUNG` container allocations instead of 700: records waiting in a
    receive's queue of batches were traversed again at every collection (receive of the
    Debian ``--compressed-data`` delta, three runs at load 6: 150 collections holding
    the GIL 43-78 ms, then 3 collections, 18-21 ms; the garbage found is the same, ~1,280
    objects; peak RSS of ``delta expand`` of it +5 MB), and a small send went over its
    start-up's objects 25 times (``send --from-sendshot`` of a 6,000-file tree: 4-9 ms).
    The objects made so far (modules, classes, functions: they live as long as the
    process) are frozen (``gc.freeze``): no collection goes over them again, and the
    count towards the first one starts from zero (that send made one young collection
    of 3-4 ms of CPU over its imports' objects; none now).
    """
    gc.set_threshold(_GC_YOUNG, *gc.get_threshold()[1:])
    gc.freeze()
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        if code == 0:
            sys.exit(code)  # the usual shutdown reports it
        # the command failed and said why (a full standard output): Python 3.13 keeps what
        # a failed flush could not write, and the shutdown's flush would fail again
        # ("Exception ignored on flushing sys.stdout", exit 120): dropped
        _stdout_to_devnull()
    threading = sys.modules.get("threading")
    callbacks = getattr(atexit, "_ncallbacks", None)
    if (threading is None or threading.active_count() == 1) and callbacks is not None \
            and callbacks() == 0:
        os._exit(code)
    sys.exit(code)


def _stdout_to_devnull() -> None:
    """Point standard output at /dev/null: what its buffers hold goes nowhere, quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (only ``__main__`` calls ``sys.exit``)."""
    words = list(sys.argv[1:] if argv is None else argv)
    # only the chosen command's module is imported; without one (--help, --version, a
    # mistyped name) the commands are listed from COMMANDS
    command = next((w for w in words if not w.startswith("-")), None)
    args = _quick_args(command, words)
    if args is None:
        parser = build_parser(command, listing=command not in COMMANDS)
        args = parser.parse_args(words)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 2
    # "delta make", "image clone": the words that chose the command, for error lines
    args.command = " ".join(v for k, v in vars(args).items()
                            if k.endswith("command") and isinstance(v, str))
    # SIGTERM and SIGHUP end every command as Ctrl-C does (its clean-up runs); the exit code
    # is 128 + the signal's number (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP) for all of them.
    # The servers (serve, image nbd/mount) take the signals as their normal stop (exit 0).
    handlers = stop_on_signals()
    unraisable, sys.unraisablehook = sys.unraisablehook, redelivering(sys.unraisablehook)
    errors.warn_as = f"btrdelta {args.command}"
    try:
        return int(args.func(args) or 0)
    except BtrdeltaError as exc:
        if args.debug:
            raise
        print(f"btrdelta {args.command}: error: {exc}{_not_root(exc, str(exc))}",
              file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # the reader went away (`btrdelta dump | head`): exit quietly, like coreutils
        _stdout_to_devnull()
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt as exc:
        print(f"btrdelta {args.command}: interrupted", file=sys.stderr)
        return 128 + (exc.signum if isinstance(exc, Interrupted) else signal.SIGINT)
    except OSError as exc:
        if args.debug:
            raise
        text = describe_os_error(exc)
        print(f"btrdelta {args.command}: error: {text}{_not_root(exc, text)}",
              file=sys.stderr)
        # no space: the code of a receive's (send -o, dump, image clone exited 1)
        return ApplyError.exit_code if exc.errno in FULL else 1
    except Exception as exc:  # a bug: still one line (the mistake tests look for these)
        if args.debug:
            raise
        top = (exc.name or "").split(".")[0] if isinstance(exc, ImportError) else ""
        if top in OPTIONAL:  # an optional dependency imported without _optional.need()
            err = missing(top)
            print(f"btrdelta {args.command}: error: {err}", file=sys.stderr)
            return err.exit_code
        print(f"btrdelta {args.command}: internal error: {type(exc).__name__}: {exc} "
              "(--debug shows the traceback)", file=sys.stderr)
        return 1
    finally:
        errors.warn_as = None
        sys.unraisablehook = unraisable
        for sig, handler in handlers.items():  # (main() called in a process that goes on)
            signal.signal(sig, handler)


def _quick_args(command: str | None, words: list[str]) -> argparse.Namespace | None:
    """The arguments of a command whose module reads plain words without its parser
    (``quick_args``: ``send``), as ``build_parser(command).parse_args(words)`` gives them;
    None: build the parser (anything else, ``--help`` and mistakes included)."""
    if command not in COMMANDS:
        return None
    at = words.index(command)
    if any(w != "--debug" for w in words[:at]):
        return None
    quick = getattr(_import_module(f"{__name__}.{COMMANDS[command][0]}"),
                    "quick_args", None)
    ns: argparse.Namespace | None = quick(words[at + 1:]) if quick is not None else None
    if ns is None:
        return None
    # (the top-level parser's dests first, as its parse gives them)
    return type(ns)(debug=at > 0, command=command, **vars(ns))


#: what a refusal to an unprivileged user says (the errno is not always at hand: a mount or
#: ioctl made by a helper program reports in words)
_REFUSED = ("Permission denied", "Operation not permitted", "failed to setup loop device",
            "must be superuser", "only root")


def _not_root(exc: BaseException, text: str) -> str:
    """A hint for a user who is not root and was refused: btrfs subvolume operations,
    loop mounts, ``receive`` of owners and devices and the default stores need root
    (``""`` as root, or for another error)."""
    if os.geteuid() == 0 or any(w in text for w in ("needs root", "as root", "running as uid")):
        return ""  # root, or the error said it already
    refused = any(word in text for word in _REFUSED)
    cause: BaseException | None = exc
    while cause is not None and not refused:
        refused = isinstance(cause, PermissionError)
        cause = cause.__cause__ or cause.__context__
    if not refused:
        return ""
    return " (not running as root: btrfs subvolumes, mounts and the default stores need root)"


#: a path in an error line longer than this is shortened in its middle (a path past
#: PATH_MAX, refused with ENAMETOOLONG, filled a terminal with 4 KB of one line)
_PATH_SHOWN = 240


def describe_os_error(exc: OSError) -> str:
    """``path: reason`` of an :class:`OSError`, without Python's ``[Errno N]``; a path longer
    than 240 characters keeps its first and last 100 and says how long it is."""
    name = exc.filename
    text = os.fsdecode(name) if isinstance(name, bytes) else str(name) if name else ""
    if len(text) > _PATH_SHOWN:
        text = f"{text[:100]}...({len(text)} characters)...{text[-100:]}"
    where = f"{text}: " if text else ""
    return f"{where}{exc.strerror or exc}"
