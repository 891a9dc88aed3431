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
        hint = None
        if self.missing_hint is not None and message.startswith(
                "the following arguments are required"):
            hint = self.missing_hint(self.words)
        elif self._subparsers is not None and message.startswith("unrecognized arguments"):
            hint = self._placement_hint()
        elif self._subparsers is not None and "invalid choice: " in message:
            hint = self._choice_hint(message)
        message += f"; {hint}" if hint else ""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _commands(self) -> dict[str, argparse.ArgumentParser]:
        assert self._subparsers is not None
        action = self._subparsers._group_actions[0]
        return action.choices if isinstance(action.choices, dict) else {}

    def _choice_hint(self, message: str) -> str | None:
        """``btrdelta recieve``: the command meant, by spelling (or where help is)."""
        import difflib  # (this mistake only)
        import re

        given = re.search(r"invalid choice: '([^']*)'", message)
        if given is None:
            return None
        if given.group(1) in ("help", "-help"):
            return f"help: {self.prog} --help, {self.prog} COMMAND --help"
        close = difflib.get_close_matches(given.group(1), self._commands(), n=1, cutoff=0.6)
        return f"did you mean '{close[0]}'?" if close else None

    def _placement_hint(self) -> str | None:
        """``btrdelta -q receive ...``: a command's options given before its name."""
        import shlex  # (this mistake only)

        words, i = self.words, 0
        mine = {s for a in self._actions for s in a.option_strings}
        own: list[str] = []
        moved: list[str] = []
        while i < len(words) and words[i].startswith("-") and words[i] != "--":
            (own if words[i] in mine else moved).append(words[i])
            i += 1
        parser: argparse.ArgumentParser = self
        path: list[str] = []
        while i < len(words) and isinstance(parser, Parser) and parser._subparsers is not None:
            chosen = parser._commands().get(words[i])
            if chosen is None:
                break
            parser, i = chosen, i + 1
            path.append(words[i - 1])
        if not moved or not path or (isinstance(parser, Parser) and parser._subparsers) \
                or any(w.split("=", 1)[0] not in parser._option_string_actions for w in moved):
            return None
        return (f"a command's options go after its name: "
                f"{self.prog} {shlex.join([*own, *path, *moved, *words[i:]])}")

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
