"""init, install by delta, boot switch, verdicts and rollback on loop-mounted btrfs, with
real Debian releases; oracles: tree-sum of the source trees, btrfs-progs for the default
subvolume and the subvolume list."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from btrdelta import device
from btrdelta.device.boot import select_root
from btrdelta.device.layout import Layout
from btrdelta.tree import tree_sum
from tests.conftest import Children
from tests.jsondoc import checked

from .conftest import BTRDELTA, Release, btrdelta

pytestmark = pytest.mark.btrfs


def progs_default(mnt: Path) -> str:
    """``btrfs subvolume get-default``'s path (btrfs-progs: the oracle)."""
    out = subprocess.run(["btrfs", "subvolume", "get-default", str(mnt)], capture_output=True,
                         text=True, check=True).stdout
    return out.split(" path ")[1].strip()


def subvolumes(mnt: Path) -> list[str]:
    out = subprocess.run(["btrfs", "subvolume", "list", "-o", str(mnt)], capture_output=True,
                         text=True, check=True).stdout
    return sorted(line.split(" path ")[1].strip() for line in out.splitlines())


def status(mnt: Path) -> dict:  # type: ignore[type-arg]
    return checked("device status", json.loads(btrdelta("device", "status", mnt,
                                                      "--json").stdout))


def test_debian_install_by_delta(btrfs_dev: Path, debian_release: Release) -> None:
    r = debian_release
    checked("device status", json.loads(btrdelta(
        "device", "init", btrfs_dev, "--factory", r.full, "--expect-sum", r.old_sum,
        "--json").stdout))
    assert progs_default(btrfs_dev) == "roots/a"
    assert sorted(subvolumes(btrfs_dev)) == ["roots/a", "roots/b", "roots/factory",
                                             "state/etc", "state/home", "state/var"]
    for name in ("a", "b", "factory"):
        assert tree_sum(btrfs_dev / "roots" / name) == r.old_sum
    out = btrdelta("device", "install", btrfs_dev, r.delta, "--expect-sum", r.new_sum,
                   "--json")
    res = checked("device install", json.loads(out.stdout))
    assert res["slot"] == "b"
    assert res["tree_sum"] == r.new_sum
    assert tree_sum(btrfs_dev / "roots/b") == r.new_sum
    assert tree_sum(btrfs_dev / "roots/a") == r.old_sum  # the running root: untouched
    st = status(btrfs_dev)
    assert st["default"] == "a"
    assert st["next_boot"] == "b"
    assert st["trial"] == {"slot": "b", "tries_left": 3, "boots": 0}
    assert progs_default(btrfs_dev) == "roots/a"  # only the trial points at b
    # the boot: the trial is spent, b comes up; it is marked good
    assert select_root(Layout(btrfs_dev))[0] == "b"
    checked("device status", json.loads(btrdelta("device", "mark-good", btrfs_dev, "--slot",
                                                 "b", "--json").stdout))
    assert progs_default(btrfs_dev) == "roots/b"
    st = status(btrfs_dev)
    assert st["trial"] is None
    assert st["roots"]["b"]["verdict"] == "good"
    # rollback: a is good, it becomes the default again
    checked("device status", json.loads(btrdelta("device", "rollback", btrfs_dev,
                                                 "--json").stdout))
    assert progs_default(btrfs_dev) == "roots/a"
    assert subvolumes(btrfs_dev) == ["roots/a", "roots/b", "roots/factory", "state/etc",
                                     "state/home", "state/var"]


def test_rollback_goes_back_to_the_root_that_was_the_default_before(
        btrfs_dev: Path, small_release: Release) -> None:
    """"the previous good root" (docs/device.md §2): after b (the new release) was good and
    a factory reset made the factory base the default, rollback went to a, the older
    release, because it tried the slots in name order."""
    r = small_release
    device.init(btrfs_dev, r.old, state=[])
    device.install(btrfs_dev, r.delta, booted="a")
    device.mark_good(btrfs_dev, slot="b")
    btrdelta("device", "factory-reset", btrfs_dev)
    assert status(btrfs_dev)["default"] == "factory"
    assert status(btrfs_dev)["roots"]["a"]["verdict"] == "good"
    out = btrdelta("device", "rollback", btrfs_dev).stdout
    assert out.startswith("rolled back from factory: b is the default"), out
    assert progs_default(btrfs_dev) == "roots/b"
    assert tree_sum(btrfs_dev / "roots/b") == r.new_sum
    # and from b, back to the factory base it came from (a is good, but older)
    device.rollback(btrfs_dev)
    assert progs_default(btrfs_dev) == "roots/factory"


def test_wrong_release_sum_selects_nothing(btrfs_dev: Path, small_release: Release) -> None:
    r = small_release
    device.init(btrfs_dev, r.old, state=[])
    proc = btrdelta("device", "install", btrfs_dev, r.delta, "--expect-sum", "0" * 64,
                    check=False)
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert "tree-sum" in proc.stderr
    st = device.status(btrfs_dev)
    assert st["trial"] is None
    assert st["next_boot"] == "a"
    assert st["pending"] is None
    assert tree_sum(btrfs_dev / "roots/b") == r.old_sum
    assert subvolumes(btrfs_dev) == ["roots/a", "roots/b", "roots/factory"]


def test_missing_parent_is_refused(btrfs_dev: Path, small_release: Release,
                                   tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "file").write_text("not the parent\n")
    device.init(btrfs_dev, other, state=[])
    proc = btrdelta("device", "install", btrfs_dev, small_release.delta, check=False)
    assert proc.returncode == 6, proc.stderr
    assert "parent" in proc.stderr
    assert proc.stderr.count("\n") == 1
    st = device.status(btrfs_dev)
    assert st["trial"] is None
    assert st["next_boot"] == "a"
    assert subvolumes(btrfs_dev) == ["roots/a", "roots/b", "roots/factory"]


def test_boot_counting_brings_the_default_back(btrfs_dev: Path,
                                               small_release: Release) -> None:
    r = small_release
    device.init(btrfs_dev, r.old, state=[], tries=2)
    device.install(btrfs_dev, r.stream)
    layout = Layout(btrfs_dev)
    boots = [select_root(layout) for _ in range(4)]
    assert [b[0] for b in boots] == ["b", "b", "a", "a"]
    assert boots[1][1] is not None
    assert (boots[1][1].left, boots[1][1].done) == (0, 2)
    st = device.status(btrfs_dev)
    assert st["trial"] == {"slot": "b", "tries_left": 0, "boots": 2}
    # the trial ran out: nothing says b runs, so nothing is marked good by guess
    with pytest.raises(device.DeviceError, match="--slot"):
        device.mark_good(btrfs_dev, booted=None)
    st = device.mark_bad(btrfs_dev, slot="b")
    assert st["roots"]["b"]["verdict"] == "bad"
    assert st["next_boot"] == "a"
    # the next install rebuilds b (the bad slot), never a (the default)
    assert device.install(btrfs_dev, r.new).slot == "b"


def test_install_from_tree_and_booted_slot_is_kept(btrfs_dev: Path,
                                                   small_release: Release) -> None:
    r = small_release
    device.init(btrfs_dev, r.old, state=[])
    res = device.install(btrfs_dev, r.new)
    assert res.slot == "b"
    assert res.tree_sum == r.new_sum
    # booted on trial into b, not yet good: no slot can be rebuilt
    with pytest.raises(device.DeviceError, match="on trial"):
        device.install(btrfs_dev, r.new, booted="b")
    device.mark_good(btrfs_dev, booted="b")
    res = device.install(btrfs_dev, r.old, booted="b")
    assert res.slot == "a"
    assert tree_sum(btrfs_dev / "roots/a") == r.old_sum
    assert sorted(os.listdir(btrfs_dev / "roots")) == ["a", "b", "factory"]


def test_disk_full_during_install(small_release: Release, tmp_path: Path) -> None:
    from btrdelta.testing.loopfs import loop_fs
    from tests.conftest import require_btrfs

    require_btrfs()
    r = small_release
    big = tmp_path / "big"
    subprocess.run(["cp", "-a", str(r.new), str(big)], check=True)
    with open(big / "payload", "wb") as f:  # incompressible, larger than the device
        for _ in range(40):
            f.write(os.urandom(8 << 20))
    with loop_fs("btrfs", size="256M") as mnt:
        device.init(mnt, r.old, state=["home:/home:bind"])
        (mnt / "state/home/kept").write_text("state survives\n")
        os.sync()
        before = os.statvfs(mnt).f_bavail
        proc = btrdelta("device", "install", mnt, big, check=False)
        assert proc.returncode == 8, proc.stderr
        assert "disk full" in proc.stderr
        assert proc.stderr.count("\n") == 1
        after = os.statvfs(mnt).f_bavail
        assert after >= before * 0.95, (before, after)  # the space came back
        st = device.status(mnt)
        assert st["trial"] is None
        assert st["next_boot"] == "a"
        assert st["pending"] is None
        assert tree_sum(mnt / "roots/b") == r.old_sum
        assert subvolumes(mnt) == ["roots/a", "roots/b", "roots/factory", "state/home"]
        assert (mnt / "state/home/kept").read_text() == "state survives\n"
        # and an install that fits still works
        assert device.install(mnt, r.delta).tree_sum == r.new_sum


def test_install_refuses_unsigned_or_wrongly_signed(btrfs_dev: Path, small_release: Release,
                                                    tmp_path: Path) -> None:
    r = small_release
    btrdelta("key", "generate", "-o", tmp_path / "release")
    btrdelta("key", "generate", "-o", tmp_path / "other")
    delta = tmp_path / "update.delta"
    subprocess.run(["cp", str(r.delta), str(delta)], check=True)
    device.init(btrfs_dev, r.old, state=[])
    # no signature at all
    proc = btrdelta("device", "install", btrfs_dev, delta, "--key", tmp_path / "release.pub",
                    check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1
    # signed by a key the device does not trust
    btrdelta("sign", delta, "--key", tmp_path / "other.key")
    proc = btrdelta("device", "install", btrfs_dev, delta, "--key", tmp_path / "release.pub",
                    check=False)
    assert proc.returncode == 5, proc.stderr
    st = device.status(btrfs_dev)
    assert st["trial"] is None
    assert st["next_boot"] == "a"
    assert subvolumes(btrfs_dev) == ["roots/a", "roots/b", "roots/factory"]
    # signed by the release key: installed
    btrdelta("sign", delta, "--key", tmp_path / "release.key")
    res = device.install(btrfs_dev, delta, keys=[str(tmp_path / "release.pub")])
    assert res.tree_sum == r.new_sum


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_init_interrupted_leaves_nothing_and_a_rerun_completes(
        btrfs_dev: Path, small_release: Release, sig: signal.Signals,
        children: Children) -> None:
    """Ctrl-C (or SIGTERM) while `device init` receives the factory stream: one line, exit
    130 (143), and no roots/ or state/ left: they were, and the re-run was refused as "an
    unfinished init" until --force (only an error, not an interrupt, removed them)."""
    data = small_release.full.read_bytes()

    def default() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # (a background run inherits SIG_IGN)

    proc = children.start([*BTRDELTA, "device", "init", str(btrfs_dev), "--factory", "-"],
                          stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=False,
                          preexec_fn=default)
    assert proc.stdin is not None
    proc.stdin.write(data[:len(data) // 2])
    proc.stdin.flush()
    deadline = time.monotonic() + 60
    while True:  # the first half received: the process waits for the rest
        assert proc.poll() is None, proc.returncode
        with open(f"/proc/{proc.pid}/wchan") as f:
            if "pipe_read" in f.read() and (btrfs_dev / "roots").exists():
                break
        assert time.monotonic() < deadline, "never waited for the rest of the stream"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    proc.stdin.close()
    assert (proc.returncode, err) == (128 + sig, b"btrdelta device init: interrupted\n")
    assert sorted(os.listdir(btrfs_dev)) in ([], [".btrdelta"])
    assert subprocess.run(["btrfs", "subvolume", "list", str(btrfs_dev)], capture_output=True,
                          text=True, check=True).stdout == ""
    btrdelta("device", "init", btrfs_dev, "--factory", small_release.full)
    assert tree_sum(btrfs_dev / "roots/a") == small_release.old_sum
