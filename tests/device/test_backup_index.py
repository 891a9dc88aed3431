"""A backup index is untrusted input (a USB stick, an HTTP server): ``device restore``
refuses a damaged or lying one in one line naming it (exit 3), reads nothing it names
outside its location and never loops. Through the CLI, ``--to-dir`` into a plain
directory (the index is refused before anything is received); oracles: the exit code,
stderr, the output directory left empty, a file beside the location never read."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .conftest import BTRDELTA

_GOOD = {"n": 1, "file": "home.1.stream", "parent": None, "uuid": "u", "tree_sum": "0" * 64}


@pytest.mark.parametrize("backups", [
    # a parent naming its own backup, or a later one: the chain never ended (restore ran
    # forever, its memory growing)
    [{**_GOOD, "n": 2, "file": "home.2.delta", "parent": 2}],
    [{**_GOOD, "n": 1, "file": "home.1.delta", "parent": 2},
     {**_GOOD, "n": 2, "file": "home.2.delta", "parent": 1}],
    # a file name that leaves the location: read, and its first bytes shown in the error
    [{**_GOOD, "file": "../secret"}],
    [{**_GOOD, "file": "/etc/hostname"}],
    # fields missing or of another type: "internal error: KeyError"
    [{"file": "home.1.stream"}],
    [{**_GOOD, "n": "1"}],
    [{**_GOOD, "n": True}],
    [{**_GOOD, "tree_sum": None}],
    [_GOOD, _GOOD],
    {"n": 1},
    ["home.1.stream"],
], ids=["own-parent", "parent-loop", "dotdot", "absolute", "no-n", "n-string", "n-bool",
        "no-sum", "twice", "not-a-list", "not-objects"])
def test_a_lying_backup_index_is_refused_in_one_line(tmp_path: Path, backups: Any) -> None:
    src, out = tmp_path / "backups", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (tmp_path / "secret").write_bytes(b"SECRET-BYTES" * 8)
    (src / "home.1.stream").write_bytes(b"not read either")
    index = src / "home.backups.json"
    index.write_text(json.dumps({"format": "btrdelta-backups", "version": 1, "name": "home",
                                 "backups": backups}))
    proc = subprocess.run([*BTRDELTA, "device", "restore", str(out), "home", str(src),
                           "--to-dir"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"{index}: invalid backup index: " in proc.stderr, proc.stderr
    assert "SECRET" not in proc.stderr
    assert "53 45 43" not in proc.stderr
    assert list(out.iterdir()) == []
