"""Incremental sends against a record that visit only what btrfs says changed
(`btrdelta.send.rescan`): every kind of change, one round each, applied by the kernel's
`btrfs receive` on its copy of the base (oracle: tree-sum equal to the source); the files
opened and the entries stat'ed are only those of changed inodes (os.open/os.lstat/os.listdir
watched in process); the record patched with the changes equals the record of a full scan
of the same snapshot."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from btrdelta._value import replace
from btrdelta.fs.btrfs import changed_inodes
from btrdelta.send.record import record_inodes, stamp_generations
from btrdelta.send.rescan import rescan
from btrdelta.send.scan import TreeScan
from btrdelta.send.sendshot import SendshotResult, load_base, send_with_sendshots
from btrdelta.send.store import SendshotStore
from btrdelta.tree import tree_sum
from btrdelta.tree.sendshot import PATCH_WRITTEN, Patch, RecordInode
from tests.send.conftest import run

pytestmark = pytest.mark.btrfs


def _build(live: Path) -> None:
    for d in ("a", "a/b", "c", "quiet", "gone"):
        (live / d).mkdir()
    for i in range(4):
        (live / "a" / f"f{i}").write_bytes(os.urandom(20_000 + 4096 * i))
        (live / "quiet" / f"q{i}").write_bytes(os.urandom(9000 + i))
        (live / "gone" / f"g{i}").write_bytes(b"g" * (100 + i))
    (live / "a" / "b" / "big").write_bytes(os.urandom(300_000))
    (live / "c" / "small").write_bytes(b"tiny")
    (live / "c" / "x").write_bytes(b"x" * 70_000)
    (live / "c" / "tmp").write_bytes(b"temporary")
    os.link(live / "c" / "x", live / "a" / "x-link")
    os.symlink("a/f0", live / "sym")
    os.mkfifo(live / "c" / "fifo")
    os.setxattr(live / "c" / "small", "user.keep", b"1")


def _punch(p: Path) -> None:
    subprocess.run(["fallocate", "-p", "-o", "8192", "-l", "16384", str(p)], check=True)


def _append(p: Path, data: bytes) -> None:
    with open(p, "ab") as f:
        f.write(data)


def _overwrite(p: Path, off: int, data: bytes) -> None:
    with open(p, "r+b") as f:
        f.seek(off)
        f.write(data)


def _new_dir(live: Path) -> None:
    (live / "new").mkdir()
    (live / "new/n1").write_bytes(b"n" * 9000)


def _file_to_dir(p: Path) -> None:
    p.unlink()
    p.mkdir()


def _retarget(p: Path, target: str) -> None:
    p.unlink()
    os.symlink(target, p)


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name("swap-tmp")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


#: (what changes, the change, names of the inodes it touches: the only files that may be read)
CHANGES: list[tuple[str, Callable[[Path], object], set[str]]] = [
    ("append", lambda L: _append(L / "a/f1", b"more" * 100), {"f1"}),
    ("overwrite in the middle", lambda L: _overwrite(L / "a/b/big", 150_000, b"Z" * 5000),
     {"big"}),
    ("truncate", lambda L: os.truncate(L / "a/f2", 5000), {"f2"}),
    ("punch a hole", lambda L: _punch(L / "a/b/big"), {"big"}),
    ("touch (mtime only)", lambda L: os.utime(L / "a/f3", ns=(10**18, 10**18)), {"f3"}),
    ("chmod", lambda L: os.chmod(L / "a/f0", 0o600), {"f0"}),
    ("chown", lambda L: os.chown(L / "c/small", 1234, 5678), {"small"}),
    ("xattr set", lambda L: os.setxattr(L / "a/f1", "user.round", b"2"), {"f1"}),
    ("xattr removed", lambda L: os.removexattr(L / "c/small", "user.keep"), {"small"}),
    ("rename across directories", lambda L: (L / "a/f1").rename(L / "c/f1-moved"),
     {"f1-moved"}),
    ("rename a directory", lambda L: (L / "a/b").rename(L / "c/b2"), {"b2"}),
    ("hard link added", lambda L: os.link(L / "a/f0", L / "c/f0-link"), {"f0", "f0-link"}),
    ("one of two links removed", lambda L: (L / "c/x").unlink(), {"x-link"}),
    ("file deleted", lambda L: (L / "c/tmp").unlink(), set()),
    ("directory tree deleted", lambda L: subprocess.run(["rm", "-r", str(L / "gone")],
                                                         check=True), set()),
    ("new files in a new directory", _new_dir, {"n1"}),
    ("file replaced by a directory", lambda L: _file_to_dir(L / "c/small"), set()),
    ("symlink retargeted", lambda L: _retarget(L / "sym", "c/x"), set()),
    # (the inode of a/f0 also has the name c/f0-link since "hard link added")
    ("two files swapped", lambda L: _swap(L / "a/f0", L / "a/f2"), {"f0", "f2", "f0-link"}),
]


@contextmanager
def _watched() -> Iterator[dict[str, set[str]]]:
    """Paths passed to os.open (files only), names passed to os.lstat and os.listdir or
    os.scandir while inside."""
    seen: dict[str, set[str]] = {"open": set(), "lstat": set(), "listdir": set()}
    real_open, real_lstat, real_listdir, real_scandir = os.open, os.lstat, os.listdir, \
        os.scandir

    def name(p: Any) -> str:
        return os.path.basename(os.fsdecode(p)) if isinstance(p, (str, bytes)) else ""

    def wopen(path: Any, flags: int, *a: Any, **kw: Any) -> int:
        if not flags & os.O_DIRECTORY:
            seen["open"].add(os.fsdecode(path))
        return real_open(path, flags, *a, **kw)

    def wlstat(path: Any, *a: Any, **kw: Any) -> os.stat_result:
        seen["lstat"].add(name(path))
        return real_lstat(path, *a, **kw)

    def wlistdir(path: Any = ".") -> list[Any]:
        seen["listdir"].add(name(path))
        return real_listdir(path)

    def wscandir(path: Any = ".") -> Any:
        seen["listdir"].add(name(path))
        return real_scandir(path)

    os.open, os.lstat, os.listdir, os.scandir = wopen, wlstat, wlistdir, wscandir
    try:
        yield seen
    finally:
        os.open, os.lstat, os.listdir, os.scandir = real_open, real_lstat, real_listdir, \
            real_scandir


def first_send(two_fs: tuple[Path, Path], tmp_path: Path, atime: str) -> SendshotResult:
    """The sender of ``two_fs`` mounted ``atime``, its subvolume ``live`` built (``_build``),
    sent whole with a record (store ``tmp_path/store``, stream ``tmp_path/s``), received."""
    snd, rcv = two_fs
    run("mount", "-o", f"remount,{atime}", snd)
    run("btrfs", "subvolume", "create", snd / "live")
    _build(snd / "live")
    with open(tmp_path / "s", "wb") as f:
        res = send_with_sendshots(f.write, snd / "live", store=SendshotStore(tmp_path / "store"),
                                  name=b"r0")
    run("btrfs", "receive", "-f", tmp_path / "s", rcv)
    return res


def send_round(two_fs: tuple[Path, Path], tmp_path: Path, i: int, what: str
               ) -> tuple[SendshotResult, dict[str, set[str]]]:
    """Round ``i`` of :func:`first_send`'s subvolume (the change made): sent against the
    latest record, received, checked (tree-sum); the result and what it opened."""
    snd, rcv = two_fs
    with open(tmp_path / "s", "wb") as f, _watched() as seen:
        res = send_with_sendshots(f.write, snd / "live", store=SendshotStore(tmp_path / "store"),
                                  from_sendshot="latest", name=f"r{i}".encode())
    run("btrfs", "receive", "-f", tmp_path / "s", rcv)
    assert tree_sum(rcv / f"r{i}") == tree_sum(snd / "live"), what
    return res, seen


def only_touched(snd: Path, what: str, touched: set[str], res: SendshotResult,
                 seen: dict[str, set[str]]) -> None:
    """The round read only the files ``touched`` and nothing of directory ``quiet``."""
    quiet = {f"q{i}" for i in range(4)}  # files of a directory no change touches
    assert res.reused >= 8, what  # the record was used: no full walk
    read = {os.path.basename(p) for p in seen["open"] if p.startswith(str(snd))}
    assert read <= touched, (what, read)
    assert not (seen["lstat"] | read) & quiet, (what, seen)
    assert "quiet" not in seen["listdir"], (what, seen)
    assert res.stats.bytes_read <= 400_000, what


def test_each_kind_of_change(two_fs: tuple[Path, Path], tmp_path: Path) -> None:
    # reading the source for tree-sum would change atimes: every inode changed (before
    # record version 8, tests/send/test_rescan_atime.py)
    first_send(two_fs, tmp_path, "noatime")
    for i, (what, change, touched) in enumerate(CHANGES, 1):
        change(two_fs[0] / "live")
        res, seen = send_round(two_fs, tmp_path, i, what)
        only_touched(two_fs[0], what, touched, res, seen)


def test_patched_record_equals_a_full_scan(two_fs: tuple[Path, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kind of change at once: the changed part is small (few directories listed,
    small trees), and the record made by patching the base with it (a patch record, read
    back with its base) holds the same inodes as the record of a full scan of the same
    snapshot (through the encoder and the reader)."""
    snd, _rcv = two_fs
    live = snd / "live"
    run("btrfs", "subvolume", "create", live)
    _build(live)
    store = SendshotStore(tmp_path / "store")
    send_with_sendshots(lambda b: None, live, store=store)
    for _what, change, _touched in CHANGES:
        change(live)
    run("btrfs", "subvolume", "snapshot", "-r", live, snd / "S")
    base, cols = load_base(store, "latest", os.fsencode(live), None)
    fd = os.open(snd / "S", os.O_RDONLY | os.O_DIRECTORY)
    try:
        changes = rescan(cols, os.fsencode(snd / "S"), fd,
                         changed_inodes(fd, base.head.generation))
        quick = TreeScan(snd / "S", seed=base.head.seed, new_tree=changes.to_hash)
        quick.hasher.wait()
        changes.build()
        full = TreeScan(snd / "S", seed=base.head.seed)
        full.hasher.wait()
        stamp_generations(full.new, fd)
    finally:
        os.close(fd)
    dirs = [n for n in full.new.nodes.values() if n.is_dir]
    assert 0 < changes.listed < len(dirs)
    assert len(changes.new.nodes) < len(full.new.nodes)
    # (a patch record of the base, read back with it: not compacted, though the changes
    # outweigh a tree this small)
    monkeypatch.setattr("btrdelta.tree.chain.SLACK", 10_000)
    patch = changes.record()
    assert isinstance(patch, Patch)
    head = replace(base.head, version=PATCH_WRITTEN, base=base.digest)
    got = store.view(store.save(head, patch)).rows()

    def model(rows: Iterable[RecordInode]) -> dict[int, RecordInode]:
        out = {r.ino: r for r in rows}
        for r in out.values():
            r.dentries.sort()
        if r.size < 4096:
            r.blocks = b""  # a record keeps no block digests below a block
        return out

    want = list(record_inodes(full.new))
    assert model(got) == model(want)


def test_inode_number_reused_after_a_delete(two_fs: tuple[Path, Path], tmp_path: Path) -> None:
    """btrfs hands out the highest inode number + 1 after a mount: the number of a deleted
    newest file comes back for another file (another generation): not the recorded inode."""
    snd, rcv = two_fs
    live = snd / "live"
    run("btrfs", "subvolume", "create", live)
    _build(live)
    (live / "last").write_bytes(b"L" * 40_000)
    ino = (live / "last").stat().st_ino
    store = SendshotStore(tmp_path / "store")
    stream = tmp_path / "s"
    with open(stream, "wb") as f:
        send_with_sendshots(f.write, live, store=store, name=b"r0")
    run("btrfs", "receive", "-f", stream, rcv)
    (live / "last").unlink()
    run("btrfs", "filesystem", "sync", snd)
    dev = run("findmnt", "-no", "SOURCE", snd).strip()
    run("umount", snd)
    run("mount", "-o", "noatime", dev, snd)
    (live / "other").write_bytes(b"O" * 40_000)
    assert (live / "other").stat().st_ino == ino
    with open(stream, "wb") as f:
        res = send_with_sendshots(f.write, live, store=store, from_sendshot="latest",
                                  name=b"r1")
    assert res.reused >= 8
    run("btrfs", "receive", "-f", stream, rcv)
    assert tree_sum(rcv / "r1") == tree_sum(live)
    assert not (rcv / "r1" / "last").exists()


@pytest.mark.parametrize("backend", ["c", "python"])
def test_a_changed_file_with_an_unchanged_files_content_is_a_clone(
        two_fs: tuple[Path, Path], tmp_path: Path, backend: str) -> None:
    """New files whose content equals an unchanged file's (found among
    the record's digests by the columns accelerator's ``leading`` or by the Python scan) are
    a whole-file CLONE of it, not data; a file equal to nothing is written. Oracle: the
    kernel's receive on its copy of the base, tree-sum equal to the source."""
    from btrdelta import _native
    from btrdelta.stream import StreamReader
    from btrdelta.stream.records import Clone, Write

    if backend == "c" and not _native.available("columns") and os.environ.get("CI") != "true":
        pytest.skip("the columns accelerator is not built")
    snd, rcv = two_fs
    first_send(two_fs, tmp_path, "noatime")
    live, store, stream = snd / "live", SendshotStore(tmp_path / "store"), tmp_path / "s"
    (live / "c/copy").write_bytes((live / "a/b/big").read_bytes())
    (live / "a/dup").write_bytes((live / "c/x").read_bytes())
    (live / "c/own").write_bytes(os.urandom(70_000))
    with _native.use_backend(backend, "columns"), open(stream, "wb") as f:  # type: ignore[arg-type]
        res = send_with_sendshots(f.write, live, store=store, from_sendshot="latest",
                                  name=b"r1")
    assert res.reused >= 8
    with open(stream, "rb") as f:
        events = list(StreamReader(f).events())
    clones = {e.path: (e.clone_path, e.length) for e in events if isinstance(e, Clone)}
    assert clones.keys() == {b"c/copy", b"a/dup"}
    assert clones[b"c/copy"] == (b"a/b/big", 300_000)
    assert clones[b"a/dup"] in {(b"c/x", 70_000), (b"a/x-link", 70_000)}  # (one inode)
    written = {e.path for e in events if isinstance(e, Write)}
    assert b"c/own" in written
    assert not written & {b"c/copy", b"a/dup"}
    run("btrfs", "receive", "-f", stream, rcv)
    assert tree_sum(rcv / "r1") == tree_sum(live)


@pytest.mark.parametrize("backend", ["c", "python"])
def test_change_sweep_in_big_and_small_buffers(two_fs: tuple[Path, Path],
                                               monkeypatch: pytest.MonkeyPatch,
                                               backend: str) -> None:
    """`changed_inodes` names exactly the inodes written since a generation, whether the
    sweep takes one TREE_SEARCH_V2 call, many (a buffer smaller than the changes: the search
    resumes after the last key), or falls back to TREE_SEARCH (a kernel without V2); the
    items walked in C (the ``sweep`` accelerator) or by the Python reference."""
    from btrdelta import _native

    if backend == "c" and not _native.available("sweep") and os.environ.get("CI") != "true":
        pytest.skip("the sweep accelerator is not built")
    with _native.use_backend(backend, "sweep"):  # type: ignore[arg-type]
        _sweep_in_buffers(two_fs, monkeypatch)


def _sweep_in_buffers(two_fs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from btrdelta.fs import btrfs

    snd, _rcv = two_fs
    live = snd / "live"
    run("btrfs", "subvolume", "create", live)
    for i in range(300):
        (live / f"f{i}").write_bytes(b"x" * (i * 50))
    run("btrfs", "subvolume", "snapshot", "-r", live, snd / "A")
    fd = os.open(snd / "A", os.O_RDONLY | os.O_DIRECTORY)
    try:
        since = btrfs.subvol_info(fd).ctransid
    finally:
        os.close(fd)
    run("sync")
    for i in range(0, 300, 7):
        _append(live / f"f{i}", b"more")
    run("btrfs", "subvolume", "snapshot", "-r", live, snd / "B")
    want = {os.stat(live / f"f{i}").st_ino for i in range(0, 300, 7)}
    fd = os.open(snd / "B", os.O_RDONLY | os.O_DIRECTORY)
    try:
        whole = btrfs.changed_inodes(fd, since)
        assert set(whole) == want
        monkeypatch.setattr(btrfs, "_SWEEP_BUFFER", 4096)
        assert btrfs.changed_inodes(fd, since) == whole
        monkeypatch.setattr(btrfs, "_TREE_SEARCH_V2", 0xC0709400)  # no such ioctl: ENOTTY
        assert btrfs.changed_inodes(fd, since) == whole
    finally:
        os.close(fd)


def test_a_damaged_newest_record_is_swept_since_the_older_one(
        two_fs: tuple[Path, Path], tmp_path: Path) -> None:
    """The change sweep starts (in a thread) once the base record's head is read, while its
    columns are; when the newest record then proves damaged and an older one is used,
    the changes are those since the older one's generation, not since the damaged one's
    (a change made between the two is sent). Oracle: the kernel's receive of the stream on
    its copy of the older base, tree-sum equal to the snapshot."""
    snd, rcv = two_fs
    run("mount", "-o", "remount,noatime", snd)
    live = snd / "live"
    run("btrfs", "subvolume", "create", live)
    _build(live)
    (live / "many").mkdir()
    for i in range(1500):  # a record of several zstd blocks: a torn one's head still reads
        (live / "many" / f"n{i}").write_bytes(os.urandom(40))
    store = SendshotStore(tmp_path / "store")
    stream = tmp_path / "s"
    digests = []
    def between() -> None:  # (and every file of many/: a whole record, not a small patch)
        _append(live / "a/f1", b"between")
        for i in range(1500):
            (live / "many" / f"n{i}").write_bytes(os.urandom(40))

    for i, change in enumerate((lambda: None, between,
                                lambda: _overwrite(live / "a/f2", 4096, b"later" * 100))):
        change()
        run("sync")
        run("btrfs", "subvolume", "snapshot", "-r", live, snd / f"R{i}")
        with open(stream, "wb") as f:
            res = send_with_sendshots(f.write, snd / f"R{i}", store=store, name=f"r{i}".encode(),
                                      from_sendshot="latest" if i else None)
        assert res.recorded is not None
        digests.append(res.recorded.digest)
        if i == 0:
            run("btrfs", "receive", "-f", stream, rcv)
        if i == 1:  # never received; then torn (its head still reads)
            path = res.recorded.path
            os.truncate(path, os.path.getsize(path) * 2 // 3)
    assert res.base is not None
    assert res.base.digest == digests[0]
    assert "cannot be read" in res.warning
    assert res.reused >= 8  # the sweep was used, not a walk of the whole tree
    run("btrfs", "receive", "-f", stream, rcv)
    assert tree_sum(rcv / "r2") == tree_sum(snd / "R2")
