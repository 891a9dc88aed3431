"""`btrfs receive` and `btrdelta receive` alternate on one btrfs, in both orders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from btrdelta.testing.scenarios import kernel_receive
from btrdelta.tree.treesum import diff_manifests, tree_manifest

from .conftest import Group, Targets, our_receive

pytestmark = pytest.mark.btrfs

NAMES = ["inversion-030.zstd.v2", "compressible-data-W6.zstd.v2", "compressible-data-W6.lzo.v2",
         "reflinks-same-file-200.zstd.v1", "xattrs.zstd.v1", "capabilities-214.zstd.v2",
         "special-files.zstd.v1", "many-links-272.zstd.v2"]


@pytest.mark.parametrize("name", NAMES)
def test_alternating_receivers(name: str, received: dict[str, Group], targets: Targets) -> None:
    g = received[name]
    assert g.error is None, g.error
    snaps = sorted(p.name for p in g.dirs["kernel"].iterdir())
    ours_then_kernel = targets.scratch_btrfs / f"ok-{name}"
    kernel_then_ours = targets.scratch_btrfs / f"ko-{name}"
    ours_then_kernel.mkdir()
    kernel_then_ours.mkdir()
    our_receive(g.a.path, ours_then_kernel)
    kernel_receive(g.b.path, ours_then_kernel)  # btrfs receive finds our received parent
    kernel_receive(g.a.path, kernel_then_ours)
    our_receive(g.b.path, kernel_then_ours)  # and we find the kernel's
    holes = name.endswith(".v2")
    for snap in snaps:
        ref = tree_manifest(g.dirs["kernel"] / snap, holes=holes, ignore_root_mtime=True)
        for d in (ours_then_kernel, kernel_then_ours):
            got = tree_manifest(d / snap, holes=holes, ignore_root_mtime=True)
            assert not diff_manifests(ref, got), (d.name, snap, diff_manifests(ref, got))


def test_encoded_writes_pass_through_on_btrfs(
    received: dict[str, Group], targets: Targets, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from btrdelta.receive import applier
    from btrdelta.stream import StreamReader
    from btrdelta.stream.records import EncodedWrite

    g = received["compressible-data-W6.zstd.v2"]
    n_encoded = sum(type(r) is EncodedWrite
                    for r in StreamReader(io.BytesIO(g.a.path.read_bytes())))
    assert n_encoded >= 3
    calls: list[int] = []
    real = applier.decode_extent

    def counting(data: object, compression: int, unencoded_len: int) -> bytes:
        calls.append(compression)
        return real(data, compression, unencoded_len)

    monkeypatch.setattr(applier, "decode_extent", counting)
    d = targets.scratch_btrfs / "passthrough"
    d.mkdir()
    our_receive(g.a.path, d)
    assert len(calls) < n_encoded / 2, (len(calls), n_encoded)
    ext4 = targets.ours_ext4 / "passthrough"
    ext4.mkdir()
    our_receive(g.a.path, ext4)
    assert len(calls) >= n_encoded  # off btrfs everything is decompressed


@pytest.mark.parametrize("name", ["multi", "multi-e", "nodata"])
def test_multi_subvolume_and_no_data_streams(
    name: str, kernel_streams: list, received: dict[str, Group], targets: Targets
) -> None:
    by_name = {ks.name: ks for ks in kernel_streams}
    stream = by_name[name].path
    dirs = {k: root / f"special-{name}" for k, root in (
        ("kernel", targets.kernel), ("btrfs", targets.ours_btrfs), ("ext4", targets.ours_ext4))}
    for d in dirs.values():
        d.mkdir()
    if name == "nodata":  # incremental: needs its parent first
        base = by_name["compressible-data-W6.zstd.v1.A"].path
        kernel_receive(base, dirs["kernel"])
        our_receive(base, dirs["btrfs"])
        our_receive(base, dirs["ext4"])
    kernel_receive(stream, dirs["kernel"])
    our_receive(stream, dirs["btrfs"])
    our_receive(stream, dirs["ext4"])
    snaps = sorted(p.name for p in dirs["kernel"].iterdir())
    assert len(snaps) == 2
    for key in ("btrfs", "ext4"):
        assert sorted(p.name for p in dirs[key].iterdir() if not p.name.startswith(".")) == snaps
        for snap in snaps:
            ref = tree_manifest(dirs["kernel"] / snap, ignore_root_mtime=True)
            got = tree_manifest(dirs[key] / snap, ignore_root_mtime=True)
            assert not diff_manifests(ref, got), (key, snap, diff_manifests(ref, got))


def test_parent_found_when_a_subvolume_is_mounted(btrfs_ok: None, tmp_path: Path) -> None:
    # DEST below a `-o subvol=top` mount: UUID-tree paths are relative to the top level
    import subprocess

    from btrdelta.fs.btrfs import subvol_info
    from btrdelta.receive import receive
    from btrdelta.testing.loopfs import loop_fs
    from btrdelta.testing.loopfs import run as sh

    from .helpers import UUID_A, UUID_B, events
    from .test_failures import FULL, INCR

    with loop_fs("btrfs", size="256M") as mnt:
        sh("btrfs", "-q", "subvolume", "create", str(mnt / "top"))
        with open("/proc/mounts") as f:
            dev = next(line.split()[0] for line in f if line.split()[1] == str(mnt))
        m2 = tmp_path / "m2"
        m2.mkdir()
        sh("mount", "-o", "subvol=top", dev, str(m2))
        try:
            (m2 / "dest").mkdir()
            receive(events(FULL), m2 / "dest")
            receive(events(INCR), m2 / "dest")
            assert (m2 / "dest" / "B" / "moved").read_bytes().startswith(b"HELLOhello")
            fd = os.open(m2 / "dest" / "B", os.O_RDONLY)
            try:
                info = subvol_info(fd)
            finally:
                os.close(fd)
            assert info.received_uuid == UUID_B
            assert info.readonly
            fd = os.open(m2 / "dest" / "A", os.O_RDONLY)
            try:
                assert subvol_info(fd).received_uuid == UUID_A
                assert info.parent_uuid == subvol_info(fd).uuid
            finally:
                os.close(fd)
        finally:
            subprocess.run(["umount", str(m2)], check=False)
