"""One spelling across commands: ``-`` for stdin, ``-q``, ``--progress`` (plain lines in a
file, percentage when the size is known), ``--json`` on standard output; examples in every
``--help``."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from btrdelta.cli import build_parser
from btrdelta.stream import StreamReader
from btrdelta.stream.records import Subvol
from tests.cli.test_mistakes import COMMANDS
from tests.conftest import committed_streams
from tests.jsondoc import checked, documented, title

FULL = next(s for s in committed_streams() if ".A." in s.name)
BTRDELTA = [sys.executable, "-m", "btrdelta"]


def _run(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BTRDELTA, *map(str, args)], input=stdin, capture_output=True,
                          check=False, **({"text": True} if stdin is None else {}))


def _uuid_of(stream: Path) -> str:
    with open(stream, "rb") as f:
        return str(next(e for e in StreamReader(f).events() if isinstance(e, Subvol)).uuid)


def test_every_help_has_an_example() -> None:
    parsers = [build_parser(), *(p for _, p in COMMANDS)]
    for p in parsers:
        text = p.format_help()
        assert "example" in text, p.prog
        after = text.split("example", 1)[1]  # "examples:" lines, or "example: btrdelta ..."
        assert any(line.strip(" :s").startswith(("btrdelta ", "btrfs send")) for line in
                   after.splitlines()), p.prog
        # long lines of the examples are kept as written, paragraphs are wrapped
        assert max(len(line) for line in text.splitlines()) <= 100, p.prog


def test_every_group_s_help_has_an_example() -> None:
    """`btrdelta image --help` (a command of subcommands, as `device`, `repo`, `key`) had
    no example: a new user saw seven subcommands and no order to run them in."""
    def groups(p: argparse.ArgumentParser, words: tuple[str, ...] = ()
               ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, child in a.choices.items():
                    if any(isinstance(x, argparse._SubParsersAction) for x in child._actions):
                        yield (*words, name), child
                        yield from groups(child, (*words, name))

    found = dict(groups(build_parser()))
    assert {("image",), ("device",), ("repo",)} <= set(found)
    for words, p in found.items():
        text = p.format_help()
        assert "example" in text, words
        after = text.split("example", 1)[1]
        assert any(line.strip(" :s").startswith(f"btrdelta {words[0]} ")
                   for line in after.splitlines()), words


def test_every_help_gives_the_exit_codes() -> None:
    """Only `btrdelta --help`, `replicate` and `update` said them (session 19): a script's
    author reading `device install --help` could not tell a bad signature from a lost
    mirror. The short paragraph names every code of the table, each with its kind."""
    from btrdelta.cli._parser import EXIT_CODES
    from btrdelta.errors import exit_codes

    for code, _meaning in exit_codes():
        assert re.search(rf"\b{code}\b", EXIT_CODES), code
    for p in [build_parser(), *(p for _, p in COMMANDS)]:
        assert re.search("exit codes", p.format_help(), re.I), p.prog


def test_every_option_with_a_default_states_it() -> None:
    """`replicate --ssh`, `--backend` and the three `image --wait` took a default their
    help did not give (session 19): each option whose value is not None (or a flag's
    False, or an empty list) says `default` in its help."""
    plain = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction,
             argparse._VersionAction, argparse._CountAction, argparse._AppendAction)
    for p in [build_parser(), *(p for _, p in COMMANDS)]:
        for a in p._actions:
            if not a.option_strings or isinstance(a, plain) or a.default in (None, False, []):
                continue
            assert "default" in (a.help or "").lower(), (p.prog, a.option_strings, a.default)


def test_every_help_says_what_the_command_does() -> None:
    # `image verify`, `device rollback`, `repo add` and 12 more showed only their usage and
    # options: a new user could not tell what verify checks or where rollback goes
    for words, p in COMMANDS:
        text = p.description or ""
        assert len(text) >= 60, (words, text)
        assert text.rstrip().endswith("."), (words, text)


def test_receive_stdin_dash_quiet_and_json(tmp_path: Path) -> None:
    proc = subprocess.run([*BTRDELTA, "receive", "-q", "--json", "-", str(tmp_path)],
                          input=FULL.read_bytes(), capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""  # -q: not even "At subvol"
    report = json.loads(proc.stdout)
    (sv,) = report["subvolumes"]
    assert sv["uuid"] == _uuid_of(FULL)
    assert Path(sv["path"]).is_dir()
    assert sv["records"] > 0
    assert report["dry_run"] is False


def test_receive_progress_in_a_file_is_plain_with_a_percentage(tmp_path: Path) -> None:
    proc = _run("receive", "--progress", FULL, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    assert "\x1b" not in proc.stderr
    lines = proc.stderr.splitlines()
    # the first line at once (the first read), then the stream's `At subvol`
    assert lines[0].startswith("receive: ")
    assert lines[1].startswith("At subvol ")
    assert "100%" in lines[-1]
    assert "records" in lines[-1]


def test_receive_without_progress_in_a_file_says_only_at_subvol(tmp_path: Path) -> None:
    proc = _run("receive", "-f", FULL, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [f"At subvol {FULL.name.split('.')[0]}-A"]


def test_json_goes_to_stdout(tmp_path: Path) -> None:
    verify = json.loads(_run("verify", "--json", FULL).stdout)
    assert verify["ok"] is True
    assert verify["kind"] == "stream"
    assert verify["commands"] > 0
    stat = json.loads(_run("stat", "--json", FULL).stdout)
    assert stat["records"] == verify["commands"]
    old = tmp_path / "old"
    old.mkdir()
    made = _run("delta", "make", "-q", "--json", "-f", FULL, "--old", old, "-o",
                tmp_path / "d")
    assert made.returncode == 0, made.stderr
    assert made.stderr == ""
    assert json.loads(made.stdout)["input_bytes"] == FULL.stat().st_size
    expanded = _run("delta", "expand", "--json", "-f", tmp_path / "d", "--old", old, "-o",
                    tmp_path / "s")
    assert json.loads(expanded.stdout)["output_bytes"] == FULL.stat().st_size
    assert (tmp_path / "s").read_bytes() == FULL.read_bytes()
    tree = json.loads(_run("tree-sum", "--json", old).stdout)
    assert tree == {"dir": str(old), "sum": tree["sum"], "format": "tree-sum-2"}
    sent = json.loads(_run("send", "--json", "-q", old, "-f", tmp_path / "o.s").stdout)
    assert sent["records"] > 0
    assert sent["uuid"] == _uuid_of(tmp_path / "o.s")


@pytest.mark.parametrize("argv", [
    ["send", "--json", "{old}"],
    ["delta", "make", "--json", "--old", "{old}", "-f", str(FULL)],
    ["delta", "expand", "--json", "--old", "{old}", "-f", str(FULL)],
])
def test_json_with_the_payload_on_stdout_is_a_usage_error(tmp_path: Path,
                                                         argv: list[str]) -> None:
    proc = _run(*(a.format(old=tmp_path) for a in argv))
    assert proc.returncode == 2
    assert "--json prints on standard output" in proc.stderr
    assert proc.stdout == ""


def test_delta_expand_shows_progress(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    assert _run("delta", "make", "-f", FULL, "--old", old, "-o", tmp_path / "d").returncode == 0
    proc = _run("delta", "expand", "--progress", "-f", tmp_path / "d", "--old", old, "-o",
                tmp_path / "s")
    assert proc.returncode == 0, proc.stderr
    assert "delta expand:" in proc.stderr
    assert "100%" in proc.stderr
    assert "\r" not in proc.stderr


def test_verify_accepts_a_delta_stream(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    assert _run("delta", "make", "-f", FULL, "--old", old, "-o", tmp_path / "d").returncode == 0
    report = json.loads(_run("verify", "--json", tmp_path / "d").stdout)
    assert report["kind"] == "delta"
    assert report["content_bytes"] == FULL.stat().st_size
    damaged = bytearray((tmp_path / "d").read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (tmp_path / "bad").write_bytes(bytes(damaged))
    proc = _run("verify", tmp_path / "bad")
    assert proc.returncode in (3, 5)
    assert proc.stderr.count("\n") == 1


def _checked_in_tests() -> set[str]:
    """Titles of the commands whose output some test passes through ``checked`` (or the
    sendshot tests' ``_json``, which does)."""
    calls = re.compile(r'(?:checked|_json)\(\s*(?:capsys,\s*)?"([a-z -]+)"')
    tests = Path(__file__).parents[1]
    return {title(c) for p in tests.rglob("*.py") for c in calls.findall(p.read_text())}


def test_every_documented_command_is_checked() -> None:
    here = set(_RUNS_HERE)
    assert here | _checked_in_tests() >= set(documented()), sorted(set(documented())
                                                                - here - _checked_in_tests())
    assert not here & _checked_in_tests()


#: sections of docs/cli-json.md checked by test_json_keys_are_the_documented_ones below
_RUNS_HERE = (
    "`btrdelta receive --json`", "`btrdelta send --json`", "`btrdelta verify --json`",
    "`btrdelta stat --json` (a send stream)", "`btrdelta delta make --json`",
    "`btrdelta stat --json` and `btrdelta delta stat --json` (a delta stream)",
    "`btrdelta delta expand --json`", "`btrdelta tree-sum --json`",
)


def test_json_keys_are_the_documented_ones(tmp_path: Path) -> None:
    docs = documented()
    old = tmp_path / "old"
    old.mkdir()
    runs = {
        "`btrdelta receive --json`": ["receive", "-q", "--json", FULL, tmp_path],
        "`btrdelta send --json`": ["send", "-q", "--json", old, "-f", tmp_path / "o.s"],
        "`btrdelta verify --json`": ["verify", "--json", FULL],
        "`btrdelta stat --json` (a send stream)": ["stat", "--json", FULL],
        "`btrdelta delta make --json`": ["delta", "make", "-q", "--json", "-f", FULL,
                                         "--old", old, "-o", tmp_path / "d"],
        "`btrdelta stat --json` and `btrdelta delta stat --json` (a delta stream)":
            ["delta", "stat", "--json", tmp_path / "d"],
        "`btrdelta delta expand --json`": ["delta", "expand", "--json", "-f", tmp_path / "d",
                                           "--old", old, "-o", tmp_path / "s"],
        "`btrdelta tree-sum --json`": ["tree-sum", "--json", old],
    }
    assert set(runs) == set(_RUNS_HERE)
    for section, argv in runs.items():
        proc = _run(*argv)
        assert proc.returncode == 0, (section, proc.stderr)
        assert set(json.loads(proc.stdout)) == docs[section], section


#: commands that report nothing (servers and mounts run until stopped)
NO_REPORT = {"image mount", "image nbd", "serve"}


def test_every_command_that_reports_has_json() -> None:
    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))

    def has_json(p: argparse.ArgumentParser) -> bool:
        return any("--json" in a.option_strings for a in p._actions)

    # on the command or on its group (`btrdelta sendshot --json list`)
    without = {" ".join(words) for words, p in COMMANDS
               if not has_json(p) and not has_json(sub.choices[words[0]])}
    assert without == NO_REPORT


def test_repo_init_and_sign_json(tmp_path: Path) -> None:
    from btrdelta import trust

    trust.save_key_pair(trust.generate_key(), str(tmp_path / "root.pem"),
                        str(tmp_path / "root.pub"))
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"release 1\n" * 100)
    repo = tmp_path / "repo"
    made = checked("repo init", json.loads(_run("repo", "init", "--json", "--avg-chunk", "4K",
                                                repo).stdout))
    assert made == {"repo": str(repo), "avg_chunk": 4096, "level": 12, "solid_level": 19}
    assert _run("repo", "add", "-q", repo, "1", tree).returncode == 0
    signed = _run("repo", "sign", "--json", repo, "--key", tmp_path / "root.pem")
    assert signed.returncode == 0, signed.stderr
    report = checked("repo sign", json.loads(signed.stdout))
    # what the signed index and timestamp say, read back through `repo ls`
    listing = json.loads(_run("repo", "ls", "--json", repo).stdout)
    assert report["versions"] == listing["versions_count"] == 1
    assert report["index_version"] == 1
    assert report["timestamp_version"] == 1
    assert report["timestamp_expires"].endswith("Z")


#: the one spelling of each shared flag
_SPELLINGS = {"--quiet": ["-q", "--quiet"], "--verbose": ["-v", "--verbose"],
              "--jobs": ["-j", "--jobs"], "--progress": ["--progress"]}


def test_shared_flags_are_spelled_the_same_everywhere() -> None:
    """``-q/--quiet``, ``-v/--verbose``, ``-j/--jobs``, ``--progress``: no other spelling
    shown in any help, and ``-q`` wherever there is progress to silence (test_quiet.py: also
    wherever a command says what it did)."""
    for words, p in COMMANDS:
        name = " ".join(words)
        shown = [a for a in p._actions if a.help != argparse.SUPPRESS]
        opts = {o: a.option_strings for a in shown for o in a.option_strings}
        for long, spelling in _SPELLINGS.items():
            if long in opts:
                assert opts[long] == spelling, (name, opts[long])
        for short, long in (("-q", "--quiet"), ("-v", "--verbose"), ("-j", "--jobs")):
            if short in opts:
                assert long in opts[short], (name, short)
        assert "--threads" not in opts, name
        if "--progress" in opts:
            assert "--quiet" in opts, name


@pytest.mark.parametrize("words", [("delta", "make"), ("send",), ("receive",)])
def test_every_choice_is_explained(words: tuple[str, ...]) -> None:
    # `--codec {auto,bsdiff,edits,edits2,hdiff,hdiff-raw,zstd}` said what auto does only:
    # a new user could not tell which codec a core-only device can expand
    parser = dict(COMMANDS)[words]
    for a in parser._actions:
        if not a.option_strings or not a.choices or a.help == argparse.SUPPRESS:
            continue
        for choice in a.choices:
            assert re.search(rf"(?<![\w-]){re.escape(str(choice))}(?![\w-])", a.help or ""), \
                (words, a.option_strings[-1], choice)
    if words == ("delta", "make"):
        codec = next(a for a in parser._actions if "--codec" in a.option_strings)
        assert "btrdelta[hdiff]" in (codec.help or "")
        assert "core install" in (codec.help or "")


def test_every_positional_says_what_it_is() -> None:
    # `sendshot delete ID`, `repo add REPO VERSION` and `tree-sum dir` were listed with no
    # word on what to give; every positional has a help line and a metavar in capitals
    for words, p in COMMANDS:
        for a in p._actions:
            if a.option_strings or isinstance(a, argparse._SubParsersAction):
                continue
            shown = a.metavar or a.dest
            assert a.help, (words, shown)
            assert isinstance(shown, str), (words, shown)
            assert shown[:1].isupper(), (words, shown)
