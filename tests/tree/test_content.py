"""tree-sum-3's content digest (:mod:`btrdelta.tree.content`) against a plain reference
implementation of its definition (docs/formats/tree-sum.md), over small files read whole;
and in time proportional to data on the real kernel's btrfs, ext4 and tmpfs."""

from __future__ import annotations

import os
import random
import resource
import struct
import subprocess
import sys
import threading
from pathlib import Path

import blake3
import pytest

from btrdelta.tree.content import ContentDigest, Stopped, content_digest, file_content_digest
from btrdelta.tree.treesum import tree_manifest, tree_sum
from tests.conftest import HUGE_PIECES, TIB, btrfs_loop, huge_sparse_tree

B = 4096


def reference(content: bytes) -> bytes:
    """The definition, block by block: no SEEK_DATA, no find, no streaming."""
    items: list[tuple[str, int | bytes]] = []
    for i in range(0, len(content), B):
        block = content[i:i + B]
        kind = "z" if block == bytes(len(block)) else "d"
        if items and items[-1][0] == kind:
            prev = items[-1][1]
            items[-1] = (kind, prev + 1 if kind == "z" else prev + block)  # type: ignore[operator]
        else:
            items.append((kind, 1 if kind == "z" else block))
    out = b"tree-sum-3 content\0"
    for kind, v in items:
        if kind == "z":
            out += b"\0" + struct.pack("<Q", v)
        else:
            assert isinstance(v, bytes)
            out += b"\1" + struct.pack("<Q", len(v)) + blake3.blake3(v).digest()
    return blake3.blake3(out + struct.pack("<Q", len(content))).digest()


def _cases() -> dict[str, bytes]:
    rnd = random.Random(7)
    data = bytes(rnd.getrandbits(8) for _ in range(3 * B))
    return {
        "empty": b"",
        "one byte": b"x",
        "one zero": b"\0",
        "a partial block of zeros": bytes(100),
        "zeros then a partial tail": bytes(2 * B) + b"tail",
        "data then a zero partial tail": data + bytes(17),
        "a zero block inside data": data[:B] + bytes(B) + data[B:],
        "zeros not on a block edge": data[:100] + bytes(2 * B) + data[100:],
        "zeros that nearly fill a block": data[:B] + bytes(B - 1) + b"\1" + data[B:],
        "blocks alternating": b"".join((data[:B], bytes(B)) * 5),
        "only zeros": bytes(5 * B),
        "64 zeros mid-block": data[:B + 10] + bytes(200) + data[B + 10:],
        "many blocks of every kind": _many(rnd),
    }


def _many(rnd: random.Random) -> bytes:
    """Over 16 blocks (the strided search): zero blocks, blocks starting with 8 zeros or
    more, first words ending and starting with zeros (a run of 8 across two words)."""
    kinds = [
        lambda: bytes(B),
        lambda: rnd.randbytes(B),
        lambda: bytes(8) + rnd.randbytes(B - 8),
        lambda: bytes(B - 1) + b"\1",
        lambda: b"\1" + bytes(B - 1),
        lambda: b"\1" + bytes(7) + rnd.randbytes(B - 8),
        lambda: bytes(7) + b"\1" + rnd.randbytes(B - 8),
    ]
    return b"".join(rnd.choice(kinds)() for _ in range(60)) + bytes(B) * 3 + b"\1\2"


@pytest.mark.parametrize("name", sorted(_cases()))
def test_digest_matches_the_reference_fed_any_way(name: str) -> None:
    content = _cases()[name]
    want = reference(content)
    rnd = random.Random(name)
    for _ in range(20):  # random pieces, zeros given as holes where they are zeros
        h = ContentDigest()
        pos = 0
        while pos < len(content):
            n = rnd.choice((1, 17, B - 1, B, B + 1, 3 * B, len(content)))
            piece = content[pos:pos + n]
            if piece.count(0) == len(piece) and rnd.random() < 0.7:
                h.zeros(len(piece))
            else:
                h.update(piece)
            pos += len(piece)
        assert h.digest(len(content)) == want
    assert content_digest(content) == want


def test_content_not_fed_is_zeros_and_too_much_is_refused() -> None:
    h = ContentDigest()
    h.update(b"12345")
    assert h.digest(2 * B + 1) == reference(b"12345" + bytes(2 * B - 4))
    h = ContentDigest()
    h.update(b"12345")
    with pytest.raises(ValueError, match="fed 5"):
        h.digest(4)


def _write(path: Path, content: bytes, holes: bool) -> None:
    """``content`` into ``path``: every whole zero block as a hole (``holes``) or written."""
    with open(path, "wb") as f:
        for i in range(0, len(content), B):
            block = content[i:i + B]
            if holes and block == bytes(len(block)) and len(block) == B:
                continue
            f.seek(i)
            f.write(block)
        f.truncate(len(content))


def test_files_hash_as_their_content_holes_or_written_zeros(where: Path) -> None:
    """A hole and written zeros hash alike; every case as the reference says; and the
    tree-sum-3 of two trees differing only in layout is one sum (tree-sum-2 likewise),
    the two formats' sums differ."""
    trees = where / "holes", where / "zeros"
    for tree, holes in zip(trees, (True, False), strict=True):
        tree.mkdir()
        for i, (_name, content) in enumerate(sorted(_cases().items())):
            _write(tree / f"f{i}", content, holes)
            fd = os.open(tree / f"f{i}", os.O_RDONLY)
            try:
                assert file_content_digest(fd, len(content)) == reference(content), _name
            finally:
                os.close(fd)
            os.utime(tree / f"f{i}", ns=(0, 0))
        os.utime(tree, ns=(0, 0))
    sums3 = [tree_sum(t, version=3) for t in trees]
    assert sums3[0] == sums3[1]
    assert tree_sum(trees[0], version=2) == tree_sum(trees[1], version=2) != sums3[0]
    entries = {e.path: e.digest for e in tree_manifest(trees[0], version=3)}
    for i, (_name, content) in enumerate(sorted(_cases().items())):
        assert entries[f"f{i}".encode()] == reference(content).hex()


def test_a_tree_without_files_has_two_sums(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    os.symlink("x", tmp_path / "l")
    assert tree_sum(tmp_path, version=2) != tree_sum(tmp_path, version=3)
    with pytest.raises(ValueError, match="no tree-sum format 4"):
        tree_sum(tmp_path, version=4)


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _expect_huge() -> bytes:
    """vm.img's digest by the definition, its runs of zero blocks counted by hand."""
    size = TIB + 105
    d1 = blake3.blake3(HUGE_PIECES[0][1]).digest()
    d2 = blake3.blake3(HUGE_PIECES[1][1]).digest()
    tail = bytes(100) + b"tail!"  # the last, partial block
    out = b"tree-sum-3 content\0"
    out += b"\1" + struct.pack("<Q", B) + d1
    out += b"\0" + struct.pack("<Q", (300 << 30) // B - 1)
    out += b"\1" + struct.pack("<Q", 65536) + d2
    out += b"\0" + struct.pack("<Q", (TIB - (300 << 30) - 65536) // B)
    out += b"\1" + struct.pack("<Q", len(tail)) + blake3.blake3(tail).digest()
    return blake3.blake3(out + struct.pack("<Q", size)).digest()


def _check_huge(tree: Path) -> None:
    cpu = _cpu()
    got = {e.path: e.digest for e in tree_manifest(tree, version=3)}
    assert _cpu() - cpu < 5  # tree-sum-2: ~3 min of CPU for the TiB
    assert got[b"vm.img"] == _expect_huge().hex()
    assert got[b"prealloc"] == reference(bytes(256 << 20)).hex()


def test_a_1tib_sparse_file_in_seconds(where: Path) -> None:
    huge_sparse_tree(where / "t")
    _check_huge(where / "t")


@pytest.mark.btrfs
def test_a_1tib_sparse_file_in_seconds_on_btrfs() -> None:
    with btrfs_loop(size="1G") as mnt:
        huge_sparse_tree(mnt / "t")
        subprocess.run(["sync", "-f", str(mnt)], check=True)
        _check_huge(mnt / "t")


def test_cli_format_3_and_a_stop(tmp_path: Path) -> None:
    """``tree-sum --format 3`` prints tree-sum-3's sum; a set stop event ends the hashing."""
    (tmp_path / "t").mkdir()
    content = os.urandom(3 * B) + bytes(4 * B)
    _write(tmp_path / "t" / "f", content, True)
    for fmt in (2, 3):
        proc = subprocess.run([sys.executable, "-m", "btrdelta", "tree-sum", "--format",
                               str(fmt), str(tmp_path / "t")],
                              capture_output=True, timeout=60, check=True)
        assert proc.stdout.split()[0].decode() == tree_sum(tmp_path / "t", version=fmt)
    stop = threading.Event()
    stop.set()
    fd = os.open(tmp_path / "t" / "f", os.O_RDONLY)
    try:
        with pytest.raises(Stopped):
            file_content_digest(fd, len(content), stop)
    finally:
        os.close(fd)


def test_random_contents_match_the_reference() -> None:
    """Contents made of random blocks (zeros, data, data with runs of zeros, shorter
    last blocks), fed in random pieces."""
    rnd = random.Random(11)
    for _ in range(60):
        parts = []
        for _ in range(rnd.randrange(0, 40)):
            kind = rnd.randrange(4)
            if kind == 0:
                parts.append(bytes(B * rnd.randrange(1, 4)))
            elif kind == 1:
                parts.append(rnd.randbytes(B))
            elif kind == 2:
                k = rnd.randrange(64, B)
                parts.append(rnd.randbytes(B - k) + bytes(k))
            else:
                parts.append(bytes(rnd.randrange(0, 300)))
        content = b"".join(parts)[:rnd.randrange(0, 40 * B)]
        h = ContentDigest()
        pos = 0
        while pos < len(content):
            n = rnd.randrange(1, 30 * B)
            piece = content[pos:pos + n]
            if piece.count(0) == len(piece) and rnd.random() < 0.5:
                h.zeros(len(piece))
            else:  # (a send feeds views of a reused buffer)
                h.update(memoryview(piece) if rnd.random() < 0.5 else piece)
            pos += len(piece)
        assert h.digest(len(content)) == reference(content)
        assert content_digest(content) == reference(content)
