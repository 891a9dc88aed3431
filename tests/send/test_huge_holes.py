"""Files of a large apparent size and little data (VM images, preallocated files): a send
does work in proportion to their data, as the kernel's does, not to their size.

The oracle is the kernel: ``btrfs send`` of the same snapshot received by ``btrfs receive``,
compared file by file on what the kernel says is data (``SEEK_DATA``/``SEEK_HOLE``: the data
ranges and their bytes; a 1 TiB file is not read whole). What the send reads is bounded by
the data (``/proc/self/io``'s ``rchar``), and our stream is as small as the kernel's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from btrdelta.fs.content import data_segments
from btrdelta.tree.treesum import tree_sum
from tests.conftest import HUGE_PIECES, huge_sparse_tree

from .conftest import Workspace


def _layout(path: Path) -> tuple[int, list[tuple[int, int]], list[bytes]]:
    """(size, data ranges, their bytes) of a file, by SEEK_DATA/SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        segs = data_segments(fd, size)
        return size, segs, [os.pread(fd, n, off) for off, n in segs]
    finally:
        os.close(fd)


def _same_files(a: Path, b: Path) -> None:
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for name in names:
        sa, sb = _layout(a / name), _layout(b / name)
        assert sa[0] == sb[0], name
        # the same bytes in the data ranges (merged: one side may split a range), and no
        # data where the other has a hole but zeros
        assert b"".join(sa[2]).strip(b"\0") == b"".join(sb[2]).strip(b"\0"), name
        assert sum(n for _o, n in sb[1]) <= sum(n for _o, n in sa[1]) + (1 << 20), name


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


@pytest.mark.btrfs
def test_a_1tib_sparse_file_sends_like_the_kernels(btrfs_ws: Workspace, tmp_path: Path
                                                  ) -> None:
    """Full sends (v1, and v2 with compressed data) of a read-only snapshot holding a 1 TiB
    sparse file, a preallocated and an empty large file: ``btrfs receive`` of ours makes
    what it makes of the kernel's, ``btrdelta receive`` into a plain directory too (holes
    stay holes: its files take only their data's blocks), and the send reads only data."""
    from btrdelta.cli import main

    base = btrfs_ws.fresh("huge")
    sv = base / "sv"
    subprocess.run(["btrfs", "-q", "subvolume", "create", str(sv)], check=True)
    huge_sparse_tree(sv)
    snap = base / "snap"
    subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(sv), str(snap)],
                   check=True)
    kernel_stream = tmp_path / "kernel.stream"
    subprocess.run(["btrfs", "send", "-q", "-f", str(kernel_stream), str(snap)], check=True)
    (base / "k").mkdir()
    subprocess.run(["btrfs", "receive", "-f", str(kernel_stream), str(base / "k")],
                   check=True, capture_output=True)
    data = sum(len(d) for _o, d in HUGE_PIECES)
    for n, flags in enumerate(([], ["--proto", "2", "--compressed-data"])):
        ours = tmp_path / f"ours{n}.stream"
        if not flags:  # in this process: what it reads is bounded by the data
            before = _rchar()
            assert main(["send", str(snap), "-o", str(ours), "-q"]) == 0
            assert _rchar() - before < (16 << 20) + 4 * data
        else:
            subprocess.run([sys.executable, "-m", "btrdelta", "send", str(snap), "-o",
                            str(ours), "-q", *flags], check=True)
        assert ours.stat().st_size < kernel_stream.stat().st_size + 4 * data
        dest = base / f"o{n}"
        dest.mkdir()
        subprocess.run(["btrfs", "receive", "-f", str(ours), str(dest)], check=True,
                       capture_output=True)
        _same_files(base / "k" / "snap", dest / "snap")
        _same_files(snap, dest / "snap")
    plain = tmp_path / "plain"
    plain.mkdir()
    subprocess.run([sys.executable, "-m", "btrdelta", "receive", "-q", "-f",
                    str(tmp_path / "ours0.stream"), str(plain)], check=True)
    _same_files(snap, plain / "snap")
    blocks = sum((plain / "snap" / n).stat().st_blocks for n in os.listdir(plain / "snap"))
    assert blocks * 512 < 4 * data + (1 << 20)
    for d in ("k/snap", "o0/snap", "o1/snap", "snap"):
        subprocess.run(["btrfs", "-q", "subvolume", "delete", str(base / d)], check=True)


def test_record_then_from_sendshot_with_huge_holes(where: Path) -> None:
    """``send --record`` of a tree with files of a few GiB of holes, then a data block
    written inside a hole, a MiB of data punched, a file of holes extended by a GiB:
    ``--from-sendshot`` sends those, and receiving both streams gives the tree (tree-sum,
    BLAKE3 of the whole apparent size: the sizes are kept small for it)."""
    tmp_path = where
    tree, store = tmp_path / "tree", str(tmp_path / "store")
    tree.mkdir()
    with open(tree / "vm.img", "wb") as f:
        f.seek(1 << 30)
        f.write(os.urandom(3 << 20))
        f.truncate(3 << 30)
    with open(tree / "holes", "wb") as f:
        f.truncate(1 << 30)
    run = [sys.executable, "-m", "btrdelta"]
    subprocess.run([*run, "send", str(tree), "-o", str(tmp_path / "full"), "--record",
                    "--store", store, "-q", "--name", "v1"], check=True)
    with open(tree / "vm.img", "r+b") as f:
        f.seek(2 << 30)
        f.write(b"new data" * 512)
    subprocess.run(["fallocate", "--punch-hole", "--offset", str((1 << 30) + (1 << 20)),
                    "--length", str(1 << 20), str(tree / "vm.img")], check=True)
    with open(tree / "holes", "r+b") as f:
        f.truncate(2 << 30)
    inc = tmp_path / "inc"
    subprocess.run([*run, "send", str(tree), "-o", str(inc), "--from-sendshot", "latest",
                    "--record", "--store", store, "-q", "--name", "v2", "--proto", "2"],
                   check=True)  # (v2: the punched MiB is punched; v1 writes its zeros)
    assert inc.stat().st_size < (2 << 20)  # the block written, the punch, the truncate
    dest = tmp_path / "dest"
    dest.mkdir()
    for stream in ("full", "inc"):
        subprocess.run([*run, "receive", "-q", "-f", str(tmp_path / stream), str(dest)],
                       check=True)
    assert tree_sum(dest / "v2") == tree_sum(tree)
    _same_files(tree, dest / "v2")


def test_a_moved_and_copied_sparse_file(tmp_path: Path) -> None:
    """An incremental from plain directories where a 256 GiB sparse file was renamed and
    copied: a ``RENAME`` and a ``CLONE`` from the parent of each of its data ranges (the
    copy confirmed by comparing where either file has data, not by BLAKE3 of 256 GiB of
    zeros: ~3 min; one CLONE of 256 GiB would be one of 0 bytes to btrfs-progs' receive,
    which keeps a length's low 32 bits), no ``WRITE``, the reads bounded by the data."""
    from btrdelta.cli import main
    from btrdelta.stream import StreamReader
    from btrdelta.stream.records import Clone, Rename, Write

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    pieces = [(0, b"\x01" * 4096), (100 << 30, os.urandom(65536)), ((256 << 30) - 5, b"tail!")]
    with open(old / "a.img", "wb") as f:
        for off, data in pieces:
            f.seek(off)
            f.write(data)
    subprocess.run(["cp", "-a", "--sparse=always", str(old), str(new)], check=True)
    os.rename(new / "a.img", new / "b.img")
    subprocess.run(["cp", "-a", "--sparse=always", str(new / "b.img"), str(new / "c.img")],
                   check=True)
    stream = tmp_path / "inc"
    before = _rchar()
    assert main(["send", "-p", str(old), str(new), "-o", str(stream), "-q"]) == 0
    data = sum(len(d) for _o, d in pieces)
    assert _rchar() - before < (16 << 20) + 8 * data
    with open(stream, "rb") as f:
        recs = list(StreamReader(f))
    assert [(r.path, r.path_to) for r in recs if isinstance(r, Rename)] == \
        [(b"a.img", b"b.img")]
    clones = [r for r in recs if isinstance(r, Clone)]
    assert [(c.path, c.clone_path, c.offset, c.length, c.clone_offset) for c in clones] == \
        [(b"c.img", b"a.img", off, n, off)
         for off, n in ((0, 4096), (100 << 30, 65536), ((256 << 30) - 4096, 4096))]
    assert not [r for r in recs if isinstance(r, Write)]


def test_files_equal_reads_only_data_and_sees_every_difference(tmp_path: Path) -> None:
    """``files_equal`` compares where either file has data: written zeros equal a hole,
    a byte in the other's hole or past its end differs, two 64 GiB holes are equal."""
    from btrdelta.send.compare import files_equal

    def make(name: str, size: int, pieces: list[tuple[int, bytes]]) -> bytes:
        with open(tmp_path / name, "wb") as f:
            f.truncate(size)
            for off, data in pieces:
                f.seek(off)
                f.write(data)
        return os.fsencode(tmp_path / name)

    size = 64 << 30
    a = make("a", size, [(1 << 30, b"x" * 5000)])
    zeros = make("zeros", size, [(1 << 30, b"x" * 5000), (5 << 30, bytes(1 << 20))])
    other = make("other", size, [(1 << 30, b"x" * 5000), (7 << 30, b"\0\0y")])
    short = make("short", size - 1, [(1 << 30, b"x" * 5000)])
    last = make("last", size, [(1 << 30, b"x" * 5000), (size - 1, b"z")])
    holes1, holes2 = make("h1", size, []), make("h2", size, [])
    before = _rchar()
    for x, y in ((a, zeros), (zeros, a)):
        assert files_equal(x, y, size)
    for x, y in ((a, other), (a, short), (a, last)):
        assert not files_equal(x, y, size)
        assert not files_equal(y, x, size)
    assert files_equal(holes1, holes2, size)
    assert _rchar() - before < 64 << 20
