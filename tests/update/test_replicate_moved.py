"""`replicate` of a writable subvolume cut short, then run again with the filesystem seen at
another path: the session's snapshot is found next to the source where it is now.

The sender's cursor names the session's snapshot by its path. A device's disk mounted
elsewhere after a power cut (the host checking a VM's disk: `make vmtest`, session 26,
the sending side's 10th cut), or the directory holding the source renamed, made that path
wrong: the next run wanted to resume the transfer from it and failed ("path ... does not
exist"), every run after it too, until someone edited the store."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from btrdelta.send.store import SendshotStore
from btrdelta.tree import tree_sum
from btrdelta.update.channels import spawn_local
from btrdelta.update.replica import Replica
from btrdelta.update.replicate import replicate
from tests.update.test_replicate_kill import (
    SEG,
    _sender_killed_at,
    _visible,
    replicated_subvolume,
    shim,
)

__all__ = ["shim"]  # (the fixture, used by name)

pytestmark = pytest.mark.btrfs


def _snapshots(where: Path) -> list[str]:
    return sorted(n for n in os.listdir(where) if n.startswith(".btrdelta-replicate-"))


@pytest.mark.parametrize(("point", "snapshot"), [("cursors.json:2:after", "moved"),
                                               ("cursors.json:1:after", "moved"),
                                               ("cursors.json:2:after", "deleted")])
def test_a_cut_transfer_goes_on_from_where_the_source_is_now(tmp_path: Path, shim: Path,
                                                           point: str, snapshot: str) -> None:
    """Killed once the receiver holds the whole stream (2: its sendshot named before the
    COMMIT: the next run resumes, reading the snapshot again) or as it starts (1: the
    transfer named in flight: the next run sends again, the snapshot deleted); then the
    directory holding the source, its snapshot and the store renamed. The next run
    completes from the new path: the new tree once, equal to the source, no snapshot
    left, nothing in flight. With the snapshot deleted (by hand) the transfer cannot be
    resumed: the next run sends again."""
    from tests.conftest import btrfs_loop

    with btrfs_loop("400M") as fs:
        disk = fs / "run-vda"
        disk.mkdir()
        live, dest = disk / "vol", fs / "dest"
        store = SendshotStore(disk / "store")
        old = replicated_subvolume(live, dest, store)
        (live / "more").write_bytes(os.urandom(2 * SEG))
        _sender_killed_at(live, dest, store, point)
        [snap] = _snapshots(disk)
        if snapshot == "deleted":
            subprocess.run(["btrfs", "subvolume", "delete", str(disk / snap)], check=True,
                           capture_output=True)
        moved = fs / "mnt"
        disk.rename(moved)
        live, store = moved / "vol", SendshotStore(moved / "store")
        ch = spawn_local(str(dest))
        res = replicate(live, ch, store=store, segment=SEG)
        ch.close()
        assert res.outcome == "committed", res
        if point.startswith("cursors.json:2"):
            assert res.kind == ("resume" if snapshot == "moved" else "incremental"), res
        [_, new] = _visible(dest)
        assert new == res.name
        assert tree_sum(dest / new) == tree_sum(live)
        assert _visible(dest) == [old, new]
        assert _snapshots(moved) == []
        cursor = store.cursors()[Replica(dest).ident]
        assert not cursor.get("inflight"), cursor
