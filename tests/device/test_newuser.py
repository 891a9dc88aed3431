"""A device maker's first hour, through the CLI, on loop-mounted btrfs with the real Debian
releases: each test is a step that went wrong or said too little (found by walking through
docs/device.md and ``--help`` as a new user), with the oracle the user has: exit codes, one
line on stderr, ``btrdelta tree-sum``, ``device status``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from btrdelta import device
from btrdelta.tree import tree_sum
from tests.conftest import btrfs_loop

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


def test_mistakes_get_one_line_naming_what_the_user_gave(small_release: Release,
                                                         tmp_path: Path) -> None:
    """An ext4 image: mount's own last line was all ("dmesg(1) may have more information
    after failed mount system call"); an image not initialised, and status's
    "filesystem", named the private mount directory (/tmp/btrdelta-device-XXXX)."""
    ext4 = tmp_path / "ext4.img"
    with open(ext4, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", str(ext4)], check=True)
    got = btrdelta("device", "init", ext4, "--factory", small_release.full, check=False)
    assert got.returncode == 1
    assert got.stderr.splitlines() == [
        f"btrdelta device init: error: {ext4} is not a btrfs filesystem (it holds ext4): a "
        "device's filesystem is made with mkfs.btrfs, then laid out with btrdelta device init"]
    img = tmp_path / "btrfs.img"
    with open(img, "wb") as f:
        f.truncate(256 << 20)
    subprocess.run(["mkfs.btrfs", "-q", str(img)], check=True, capture_output=True)
    for cmd in (("status",), ("install", small_release.delta), ("mark-good",)):
        got = btrdelta("device", cmd[0], img, *cmd[1:], check=False)
        assert got.returncode == 1
        assert got.stderr.splitlines() == [
            f"btrdelta device {cmd[0]}: error: {img}: not a btrdelta device (run `btrdelta "
            "device init` first)"]
    btrdelta("device", "init", img, "--factory", small_release.full, "--state",
             "etc:/etc", "-q")
    status = json.loads(btrdelta("device", "status", img, "--json").stdout)
    assert status["filesystem"] == str(img)
    assert "btrdelta-device-" not in json.dumps(status)


def test_a_delta_for_a_root_the_device_lacks(btrfs_dev: Path, small_release: Release,
                                             tmp_path: Path) -> None:
    """The error named the private staging name or mount directory and a UUID, not what
    the device holds nor what to do."""
    r = small_release
    btrdelta("send", "--parent", r.new, r.old, "-o", tmp_path / "back.stream")
    btrdelta("device", "init", btrfs_dev, "--factory", r.old, "--state", "etc:/etc", "-q")
    back = tmp_path / "back.stream"
    got = btrdelta("device", "install", btrfs_dev, back, check=False)  # new -> old
    assert got.returncode == 6
    [line] = got.stderr.splitlines()
    assert line.startswith(f"btrdelta device install: error: {back}: made against a root "
                           "this device does not hold (parent subvolume ")
    assert line.endswith("); its roots: a old, b old, factory old. Install a full stream, "
                         "or a delta or incremental stream made against one of them")
    assert json.loads(btrdelta("device", "status", btrfs_dev, "--json").stdout)[
        "next_boot"] == "a"
    btrdelta("device", "install", btrfs_dev, r.delta)  # old -> new: b
    btrdelta("device", "install", btrfs_dev, back)  # new (b) -> old: b again
    assert tree_sum(btrfs_dev / "roots/b") == r.old_sum


def test_disk_full_before_the_install_keeps_the_pending_trial(small_release: Release) -> None:
    """On a full disk the install cancelled the pending trial of the slot it meant to
    rebuild, then failed to write its intent: exit 1, "No space left on device" and the
    release installed before lost its boot."""
    r = small_release
    with btrfs_loop(size="256M") as dev:
        btrdelta("device", "init", dev, "--factory", r.old, "--state", "home:/home:bind",
                 "-q")
        btrdelta("device", "install", dev, r.delta, "-q")
        with open(dev / "state/home/fill", "wb") as f, contextlib.suppress(OSError):
            block = os.urandom(1 << 20)
            while True:
                f.write(block)
                f.flush()
        got = btrdelta("device", "install", dev, r.delta, check=False)
        assert got.returncode == 8, got.stderr
        [line] = got.stderr.splitlines()
        assert "disk full" in line
        status = json.loads(btrdelta("device", "status", dev, "--json").stdout)
        assert (status["next_boot"], status["trial"]["tries_left"]) == ("b", 3)
        assert tree_sum(dev / "roots/b") == r.new_sum
        (dev / "state/home/fill").unlink()
        btrdelta("device", "install", dev, r.delta)
        assert tree_sum(dev / "roots/b") == r.new_sum


def test_mount_twice_is_refused(btrfs_dev: Path, small_release: Release,
                                tmp_path: Path) -> None:
    """A second ``device mount`` on the same target stacked a second root with its
    overlays over the first (exit 0); --help says TARGET is an empty directory."""
    btrdelta("device", "init", btrfs_dev, "--factory", small_release.old, "-q")
    target = tmp_path / "sysroot"
    target.mkdir()
    try:
        btrdelta("device", "mount", btrfs_dev, target)
        got = btrdelta("device", "mount", btrfs_dev, target, check=False)
        assert got.returncode == 1
        assert got.stderr.splitlines() == [
            f"btrdelta device mount: error: {target} is a mount point already (umount -R "
            f"{target} first)"]
    finally:
        while os.path.ismount(target):  # twice when the second mount was stacked
            subprocess.run(["umount", "-R", str(target)], check=True)
    (target / "file").write_text("x")
    got = btrdelta("device", "mount", btrfs_dev, target, check=False)
    assert got.returncode == 1
    assert "is not empty" in got.stderr
