"""On btrfs the parent of an incremental stream (or of a delta stream) is looked up as
``btrfs receive`` does: anywhere on DEST's filesystem, never on another one. Oracle: the
kernel receiving the same stream (its tree-sum, and its refusal on another filesystem)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from btrdelta.delta.make import make_delta
from btrdelta.delta.options import MakeOptions
from btrdelta.stream import StreamReader
from btrdelta.stream.records import Clone, Snapshot
from btrdelta.testing.loopfs import loop_fs
from btrdelta.testing.scenarios import SCENARIOS, kernel_receive, make_snapshots, send
from btrdelta.tree import tree_sum
from tests.conftest import require_btrfs

pytestmark = pytest.mark.btrfs
SCENARIO = next(s for s in SCENARIOS if s.name == "reflinks-same-file-200")


def _receive(stream: Path, dest: Path) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "btrdelta", "receive", "-f", str(stream),
                           str(dest)], capture_output=True, check=False)
    return proc.returncode, proc.stderr.decode()


def test_parent_elsewhere_on_the_filesystem_not_on_another(tmp_path: Path) -> None:
    require_btrfs()
    with loop_fs("btrfs", size="1G") as mnt, loop_fs("btrfs", size="256M") as other:
        pair = make_snapshots(mnt, SCENARIO)  # A and B at the top of the filesystem
        incr = send(pair.b, tmp_path / "B.stream", parent=pair.a)
        recs = list(StreamReader(io.BytesIO(incr.read_bytes())))
        parent = next(r for r in recs if isinstance(r, Snapshot)).clone_uuid
        assert any(isinstance(r, Clone) and r.clone_uuid == parent for r in recs)
        delta = tmp_path / "B.delta"
        with open(incr, "rb") as f, open(delta, "wb") as o:
            make_delta(f, pair.a, o.write, MakeOptions(jobs=1))
        store = mnt / "store"  # a received A (btrfs receive finds clone sources by
        store.mkdir()  # received UUID only)
        kernel_receive(send(pair.a, tmp_path / "A.stream"), store)
        kernel = mnt / "kernel"
        kernel.mkdir()
        kernel_receive(incr, kernel)  # finds store/A outside kernel/
        want = tree_sum(kernel / pair.b.name, ignore_root_mtime=True)
        for name, stream in (("plain", incr), ("delta", delta)):
            dest = mnt / "deep" / name
            dest.mkdir(parents=True)
            code, err = _receive(stream, dest)
            assert code == 0, err
            assert tree_sum(dest / pair.b.name, ignore_root_mtime=True) == want, name
        # another filesystem holds no parent: the kernel refuses, and so do we
        far = other / "dest"
        far.mkdir()
        proc = subprocess.run(["btrfs", "receive", "-f", str(incr), str(far)],
                              capture_output=True, check=False)
        assert proc.returncode != 0
        code, err = _receive(incr, far)
        assert code == 6, err
        assert f"cannot find parent subvolume {parent}" in err
        assert "Traceback" not in err
        assert sorted(p.name for p in far.iterdir()) == []
