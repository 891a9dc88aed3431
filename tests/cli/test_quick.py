"""A command's plain words read without its parser (``quick_args``: ``send``, ``receive``)
give what its argparse parser gives, and anything else is left to the parser: random word
lists made of the command's options (whole, abbreviated, with ``=``, combined, unknown), values and
positionals (some starting with ``-``), ``--``, ``-``, ``--help``; each read both ways
(oracle: argparse). The quick table holds exactly the parser's options."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from btrdelta import cli
from btrdelta.cli import receive_cmd, send_cmd

_WORDS = [
    "send", "-p", "--parent", "-c", "--clone-src", "-f", "-o", "--output", "--output=x",
    "--proto", "--proto=2", "0", "1", "2", "3", "02", "9", "--compressed-data",
    "--compress", "zstd", "zlib", "none", "lz4", "--no-data", "--quick", "--name", "--name=",
    "--kernel", "--record", "--rec", "--from-sendshot", "latest", "--store", "--store=S",
    "--no-snapshot", "--parent-uuid", "--sign", "--signature", "--json", "--json=1", "-q",
    "--quiet", "--progress", "-v", "--verbose", "-vv", "-qv", "-oF", "-o=F", "--", "-",
    "--help", "-h", "--debug", "--version", "-5", "--bogus", "", "tree", "out", "x y", "a=b",
]


def _send_parser(command: str = "send") -> argparse.ArgumentParser:
    parser = cli.build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command]  # type: ignore[index, no-any-return]


def _argparse(words: list[str], command: str = "send") -> argparse.Namespace | None:
    try:
        return cli.build_parser(command).parse_args(words)
    except SystemExit:
        return None


_FLAGS = [o for o, (_d, kind, _c) in send_cmd._QUICK.items() if kind in ("true", "count")]
_VALUED = [o for o, (_d, kind, _c) in send_cmd._QUICK.items() if kind in ("store", "append")]
_VALUES = ["0", "2", "3", "02", "zstd", "none", "lz4", "latest", "", "x y", "a=b", "-x", "-5"]
#: mostly plain word lists (options with fitting values, one positional), some not
_ITEMS = st.one_of(
    st.sampled_from(_FLAGS).map(lambda o: [o]),
    st.tuples(st.sampled_from(_VALUED), st.sampled_from(_VALUES)).map(list),
    st.tuples(st.sampled_from(_VALUED), st.sampled_from(_VALUES)).map(lambda t: [f"{t[0]}={t[1]}"]),
    st.sampled_from(["tree", "/snap", ""]).map(lambda w: [w]),
    st.sampled_from(_WORDS).map(lambda w: [w]),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_ITEMS, max_size=8), st.sampled_from(["/a", "b"]), st.integers(0, 8),
       st.booleans())
def test_quick_words_read_as_the_parser_reads_them(items: list[list[str]], tree: str,
                                                   at: int, debug: bool) -> None:
    words = [w for item in items for w in item]
    words.insert(min(at, len(words)), tree)
    words = [*(["--debug"] if debug else []), "send", *words]
    command = next((w for w in words if not w.startswith("-")), None)
    quick = cli._quick_args(command, words)
    if quick is None:
        return  # (the parser reads them: what main() does)
    want = _argparse(words)
    assert want is not None, words
    assert vars(quick) == vars(want), words  # (3.13 orders the namespace otherwise)


@pytest.mark.parametrize("words", [
    ["send", "/snap", "-o", "/out", "--record", "--store", "/store", "--name", "live.1",
     "--proto", "2", "--from-sendshot", "latest"],
    ["--debug", "send", "--json", "-q", "-v", "-v", "/snap", "-f=x", "-c", "A", "-c", "B"],
    ["send", "-o", "/out", "/snap", "--compress=zstd", "--proto", "2", "--no-snapshot"],
])
def test_the_benchmarks_words_are_read_quickly(words: list[str]) -> None:
    quick = cli._quick_args("send", words)
    if words[-1] == "B":  # -f=x: a short option's "=" is its value's (the parser's)
        assert quick is None
        return
    assert quick is not None
    assert vars(quick) == vars(_argparse(words))


def test_the_quick_table_is_the_parsers() -> None:
    table, defaults = _table("send")
    assert table == send_cmd._QUICK
    assert defaults == send_cmd._DEFAULTS
    assert list(defaults) == list(send_cmd._DEFAULTS)


def _table(command: str) -> tuple[dict[str, tuple[str, str, object]], dict[str, object]]:
    """A parser's options as a quick table (``store``/``append``/``true``/``count``), and
    every dest's default in the parser's order."""
    kinds = {"_StoreAction": "store", "_AppendAction": "append", "_StoreTrueAction": "true",
             "_CountAction": "count"}
    table: dict[str, tuple[str, str, object]] = {}
    defaults: dict[str, object] = {}
    for action in _send_parser(command)._actions:
        if action.dest == "help":
            continue
        defaults[action.dest] = action.default
        choices = None if action.choices is None else {str(c): c for c in action.choices}
        for option in action.option_strings:
            table[option] = (action.dest, kinds[type(action).__name__], choices)
    return table, defaults


_RECEIVE_WORDS = [
    "receive", "-f", "--file", "--file=x", "-e", "-E", "--max-errors", "0", "3", "-1", "-C",
    "--chroot", "-m", "--dump", "--dry-run", "--dry", "--backend", "--backend=dir", "auto",
    "btrfs", "dir", "zfs", "--fileattr", "--force-decompress", "--max-file-size", "1M",
    "--key", "--signature", "--json", "-q", "--quiet", "--progress", "-v", "--verbose", "-vv",
    "-qv", "-fF", "-f=F", "--", "-", "--help", "-h", "--debug", "--bogus", "", "A.delta",
    "/dest", "x y",
]
_R_FLAGS = [o for o, (_d, kind, _c) in receive_cmd._QUICK.items() if kind in ("true", "count")]
_R_VALUED = [o for o, (_d, kind, _c) in receive_cmd._QUICK.items()
             if kind in ("store", "append")]
_R_VALUES = ["auto", "dir", "zfs", "A.delta", "/root", "", "x y", "a=b", "-x", "-"]
_R_ITEMS = st.one_of(
    st.sampled_from(_R_FLAGS).map(lambda o: [o]),
    st.tuples(st.sampled_from(_R_VALUED), st.sampled_from(_R_VALUES)).map(list),
    st.tuples(st.sampled_from(_R_VALUED), st.sampled_from(_R_VALUES)).map(
        lambda t: [f"{t[0]}={t[1]}"]),
    st.sampled_from(["A.delta", "/dest", ""]).map(lambda w: [w]),
    st.sampled_from(_RECEIVE_WORDS).map(lambda w: [w]),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_R_ITEMS, max_size=8), st.lists(st.sampled_from(["/dest", "A.delta", "b"]),
                                                min_size=1, max_size=3),
       st.integers(0, 8), st.booleans())
def test_quick_receive_words_read_as_the_parser_reads_them(
        items: list[list[str]], positionals: list[str], at: int, debug: bool) -> None:
    """``receive``: one positional (DEST, or FILE with ``--dump``) or two (FILE DEST), read
    as argparse reads them; ``-E`` and ``--max-file-size`` (values the parser converts)
    and anything not plain are left to the parser."""
    words = [w for item in items for w in item]
    for p in positionals:
        words.insert(min(at, len(words)), p)
    words = [*(["--debug"] if debug else []), "receive", *words]
    quick = cli._quick_args("receive", words)
    if quick is None:
        return
    want = _argparse(words, "receive")
    assert want is not None, words
    assert vars(quick) == vars(want), words  # (3.13 orders the namespace otherwise)


@pytest.mark.parametrize("words", [
    ["receive", "-f", "/var/tmp/c.delta", "/mnt/x"],  # the benchmark's (cdreceive)
    ["receive", "A.stream", "/target"],
    ["receive", "-q", "--json", "-f", "A.stream", "/target", "--signature", "s"],
    ["receive", "--dump", "-f", "A.stream"],
    ["receive", "/target"],
])
def test_the_usual_receive_words_are_read_quickly(words: list[str]) -> None:
    quick = cli._quick_args("receive", words)
    assert quick is not None
    assert vars(quick) == vars(_argparse(words, "receive"))


def test_the_quick_receive_table_is_the_parsers_but_three() -> None:
    """Every option of ``receive``'s parser is in its quick table but ``-E`` and
    ``--max-file-size``, whose values the parser converts, and ``--key`` (a list whose
    default is None): words with any of them go to the parser."""
    table, defaults = _table("receive")
    left = {o: table.pop(o) for o in ("-E", "--max-errors", "--max-file-size", "--key")}
    assert {d for d, _k, _c in left.values()} == {"max_errors", "max_file_size", "key"}
    assert table == receive_cmd._QUICK
    assert list(defaults.items()) == list(receive_cmd._DEFAULTS.items())
    for option in left:
        assert cli._quick_args("receive", ["receive", option, "1", "-f", "x", "/d"]) is None


def test_a_quick_receive_imports_no_parser(tmp_path: Path) -> None:
    """``btrdelta receive -f FILE DEST`` (a mistake here: DEST missing) builds no parser:
    neither ``argparse`` nor ``gettext`` is imported; ``--help`` still gets the parser."""
    code = ("import sys\n"
            "from btrdelta.cli import main\n"
            "code = main(sys.argv[1:])\n"
            "print(code, 'argparse' in sys.modules, 'gettext' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, "receive", "-f", str(tmp_path / "no"),
                          str(tmp_path / "missing")], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["1", "False", "False"]
    assert "destination does not exist" in out.stderr
