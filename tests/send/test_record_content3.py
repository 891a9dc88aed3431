"""The record's per-file content digest (DIGESTS' BLAKE3 part): tree-sum-3's in record
version 4, so ``send --record`` of a huge sparse file costs its data; a record of version 3
(BLAKE3 of the whole content, as every earlier btrdelta wrote) is still a base, and its
lineage keeps its kind of digests. Oracles: a plain reference implementation of the
tree-sum-3 digest (tests/tree/test_content.py), BLAKE3 of each file read whole, the
kernel's ``btrfs receive`` of every stream on top of its base, tree-sum of the result."""

from __future__ import annotations

import os
import resource
import stat
import subprocess
from pathlib import Path

import blake3
import pytest

from btrdelta._value import replace
from btrdelta.cli import main
from btrdelta.send.store import SendshotStore, StoredSendshot
from btrdelta.stream import StreamReader
from btrdelta.stream.records import Clone, Write
from btrdelta.tree.sendshot import VERSION, RecordInode, RecordReader
from btrdelta.tree.treesum import tree_sum
from tests.conftest import HUGE_PIECES
from tests.tree.test_content import _expect_huge, reference

from .conftest import Workspace

pytestmark = pytest.mark.btrfs
B = 4096


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _record(store: Path, digest: str | None = None) -> tuple[StoredSendshot, list[RecordInode]]:
    """The newest record of ``store`` (or the one named), and its inodes."""
    got = SendshotStore(store).records_list()
    rec = got[-1] if digest is None else next(r for r in got if r.digest == digest)
    with open(rec.path, "rb") as f:
        reader = RecordReader(f, source=rec.path)
        inodes = list(reader.inodes())
        assert reader.version == rec.head.version
    return rec, inodes


def _files(tree: Path) -> dict[int, Path]:
    return {os.lstat(p).st_ino: p for p in tree.rglob("*") if p.is_file()}


def _ops(stream: Path) -> list[tuple[str, bytes]]:
    with open(stream, "rb") as f:
        return [(type(r).__name__, r.path) for r in StreamReader(f)
                if isinstance(r, (Write, Clone))]


def _tree(tree: Path) -> None:
    tree.mkdir()
    (tree / "d").mkdir()
    for i in range(6):
        (tree / "d" / f"f{i}").write_bytes(os.urandom(5000 + 3000 * i))
    (tree / "big").write_bytes(os.urandom(3 << 20))
    # zero blocks inside data (written), a shorter last block
    (tree / "zeros").write_bytes(os.urandom(B) + bytes(3 * B) + os.urandom(B + 5))
    (tree / "empty").write_bytes(b"")


def _change(tree: Path) -> None:
    """A file changed, one rewritten with its own content (a new mtime, the same bytes),
    a new file that copies an unchanged one."""
    (tree / "d" / "f1").write_bytes(b"changed" * 1000)
    (tree / "d" / "f2").write_bytes((tree / "d" / "f2").read_bytes())
    os.utime(tree / "d" / "f2", ns=(1, 1))
    (tree / "copy").write_bytes((tree / "big").read_bytes())


def _receive(streams: list[Path], dest: Path) -> None:
    for s in streams:
        subprocess.run(["btrfs", "receive", "-q", "-f", str(s), str(dest)], check=True,
                       capture_output=True)


def _check_sent_changes(stream: Path) -> None:
    ops = _ops(stream)
    assert ("Write", b"d/f1") in ops
    # the same bytes: UTIMES only; the copy: one CLONE of the file it copies, no WRITE
    assert not [p for k, p in ops if k == "Write" and p in (b"d/f2", b"copy")]
    with open(stream, "rb") as f:
        clones = [r for r in StreamReader(f) if isinstance(r, Clone)]
    assert [(c.path, c.clone_path) for c in clones] == [(b"copy", b"big")]


def test_a_record_of_a_1tib_sparse_file_costs_its_data(btrfs_ws: Workspace,
                                                      tmp_path: Path) -> None:
    """``send --record`` of a plain tree holding a 1 TiB file with little data: version 4,
    every file's digest tree-sum-3's (the reference's), within seconds of CPU (BLAKE3 of
    the whole size: ~3 min); then a block written into a hole and ``--from-sendshot``:
    the kernel receives both streams, the result is the tree."""
    tree, store = tmp_path / "tree", tmp_path / "store"
    _tree(tree)
    with open(tree / "vm.img", "wb") as f:
        for off, data in HUGE_PIECES:
            f.seek(off)
            f.write(data)
    full, inc = tmp_path / "full", tmp_path / "inc"
    cpu = _cpu()
    assert main(["send", str(tree), "-o", str(full), "--record", "--store", str(store), "-q",
                 "--name", "v1"]) == 0
    assert _cpu() - cpu < 60
    rec, inodes = _record(store)
    assert rec.head.version == VERSION
    by_ino = _files(tree)
    regs = [n for n in inodes if stat.S_ISREG(n.mode)]
    assert len(regs) == len(by_ino) == 10
    for n in regs:
        path = by_ino[n.ino]
        want = _expect_huge() if path.name == "vm.img" else reference(path.read_bytes())
        assert n.bdigest == want, path
    with open(tree / "vm.img", "r+b") as f:
        f.seek(700 << 30)
        f.write(b"new block" * 455)
    _change(tree)
    cpu = _cpu()
    assert main(["send", str(tree), "-o", str(inc), "--from-sendshot", "latest", "--record",
                 "--store", str(store), "-q", "--name", "v2"]) == 0
    assert _cpu() - cpu < 60
    assert _record(store)[0].head.version == VERSION
    assert ("Write", b"vm.img") in _ops(inc)
    _check_sent_changes(inc)
    dest = btrfs_ws.fresh("c3")
    _receive([full, inc], dest)
    assert tree_sum(dest / "v2", version=3) == tree_sum(tree, version=3)


def _as_version_3(store: Path, tree: Path) -> str:
    """Rewrite the newest record as a version 3 one, as every btrdelta before record
    version 4 wrote it (BLAKE3 of each file's whole content, read here), in place of it."""
    rec, inodes = _record(store)
    by_ino = _files(tree)
    old = [replace(n, bdigest=blake3.blake3(by_ino[n.ino].read_bytes()).digest())
           if stat.S_ISREG(n.mode) else n for n in inodes]
    saved = SendshotStore(store).save(replace(rec.head, version=3), old)
    os.unlink(rec.path)
    return saved.digest


def test_a_version_3_record_is_a_base_and_its_lineage_stays_version_3(
        btrfs_ws: Workspace, tmp_path: Path) -> None:
    """A record of version 3 as the base: unchanged files found unchanged by its BLAKE3
    digests (a file rewritten with its own bytes: no WRITE; a copy of a recorded file: a
    CLONE), the kernel receives the incremental on top of the full stream; the new record
    is of version 3 with BLAKE3 of the whole content; a full send starts version 6 (4 until
    session 27)."""
    tree, store = tmp_path / "tree", tmp_path / "store"
    _tree(tree)
    full, inc, again = tmp_path / "full", tmp_path / "inc", tmp_path / "again"
    assert main(["send", str(tree), "-o", str(full), "--record", "--store", str(store), "-q",
                 "--name", "v1"]) == 0
    base = _as_version_3(store, tree)
    for _ in range(2):  # (read from the record, then from the store's head cache)
        assert [r.head.version for r in SendshotStore(store).records_list()] == [3]
    _change(tree)
    assert main(["send", str(tree), "-o", str(inc), "--from-sendshot", base, "--record",
                 "--store", str(store), "-q", "--name", "v2"]) == 0
    _check_sent_changes(inc)
    rec, inodes = _record(store)
    assert (rec.head.version, rec.head.parent) == (3, base)
    by_ino = _files(tree)
    for n in inodes:
        if stat.S_ISREG(n.mode):
            assert n.bdigest == blake3.blake3(by_ino[n.ino].read_bytes()).digest()
    dest = btrfs_ws.fresh("v3")
    _receive([full, inc], dest)
    assert tree_sum(dest / "v2") == tree_sum(tree)
    assert main(["send", str(tree), "-o", str(again), "--record", "--store", str(store),
                 "-q", "--name", "v3"]) == 0
    assert _record(store)[0].head.version == VERSION


def test_files_hashed_as_they_are_sent_get_tree_sum_3_digests(btrfs_ws: Workspace,
                                                             tmp_path: Path) -> None:
    """A full send of a read-only snapshot hashes its large files from the bytes it sends
    (views of a reused buffer, zero blocks inside them, a hole): each file's record digest
    is the reference's of its content."""
    from btrdelta.send.sendshot import send_with_sendshots

    base = btrfs_ws.fresh("sent")
    live = base / "live"
    subprocess.run(["btrfs", "-q", "subvolume", "create", str(live)], check=True)
    (live / "zeros").write_bytes(os.urandom(1 << 20) + bytes(5 * B) + os.urandom((2 << 20) + 9))
    with open(live / "sparse", "wb") as f:  # a hole between two data ranges
        f.write(os.urandom(70_000))
        f.seek(3 << 20)
        f.write(b"z" * 5000)
    (live / "small").write_bytes(b"s" * 5000 + bytes(B))
    subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(live), str(base / "S")],
                   check=True)
    try:
        out = bytearray()
        sent = send_with_sendshots(out.extend, base / "S", store=SendshotStore(tmp_path / "s"))
        assert sent.recorded is not None
        assert sent.recorded.head.version == VERSION
        _rec, inodes = _record(tmp_path / "s", sent.recorded.digest)
        by_ino = _files(base / "S")
        regs = [n for n in inodes if stat.S_ISREG(n.mode)]
        assert len(regs) == 3
        for n in regs:
            assert n.bdigest == reference(by_ino[n.ino].read_bytes()), by_ino[n.ino]
    finally:
        for d in ("S", "live"):
            subprocess.run(["btrfs", "-q", "subvolume", "delete", str(base / d)], check=True)
