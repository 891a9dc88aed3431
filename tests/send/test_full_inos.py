"""Inode numbers of full sends (btrdelta.send.order.FullInos): stable across releases of a
rebuilt tree, so the fulls of two releases share their content-defined chunks."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from btrdelta.chunk.chunker import ChunkerParams, chunk_digest, iter_chunks
from btrdelta.send import TreeScan, send_records
from btrdelta.send.order import INO_SPACE, FullInos
from btrdelta.stream.records import Link, Mkdir, Mkfile, Symlink
from btrdelta.tree.treesum import tree_sum
from btrdelta.update.streams import write_release_stream

from .conftest import Workspace

#: the repository's chunker at a quarter of its default average: more chunks, a sharper test
PARAMS = ChunkerParams.from_avg(16 << 10)


def test_a_number_follows_the_path() -> None:
    """The same path has the same number in every send; numbers are unique, above 256 and
    below 2**63, also past the table's growth."""
    paths = [b"d%d/f%d" % (i // 100, i) for i in range(20_000)]
    a, b = FullInos(), FullInos()
    first = [a.number(p) for p in paths]
    assert len(set(first)) == len(first)
    assert all(257 <= n < 1 << 63 for n in first)
    assert INO_SPACE == (1 << 63) - 257
    # another tree: a path added first, the rest shifted in the walk, same numbers
    b.number(b"0-added")
    assert [b.number(p) for p in paths] == first


def test_a_clash_takes_the_next_free_number() -> None:
    """In a small space every number is used once; the walk order decides who keeps a
    number (the same order, the same numbers); a clash of the low 32 bits counts too."""
    paths = [b"f%d" % i for i in range(1000)]
    inos = FullInos(space=1000)
    numbers = [inos.number(p) for p in paths]
    assert sorted(numbers) == list(range(257, 1257))
    assert numbers[0] == FullInos(space=1000).number(paths[0])  # the first keeps its own
    again = FullInos(space=1000)
    assert [again.number(p) for p in paths] == numbers
    wide = FullInos(space=(1 << 32) + 10)
    wide._hash = {b"a": 0, b"b": 1 << 32, b"c": 1}.__getitem__
    assert [wide.number(p) for p in (b"a", b"b", b"c")] == [257, 258 + (1 << 32), 259]


def _tree(root: Path, rng: random.Random) -> None:
    """400 small files of random bytes (~3 MiB) in 8 directories, a hard link, a symlink."""
    for i in range(400):
        d = root / f"d{i % 8}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:03d}").write_bytes(rng.randbytes(rng.randrange(2000, 14000)))
    os.link(root / "d1" / "f001", root / "d7" / "link")
    os.symlink("d2/f002", root / "d3" / "sym")


def _settle_times(root: Path) -> None:
    """Every entry's times the same fixed value: the same stream bytes in every run."""
    for d, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            os.utime(os.path.join(d, name), ns=(_TIME, _TIME), follow_symlinks=False)
    os.utime(root, ns=(_TIME, _TIME))


_TIME = 1_700_000_000 * 10**9


def _creates(tree: Path, **kw: object) -> list[tuple[bytes, int]]:
    return [(r.path, r.ino) if not isinstance(r, Link) else (r.path, 0)
            for r in send_records(tree, version=2, **kw)  # type: ignore[arg-type]
            if isinstance(r, (Mkfile, Mkdir, Symlink, Link))]


def test_the_streamed_full_and_the_whole_tree_full_number_alike(tmp_path: Path) -> None:
    """A full made directory by directory and one made from a whole scan (``send
    --record``'s) name the same inodes by the same numbers."""
    tree = tmp_path / "t"
    _tree(tree, random.Random(5))
    assert _creates(tree) == _creates(tree, scan=TreeScan(tree))


def _chunks(stream: bytes) -> set[bytes]:
    return {chunk_digest(data) for _off, data in iter_chunks(stream, PARAMS)}


def _new_chunks(a: bytes, b: bytes) -> int:
    """How many of ``b``'s chunks ``a`` lacks."""
    return len(_chunks(b) - _chunks(a))


@pytest.mark.btrfs
def test_a_file_added_early_changes_few_chunks(btrfs_ws: Workspace, tmp_path: Path) -> None:
    """Release B is release A rebuilt (copied afresh) with a file added first in the walk.
    Our full of B (``repo add``'s stream) shares all but a few chunks with our full of A, as
    the kernel's fulls of two snapshots of one subvolume do (the oracle: ours 1 new chunk of
    161, the kernel's 2); numbering inodes in walk order changed every chunk after the new
    file (151). Every time is fixed: the same chunks in every run. ``btrfs receive`` takes
    both streams, the trees equal."""
    base = btrfs_ws.fresh("inos")
    a, b = base / "a", base / "b"
    _tree(a, random.Random(7))
    _settle_times(a)
    subprocess.run(["cp", "-a", str(a), str(b)], check=True)  # rebuilt: new inode numbers
    (b / "0-added").write_bytes(b"1.2.3\n")
    _settle_times(b)
    ours = []
    for tree in (a, b):
        out = tmp_path / f"{tree.name}.stream"
        with open(out, "wb") as f:
            write_release_stream(f.write, tree, "r", tree_sum(tree))
        ours.append(out.read_bytes())
        dest = base / f"recv-{tree.name}"
        dest.mkdir()
        subprocess.run(["btrfs", "receive", "-f", str(out), str(dest)], check=True,
                       capture_output=True)
        assert tree_sum(dest / "r") == tree_sum(tree)
    again: list[bytes] = []
    write_release_stream(again.append, a, "r", tree_sum(a))
    assert b"".join(again) == ours[0]  # an unchanged tree: the same bytes
    # the kernel: A in a subvolume, snapshotted; the file added, snapshotted again
    sub = base / "sub"
    subprocess.run(["btrfs", "-q", "subvolume", "create", str(sub)], check=True)
    subprocess.run(["cp", "-a", f"{a}/.", str(sub)], check=True)
    kernel = []
    for tag in ("ka", "kb"):
        if tag == "kb":
            (sub / "0-added").write_bytes(b"1.2.3\n")
            for path in (sub / "0-added", sub):  # (a utime of all would change ctimes)
                os.utime(path, ns=(_TIME, _TIME))
        snap = base / tag
        subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(sub), str(snap)],
                       check=True)
        kernel.append(subprocess.run(["btrfs", "send", "-q", "--proto", "2", str(snap)],
                                     check=True, capture_output=True).stdout)
    total = len(_chunks(ours[1]))
    new, kernel_new = _new_chunks(*ours), _new_chunks(*kernel)
    assert total > 100, total
    assert new <= kernel_new, (new, kernel_new, total)
    assert new <= 2, (new, total)  # the first chunk (SUBVOL, the new file; 1 here), one more
