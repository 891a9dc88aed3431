"""``btrdelta send -c`` (clone sources) and ``--no-data`` (NO_FILE_DATA), checked against
the kernel: its ``btrfs receive`` applies the streams, and its own ``btrfs send --no-data``
of the same change says which files changed."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from btrdelta.cli import main
from btrdelta.stream.records import Clone, EncodedWrite, Subvol, UpdateExtent, Write
from btrdelta.testing.scenarios import kernel_receive
from btrdelta.tree import tree_manifest
from tests.send.conftest import Workspace, progs_dump_ok
from tests.send.test_scenarios import assert_same_tree, read_all


def _rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _trees(base: Path) -> tuple[Path, Path]:
    """v1 and v2 (v1 changed by :func:`_change`)."""
    v1 = base / "v1"
    (v1 / "d").mkdir(parents=True)
    (v1 / "big").write_bytes(_rand(400_000, 1))
    (v1 / "d" / "grows").write_bytes(_rand(50_000, 2))
    (v1 / "same").write_bytes(_rand(30_000, 3))
    (v1 / "holes").write_bytes(_rand(200_000, 4))
    (v1 / "old-name").write_bytes(_rand(20_000, 5))
    subprocess.run(["cp", "-a", str(v1), str(base / "v2")], check=True)
    _change(base / "v2")
    return v1, base / "v2"


def _change(tree: Path) -> None:
    """A changed file, a grown file, a new file, a hole punched, a rename."""
    with open(tree / "big", "r+b") as f:
        f.seek(100_000)
        f.write(_rand(5000, 6))
    with open(tree / "d" / "grows", "ab") as f:
        f.write(_rand(10_000, 7))
    (tree / "new").write_bytes(_rand(70_000, 8))
    subprocess.run(["fallocate", "--punch-hole", "-o", "65536", "-l", "65536",
                    str(tree / "holes")], check=True)
    (tree / "old-name").rename(tree / "d" / "new-name")


def _changed_paths(records: list[object]) -> set[bytes]:
    return {r.path for r in records if isinstance(r, UpdateExtent)}


@pytest.mark.btrfs
def test_no_data_names_what_the_kernel_names(btrfs_ws: Workspace) -> None:
    base = btrfs_ws.fresh("nodata")
    v1, v2 = _trees(base)
    ours = base / "ours.s"
    assert main(["send", "-q", "--no-data", "-p", str(v1), str(v2), "-f", str(ours)]) == 0
    recs = read_all(ours)
    assert not [r for r in recs if isinstance(r, (Write, EncodedWrite))]
    progs_dump_ok(ours)  # btrfs-progs reads it
    # the kernel's --no-data stream of the same change, made on btrfs snapshots
    subprocess.run(["btrfs", "-q", "subvolume", "create", str(base / "w")], check=True)
    subprocess.run(["cp", "-a", f"{v1}/.", str(base / "w")], check=True)
    subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(base / "w"),
                    str(base / "A")], check=True)
    _change(base / "w")
    subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(base / "w"),
                    str(base / "B")], check=True)
    kernel = base / "kernel.s"
    subprocess.run(["btrfs", "-q", "send", "--no-data", "-p", str(base / "A"), "-f",
                    str(kernel), str(base / "B")], check=True)
    # the kernel orders and names differently (orphans, renames), so compare what changed
    assert _changed_paths(recs) == {b"big", b"d/grows", b"new", b"holes"}
    assert _changed_paths(read_all(kernel)) == _changed_paths(recs)


@pytest.mark.btrfs
def test_no_data_full_stream_is_received_by_the_kernel(btrfs_ws: Workspace) -> None:
    base = btrfs_ws.fresh("nodata-full")
    v1, _ = _trees(base)
    stream = base / "full.s"
    assert main(["send", "-q", "--no-data", str(v1), "-f", str(stream)]) == 0
    recs = read_all(stream)
    assert {r.path for r in recs if isinstance(r, UpdateExtent)} == {
        b"big", b"d/grows", b"same", b"holes", b"old-name"}
    dest = base / "recv"
    dest.mkdir()
    kernel_receive(stream, dest)
    got = {e.path: e for e in tree_manifest(dest / "v1")}
    want = {e.path: e for e in tree_manifest(v1)}
    assert got.keys() == want.keys()  # every name, with its type, owner and mode; no data
    for path, e in want.items():
        g = got[path]
        assert (g.kind, g.mode, g.uid, g.gid) == (e.kind, e.mode, e.uid, e.gid), path
        if e.kind == "f":
            assert g.size == 0, path


@pytest.mark.btrfs
def test_clone_source_is_cloned_by_the_kernel_receive(btrfs_ws: Workspace) -> None:
    base = btrfs_ws.fresh("clonesrc")
    v1, v2 = _trees(base)
    lib = base / "lib"
    lib.mkdir()
    (lib / "shared.so").write_bytes(_rand(300_000, 9))
    (v2 / "d" / "copy.so").write_bytes((lib / "shared.so").read_bytes())
    streams = {n: base / f"{n}.s" for n in ("lib", "v1", "v2")}
    assert main(["send", "-q", str(lib), "-f", str(streams["lib"])]) == 0
    assert main(["send", "-q", str(v1), "-f", str(streams["v1"])]) == 0
    assert main(["send", "-q", "-p", str(v1), "-c", str(lib), str(v2), "-f",
                 str(streams["v2"])]) == 0
    lib_uuid = next(r for r in read_all(streams["lib"]) if isinstance(r, Subvol)).uuid
    recs = read_all(streams["v2"])
    clones = [r for r in recs if isinstance(r, Clone) and r.path == b"d/copy.so"]
    assert [(c.clone_uuid, c.clone_path, c.length) for c in clones] == [
        (lib_uuid, b"shared.so", 300_000)]
    assert not [r for r in recs if isinstance(r, Write) and r.path == b"d/copy.so"]
    dest = base / "recv"
    dest.mkdir()
    for n in ("lib", "v1", "v2"):
        kernel_receive(streams[n], dest)
    assert_same_tree(v2, dest / "v2")


@pytest.mark.btrfs
def test_clone_source_with_the_new_trees_uuid_is_not_named(btrfs_ws: Workspace) -> None:
    # a copy of NEW has NEW's UUID (the content's): btrfs receive takes a clone from that
    # UUID for one from the subvolume it is receiving (EINVAL, cloning a file onto itself)
    base = btrfs_ws.fresh("clonesame")
    v1, v2 = _trees(base)
    copy = base / "copy"
    subprocess.run(["cp", "-a", str(v2), str(copy)], check=True)
    streams = {n: base / f"{n}.s" for n in ("v1", "copy", "v2")}
    assert main(["send", "-q", str(v1), "-f", str(streams["v1"])]) == 0
    assert main(["send", "-q", str(copy), "-f", str(streams["copy"])]) == 0
    assert main(["send", "-q", "-p", str(v1), "-c", str(copy), str(v2), "-f",
                 str(streams["v2"])]) == 0
    copy_uuid = next(r for r in read_all(streams["copy"]) if isinstance(r, Subvol)).uuid
    recs = read_all(streams["v2"])
    assert getattr(recs[1], "uuid", None) == copy_uuid  # the premise
    assert not [r for r in recs if isinstance(r, Clone) and r.clone_uuid == copy_uuid]
    dest = base / "recv"
    dest.mkdir()
    for n in ("v1", "copy", "v2"):
        kernel_receive(streams[n], dest)
    assert_same_tree(v2, dest / "v2")
