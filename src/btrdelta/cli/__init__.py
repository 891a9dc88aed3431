"""The ``btrdelta`` command: one entry point, one module per subcommand.

Every ``btrdelta/cli/<name>_cmd.py`` module is a subcommand; it exposes ``add_parser(sub)``
(registers its argparse parser and sets ``func=run``) and ``run(args) -> int``. Commands are
thin: parse, call the public API, format. Errors become one line on stderr and the exit code
of the error class (the table of ``btrdelta --help`` and the README, generated from
:func:`btrdelta.errors.exit_codes`); a usage mistake is one line and exit 2; ``--debug``
shows the traceback. Conventions every command follows (``_common``, ``progress``):
``-q/--quiet``, ``-v/--verbose``, ``--progress``, ``-j/--jobs``, ``--json`` (to standard
output), ``-`` for standard input/output, an example in every ``--help``.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from .. import __version__
from .._optional import OPTIONAL, missing
from ..errors import BtrdeltaError, exit_codes
from ._common import HelpFormatter, Parser

__all__ = ["build_parser", "describe_os_error", "entry", "exit_codes_epilog", "main"]

def exit_codes_epilog() -> str:
    """The exit-code table of ``btrdelta --help`` (generated from :mod:`btrdelta.errors`)."""
    rows = "".join(f"  {code:>3}  {meaning}\n" for code, meaning in exit_codes())
    return f"exit codes:\n{rows}"


def _command_modules() -> list[str]:
    # a directory listing, not pkgutil (whose import costs ~4 ms of every command's start)
    here = os.path.dirname(__file__)
    return sorted(n[:-3] for n in os.listdir(here) if n.endswith("_cmd.py"))


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered (or just ``only``, when a
    module ``<only>_cmd`` registers it: saves importing every command on each run)."""
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
    names = _command_modules()
    if only is not None and f"{only.replace('-', '_')}_cmd" in names:
        first = f"{only.replace('-', '_')}_cmd"
        importlib.import_module(f"{__name__}.{first}").add_parser(sub)
        if only in sub.choices:
            return parser
        names.remove(first)
    for name in names:
        module = importlib.import_module(f"{__name__}.{name}")
        module.add_parser(sub)
    return parser


def entry() -> NoReturn:
    """The console script (and ``python -m btrdelta``): :func:`main`, then a quick exit.

    Interpreter finalization (clearing every module, final collections) costs ~10 ms, a
    measurable part of receiving a small incremental stream. When nothing is left to
    finalize — no other thread, no ``atexit`` handler — the process exits right after
    standard output and error are flushed.
    """
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        sys.exit(code)  # the usual shutdown reports it
    threading = sys.modules.get("threading")
    callbacks = getattr(atexit, "_ncallbacks", None)
    if (threading is None or threading.active_count() == 1) and callbacks is not None \
            and callbacks() == 0:
        os._exit(code)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (only ``__main__`` calls ``sys.exit``)."""
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(next((w for w in words if not w.startswith("-")), None))
    args = parser.parse_args(words)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    # "delta make", "image clone": the words that chose the command, for error lines
    args.command = " ".join(v for k, v in vars(args).items()
                            if k.endswith("command") and isinstance(v, str))
    try:
        return int(args.func(args) or 0)
    except BtrdeltaError as exc:
        if args.debug:
            raise
        print(f"btrdelta {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # the reader went away (`btrdelta dump | head`): exit quietly, like coreutils
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        print(f"btrdelta {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if args.debug:
            raise
        print(f"btrdelta {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
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


def describe_os_error(exc: OSError) -> str:
    """``path: reason`` of an :class:`OSError`, without Python's ``[Errno N]``."""
    name = exc.filename
    where = f"{os.fsdecode(name) if isinstance(name, bytes) else name}: " if name else ""
    return f"{where}{exc.strerror or exc}"
