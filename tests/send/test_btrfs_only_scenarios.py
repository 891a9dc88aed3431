"""btrdelta's send of the kernel's snapshots of every scenario only btrfs can build
(subvolumes inside, ``btrfs.compression`` properties, ``chattr`` flags, a read-only
snapshot made writable; ``tests/send/test_scenarios.py`` builds the others in plain
directories): the full stream of A and the incremental one of B from A, v1 and v2, received
by ``btrfs receive``, give the snapshots (tree-sum as the oracle)."""

from __future__ import annotations

from pathlib import Path

import pytest

from btrdelta.send import send_stream
from btrdelta.testing.scenarios import SCENARIOS, kernel_receive, make_snapshots
from btrdelta.tree.treesum import diff_manifests, tree_manifest

pytestmark = pytest.mark.btrfs

ONLY = [sc for sc in SCENARIOS if sc.btrfs_only]


@pytest.mark.parametrize("scenario", ONLY, ids=[sc.name for sc in ONLY])
def test_our_send_of_scenario_received_by_btrfs(fs_pair: tuple[Path, Path], tmp_path: Path,
                                               scenario) -> None:
    src, dst = fs_pair
    pair = make_snapshots(src, scenario)
    for version in (1, 2):
        dest = dst / f"{scenario.name}.v{version}"
        dest.mkdir()
        for new, parent in ((pair.a, None), (pair.b, pair.a)):
            stream = tmp_path / f"{new.name}.v{version}"
            with open(stream, "wb") as f:
                send_stream(f.write, new, parent, version=version,
                            compress="zstd" if version == 2 else None)
            kernel_receive(stream, dest)
        # B's root mtime: the receive's (the root holds what it makes; upstream's too)
        for snap, root_mtime in ((pair.a, True), (pair.b, False)):
            diff = diff_manifests(tree_manifest(snap, ignore_root_mtime=not root_mtime),
                                  tree_manifest(dest / snap.name,
                                                ignore_root_mtime=not root_mtime))
            assert not diff, f"v{version} {snap.name}: " + "; ".join(diff)
