"""`replicate`'s estimate of the file data of a sparse tree: the data the files hold, not
their sizes (a full stream of a live subvolume, streamed while its tree is walked, said
"5.0 MiB sent ... file data estimated 4.0 GiB"). Oracles: the files' allocated blocks
(``st_blocks``), the bytes sent, tree-sum of the received tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from btrdelta.tree import tree_sum

MIB = 1 << 20


@pytest.mark.btrfs
def test_the_estimate_of_sparse_files_counts_their_data_not_their_holes() -> None:
    from tests.conftest import btrfs_loop

    with btrfs_loop("300M") as fs:
        src = fs / "src"
        subprocess.run(["btrfs", "-q", "subvolume", "create", str(src)], check=True)
        for i in range(4):
            with open(src / f"sparse{i}", "wb") as f:
                f.truncate(256 * MIB)
                f.seek(i * 8 * MIB)
                f.write(os.urandom(MIB))
        (src / "plain").write_bytes(os.urandom(MIB))
        dest = fs / "dest"
        dest.mkdir()
        cli = [sys.executable, "-m", "btrdelta", "replicate", str(src), str(dest),
               "--store", str(fs / "store"), "--json"]
        allocated = sum(p.stat().st_blocks * 512 for p in src.iterdir())
        for change in ("full", "incremental"):
            run = subprocess.run(cli, capture_output=True, text=True, check=False)
            assert run.returncode == 0, run.stderr
            res = json.loads(run.stdout)
            assert (res["outcome"], res["kind"]) == ("committed", change), res
            # within a factor of 1.25 of the bytes sent, and at most what the files hold
            assert res["sent"] / 1.25 <= res["estimate"] <= min(res["sent"], allocated), res
            assert tree_sum(dest / res["name"]) == tree_sum(src)
            with open(src / "sparse1", "r+b") as f:
                f.seek(100 * MIB)
                f.write(os.urandom(MIB))
            allocated = MIB


@pytest.mark.btrfs
def test_the_plans_estimate_of_an_incremental_counts_data_not_holes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The PLAN, before the stream, of an incremental with a sparse file changed and a new
    sparse one: its estimate (as the receiver reads it off the wire) is the data written,
    not the files' sizes. Oracles: the bytes written since, the bytes sent, tree-sum."""
    from btrdelta.update.replica import Replica
    from tests.conftest import btrfs_loop
    from tests.update.test_replicate_fault import _run

    plans: list[int] = []
    check = Replica._check_plan

    def seen(self: Replica, plan: Any, holdings: Any) -> Any:
        plans.append(plan.estimate)
        return check(self, plan, holdings)

    monkeypatch.setattr(Replica, "_check_plan", seen)
    with btrfs_loop("300M") as fs:
        src, dest = fs / "src", fs / "dest"
        subprocess.run(["btrfs", "-q", "subvolume", "create", str(src)], check=True)
        dest.mkdir()
        with open(src / "sparse", "wb") as f:
            f.truncate(256 * MIB)
            f.write(os.urandom(MIB))
        first, _ = _run(src, dest, fs / "store")
        assert getattr(first, "kind", None) == "full", first
        with open(src / "sparse", "r+b") as f:  # 1 MiB written at 100 MiB
            f.seek(100 * MIB)
            f.write(os.urandom(MIB))
        with open(src / "new", "wb") as f:  # 512 MiB, 1 MiB of data
            f.truncate(512 * MIB)
            f.seek(3 * MIB)
            f.write(os.urandom(MIB))
        res, _ = _run(src, dest, fs / "store")
        assert getattr(res, "kind", None) == "incremental", res
        estimate = plans[-1]
        assert 2 * MIB <= estimate <= min(res.sent, 2 * MIB + 64 * 1024), (estimate, res)
        assert tree_sum(dest / res.name) == tree_sum(src)
