"""The record counter of a replication (``/dev/shm/btrdelta-progress-DEV-INO``) is left
neither by a completed replicate, nor by one whose sender was cut off (the receiver writes
the partial transfer out: ``progress`` in DEST counts it), nor by the resume that commits
it: they were left by every cut into a DEST not on a loop mount (30 after a session's
tests). Oracle: the listing of ``/dev/shm`` for the DEST's filesystem (a loop ext4 of its
own: no other process's counters)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from btrdelta.testing.loopfs import loop_fs
from btrdelta.update.partial import COUNTER_PREFIX, SHM, PartialTransfer
from tests.update.test_replicate import _complete_partial, _lying_sender, _ok_stream


def _counters(top: Path) -> list[str]:
    prefix = f"{COUNTER_PREFIX}{os.stat(top).st_dev:x}-"
    return [n for n in os.listdir(SHM) if n.startswith(prefix)]


def test_no_counter_is_left_after_a_commit_a_cut_or_a_resume(tmp_path: Path) -> None:
    from tests.conftest import require_btrfs

    require_btrfs()  # loop devices
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(100_000))
    with loop_fs("ext4", size="32M") as top:
        dest = top / "dest"
        dest.mkdir()
        subprocess.run([sys.executable, "-m", "btrdelta", "replicate", "-q", str(src),
                        str(dest), "--store", str(tmp_path / "store")], check=True)
        assert _counters(top) == []
        good = _ok_stream()
        what, code, text = _lying_sender(dest, good, None, after_end="close")
        assert (what, code) == ("Ack", 0), text
        _complete_partial(dest)
        assert PartialTransfer(dest, "dir").counter() is not None  # (its name: /dev/shm)
        assert _counters(top) == []
        what, code, text = _lying_sender(dest, good, None, resume=True)
        assert (what, code) == ("Committed", 0), text
        assert (dest / "ok" / "f").read_bytes() == b"x" * 9000
        assert _counters(top) == []
