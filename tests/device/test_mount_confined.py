"""``device mount`` mounts below its TARGET only: a state path that is a symbolic link in
the root, or a state subvolume's ``upper`` that is one on the device, is refused instead of
followed out (mount(8) follows links: an absolute ``/srv -> /somewhere`` in a release had
the state subvolume bind-mounted over the directory of the machine running the command).
On loop-mounted btrfs through the CLI; oracles: ``os.path.ismount`` and the directory the
link names, unchanged."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .conftest import Release, btrdelta, copy_tree

pytestmark = pytest.mark.btrfs


@pytest.mark.parametrize("link", ["root", "upper"])
def test_device_mount_never_mounts_out_of_its_target(btrfs_dev: Path, small_release: Release,
                                                     tmp_path: Path, link: str) -> None:
    victim = tmp_path / "victim"  # a directory of this machine
    victim.mkdir()
    (victim / "mine").write_text("host\n")
    tree = tmp_path / "release"
    copy_tree(small_release.old, tree)
    if link == "root":
        (tree / "srv").symlink_to(victim)  # absolute: leaves the mounted root
    else:
        (tree / "srv").mkdir()
    btrdelta("device", "init", btrfs_dev, "--factory", tree, "-q", "--state",
             "etc:/etc:overlay", "--state", "data:/srv:" + ("bind" if link == "root" else
                                                           "overlay"))
    (btrfs_dev / "state/data/from-device").write_text("device\n")
    if link == "upper":  # the overlay would write into the machine's directory
        (tmp_path / "work").mkdir()
        for d, to in (("upper", victim), ("work", tmp_path / "work")):
            os.rmdir(btrfs_dev / "state/data" / d)
            (btrfs_dev / "state/data" / d).symlink_to(to)
    target = tmp_path / "sysroot"
    target.mkdir()
    try:
        got = btrdelta("device", "mount", btrfs_dev, target, check=False)
        assert got.returncode == 1, got.stderr
        assert got.stderr.count("\n") == 1, got.stderr
        what = "root a: /srv" if link == "root" else "state/data/upper"
        assert f"btrdelta device mount: error: {what} leads out of " in got.stderr, got.stderr
        assert not os.path.ismount(victim)
        assert os.listdir(victim) == ["mine"]
        assert not os.path.ismount(target)
        if link == "upper":  # diff reads the upper as mount would use it: refused too
            got = btrdelta("device", "diff", btrfs_dev, check=False)
            assert got.returncode == 1, got.stderr
            assert f"error: {what} leads out of " in got.stderr, got.stderr
            assert "/mine" not in got.stdout
    finally:
        for p in (victim / "etc", victim, target):
            while os.path.ismount(p):
                subprocess.run(["umount", "-R", str(p)], check=True)
