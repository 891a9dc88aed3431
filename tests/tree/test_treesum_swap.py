"""``tree-sum`` of a tree whose directory is swapped for a symlink to a directory outside
it between the walk's lstat of that directory and its open (a deterministic hook: the
swap happens in the walk's own call that names the path it is about to open). Oracle: the
manifest of the tree as it was before the swap (no entry of the outside directory may
ever be summed)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from btrdelta.cli import main
from btrdelta.tree import treesum


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    tree, outside = tmp_path / "tree", tmp_path / "outside"
    (tree / "a").mkdir(parents=True)
    (tree / "a/f").write_bytes(b"inside\n" * 10)
    (tree / "z").write_text("last\n")
    outside.mkdir()
    (outside / "f").write_bytes(b"a secret outside the tree\n")
    (outside / "only-outside").write_text("x\n")
    return tree, outside


def _swap_at(at: Path, outside: Path, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Swap directory ``a`` (the tree's) for a symlink to ``outside`` (once) when tree-sum
    is about to open ``at``; returns the list that holds ``at`` once it happened."""
    tree = at if at.name == "a" else at.parent  # (the tree's directory a)
    swapped: list[bytes] = []
    real = treesum.short_path

    @contextlib.contextmanager
    def short_path(path: bytes) -> Iterator[bytes]:
        if path == os.fsencode(at) and not swapped:
            os.rename(tree, tree.parent.parent / "a.moved")
            os.symlink(outside, tree)
            swapped.append(path)
        with real(path) as short:
            yield short

    monkeypatch.setattr(treesum, "short_path", short_path)
    return swapped


@pytest.mark.parametrize("at", ["a", "a/f"])
def test_a_directory_swapped_for_a_symlink_is_not_followed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], at: str) -> None:
    """``at`` "a": the directory is swapped before the walk opens it to list it (it listed
    ``a/only-outside``); "a/f": before the walk opens ``a/f`` to hash it (it hashed the
    outside ``f``). Now the command stops: one line naming the path, exit 1."""
    tree, outside = _tree(tmp_path)
    assert main(["tree-sum", "--manifest", str(tree)]) == 0
    assert "a/f f " in capsys.readouterr().out
    swapped = _swap_at(tree / at, outside, monkeypatch)
    rc = main(["tree-sum", "--manifest", str(tree)])
    out, err = capsys.readouterr()
    assert swapped
    assert "only-outside" not in out
    assert rc == 1, out
    assert err.count("\n") == 1, err
    assert err.startswith("btrdelta tree-sum: error: "), err
    assert f"{tree / at}: replaced by another file while the tree was read" in err, err
    monkeypatch.undo()  # the tree as it is now: its symlink a not followed
    assert main(["tree-sum", "--manifest", str(tree)]) == 0
    now = capsys.readouterr().out.splitlines()
    assert [x.split()[:2] for x in now] == [[".", "d"], ["a", "l"], ["z", "f"]], now


def test_a_parent_swapped_before_a_symlink_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Directory ``a`` swapped for a symlink to ``outside`` just before tree-sum reads its
    last entry, symlink ``a/l``: its target and extended attributes were read by path, so
    the outside symlink's (``outside-target``, ``trusted.secret``) went into the sum and
    nothing noticed (exit 0: no later read below ``a``). Now they are read through a
    descriptor checked to be the inode the walk saw: one line naming the path, exit 1."""
    tree, outside = _tree(tmp_path)
    os.symlink("inside-target", tree / "a/l")
    os.symlink("outside-target", outside / "l")
    os.setxattr(outside / "l", "trusted.secret", b"outside", follow_symlinks=False)
    assert main(["tree-sum", "--manifest", str(tree)]) == 0
    assert "inside-target" in capsys.readouterr().out
    swapped = _swap_at(tree / "a/l", outside, monkeypatch)
    rc = main(["tree-sum", "--manifest", str(tree)])
    out, err = capsys.readouterr()
    assert swapped
    assert "outside" not in out, out
    assert "secret" not in out, out
    assert rc == 1, out
    assert err.count("\n") == 1, err
    assert f"{tree / 'a/l'}: replaced by another file while the tree was read" in err, err
