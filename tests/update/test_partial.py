"""A replication receiver's partial transfer (``update.partial``): its meta saved whole and
durable where it must be."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from btrdelta.update.partial import PartialTransfer, boot_id
from tests.conftest import spy_fsync


def test_partial_meta_saves_fsync_the_file_and_the_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """meta.json was written to meta.json.tmp and renamed, never fsync-ed: a power cut could
    leave it torn or lose it. Now as fs.atomic writes files."""
    part = PartialTransfer(tmp_path, "dir")
    part.path.mkdir()
    synced = spy_fsync(monkeypatch)
    part.save({"version": 2}, durable=True)  # (a transfer's first meta)
    assert len(synced) == 2, synced
    assert synced[1] == str(part.path)
    assert json.loads((part.path / "meta.json").read_text()) == {"version": 2,
                                                                  "boot": boot_id()}
    part.save({"version": 2, "offset": 1}, synced=True)  # (a cut receiver's, written out)
    # the records' count first (it must outlive a restart as the meta does), then the meta
    assert len(synced) == 5, synced
    assert synced[2] == str(part.path / "progress")
    assert json.loads((part.path / "meta.json").read_text())["boot"] is None
    # an acknowledged segment's: renamed whole, not fsync-ed (discarded after a restart)
    part.save({"version": 2, "offset": 2})
    assert len(synced) == 5, synced
    assert json.loads((part.path / "meta.json").read_text()) == {
        "version": 2, "offset": 2, "boot": boot_id()}
    assert sorted(os.listdir(part.path)) == ["meta.json", "progress"]



def test_the_record_counter_is_mapped_in_tmpfs_and_outlives_a_restart_once_synced(
        tmp_path: Path) -> None:
    """The counter the applier stores into is a tmpfs file (a mapping of a file on DEST
    can SIGBUS on a full btrfs); a synced meta's count is in DEST too, where a restart
    (no tmpfs file) finds it, and the tmpfs file is removed then; drop removes both."""
    part = PartialTransfer(tmp_path, "dir")
    counter = part.start()
    counter[:8] = (41).to_bytes(8, sys.byteorder)
    shm = [n for n in os.listdir("/dev/shm") if n.startswith("btrdelta-progress-")
           and n.endswith(f"-{os.stat(part.path).st_ino:x}")]
    assert len(shm) == 1
    assert part.applied() == 41
    assert not (part.path / "progress").exists()  # (nothing on DEST until it must last)
    part.save({"version": 2, "offset": 1}, synced=True)
    assert (part.path / "progress").read_bytes() == (41).to_bytes(8, sys.byteorder)
    # no record is applied after it (a cut-off receiver's last words, or END's): the
    # tmpfs file goes (none left by a cut), as after a restart
    assert not os.path.exists(f"/dev/shm/{shm[0]}")
    assert part.applied() == 41  # the synced count
    again = part.start()  # a resume after it: the counter starts from that count
    assert int.from_bytes(again[:8], sys.byteorder) == 41
    assert part.applied() == 41
    part.drop()
    assert not os.path.exists(f"/dev/shm/{shm[0]}")
    assert not part.path.exists()
