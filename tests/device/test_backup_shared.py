"""Backups into a directory that holds more than this device's backups: another device's
backup of the same name running at the same time, and entries that are not backup files.
Oracles: the tree-sums of the backed-up subvolumes against their restores (``btrfs
receive`` of the kernel's send streams under ``device restore --to-dir``)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from btrdelta import device
from btrdelta.device import backup as backup_mod
from btrdelta.device.backup import backup, restore_to_dir
from btrdelta.tree import tree_sum
from tests.conftest import btrfs_loop

from .conftest import Release, btrdelta, copy_tree

STATE = ["etc:/etc:overlay", "home:/home:bind"]


def _device(mnt: Path, release: Release, note: str) -> Path:
    device.init(mnt, release.old, state=STATE)
    home = mnt / "state/home"
    copy_tree(release.new / "usr/lib/apt", home / "apt")
    (home / "notes").write_text(note)
    return home


def test_two_devices_backing_up_one_name_into_one_directory_at_once(
        btrfs_dev: Path, small_release: Release, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Device A's backup of ``home`` stops after its file is put, before its index is
    written; device B's backup of ``home`` to the same directory starts meanwhile. Before
    the directory's lock, B took A's number, its file replaced A's, the index A wrote last
    named B's file with A's tree-sum, and A's backup was lost (its restore failed its
    check). Now B waits for A: the index lists both, each restores to its device's tree."""
    dest = tmp_path / "shared"
    paused, go = threading.Event(), threading.Event()
    real = backup_mod._Store.put_index

    def put_index(self: Any, name: str, entries: list[dict[str, Any]]) -> None:
        if threading.current_thread().name == "A":
            paused.set()
            assert go.wait(60)
        real(self, name, entries)

    monkeypatch.setattr(backup_mod._Store, "put_index", put_index)
    with btrfs_loop(size="2G") as other:
        homes = {"A": _device(btrfs_dev, small_release, "device A\n"),
                 "B": _device(other, small_release, "device B\n")}
        want = {k: tree_sum(h) for k, h in homes.items()}
        got: dict[str, Any] = {}

        def run(who: str, fs: Path) -> None:
            try:
                got[who] = backup(fs, "home", str(dest))
            except BaseException as exc:  # (seen by the assertions below)
                got[who] = exc

        a = threading.Thread(target=run, args=("A", btrfs_dev), name="A")
        b = threading.Thread(target=run, args=("B", other), name="B")
        a.start()
        assert paused.wait(120)
        b.start()
        b.join(3)  # (B ends here without the lock, or waits for A with it)
        go.set()
        a.join(120)
        b.join(120)
        assert not a.is_alive()
        assert not b.is_alive()
    assert all(isinstance(r, dict) for r in got.values()), got
    index = json.loads((dest / "home.backups.json").read_text())
    numbers = {e["n"]: e["tree_sum"] for e in index["backups"]}
    assert numbers == {got["A"]["n"]: want["A"], got["B"]["n"]: want["B"]}, numbers
    assert sorted(os.listdir(dest)) == sorted(
        [*(e["file"] for e in index["backups"]), "home.backups.json", "home.backups.lock"])
    for who in ("A", "B"):
        out = tmp_path / f"restored-{who}"
        out.mkdir()
        assert tree_sum(restore_to_dir(str(dest), "home", out, upto=got[who]["n"])) \
            == want[who]


def test_a_directory_named_like_a_backup_file_is_left_alone(
        btrfs_dev: Path, small_release: Release, tmp_path: Path) -> None:
    """A directory ``home.7.stream`` and a symlink ``home.8.delta`` in DEST are no backup
    files a cut backup left: the backup neither fails (it failed with EISDIR after writing
    its index, so the device never noted DEST and its next backup was whole) nor removes
    them; an unlisted regular file is still removed."""
    home = _device(btrfs_dev, small_release, "first\n")
    dest = tmp_path / "backups"
    (dest / "home.7.stream").mkdir(parents=True)
    (dest / "home.7.stream/mine").write_text("not a backup\n")
    (dest / "home.8.delta").symlink_to("home.7.stream")
    (dest / "home.9.delta").write_bytes(b"a cut backup's file")
    got = btrdelta("device", "backup", btrfs_dev, "home", dest, "--json")
    assert json.loads(got.stdout)["removed"] == ["home.9.delta"]
    assert (dest / "home.7.stream/mine").read_text() == "not a backup\n"
    assert os.readlink(dest / "home.8.delta") == "home.7.stream"
    (home / "notes").write_text("second\n")
    want = tree_sum(home)
    second = json.loads(btrdelta("device", "backup", btrfs_dev, "home", dest,
                                 "--json").stdout)
    assert (second["parent"], second["file"]) == (1, "home.2.delta"), second
    out = tmp_path / "restored"
    out.mkdir()
    assert tree_sum(restore_to_dir(str(dest), "home", out)) == want
