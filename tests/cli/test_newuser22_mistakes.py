"""A new user's mistakes found in session 22's trial, each through the CLI: one line naming
what and where, the documented exit code, nothing made or left half-written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from btrdelta.cli import main


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def _listing(top: Path) -> list[str]:
    return sorted(str(p.relative_to(top)) for p in top.rglob("*"))


def test_replicate_into_its_own_source(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Before: ``replicate SRC SRC`` (and ``replicate SRC SRC/sub``) exited 0 having made
    SRC/SRC.DATE, a copy of SRC inside itself, and the receiver's state files
    (.btrdelta-replica.json, .lock) in SRC, which the next send would carry."""
    src = tmp_path / "data"
    (src / "sub").mkdir(parents=True)
    (src / "f").write_bytes(os.urandom(4096))
    before = _listing(src)
    store = tmp_path / "store"
    for dest, said in ((src, f"DEST {src} is SOURCE"),
                       (src / "sub", f"DEST {src / 'sub'} is inside SOURCE {src}"),
                       (src / "sub" / "new", f"DEST {src / 'sub' / 'new'} is inside")):
        rc = main(["replicate", "--store", str(store), str(src), str(dest)])
        assert rc == 2, dest
        err = _err(capsys)
        assert err.startswith(f"btrdelta replicate: error: {said}"), err
        assert _listing(src) == before
    assert not store.exists()
    # a symbolic link to SOURCE is SOURCE; a directory beside it is fine
    (tmp_path / "link").symlink_to(src)
    assert main(["replicate", "--store", str(store), str(src), str(tmp_path / "link")]) == 2
    assert "is SOURCE" in _err(capsys)
    beside = tmp_path / "data-backup"
    beside.mkdir()
    assert main(["replicate", "-q", "--store", str(store), str(src), str(beside)]) == 0
    assert _listing(src) == before
    assert [p.name.startswith("data.") for p in beside.iterdir()
            if not p.name.startswith(".")] == [True]
