"""Kill -9 at every durable step (:data:`tests.device.crash.DURABLE`: subvolume steps,
renames, syncs, the default subvolume, state file writes, the boot-counting file) of
``mark-good``, ``rollback``, ``factory-reset`` and ``restore`` (``install``'s are in
test_crash.py). After each kill: the default subvolume and the next boot are complete roots
(tree-sums of the release trees), no state subvolume is half-made or lost, and the next
command, through the CLI, completes with the result the user asked for once: a re-run of a
rollback cut after its commit point does not go back a second time."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from btrdelta import device
from btrdelta.device.backup import backup
from btrdelta.device.boot import default_root, select_root, start_trial
from btrdelta.device.layout import Layout
from btrdelta.tree import tree_sum

from .conftest import Release, btrdelta, copy_tree
from .crash import crash_at, crash_op

pytestmark = pytest.mark.btrfs
STATE = ["etc:/etc:overlay", "home:/home:bind"]


def _check_boot(mnt: Path, sums: dict[str, str]) -> str:
    """The default and the next boot are complete roots; returns the default."""
    layout = Layout(mnt)
    default = default_root(layout)
    assert default is not None
    nxt, _ = select_root(layout, count=False)
    assert nxt is not None
    for name in {default, nxt}:
        assert tree_sum(mnt / "roots" / name) == sums[name]
    return default


def _boot_b_on_trial(mnt: Path) -> None:
    layout = Layout(mnt)
    start_trial(layout, "b", 3)
    assert select_root(layout)[0] == "b"  # one boot of b, its try spent


def _leftovers(mnt: Path) -> list[str]:
    return sorted([e for e in os.listdir(mnt) if e.startswith(".state-")]
                  + [e for e in os.listdir(mnt / "roots") if e.startswith(".")]
                  + [e for e in os.listdir(mnt / "state") if e.startswith(".restored-")]
                  + [e for e in os.listdir(mnt / ".btrdelta") if e == "restore"])


def test_kill_mark_good_at_every_step(btrfs_dev: Path, small_release: Release) -> None:
    r = small_release
    sums = {"a": r.old_sum, "b": r.new_sum, "factory": r.old_sum}
    device.init(btrfs_dev, r.old, state=[])
    device.install(btrfs_dev, r.delta, booted="a")
    cut_after_commit = 0
    k = 1
    while True:
        _boot_b_on_trial(btrfs_dev)
        if not crash_op("btrdelta.device.mark_good", btrfs_dev, k, booted="b"):
            break
        default = _check_boot(btrfs_dev, sums)
        assert default in ("a", "b")
        if default == "a":  # before the commit point: the trial goes on
            assert select_root(Layout(btrfs_dev), count=False)[0] == "b"
        else:
            # after it: b is the last good root (a mark-good cut short must not leave it
            # "new": --to last-good refused to reset to it, rollback skipped it)
            cut_after_commit += 1
            got = btrdelta("device", "factory-reset", btrfs_dev, "--to", "last-good",
                           check=False)
            assert got.returncode == 0, got.stderr
            assert "root b" in got.stdout
        # the booted system's unit runs mark-good again
        btrdelta("device", "mark-good", btrfs_dev, "--slot", "b")
        st = device.status(btrfs_dev)
        assert (st["default"], st["trial"], st["pending"]) == ("b", None, None)
        assert st["roots"]["b"]["verdict"] == "good"
        assert _leftovers(btrfs_dev) == []
        device.rollback(btrfs_dev)
        assert device.status(btrfs_dev)["default"] == "a"
        k += 1
    assert k > 4
    assert cut_after_commit > 1


def test_kill_rollback_at_every_step(btrfs_dev: Path, small_release: Release) -> None:
    r = small_release
    sums = {"a": r.old_sum, "b": r.new_sum, "factory": r.old_sum}
    device.init(btrfs_dev, r.old, state=[])
    device.install(btrfs_dev, r.delta, booted="a")
    device.mark_good(btrfs_dev, slot="b")
    for trial in (False, True):  # back from the default b; a trial of b cancelled
        k = 1
        while True:
            if trial:
                device.mark_good(btrfs_dev, slot="a")
                _boot_b_on_trial(btrfs_dev)
            if not crash_op("btrdelta.device.rollback", btrfs_dev, k):
                break
            assert _check_boot(btrfs_dev, sums) in ("a", "b")
            # unless the state file records it done (its last write), the user runs it
            # again: it goes back once, whether or not the cut one had reached its commit
            if device.status(btrfs_dev)["log"][-1]["event"] != "rollback":
                btrdelta("device", "rollback", btrfs_dev)
            st = device.status(btrfs_dev)
            assert (st["default"], st["next_boot"], st["pending"]) == ("a", "a", None), (k, trial)
            if trial:
                assert st["trial"]["tries_left"] == 0
            device.mark_good(btrfs_dev, slot="b")
            k += 1
        assert k > 3


def test_kill_factory_reset_at_every_step(btrfs_dev: Path, small_release: Release) -> None:
    r = small_release
    sums = {"a": r.old_sum, "b": r.old_sum, "factory": r.old_sum}
    device.init(btrfs_dev, r.old, state=STATE)
    home = btrfs_dev / "state/home"
    copy_tree(r.new / "usr/lib/apt", home / "apt")
    kept = tree_sum(home)
    upper = btrfs_dev / "state/etc/upper"
    k = 1
    while True:
        (upper / "local.conf").write_text(f"changed before reset {k}\n")
        old_etc = tree_sum(btrfs_dev / "state/etc")
        if not crash_op("btrdelta.device.reset.factory_reset", btrfs_dev, k, keep=["home"]):
            break
        default = _check_boot(btrfs_dev, sums)
        etc = tree_sum(btrfs_dev / "state/etc")
        assert tree_sum(home) == kept  # kept, never lost
        if etc == old_etc:  # before the swap: nothing changed
            assert default == "a"
        else:  # after it: every state subvolume at once; the root switch may be pending
            assert os.listdir(upper) == []
            assert default in ("a", "factory")
        # any next command finishes or undoes it (a neutral one here), leaving nothing
        btrdelta("device", "mark-good", btrfs_dev, "--slot", "a")
        assert _leftovers(btrfs_dev) == []
        assert device.status(btrfs_dev)["pending"] is None
        got = btrdelta("device", "factory-reset", btrfs_dev, "--keep", "home")
        assert "root factory; reset etc; kept home" in got.stdout
        st = device.status(btrfs_dev)
        assert (st["default"], st["pending"]) == ("factory", None)
        assert os.listdir(upper) == []
        assert tree_sum(home) == kept
        assert _leftovers(btrfs_dev) == []
        device.mark_good(btrfs_dev, slot="a")
        k += 1
    assert k > 6


def test_kill_restore_at_every_step(btrfs_dev: Path, small_release: Release,
                                    tmp_path: Path) -> None:
    r = small_release
    device.init(btrfs_dev, r.old, state=STATE)
    home = btrfs_dev / "state/home"
    copy_tree(r.new / "usr/lib/apt", home / "apt")
    dest = str(tmp_path / "backups")
    backup(btrfs_dev, "home", dest)
    (home / "notes").write_text("backed up\n")
    want = backup(btrfs_dev, "home", dest)["tree_sum"]
    k = 1
    while True:
        (home / "notes").write_text(f"changed after the backup {k}\n")
        live = tree_sum(home)
        if not crash_op("btrdelta.device.backup.restore", btrfs_dev, k, name="home",
                        src=dest):
            break
        assert tree_sum(home) in (live, want)  # the old or the restored one, never between
        btrdelta("device", "mark-good", btrfs_dev, "--slot", "a")  # any next command...
        assert _leftovers(btrfs_dev) == []  # ...removes what the cut one left
        got = btrdelta("device", "restore", btrfs_dev, "home", dest)
        assert got.stdout.startswith("restored state/home")
        assert tree_sum(home) == want
        assert _leftovers(btrfs_dev) == []
        k += 1
    assert k > 4
    assert tree_sum(home) == want


def _work(meta: Path) -> list[str]:
    """What .btrdelta holds beside its lasting files."""
    return [e for e in os.listdir(meta) if e not in ("backups", "held", "lock", "mounts",
                                                   "state.json")]


def test_backups_killed_before_their_index_leave_nothing_behind(
        btrfs_dev: Path, small_release: Release, tmp_path: Path) -> None:
    """A backup killed as it puts its file (its work directory on the device holding the
    whole stream and its delta), then one killed after its file reached the destination,
    before the index listing it was written (steps a power cut can stop at too): the next
    backup leaves on the device no work directory (it stayed in .btrdelta for ever) and at
    the destination no file the index does not list (``home.3.delta`` stayed for ever);
    restore gives the backed-up trees (oracle: their tree-sums)."""
    device.init(btrfs_dev, small_release.old, state=STATE)
    home = btrfs_dev / "state/home"
    copy_tree(small_release.new / "usr/lib/apt", home / "apt")
    dest = tmp_path / "backups"
    first = backup(btrfs_dev, "home", str(dest))["tree_sum"]
    meta = btrfs_dev / ".btrdelta"
    for k, at in enumerate(("_Store.put", "_Store.put_index")):
        (home / "notes").write_text(f"changed after backup {k + 1}\n")
        crash_at("btrdelta.device.backup.backup", btrfs_dev, f"btrdelta.device.backup:{at}",
                 name="home", dest=str(dest))
        work = _work(meta)
        if at == "_Store.put":  # (what any next device command removes)
            assert work == ["backup-work"], work
            assert sorted(os.listdir(meta / "backup-work")) == ["delta", "stream"]
        else:
            assert work == [], work
    assert sorted(os.listdir(dest)) == ["home.1.stream", "home.3.delta", "home.backups.json",
                                        "home.backups.lock"]
    out = tmp_path / "restored"
    out.mkdir()
    btrdelta("device", "restore", "--to-dir", out, "home", dest)  # (the index's: not 3)
    assert [e for e in os.listdir(out) if e.startswith("home")] == ["home.1"]
    assert tree_sum(out / "home.1") == first
    (home / "notes").write_text("changed again\n")
    want = tree_sum(home)
    got = btrdelta("device", "backup", btrfs_dev, "home", dest)
    assert "removed home.3.delta (not in the index: a backup cut short)" in got.stderr, \
        got.stderr
    index = json.loads((dest / "home.backups.json").read_text())
    files = [e["file"] for e in index["backups"]]
    assert files == ["home.1.stream", "home.4.delta"], files
    assert sorted(os.listdir(dest)) == sorted([*files, "home.backups.json", "home.backups.lock"])
    assert sorted(os.listdir(meta / "backups/home")) == ["destinations.json", "home.4"]
    assert _work(meta) == []
    again = tmp_path / "again"
    again.mkdir()
    btrdelta("device", "restore", "--to-dir", again, "home", dest)
    assert tree_sum(again / "home.4") == want
