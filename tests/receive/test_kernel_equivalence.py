"""btrdelta receive gives the tree `btrfs receive` gives, for every kernel-made scenario.

Each scenario's full stream A and incremental A->B (v1, and v2 --compressed-data with zstd,
lzo, zlib) are received by the kernel into one btrfs and by btrdelta into ext4 (directory
backend) and into another btrfs (real subvolumes); the trees are compared with tree-sum
(type, mode, owner, size, content, xattrs, symlink targets, rdev, link counts and groups,
mtimes in ns, and for v2 the hole layout: on ext4 with one allowance, a block btrfs fills
with zeros where ext4 keeps a hole, ``tests.conftest.layouts_elsewhere``).
"""

from __future__ import annotations

import pytest

from btrdelta.fs.btrfs import subvol_info
from btrdelta.testing.scenarios import SCENARIOS
from btrdelta.tree.treesum import diff_manifests, tree_manifest
from tests.conftest import _FS_VARIANTS, _V1_VARIANTS, layouts_elsewhere

from .conftest import Group, Targets
from .helpers import extent_sharing

_SCENARIOS = {sc.name: sc for sc in SCENARIOS}

pytestmark = pytest.mark.btrfs
#: the xattrs btrfs keeps its properties in, sent as such (compression-property-048)
_BTRFS_PROPERTIES = (b"btrfs.compression",)


def _group_names() -> list[str]:
    names = []
    for comp, _options, only in _FS_VARIANTS:
        for sc in SCENARIOS:
            if only is not None and sc.name not in only:
                continue
            for tag in ("v1", "v2"):
                if comp not in _V1_VARIANTS and tag == "v1":
                    continue
                names.append(f"{sc.name}.{comp}.{tag}")
                if sc.clones:
                    names.append(f"{sc.name}.{comp}.{tag}.clones")
    return names


def _compare(g: Group, snap: str, holes: bool, ignore_root_mtime: bool) -> list[str]:
    ref = tree_manifest(g.dirs["kernel"] / snap, holes=holes,
                        ignore_root_mtime=ignore_root_mtime)
    # btrfs properties are skipped off btrfs (with a warning): not in the ext4 tree
    props = any(name in _BTRFS_PROPERTIES for e in ref for name, _ in e.xattrs)
    ref_ext4 = ref if not props else tree_manifest(
        g.dirs["kernel"] / snap, holes=holes, ignore_root_mtime=ignore_root_mtime,
        exclude_xattrs=_BTRFS_PROPERTIES)
    problems = []
    for key in ("btrfs", "ext4", "btrfs-python"):
        ours = tree_manifest(g.dirs[key] / snap, holes=holes,
                             ignore_root_mtime=ignore_root_mtime)
        want = layouts_elsewhere(ref_ext4, ours) if key == "ext4" else ref
        diff = diff_manifests(want, ours)
        if diff:
            problems.append(f"{key} {snap}: " + "; ".join(diff))
    return problems


@pytest.mark.parametrize("name", _group_names())
def test_same_tree_as_kernel_receive(name: str, received: dict[str, Group]) -> None:
    g = received[name]
    assert g.error is None, g.error
    snaps = sorted(p.name for p in g.dirs["kernel"].iterdir())
    assert len(snaps) == 2 + len(g.middle), snaps
    assert sorted(p.name for p in g.dirs["btrfs"].iterdir()) == snaps
    assert sorted(p.name for p in g.dirs["ext4"].iterdir() if not p.name.startswith(".")) == snaps
    holes = ".v2" in name
    lost = _SCENARIOS[name.split(".")[0]].root_mtime_lost
    problems = []
    for snap in snaps:  # full streams' roots exact, the incremental's (B) root mtime not
        problems += _compare(g, snap, holes, ignore_root_mtime=snap.endswith("-B") or lost)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", _group_names())
def test_same_extent_sharing_as_kernel_receive(name: str, received: dict[str, Group]) -> None:
    """Upstream's layout checks (btrfs/200, 281, 283, 319, 322: the received files' extents
    are shared where the stream cloned): in each snapshot btrdelta's receive into btrfs
    shares the same blocks as ``btrfs receive``'s (a CLONE is a reflink, a WRITE is not),
    and the blocks are preallocated and compressed alike (v2 encoded writes kept); B where
    both receivers snapshot copies of A received from the same stream, and what B shares
    with A where both snapshot this group's A."""
    g = received[name]
    assert g.error is None, g.error
    # btrfs receive snapshots the first subvolume received as B's parent on its filesystem,
    # ours the one below DEST (docs/receive.md): the v1 group's A for a v2 stream of a
    # variant with both (received as raw data, the v2 group's compressed), alike otherwise
    _scenario, comp, tag, *clones = name.split(".")
    parent_alike = tag == "v1" or comp not in _V1_VARIANTS
    # the first group to receive A (a .clones group receives it again): B's parent is its A
    ids: dict[str, dict[tuple[object, ...], int]] = {}
    problems = []
    for snap in sorted(p.name for p in g.dirs["kernel"].iterdir()):
        if snap.endswith("-B") and not parent_alike:
            continue
        if clones or not parent_alike:
            ids = {}
        want = extent_sharing(g.dirs["kernel"] / snap, ids.setdefault("kernel", {}))
        for key in ("btrfs", "btrfs-python"):
            got = extent_sharing(g.dirs[key] / snap, ids.setdefault(key, {}))
            for path in sorted(set(want) | set(got)):
                w, o = want.get(path, []), got.get(path, [])
                if w != o:
                    at = [(x, y) for x, y in zip(w, o, strict=False) if x != y][:3]
                    problems.append(f"{key} {snap}/{path}: {len(w)} and {len(o)} blocks,"
                                    f" (kernel's, ours) first differing: {at}")
    assert not problems, problems


def test_btrfs_identity_matches_kernel_receive(received: dict[str, Group]) -> None:
    import os

    g = received["hole-punch-016.zstd.v2"]
    assert g.error is None, g.error
    for snap in sorted(p.name for p in g.dirs["kernel"].iterdir()):
        fds = [os.open(g.dirs[k] / snap, os.O_RDONLY) for k in ("kernel", "btrfs")]
        try:
            kern, ours = (subvol_info(fd) for fd in fds)
        finally:
            for fd in fds:
                os.close(fd)
        assert ours.received_uuid == kern.received_uuid is not None
        assert ours.stransid == kern.stransid
        assert ours.readonly
        assert kern.readonly
        assert ours.uuid != kern.uuid


def test_the_comparison_can_fail(received: dict[str, Group]) -> None:
    # the oracle is not vacuous: A and B of a scenario differ, and ours are non-trivial
    g = received["compressible-data-W6.zstd.v2"]
    a, b = sorted(p.name for p in g.dirs["ext4"].iterdir() if not p.name.startswith("."))
    ma = tree_manifest(g.dirs["ext4"] / a, holes=True)
    mb = tree_manifest(g.dirs["kernel"] / b, holes=True)
    assert len(ma) >= 5
    assert diff_manifests(ma, mb)


def test_dedupe_between_the_snapshots_is_in_the_stream(received: dict[str, Group]) -> None:
    # dedupe-balance-snapshots-187 is not vacuous: the files B has new, deduplicated onto
    # A's after the snapshots were taken, come as clones, not as the writes they were
    import io

    from btrdelta.stream import StreamReader
    from btrdelta.stream.records import Clone, Write

    for variant in ("zstd.v1", "plain.v2"):
        g = received[f"dedupe-balance-snapshots-187.{variant}"]
        recs = list(StreamReader(io.BytesIO(g.b.path.read_bytes())))
        clones = sum(isinstance(r, Clone) for r in recs)
        written = sum(len(r.data) for r in recs if isinstance(r, Write))
        # 40 + 20 files deduplicated: a clone each, or more where the file's extent was
        # written back in two (once in a full run under load: 61 clones; once the kernel
        # wrote a 4 KiB piece of one file, 3,936,256 bytes); without the dedupe B's 100 new
        # files would all be written (6,553,600 bytes)
        assert clones >= 60, (variant, clones)
        assert 60 * 65536 <= written < 61 * 65536, (variant, written)


def test_extent_sharing_tells_a_clone_from_a_copy(received: dict[str, Group],
                                                  targets: Targets) -> None:
    # the sharing oracle is not vacuous: 319's two files share every block in the kernel's
    # tree, and the same bytes copied (not reflinked) give another map
    import shutil

    g = received["unaligned-eof-clone-319.plain.v1"]
    assert g.error is None, g.error
    snap = g.dirs["kernel"] / "unaligned-eof-clone-319-A"
    want = extent_sharing(snap)
    assert want["foo"] == want["bar"]
    assert len(want["foo"]) == 257
    copy = targets.scratch_btrfs / "sharing-oracle"
    shutil.copytree(snap, copy, copy_function=lambda s, d: shutil.copyfile(s, d))
    try:
        got = extent_sharing(copy)
        assert {p: [(b, f) for b, _id, f in m] for p, m in got.items()} == {
            p: [(b, f) for b, _id, f in m] for p, m in want.items()}
        assert got != want
    finally:
        shutil.rmtree(copy)
