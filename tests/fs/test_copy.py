"""Copies and holes: data segments found with SEEK_DATA/SEEK_HOLE, ranges copied in the
kernel with the source's hole layout, trees copied with ``cp -a --reflink=auto``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from btrdelta.errors import ApplyError
from btrdelta.fs.content import data_segments
from btrdelta.fs.copy import copy_range, copy_tree, write_zeros

_BLOCK = 1 << 16  # larger than any filesystem block: holes are kept as holes


def _sparse(path: Path, pieces: list[tuple[int, bytes]], size: int) -> None:
    with open(path, "wb") as f:
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
        f.truncate(size)


def _segments(path: Path) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return data_segments(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _holes_supported(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    _sparse(probe, [(4 * _BLOCK, b"x")], 8 * _BLOCK)
    if _segments(probe) == [(0, 8 * _BLOCK)]:
        pytest.skip("this filesystem does not report holes")


def test_data_segments(tmp_path: Path) -> None:
    _holes_supported(tmp_path)
    f = tmp_path / "f"
    _sparse(f, [(0, b"a" * _BLOCK), (3 * _BLOCK, b"b" * _BLOCK)], 6 * _BLOCK)
    assert _segments(f) == [(0, _BLOCK), (3 * _BLOCK, _BLOCK)]
    fd = os.open(f, os.O_RDONLY)
    try:
        assert data_segments(fd, _BLOCK // 2) == [(0, _BLOCK // 2)]  # cut at ``size``
        assert data_segments(fd, 0) == []
    finally:
        os.close(fd)
    (tmp_path / "empty").write_bytes(b"")
    assert _segments(tmp_path / "empty") == []


@pytest.mark.parametrize(("pieces", "size", "want", "lseeks"), [
    ([(0, 3)], 3, [(0, 3)], 1),  # no hole: one lseek
    ([(0, 1)], 3, [(0, 1)], 2),  # a hole at the end
    ([(2, 1)], 3, [(2, 1)], 3),  # a hole first
    ([(0, 1), (2, 1)], 3, [(0, 1), (2, 1)], 3),
    ([], 3, [], 2),  # all hole
])
def test_data_segments_layouts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pieces: list[tuple[int, int]], size: int,
    want: list[tuple[int, int]], lseeks: int,
) -> None:
    """Every layout of data and holes (in blocks), and how many ``lseek`` calls it takes."""
    _holes_supported(tmp_path)
    f = tmp_path / "f"
    _sparse(f, [(at * _BLOCK, b"d" * n * _BLOCK) for at, n in pieces], size * _BLOCK)
    calls: list[int] = []
    lseek = os.lseek

    def counted(fd: int, pos: int, how: int) -> int:
        calls.append(how)
        return lseek(fd, pos, how)

    monkeypatch.setattr(os, "lseek", counted)
    assert _segments(f) == [(at * _BLOCK, n * _BLOCK) for at, n in want]
    assert len(calls) == lseeks
    fd = os.open(f, os.O_RDONLY)
    try:  # asked beyond its end: the same ranges
        assert data_segments(fd, 2 * size * _BLOCK) == [(at * _BLOCK, n * _BLOCK)
                                                         for at, n in want]
    finally:
        os.close(fd)


def test_copy_range_keeps_holes(tmp_path: Path) -> None:
    _holes_supported(tmp_path)
    src, dst = tmp_path / "src", tmp_path / "dst"
    _sparse(src, [(_BLOCK, b"a" * _BLOCK), (4 * _BLOCK, b"b" * _BLOCK)], 6 * _BLOCK)
    dst.write_bytes(b"z" * 8 * _BLOCK)  # data everywhere: holes must be punched
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_RDWR)
    try:
        copy_range(sfd, 0, dfd, _BLOCK, 6 * _BLOCK)
    finally:
        os.close(sfd)
        os.close(dfd)
    want = b"z" * _BLOCK + src.read_bytes() + b"z" * _BLOCK
    assert dst.read_bytes() == want
    # the source's holes at 0, 2..4 and 5..6 blocks, shifted by one block
    assert _segments(dst) == [(0, _BLOCK), (2 * _BLOCK, _BLOCK), (5 * _BLOCK, _BLOCK),
                              (7 * _BLOCK, _BLOCK)]


def test_copy_range_past_the_end_extends(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _sparse(src, [(0, b"a" * 100)], 3 * _BLOCK)  # data, then a hole to the end
    dst.write_bytes(b"")
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_RDWR)
    try:
        copy_range(sfd, 0, dfd, 10, 3 * _BLOCK)
        write_zeros(dfd, 0, 10)
    finally:
        os.close(sfd)
        os.close(dfd)
    assert dst.read_bytes() == bytes(10) + src.read_bytes()


def test_copy_tree(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"f" * 5000)
    os.link(src / "d" / "f", src / "hard")
    (src / "l").symlink_to("d/f")
    os.utime(src / "d" / "f", ns=(10**18, 10**18))
    copy_tree(src, tmp_path / "dst")
    dst = tmp_path / "dst"
    assert (dst / "d" / "f").read_bytes() == b"f" * 5000
    assert os.stat(dst / "hard").st_ino == os.stat(dst / "d" / "f").st_ino
    assert os.readlink(dst / "l") == "d/f"
    assert os.stat(dst / "d" / "f").st_mtime_ns == 10**18
    with pytest.raises(ApplyError, match="copying parent"):
        copy_tree(tmp_path / "missing", tmp_path / "dst2")
    assert not (tmp_path / "dst2").exists()


def test_copy_tree_keeps_the_layout_of_holes_and_written_zeros(tmp_path: Path) -> None:
    """A sparse file with a block of written zeros and an xattr block of its own (ext4: its
    block count then reaches its size, and ``cp --sparse=auto`` takes it for dense): the copy
    has the source's data ranges and holes, and its mtime."""
    src = tmp_path / "src"
    src.mkdir()
    f = src / "f"
    with open(f, "wb") as out:
        out.write(b"x" * 4096)       # data
        out.seek(8192)
        out.write(bytes(4096))       # written zeros: data, not a hole
        out.truncate(16384)          # a hole at the end
    os.setxattr(f, "user.a", b"v" * 3000)
    os.utime(f, ns=(1, 1_500_000_000_000_000_001))
    dst = tmp_path / "dst"
    copy_tree(src, dst)
    with open(f, "rb") as a, open(dst / "f", "rb") as b:
        want = data_segments(a.fileno(), 16384)
        assert data_segments(b.fileno(), 16384) == want
    assert want == [(0, 4096), (8192, 4096)]
    assert (dst / "f").read_bytes() == f.read_bytes()
    assert os.stat(dst / "f").st_mtime_ns == 1_500_000_000_000_000_001


def test_copy_tree_keeps_a_hole_that_ends_inside_a_block(tmp_path: Path) -> None:
    """A file smaller than a block with no data (truncated to 119 bytes), and one whose last,
    partial block is a hole: cp writes the small one's block, and a hole punched up to the
    size (not to the block's end) kept it; found by `make randwork` (seed 44: the ext4 copy
    of the parent had data where btrfs receive has none)."""
    src = tmp_path / "src"
    src.mkdir()
    _sparse(src / "small", [], 119)
    _sparse(src / "tail", [(0, b"x" * 4096)], 4096 + 119)
    dst = tmp_path / "dst"
    copy_tree(src, dst)
    for name in ("small", "tail"):
        want = _segments(src / name)
        assert _segments(dst / name) == want, name
        assert (dst / name).read_bytes() == (src / name).read_bytes()
    assert _segments(src / "small") == []


def test_copy_range_of_a_hole_over_the_end_leaves_no_block(tmp_path: Path) -> None:
    """A hole copied over a file's end inside a block (a CLONE of a hole range past the
    destination's size, copied where no reflink can be made): the block that held the end
    is freed, as a reflink of the hole leaves it; a punch that stopped at the size kept it
    (found by `make randwork`, seed 22: the ext4 receive had a data block btrfs's has not)."""
    _holes_supported(tmp_path)
    src, dst = tmp_path / "src", tmp_path / "dst"
    _sparse(src, [(0, b"a" * 4096)], 400_000)  # a hole from 4096 on
    dst.write_bytes(b"z" * 102_000)  # its last block holds 3,696 bytes
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_RDWR)
    try:
        copy_range(sfd, 200_704, dfd, 61_440, 114_688)
    finally:
        os.close(sfd)
        os.close(dfd)
    assert dst.read_bytes() == b"z" * 61_440 + bytes(114_688)
    assert _segments(dst) == [(0, 61_440)]
