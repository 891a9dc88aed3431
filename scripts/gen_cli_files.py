"""Regenerate the man pages and shell completions from the argument parser, and the
README's exit-code table from :func:`btrdelta.errors.exit_codes`.

``share/man/man1/btrdelta.1`` (the command and its list of subcommands) and
``btrdelta-COMMAND.1`` for each command (argparse-manpage); the bash and zsh completion
scripts (shtab). They are committed, shipped in the wheel as data files (``pyproject.toml``),
and installed under the environment's ``share/``, where ``man`` and the shells find them.

``python scripts/gen_cli_files.py`` rewrites them (``make cli-files``); ``--check`` exits 1
if one is out of date (a test runs it).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARE = ROOT / "share"
MAN = SHARE / "man" / "man1"
BASH = SHARE / "bash-completion" / "completions" / "btrdelta"
ZSH = SHARE / "zsh" / "site-functions" / "_btrdelta"
README = ROOT / "README.md"
_BEGIN, _END = "<!-- BEGIN GENERATED EXIT CODES -->\n", "<!-- END GENERATED EXIT CODES -->\n"

#: metavars of arguments that name a directory (completed as directories), and of those
#: that name a file or a directory (completed as paths)
_DIRS = {"DEST", "DIR", "OLD_DIR", "NEW_DIR", "PARENT", "CLONE_SRC", "MOUNTPOINT", "REPO",
         "STORE", "OTHER", "ROOTMOUNT"}
_PATHS = {"FILE", "STREAM", "DELTA", "SIG", "KEY", "PUBKEY", "PEM", "IMAGE", "ARCHIVE",
          "JOB.json", "STORE/NAME", "FILE_OR_DEVICE", "ROOT_KEY", "ROOT_PUB", "NAME",
          "SOURCE", "ARCHIVE|STORE/NAME", "ARCHIVE|STORE/NAME|INDEX.caibx", "REPO|URL",
          "INDEX.caibx"}


def _parser() -> argparse.ArgumentParser:
    os.environ["COLUMNS"] = "80"  # help wrapped the same on every machine
    from btrdelta.cli import build_parser

    return build_parser()


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def man_pages() -> dict[str, str]:
    """``{file name: roff text}``."""
    top = _parser()
    pages = {"btrdelta.1": _page("btrdelta", _shallow(top), _commands(top))}
    for cmd, parser in sorted(_subparsers(top).items()):
        pages[f"btrdelta-{cmd}.1"] = _page(f"btrdelta-{cmd}", parser)
    return pages


def _shallow(top: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The top parser without its subcommands (they have pages of their own)."""
    p = argparse.ArgumentParser(prog=top.prog, description=top.description, epilog=top.epilog,
                                add_help=False, formatter_class=top.formatter_class)
    for a in top._actions:
        if a.option_strings:
            p._add_action(a)
    p.add_argument("command", metavar="COMMAND", help="one of the commands below")
    p.add_argument("args", metavar="ARGS", nargs="...", help="its options and arguments")
    return p


def _commands(top: argparse.ArgumentParser) -> str:
    from argparse_manpage.manpage import _markup

    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    out = [".SH COMMANDS"]
    for choice in subs._choices_actions:
        out += [".TP", f"\\fBbtrdelta {choice.dest}\\fR (\\fBbtrdelta-{choice.dest}\\fR(1))",
                _markup(choice.help or "")]
    return "\n".join(out) + "\n"


def _page(name: str, parser: argparse.ArgumentParser, extra: str = "") -> str:
    from argparse_manpage.manpage import Manpage

    from btrdelta import __version__

    epilog, parser.epilog = parser.epilog, None  # an EXAMPLES section, written below
    try:
        page = Manpage(parser)
        page.prog = name
        page.date = ""  # reproducible: the version says when
        page.source = f"btrdelta {__version__}"
        page.manual = "btrdelta manual"
        if name == "btrdelta":
            page.description = "small, fast and safe updates from btrfs send streams"
        elif parser.description:
            page.description = parser.description.split(". ")[0].rstrip(".")
        text = str(page)
    finally:
        parser.epilog = epilog
    see = "" if name == "btrdelta" else ".SH SEE ALSO\n\\fBbtrdelta\\fR(1)\n"
    return text + extra + _examples(epilog or "") + _leaf_examples(parser) + see


def _leaf_examples(parser: argparse.ArgumentParser) -> str:
    """The examples of a command's subcommands (``delta make``...), one section each."""
    from argparse_manpage.manpage import _markup

    out = []
    for child in _subparsers(parser).values():
        lines = [line[2:] for line in (child.epilog or "").splitlines()
                 if line.startswith("  btrdelta ") or line.startswith("  btrfs ")]
        if lines:
            out += [f".SS {_markup(child.prog)}", ".nf", *map(_markup, lines), ".fi"]
    return "\n".join(out) + "\n" if out else ""


def _examples(epilog: str) -> str:
    """The epilog as roff: example lines kept as they are, other paragraphs filled."""
    from argparse_manpage.manpage import _markup

    out = []
    for block in epilog.strip("\n").split("\n\n"):
        lines = block.splitlines()
        if lines and lines[0].rstrip(":") in ("example", "examples", "exit codes"):
            out.append(f".SH {lines[0].rstrip(':').upper()}")
            lines = lines[1:]
        else:
            out.append(".PP")
        if any(line.startswith("  ") for line in lines):
            out += [".nf", *(_markup(line[2:] if line.startswith("  ") else line)
                             for line in lines), ".fi"]
        else:
            out.append(_markup(" ".join(block.split())))
    return "\n".join(out) + "\n" if out else ""


def _annotate(p: argparse.ArgumentParser) -> None:
    """Tell shtab which arguments are paths (by their metavar)."""
    import shtab

    for a in p._actions:
        metavar = a.metavar if isinstance(a.metavar, str) else None
        if metavar in _DIRS:
            a.complete = shtab.DIRECTORY  # type: ignore[attr-defined]
        elif metavar in _PATHS or (a.dest in ("file", "input", "output") and a.nargs != 0):
            a.complete = shtab.FILE  # type: ignore[attr-defined]
    for child in _subparsers(p).values():
        _annotate(child)


def completions() -> dict[Path, str]:
    import shtab

    top = _parser()
    _annotate(top)
    return {BASH: shtab.complete(top, shell="bash"), ZSH: shtab.complete(top, shell="zsh")}


def readme() -> str:
    """README.md with the exit-code table between its markers made from ``errors.py``."""
    from btrdelta.errors import exit_codes

    text = README.read_text()
    head, begin, rest = text.partition(_BEGIN)
    _, end, tail = rest.partition(_END)
    if not begin or not end:
        raise SystemExit(f"{README}: the exit-code table markers are missing")
    rows = "".join(f"| {code} | {meaning} |\n" for code, meaning in exit_codes())
    return f"{head}{_BEGIN}| code | meaning |\n|---|---|\n{rows}{_END}{tail}"


def expected() -> dict[Path, str]:
    """Every generated file and its content."""
    out = {MAN / name: text for name, text in man_pages().items()}
    out.update(completions())
    out[README] = readme()
    return out


def main(argv: list[str]) -> int:
    want = expected()
    stale = [p for p, text in want.items() if not p.is_file() or p.read_text() != text]
    extra = [p for p in MAN.glob("*.1") if p not in want] if MAN.is_dir() else []
    if "--check" in argv:
        if stale or extra:
            names = ", ".join(str(p.relative_to(ROOT)) for p in [*stale, *extra])
            print(f"out of date: {names}: run make cli-files", file=sys.stderr)
            return 1
        return 0
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(want[p])
    for p in extra:
        p.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
