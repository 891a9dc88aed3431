"""A rebuilt release (every file rewritten, new inodes): the kernel's `btrfs send -p` resends
everything, btrdelta's incremental sends only what really changed."""

from __future__ import annotations

import random
import subprocess

import pytest

from btrdelta.cli import main
from btrdelta.testing.scenarios import kernel_receive
from btrdelta.testing.scenarios import send as kernel_send_file
from tests.send.conftest import Workspace, make_stream
from tests.send.test_scenarios import assert_same_tree


@pytest.mark.btrfs
def test_rebuilt_release_is_much_smaller_than_kernel(btrfs_ws: Workspace) -> None:
    base = btrfs_ws.fresh("rebuilt")
    rng = random.Random(7)
    subprocess.run(["btrfs", "-q", "subvolume", "create", str(base / "v1")], check=True)
    for i in range(40):
        d = base / "v1" / f"pkg{i % 5}"
        d.mkdir(exist_ok=True)
        (d / f"file{i}").write_bytes(rng.randbytes(rng.randrange(1000, 120_000)))
    subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(base / "v1"),
                    str(base / "A")], check=True)
    # the next release is built from scratch: every file written anew, two really changed
    subprocess.run(["btrfs", "-q", "subvolume", "create", str(base / "v2")], check=True)
    subprocess.run(["cp", "-a", "--reflink=never", f"{base}/v1/.", str(base / "v2")],
                   check=True)
    (base / "v2" / "pkg0" / "file0").write_bytes(rng.randbytes(5000))
    (base / "v2" / "pkg1" / "new-file").write_bytes(rng.randbytes(3000))
    subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(base / "v2"),
                    str(base / "B")], check=True)
    kernel = kernel_send_file(base / "B", base / "kernel.s", parent=base / "A")
    ours = make_stream(base / "ours.s", base / "B", base / "A")
    k, o = kernel.stat().st_size, ours.stat().st_size
    assert o * 20 < k, (o, k)
    assert o < 20_000
    dest = base / "recv"
    dest.mkdir()
    kernel_receive(make_stream(base / "full.s", base / "A"), dest)
    kernel_receive(ours, dest)
    assert_same_tree(base / "B", dest / "B")


@pytest.mark.btrfs
def test_two_trees_unpacked_in_one_transaction(btrfs_ws: Workspace) -> None:
    """Two releases unpacked side by side into fresh subvolumes (session 33: pandas 2.2.2 and
    2.2.3): their inodes share numbers and generations, so the kernel's `send -p` takes
    inode 257, a directory in A and a file in B, for one inode and its stream links the file
    onto the directory (`btrfs receive`: "link ... Operation not permitted"). `btrdelta send
    -p` pairs files by path: the kernel receives its stream onto A and gets B."""
    base = btrfs_ws.fresh("unpacked")
    a, b = base / "A", base / "B"
    for sub in (a, b):
        subprocess.run(["btrfs", "-q", "subvolume", "create", str(sub)], check=True)
    # the same shape as the wheels: B has a file first where A has its first directory
    (a / "d1").mkdir()
    (a / "d2" / "x").mkdir(parents=True)
    (a / "f").write_bytes(b"a\n")
    (b / "newfirst").write_bytes(b"")
    (b / "d1").mkdir()
    (b / "d2").mkdir()
    (b / "d2" / "x").write_bytes(b"b\n")
    (b / "f").write_bytes(b"a\n")
    for sub in (a, b):
        subprocess.run(["btrfs", "property", "set", "-ts", str(sub), "ro", "true"], check=True)
    dest = base / "recv"
    dest.mkdir()
    kernel_receive(kernel_send_file(a, base / "full.s"), dest)
    ours = base / "ours.s"
    assert main(["send", "-q", "-p", str(a), str(b), "--parent-uuid", "btrfs",
                 "-o", str(ours)]) == 0
    kernel_receive(ours, dest)
    assert_same_tree(b, dest / "B")
