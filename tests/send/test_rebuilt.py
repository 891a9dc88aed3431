"""A rebuilt release (every file rewritten, new inodes): the kernel's `btrfs send -p` resends
everything, btrdelta's incremental sends only what really changed."""

from __future__ import annotations

import random
import subprocess

import pytest

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
