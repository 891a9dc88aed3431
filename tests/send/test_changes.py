"""Incremental sends from the changed part of two trees (btrdelta.send.changes): memory that
does not grow with unchanged files, each file read once, the same stream as the whole-tree
model, and ``send -c`` without a parent in bounded memory; the kernel receives the streams."""

from __future__ import annotations

import random
import subprocess
import tracemalloc
from pathlib import Path

import pytest

from btrdelta.cli import main
from btrdelta.send import send_records
from btrdelta.send.scan import TreeScan
from btrdelta.stream.codec import encode_record
from btrdelta.stream.records import Clone, Subvol, Utimes, Write
from btrdelta.testing.scenarios import SCENARIOS, kernel_receive
from tests.send.conftest import Workspace, build_pair, count_reads
from tests.send.test_scenarios import assert_same_tree, read_all


def _many(root: Path, files: int, per_dir: int = 100) -> None:
    """``files`` small files, ``per_dir`` a directory, three levels deep."""
    root.mkdir()
    for i in range(files):
        d = root / f"a{i // (per_dir * 10):03d}" / f"b{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"file-{i:06d}").write_bytes(b"%d\n" % i)


def _pair(base: Path, files: int) -> tuple[Path, Path]:
    """OLD with ``files`` files; NEW a copy with the same 40 changes whatever ``files`` is:
    10 files rewritten, 10 moved to another directory, 10 added, 10 deleted."""
    old, new = base / "old", base / "new"
    base.mkdir(exist_ok=True)
    _many(old, files)
    subprocess.run(["cp", "-a", str(old), str(new)], check=True)
    b0, b1 = new / "a000" / "b0000", new / "a000" / "b0001"
    for i in range(10):
        (b0 / f"file-{i:06d}").write_bytes(b"changed %d\n" % i)
        (b0 / f"file-{i + 10:06d}").rename(b1 / f"moved-{i}")
        (b1 / f"added-{i}").write_bytes(b"new %d\n" % i)
        (b0 / f"file-{i + 20:06d}").unlink()
    return old, new


def _peak(new: Path, old: Path) -> int:
    """Peak traced memory (bytes) while sending ``new`` incrementally from ``old``."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        for _rec in send_records(new, old, version=2, workers=1):
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_incremental_memory_does_not_grow_with_unchanged_files(tmp_path: Path) -> None:
    """1,000 vs 8,000 files with the same 40 changes: the peak grows by less than 48 bytes
    an unchanged file (the whole-tree model took ~2.5 KB a file of the two trees)."""
    pairs = {n: _pair(tmp_path / str(n), n) for n in (300, 1_000, 8_000)}
    _peak(*reversed(pairs[300]))  # imports, codec tables
    p_small, p_big = _peak(*reversed(pairs[1_000])), _peak(*reversed(pairs[8_000]))
    per_file = (p_big - p_small) / 7_000
    assert per_file < 48, f"{per_file:.0f} bytes a file ({p_small} -> {p_big})"
    assert p_big < 4 << 20


@pytest.mark.btrfs
def test_incremental_reads_each_file_once(btrfs_ws: Workspace,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Every regular file of both trees is opened once and read once (its digest names the
    tree); a changed file's differing blocks are sent from that same read; the stream turns
    the kernel's receive of OLD into NEW."""
    base = btrfs_ws.fresh("inc-once")
    old, new = _pair(base, 300)
    rng = random.Random(5)
    (old / "mid").write_bytes(rng.randbytes(200_000))
    data = bytearray((old / "mid").read_bytes())
    data[100_000:100_010] = b"0123456789"
    (new / "mid").write_bytes(bytes(data))
    files = {p.stat().st_ino: p.stat().st_size for t in (old, new) for p in t.rglob("*")
             if p.is_file()}
    opened, read = count_reads(monkeypatch, old.stat().st_dev)
    out = base / "inc.s"
    with open(out, "wb") as f:
        from btrdelta.stream.writer import StreamWriter

        writer = StreamWriter(f.write, 1)
        for rec in send_records(new, old):
            writer.write(rec)
    monkeypatch.undo()
    assert set(opened) == set(files)
    for ino, size in files.items():
        assert opened[ino] == 1, ino
        assert read.get(ino, 0) <= size + 1, (ino, read.get(ino), size)
    # only the 4 KiB block that changed is sent of "mid"
    writes = [r for r in read_all(out) if isinstance(r, Write) and r.path == b"mid"]
    assert [(w.offset, len(w.data)) for w in writes] == [(98_304, 4096)]
    full = base / "full.s"
    assert main(["send", "-q", str(old), "-f", str(full)]) == 0
    dest = base / "recv"
    dest.mkdir()
    kernel_receive(full, dest)
    (dest / "old").rename(dest / "old-received")  # the stream names the parent's UUID
    kernel_receive(out, dest)
    assert_same_tree(new, dest / "new")


def _stream(new: Path, old: Path, **kw: object) -> bytes:
    """The encoded records of ``new``'s v2 stream from ``old`` (atimes left out: listing a
    directory whose mtime is in the future sets its atime each time)."""
    out = bytearray()
    for rec in send_records(new, old, version=2, **kw):
        if isinstance(rec, Utimes):
            rec = Utimes(path=rec.path, atime=0, mtime=rec.mtime, ctime=rec.ctime,
                         otime=rec.otime)
        for piece in encode_record(rec, 2):
            out += piece
    return bytes(out)


PLAIN = [sc for sc in SCENARIOS if not sc.btrfs_only]


@pytest.mark.btrfs
def test_same_stream_as_the_whole_tree_model(btrfs_ws: Workspace) -> None:
    """For every plain-directory scenario, the stream from the changed part of the trees is
    byte for byte the one the whole-tree model makes (which the kernel receives:
    test_scenarios)."""
    for sc in PLAIN:
        old, new = build_pair(btrfs_ws.fresh(f"same-{sc.name}"), sc)
        reduced = _stream(new, old, compress="zstd")
        assert reduced == _stream(new, old, compress="zstd", scan=TreeScan(new, old)), sc.name


@pytest.mark.btrfs
def test_clone_source_without_parent(btrfs_ws: Workspace) -> None:
    """``send -c LIB TREE`` (no -p): a full stream in bounded memory whose copy of a LIB file
    is a CLONE from LIB's subvolume; the kernel receives it after LIB's full stream."""
    base = btrfs_ws.fresh("clonesrc-full")
    lib, tree = base / "lib", base / "tree"
    (lib / "x").mkdir(parents=True)
    tree.mkdir()
    shared = random.Random(9).randbytes(300_000)
    (lib / "x" / "shared.so").write_bytes(shared)
    (tree / "copy.so").write_bytes(shared)
    (tree / "own").write_bytes(b"own\n")
    s_lib, s_tree = base / "lib.s", base / "tree.s"
    assert main(["send", "-q", str(lib), "-f", str(s_lib)]) == 0
    assert main(["send", "-q", "-c", str(lib), str(tree), "-f", str(s_tree)]) == 0
    lib_uuid = next(r for r in read_all(s_lib) if isinstance(r, Subvol)).uuid
    recs = read_all(s_tree)
    assert [(r.clone_uuid, r.clone_path, r.length) for r in recs if isinstance(r, Clone)] \
        == [(lib_uuid, b"x/shared.so", 300_000)]
    assert not [r for r in recs if isinstance(r, Write) and r.path == b"copy.so"]
    dest = base / "recv"
    dest.mkdir()
    kernel_receive(s_lib, dest)
    kernel_receive(s_tree, dest)
    assert_same_tree(tree, dest / "tree")


@pytest.mark.btrfs
def test_directory_with_unchanged_entries_keeps_its_inode(btrfs_ws: Workspace) -> None:
    """b/a moves to a new a/b/a while b/b stays: the matching must not hand old b (which
    still holds the unchanged b/b, left out of the reduced trees) to a/b (found by
    hypothesis in test_properties)."""
    base = btrfs_ws.fresh("keep-dir")
    old, new = base / "old", base / "new"
    for t in (old, new):
        (t / "a").mkdir(parents=True)
        (t / "b").mkdir()
        for p in ("a/a", "b/a", "b/b"):
            (t / p).write_bytes(b"")
    (new / "a" / "b").mkdir()
    (new / "b" / "a").rename(new / "a" / "b" / "a")
    full, incr = base / "full.s", base / "incr.s"
    assert main(["send", "-q", str(old), "-f", str(full)]) == 0
    assert main(["send", "-q", "-p", str(old), str(new), "-f", str(incr)]) == 0
    dest = base / "recv"
    dest.mkdir()
    kernel_receive(full, dest)
    kernel_receive(incr, dest)
    assert_same_tree(new, dest / "new")


def test_reading_stops_when_the_walk_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    """An error or a signal in a plain incremental's walk stops the threads reading large
    files within a MiB, instead of waiting until each file is read (a signal then took as
    long as the largest file): the walk hands its readers an event it sets when it ends,
    and a reader with the event set reads no further."""
    import threading

    from btrdelta.errors import BtrdeltaError
    from btrdelta.send import changes, compare
    from btrdelta.send.onepass import Stopped

    old, new = tmp_path / "old", tmp_path / "new"
    for d in (old, new):
        d.mkdir()
    data = random.Random(7).randbytes(3 << 20)
    (old / "same-name").write_bytes(data)
    (new / "same-name").write_bytes(data[:-1] + b"!")
    (new / "new-file").write_bytes(data)
    stopped = threading.Event()
    stopped.set()
    with pytest.raises(Stopped, match="reading stopped"):
        compare.compare_files(bytes(old / "same-name"), bytes(new / "same-name"),
                              len(data), len(data), stopped)
    node = changes.Node(1, 257, 0o100644, 0, 0, len(data), 0, 0, 0, path=b"new-file")
    with pytest.raises(Stopped, match="reading stopped"):
        changes._read_single(node, bytes(new / "new-file"), bytearray(1 << 20), False,
                             stop=stopped)
    # the walk's event: handed to every reader, set once the walk ends (here by an error)
    seen: list[threading.Event | None] = []

    def failing(node: object, path: bytes, buf: bytearray, keep: bool,
                stop: threading.Event | None = None) -> None:
        seen.append(stop)
        raise BtrdeltaError("cannot read", path=path)

    monkeypatch.setattr(changes, "_read_single", failing)
    with pytest.raises(BtrdeltaError, match="cannot read"):
        changes.find_changes(old, new)
    assert seen
    assert all(stop is not None and stop.is_set() for stop in seen)


@pytest.mark.parametrize("how", ["changed_ranges", "files_equal", "shifted_clones"])
def test_a_comparison_whose_second_file_is_gone_leaves_no_descriptor_open(
        tmp_path: Path, how: str) -> None:
    """A file deleted under a send of a live tree between its scan and its comparison: the
    comparison's error, and the old file it opened first closed (oracle: /proc/self/fd;
    ``changed_ranges`` left it open)."""
    import os

    from btrdelta.send import compare

    old, gone = tmp_path / "old", tmp_path / "gone"
    old.write_bytes(random.Random(3).randbytes(1 << 20))
    size = old.stat().st_size
    call = {"changed_ranges": lambda: compare.changed_ranges(bytes(old), bytes(gone), size,
                                                             size),
            "files_equal": lambda: compare.files_equal(bytes(old), bytes(gone), size),
            "shifted_clones": lambda: compare.shifted_clones(
                bytes(old), bytes(gone), size, size, [(0, size)])}[how]
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(FileNotFoundError):
            call()
    assert sorted(os.listdir("/proc/self/fd")) == before
