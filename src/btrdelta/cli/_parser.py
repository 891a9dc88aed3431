"""The parser class and help layout of every ``btrdelta`` command (``argparse``), imported
where a parser is built: a command whose words :func:`~._common.quick_parse` reads builds
none (and imports neither ``argparse`` nor ``re``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from .. import TYPE_CHECKING
from ._lean import argparse

if TYPE_CHECKING:
    from typing import NoReturn

    from ._common import Hint

__all__ = ["HelpFormatter", "Parser"]


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


#: the paragraph ending each command's --help that does not give its own (the table:
#: ``btrdelta --help``, README)
EXIT_CODES = ("Exit codes: 0 success, 2 a usage mistake, 130 interrupted (143 SIGTERM, 129 "
              "SIGHUP); an error's code says its kind: 1 other, 3 malformed input, 4 unsafe "
              "path, 5 checksum or signature, 6 missing parent or base, 7 HTTP, 8 I/O, 9 "
              "replication protocol, 10 an optional dependency missing (btrdelta --help).")


class Parser(argparse.ArgumentParser):
    """The parser of every ``btrdelta`` command: a usage mistake is one line (naming the
    command and where to read more) and exit 2."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        epilog = kwargs.get("epilog")
        if isinstance(epilog, str) and "xit code" not in epilog:  # every --help says them
            kwargs["epilog"] = f"{epilog}\n\n{EXIT_CODES}"
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
