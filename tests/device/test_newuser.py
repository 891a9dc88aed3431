"""A device maker's first hour, through the CLI, on loop-mounted btrfs with the real Debian
releases: each test is a step that went wrong or said too little (found by walking through
docs/device.md and ``--help`` as a new user), with the oracle the user has: exit codes, one
line on stderr, ``btrdelta tree-sum``, ``device status``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from btrdelta import device
from btrdelta.tree import tree_sum

from .conftest import Release, btrdelta, copy_tree

pytestmark = pytest.mark.btrfs
STATE = ["etc:/etc:overlay", "home:/home:bind"]


def test_restore_after_a_directory_was_removed(btrfs_dev: Path,
                                                small_release: Release,
                                                tmp_path: Path) -> None:
    """The kernel renames a removed directory to an orphan of the subvolume's root first
    and sends no utimes of the root after it (the root itself did not change): the restore
    left the root's mtime at the receive's time and failed its own check (exit 5) after
    this most ordinary of changes."""
    r = small_release
    device.init(btrfs_dev, r.old, state=STATE)
    home = btrfs_dev / "state/home"
    copy_tree(r.new / "usr/lib/apt", home / "apt")
    (home / "notes").write_text("one\n")
    dest = tmp_path / "backups"
    btrdelta("device", "backup", btrfs_dev, "home", dest)
    shutil.rmtree(home / "apt/methods")  # not at the top: the root's mtime stays
    (home / "notes").write_text("two\n")
    out = btrdelta("device", "backup", btrfs_dev, "home", dest).stdout
    assert "home.2.delta" in out
    want = tree_sum(home)
    (home / "notes").write_text("three: lost by the restore\n")
    got = btrdelta("device", "restore", btrfs_dev, "home", dest, check=False)
    assert got.returncode == 0, got.stderr
    assert tree_sum(home) == want
    (tmp_path / "dir").mkdir()
    got = btrdelta("device", "restore", tmp_path / "dir", "home", dest, "--to-dir",
                   check=False)
    assert got.returncode == 0, got.stderr
    assert tree_sum(tmp_path / "dir/home.2") == want
