"""A replication receiver's partial transfer (``update.partial``): its meta saved whole and
durable where it must be."""

from __future__ import annotations

import json
import os
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
    assert len(synced) == 4, synced
    assert json.loads((part.path / "meta.json").read_text())["boot"] is None
    # an acknowledged segment's: renamed whole, not fsync-ed (discarded after a restart)
    part.save({"version": 2, "offset": 2})
    assert len(synced) == 4, synced
    assert json.loads((part.path / "meta.json").read_text()) == {
        "version": 2, "offset": 2, "boot": boot_id()}
    assert sorted(os.listdir(part.path)) == ["meta.json"]

