"""What an incremental stream contains: renames for moves, only changed blocks, clones for
duplicated content, compressed extents that the kernel stores compressed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import zstandard

from btrdelta.send import send_records
from btrdelta.stream.records import (
    Clone,
    EncodedWrite,
    Mkfile,
    Rename,
    Snapshot,
    Subvol,
    Write,
)
from btrdelta.testing.scenarios import kernel_receive
from tests.send.conftest import Workspace, make_stream
from tests.send.test_scenarios import assert_same_tree, userspace_receive


def _rand(n: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def _pair(base: Path) -> tuple[Path, Path]:
    old = base / "old"
    old.mkdir()
    (old / "dir").mkdir()
    (old / "big.bin").write_bytes(_rand(1 << 20, 1))
    (old / "dir" / "other.bin").write_bytes(_rand(300_000, 2))
    (old / "small").write_bytes(b"small\n")
    subprocess.run(["cp", "-a", str(old), str(base / "new")], check=True)
    return old, base / "new"


def _roundtrip(base: Path, old: Path, new: Path, **kw: object) -> None:
    full = make_stream(base / "full.s", old, **kw)
    incr = make_stream(base / "incr.s", new, old, **kw)
    dest = base / "recv"
    dest.mkdir()
    kernel_receive(full, dest)
    kernel_receive(incr, dest)
    assert_same_tree(new, dest / "new")


@pytest.mark.btrfs
def test_move_is_a_rename(btrfs_ws: Workspace) -> None:
    base = btrfs_ws.fresh("mv")
    old, new = _pair(base)
    os.rename(new / "big.bin", new / "dir" / "moved.bin")
    os.rename(new / "dir", new / "dir2")
    recs = list(send_records(new, old))
    assert not [r for r in recs if isinstance(r, (Write, Clone, Mkfile))]
    assert {(r.path, r.path_to) for r in recs if isinstance(r, Rename)} == {
        (b"big.bin", b"dir/moved.bin"), (b"dir", b"dir2")
    } or len([r for r in recs if isinstance(r, Rename)]) == 2
    _roundtrip(base, old, new)


@pytest.mark.btrfs
def test_changed_block_only(btrfs_ws: Workspace) -> None:
    base = btrfs_ws.fresh("blk")
    old, new = _pair(base)
    with open(new / "big.bin", "r+b") as f:
        f.seek(5 * 4096 + 100)
        f.write(b"changed")
    recs = list(send_records(new, old, version=2))
    writes = [r for r in recs if isinstance(r, Write)]
    assert [(w.path, w.offset, len(w.data)) for w in writes] == [(b"big.bin", 5 * 4096, 4096)]
    _roundtrip(base, old, new, version=2)


@pytest.mark.btrfs
def test_duplicates_become_clones(btrfs_ws: Workspace) -> None:
    base = btrfs_ws.fresh("dup")
    old, new = _pair(base)
    shutil.copyfile(new / "big.bin", new / "copy-of-old-big")  # only in the parent...
    with open(new / "big.bin", "r+b") as f:  # ...once big.bin changes in place
        f.write(b"changed")
    shutil.copyfile(new / "dir" / "other.bin", new / "copy-of-other")
    (new / "fresh").write_bytes(_rand(200_000, 9))
    shutil.copyfile(new / "fresh", new / "zz-copy-of-fresh")  # sent earlier in this stream
    recs = list(send_records(new, old))
    head = recs[0]
    assert isinstance(head, Snapshot)
    clones = {r.path: r for r in recs if isinstance(r, Clone)}
    assert set(clones) == {b"copy-of-old-big", b"copy-of-other", b"zz-copy-of-fresh"}
    assert clones[b"copy-of-old-big"].clone_uuid == head.clone_uuid
    assert clones[b"copy-of-old-big"].clone_path == b"big.bin"
    assert clones[b"copy-of-other"].clone_path == b"dir/other.bin"
    assert clones[b"zz-copy-of-fresh"].clone_uuid == head.uuid
    assert clones[b"zz-copy-of-fresh"].clone_path == b"fresh"
    data = sum(len(r.data) for r in recs if isinstance(r, Write))
    assert data == 200_000 + 4096
    _roundtrip(base, old, new)


def _encoded_extents(path: Path) -> int:
    out = subprocess.run(["filefrag", "-v", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return sum(1 for line in out.splitlines() if "encoded" in line)


@pytest.mark.btrfs
@pytest.mark.parametrize("algo", ["zstd", "zlib"])
def test_encoded_writes_land_compressed(btrfs_ws: Workspace, algo: str) -> None:
    base = btrfs_ws.fresh(f"enc-{algo}")
    tree = base / "tree"
    tree.mkdir()
    text = b"".join(b"line %d of some compressible text\n" % i for i in range(20000))
    (tree / "text").write_bytes(text)  # 600 KB, unaligned EOF
    (tree / "random").write_bytes(_rand(200_000, 3))  # incompressible: plain writes
    recs = list(send_records(tree, version=2, compress=algo))
    assert isinstance(recs[0], Subvol)
    enc = [r for r in recs if isinstance(r, EncodedWrite)]
    assert enc
    assert all(r.path == b"text" for r in enc)
    for r in enc:
        assert len(r.data) % 4096 == 0
        assert r.offset % 4096 == 0
        assert r.unencoded_len <= 128 * 1024
        assert r.unencoded_len == -(-r.unencoded_file_len // 4096) * 4096
        if algo == "zstd":
            params = zstandard.get_frame_parameters(bytes(r.data))
            assert params.window_size <= 1 << 17
            assert r.compression == 2
        else:
            assert bytes(r.data[:1]) == b"\x78"
            assert r.compression == 1
    assert sum(r.unencoded_file_len for r in enc) == len(text)
    assert [r.path for r in recs if isinstance(r, Write)] == [b"random"] * 2
    stream = make_stream(base / "s", tree, version=2, compress=algo)
    assert stream.stat().st_size < len(text) // 4 + 220_000
    dest = base / "recv"
    dest.mkdir()
    kernel_receive(stream, dest)
    assert_same_tree(tree, dest / "tree")
    # the kernel stored our bytes as compressed extents (BTRFS_IOC_ENCODED_WRITE)
    assert _encoded_extents(dest / "tree" / "text") >= len(enc) // 2
    assert _encoded_extents(dest / "tree" / "random") == 0


@pytest.mark.btrfs
@pytest.mark.parametrize("version", [1, 2])
def test_shifted_data_is_cloned_from_the_old_version(
    btrfs_ws: Workspace, tmp_path: Path, version: int
) -> None:
    """Inserting whole blocks shifts the rest of a file: the shifted part is cloned from the
    old version (block-aligned partial clones), not resent; kernel and userspace receive."""
    base = btrfs_ws.fresh(f"shift{version}")
    old, new = _pair(base)
    data = (old / "big.bin").read_bytes()
    inserted = _rand(3 * 4096, 5)
    (new / "big.bin").write_bytes(data[:100_000] + inserted + data[100_000:])
    other = (old / "dir" / "other.bin").read_bytes()  # unaligned insert: cannot be cloned
    (new / "dir" / "other.bin").write_bytes(other[:5000] + b"x" * 100 + other[5000:])
    recs = list(send_records(new, old, version=version))
    head = recs[0]
    assert isinstance(head, Snapshot)
    clones = [r for r in recs if isinstance(r, Clone)]
    assert clones
    assert {c.path for c in clones} == {b"big.bin"}
    for c in clones:
        assert c.clone_uuid == head.clone_uuid
        assert c.clone_path == b"big.bin"
        assert c.offset % 4096 == 0
        assert c.clone_offset % 4096 == 0
        assert c.length % 4096 == 0
        assert c.offset - c.clone_offset == len(inserted)
    cloned = sum(c.length for c in clones)
    assert cloned > len(data) - 100_000 - 64 * 1024
    big_written = sum(len(r.data) for r in recs if isinstance(r, Write) and r.path == b"big.bin")
    assert big_written < len(inserted) + 64 * 1024
    _roundtrip(base, old, new, version=version)
    plain = tmp_path / "plain"
    plain.mkdir()
    userspace_receive(base / "full.s", plain)
    userspace_receive(base / "incr.s", plain)
    assert_same_tree(new, plain / "new")


@pytest.mark.btrfs
def test_new_file_pieces_cloned_from_old_file_of_same_name(
    btrfs_ws: Workspace, tmp_path: Path
) -> None:
    """A new file that holds most of an old file with the same name (grown by an append, or
    with whole blocks inserted) clones those parts from the old file."""
    base = btrfs_ws.fresh("xfile")
    old, new = _pair(base)
    data = (old / "big.bin").read_bytes()
    (new / "dir" / "big.bin").write_bytes(data + b"appended" * 600)  # shift 0
    (new / "v2").mkdir()
    (new / "v2" / "big.bin").write_bytes(_rand(8192, 6) + data[: 600_000])  # shift 8 KiB
    recs = list(send_records(new, old, version=2))
    head = recs[0]
    assert isinstance(head, Snapshot)
    clones = [r for r in recs if isinstance(r, Clone)]
    by_path: dict[bytes, int] = {}
    for c in clones:
        assert c.clone_uuid == head.clone_uuid
        assert c.clone_path == b"big.bin"
        assert c.offset % 4096 == 0
        assert c.clone_offset % 4096 == 0
        assert c.length % 4096 == 0
        by_path[c.path] = by_path.get(c.path, 0) + c.length
    assert by_path[b"dir/big.bin"] > len(data) - 64 * 1024
    assert by_path[b"v2/big.bin"] > 600_000 - 64 * 1024
    written = sum(len(r.data) for r in recs if isinstance(r, Write))
    assert written < 4 * 64 * 1024
    _roundtrip(base, old, new, version=2)
    plain = tmp_path / "plain"
    plain.mkdir()
    userspace_receive(base / "full.s", plain)
    userspace_receive(base / "incr.s", plain)
    assert_same_tree(new, plain / "new")
