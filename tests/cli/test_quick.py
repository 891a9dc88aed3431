"""A command's plain words read without its parser (``quick_args``: ``send``) give what its
argparse parser gives, and anything else is left to the parser: random word lists made of
the command's options (whole, abbreviated, with ``=``, combined, unknown), values and
positionals (some starting with ``-``), ``--``, ``-``, ``--help``; each read both ways
(oracle: argparse). The quick table holds exactly the parser's options."""

from __future__ import annotations

import argparse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from btrdelta import cli
from btrdelta.cli import send_cmd

_WORDS = [
    "send", "-p", "--parent", "-c", "--clone-src", "-f", "-o", "--output", "--output=x",
    "--proto", "--proto=2", "0", "1", "2", "3", "02", "9", "--compressed-data",
    "--compress", "zstd", "zlib", "none", "lz4", "--no-data", "--quick", "--name", "--name=",
    "--kernel", "--record", "--rec", "--from-sendshot", "latest", "--store", "--store=S",
    "--no-snapshot", "--parent-uuid", "--sign", "--signature", "--json", "--json=1", "-q",
    "--quiet", "--progress", "-v", "--verbose", "-vv", "-qv", "-oF", "-o=F", "--", "-",
    "--help", "-h", "--debug", "--version", "-5", "--bogus", "", "tree", "out", "x y", "a=b",
]


def _send_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser("send")
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["send"]  # type: ignore[index, no-any-return]


def _argparse(words: list[str]) -> argparse.Namespace | None:
    try:
        return cli.build_parser("send").parse_args(words)
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
    assert list(vars(quick).items()) == list(vars(want).items()), words


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
    assert list(vars(quick).items()) == list(vars(_argparse(words)).items())


def test_the_quick_table_is_the_parsers() -> None:
    kinds = {"_StoreAction": "store", "_AppendAction": "append", "_StoreTrueAction": "true",
             "_CountAction": "count"}
    table: dict[str, tuple[str, str, object]] = {}
    defaults: dict[str, object] = {}
    for action in _send_parser()._actions:
        if action.dest == "help":
            continue
        defaults[action.dest] = action.default
        choices = None if action.choices is None else {str(c): c for c in action.choices}
        for option in action.option_strings:
            table[option] = (action.dest, kinds[type(action).__name__], choices)
    assert table == send_cmd._QUICK
    assert defaults == send_cmd._DEFAULTS
    assert list(defaults) == list(send_cmd._DEFAULTS)
