"""``send --record`` of a live subvolume at a scenario's A, then ``send --from-sendshot`` at
its B (what ``replicate`` sends), for the scenarios of classes beyond the upstream tests, the
upstream tests' parts added in session 33 and those that make btrfs reuse inode numbers (a
remount between A and B): ``btrfs receive`` takes both streams and gives the read-only
snapshots A and B (tree-sum as the oracle)."""

from __future__ import annotations

from pathlib import Path

import pytest

from btrdelta.cli import main
from btrdelta.testing.scenarios import SCENARIOS, kernel_receive, make_snapshots
from btrdelta.testing.scenarios_beyond import BEYOND
from btrdelta.testing.scenarios_corners import CORNERS
from btrdelta.testing.scenarios_subcases import SUBCASES
from btrdelta.tree.treesum import diff_manifests, tree_manifest

pytestmark = pytest.mark.btrfs

SHOTS = [sc for sc in SCENARIOS if (sc in BEYOND or sc in CORNERS or sc in SUBCASES
                                     or "\nREMOUNT\n" in sc.b)
         and not (sc.a_held or sc.b_held or sc.a_open or sc.after)]


@pytest.mark.parametrize("scenario", SHOTS, ids=[sc.name for sc in SHOTS])
def test_sendshot_streams_of_scenario(fs_pair: tuple[Path, Path], tmp_path: Path,
                                      scenario) -> None:
    src, dst = fs_pair
    store, full, incr = tmp_path / "store", tmp_path / "full", tmp_path / "incr"
    send = ["send", "-q", "--store", str(store)]

    def record(vol: Path) -> None:
        assert main([*send, str(vol), "-o", str(full), "--record", "--name", "A"]) == 0

    pair = make_snapshots(src, scenario, between=record)
    vol = src / f"vol-{scenario.name}"
    assert main([*send, str(vol), "-o", str(incr), "--from-sendshot", "latest", "--record",
                 "--name", "B"]) == 0
    dest = dst / scenario.name
    dest.mkdir()
    kernel_receive(full, dest)
    kernel_receive(incr, dest)
    for snap, got in ((pair.a, dest / "A"), (pair.b, dest / "B")):
        diff = diff_manifests(tree_manifest(snap, ignore_root_mtime=True),
                              tree_manifest(got, ignore_root_mtime=True))
        assert not diff, "\n".join(diff)
