"""``-q/--quiet`` is spelled the same everywhere: every command that says what it did takes
it and then prints nothing but errors (and what ``--json`` asks for). The commands without it
are listed with the reason (their output is what they were asked for)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from btrdelta.cli import main
from tests.cli.test_mistakes import COMMANDS
from tests.conftest import committed_streams

#: commands whose output is the answer asked for, not a report of what they did
NO_QUIET = {
    "delta stat": "prints the statistics asked for",
    "device status": "prints the status asked for",
    "device diff": "prints the changes asked for",
    "dump": "prints the records asked for",
    "image info": "prints what the archive holds, asked for",
    "key show": "prints the key asked for",
    "repo ls": "prints the listing asked for",
    "sendshot list": "prints the listing asked for",
    "sendshot show": "prints the record asked for",
    "stat": "prints the statistics asked for",
    "tree-sum": "prints the digest asked for",
}


def test_every_command_that_says_what_it_did_takes_q() -> None:
    names = {" ".join(words): parser for words, parser in COMMANDS}
    assert set(NO_QUIET) <= set(names)  # no stale entry
    for name, parser in names.items():
        has = any(a.option_strings == ["-q", "--quiet"] for a in parser._actions)
        assert has != (name in NO_QUIET), f"{name}: -q/--quiet {'un' if has else ''}expected"


def _quiet(capsys: pytest.CaptureFixture[str], *argv: str) -> None:
    """``argv`` with -q succeeds and prints nothing at all."""
    capsys.readouterr()
    assert main([*argv, "-q"]) == 0
    out, err = capsys.readouterr()
    assert (out, err) == ("", ""), argv


def test_q_silences_what_it_did(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo, key = tmp_path / "repo", tmp_path / "k"
    _quiet(capsys, "key", "generate", "-o", str(key))
    assert (tmp_path / "k.key").is_file()
    assert (tmp_path / "k.pub").is_file()
    _quiet(capsys, "repo", "init", str(repo))
    assert any(repo.iterdir())
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"x" * 5000)
    _quiet(capsys, "repo", "add", str(repo), "v1", str(tree))
    _quiet(capsys, "repo", "sign", str(repo), "--key", str(tmp_path / "k.key"))
    _quiet(capsys, "repo", "gc", str(repo))
    assert main(["repo", "ls", str(repo), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["versions_count"] == 1
    stream = tmp_path / "s.stream"
    stream.write_bytes(committed_streams()[0].read_bytes())
    _quiet(capsys, "sign", str(stream), "--key", str(tmp_path / "k.key"))
    assert (tmp_path / "s.stream.sig").is_file()
    store = tmp_path / "store"
    st = ["sendshot", "--store", str(store)]
    _quiet(capsys, *st, "create", str(tree))
    _quiet(capsys, *st, "prune", "--keep", "1")
    assert main([*st, "--json", "list"]) == 0
    (shot,) = json.loads(capsys.readouterr().out)
    _quiet(capsys, *st, "delete", shot["id"])
    # --json still prints its document with -q (as receive -q --json does)
    capsys.readouterr()
    assert main(["key", "generate", "-o", str(tmp_path / "k2"), "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["private_key"] == f"{tmp_path / 'k2'}.key"
