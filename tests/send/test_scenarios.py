"""Every plain-directory upstream scenario: btrdelta's full and incremental streams, received
by the kernel's `btrfs receive`, give exactly the source trees (tree-sum as the oracle)."""

from __future__ import annotations

from pathlib import Path

import pytest

from btrdelta.receive import receive
from btrdelta.stream import StreamHeader, StreamReader
from btrdelta.stream.records import Snapshot, Subvol
from btrdelta.testing.scenarios import SCENARIOS, kernel_receive
from btrdelta.tree.treesum import diff_manifests, tree_manifest
from tests.send.conftest import Workspace, build_pair, make_stream, progs_dump_ok

PLAIN = [sc for sc in SCENARIOS if not sc.btrfs_only]
VARIANTS = [(1, None), (2, "zstd")]


def assert_same_tree(expected: Path, got: Path) -> None:
    diff = diff_manifests(tree_manifest(expected), tree_manifest(got))
    assert not diff, "\n".join(diff)


def userspace_receive(stream: Path, dest: Path) -> None:
    """btrdelta's own receiver into a plain directory (no btrfs features used)."""
    with open(stream, "rb") as f:
        receive(StreamReader(f, source=str(stream)).events(), dest, backend="dir")


def read_all(stream: Path) -> list[object]:
    with open(stream, "rb") as f:
        return list(StreamReader(f, source=str(stream)).events())


@pytest.mark.btrfs
@pytest.mark.parametrize(("version", "compress"), VARIANTS, ids=["v1", "v2-zstd"])
@pytest.mark.parametrize("scenario", PLAIN, ids=[sc.name for sc in PLAIN])
def test_scenario_kernel_receive(
    btrfs_ws: Workspace, tmp_path: Path, scenario, version, compress
) -> None:
    base = btrfs_ws.fresh(scenario.name)
    old, new = build_pair(base, scenario)
    full = make_stream(base / "full.stream", old, version=version, compress=compress)
    incr = make_stream(base / "incr.stream", new, old, version=version, compress=compress)
    # both streams are well-formed for btrfs-progs and for our reader
    for s in (full, incr):
        progs_dump_ok(s)
        events = read_all(s)
        assert isinstance(events[0], StreamHeader)
        assert events[0].version == version
    # the incremental names full(OLD)'s subvolume as its parent
    f_head, i_head = read_all(full)[1], read_all(incr)[1]
    assert isinstance(f_head, Subvol)
    assert isinstance(i_head, Snapshot)
    assert (i_head.clone_uuid, i_head.clone_ctransid) == (f_head.uuid, f_head.ctransid)
    dest = base / "recv"
    dest.mkdir()
    kernel_receive(full, dest)
    assert_same_tree(old, dest / "old")
    kernel_receive(incr, dest)
    assert_same_tree(new, dest / "new")
    # and btrdelta's own receiver into a plain directory on another filesystem (ext4/tmpfs;
    # the btrfs for xattrs a plain ext4 cannot hold)
    plain = (base if scenario.large_xattrs else tmp_path) / "plain"
    plain.mkdir()
    userspace_receive(full, plain)
    assert_same_tree(old, plain / "old")
    userspace_receive(incr, plain)
    assert_same_tree(new, plain / "new")


@pytest.mark.btrfs
def test_same_tree_same_uuid(btrfs_ws: Workspace) -> None:
    """Identity is derived from content: a copy of a tree gets the same UUID; a change, not."""
    import subprocess

    base = btrfs_ws.fresh("uuid")
    a = base / "a"
    a.mkdir()
    (a / "f").write_bytes(b"x" * 10000)
    subprocess.run(["cp", "-a", str(a), str(base / "b")], check=True)
    ha = read_all(make_stream(base / "a.s", a))[1]
    hb = read_all(make_stream(base / "b.s", base / "b"))[1]
    assert isinstance(ha, Subvol)
    assert isinstance(hb, Subvol)
    assert ha.uuid == hb.uuid
    (base / "b" / "f").write_bytes(b"y" * 10001)
    hc = read_all(make_stream(base / "c.s", base / "b"))[1]
    assert isinstance(hc, Subvol)
    assert hc.uuid != ha.uuid


CLONES = [sc for sc in PLAIN if sc.clones]


@pytest.mark.btrfs
@pytest.mark.parametrize(("version", "compress"), VARIANTS, ids=["v1", "v2-zstd"])
@pytest.mark.parametrize("scenario", CLONES, ids=[sc.name for sc in CLONES])
def test_scenario_clone_source_kernel_receive(
    btrfs_ws: Workspace, tmp_path: Path, scenario, version, compress
) -> None:
    """``send -p OLD -c CLONES NEW`` (CLONES: a copy of NEW, upstream's clones_snap), the
    three streams received by the kernel and by btrdelta's own receiver in that order."""
    import subprocess

    base = btrfs_ws.fresh(scenario.name + "-c")
    old, new = build_pair(base, scenario)
    clones = base / "clones"
    subprocess.run(["cp", "-a", "--reflink=auto", str(new), str(clones)], check=True)
    streams = [make_stream(base / "old.s", old, version=version, compress=compress),
               make_stream(base / "clones.s", clones, version=version, compress=compress),
               make_stream(base / "new.s", new, old, version=version, compress=compress,
                           clone_sources=[clones])]
    for s in streams:
        progs_dump_ok(s)
    clone_uuid = read_all(streams[1])[1]
    assert isinstance(clone_uuid, Subvol)
    dest = base / "recv"
    dest.mkdir()
    plain = tmp_path / "plain"
    plain.mkdir()
    for s, tree in zip(streams, (old, clones, new), strict=True):
        kernel_receive(s, dest)
        assert_same_tree(tree, dest / tree.name)
        userspace_receive(s, plain)
        assert_same_tree(tree, plain / tree.name)
