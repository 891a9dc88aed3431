"""Rounds of incremental sends of a live subvolume against the record of the previous one,
each record a patch record of its base (`btrdelta.send.rescan`, `btrdelta.tree.chain`; the
ninth of a chain a whole record made by `Columns.patched`): the files
opened are only those of inodes the round changed (os.open watched in process), the kernel's
`btrfs receive` of every stream gives a tree equal to the source (tree-sum), and after each
round the record carries every unchanged inode over as a full scan of the same snapshot
records it (the rows compared field by field)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from btrdelta.cli import main
from btrdelta.send.extents import EXTENT_MIN, parts_digests
from btrdelta.send.live import Frozen
from btrdelta.send.record import record_inodes, stamp_generations
from btrdelta.send.scan import TreeScan
from btrdelta.send.sendshot import load_base, send_with_sendshots
from btrdelta.send.store import SendshotStore
from btrdelta.stream import StreamReader
from btrdelta.stream.records import Clone
from btrdelta.tree import tree_sum
from btrdelta.tree.chain import MAX_DEPTH, View
from btrdelta.tree.sendshot import PATCH_WRITTEN, VERSION, RecordInode
from tests.send.conftest import run
from tests.send.test_rescan import _watched

pytestmark = pytest.mark.btrfs


def _rows(rows: list[RecordInode]) -> dict[int, RecordInode]:
    out = {r.ino: r for r in rows}
    for r in out.values():
        r.dentries.sort()
        if r.size < 4096:
            r.blocks = b""  # a record keeps no block digests below a block
    return out


def _round(live: Path, rng: random.Random, i: int) -> set[str]:
    """Change a few inodes of ``live``; every name of the files whose inode changed (the
    only ones whose content may be read: an inode written since is hashed again)."""
    files = sorted(p for p in live.rglob("*") if p.is_file() and not p.is_symlink())
    others = [p for p in files if "quiet" not in p.parts]
    touched: set[int] = set()
    for p in rng.sample(others, 3):  # overwritten in the middle
        with open(p, "r+b") as f:
            f.seek(rng.randrange(p.stat().st_size // 2))
            f.write(rng.randbytes(3000))
        touched.add(p.stat().st_ino)
    p = rng.choice(others)
    with open(p, "ab") as f:  # appended
        f.write(rng.randbytes(5000))
    touched.add(p.stat().st_ino)
    moved = rng.choice([d for d in live.iterdir() if d.is_dir() and d.name != "quiet"])
    moved.rename(live / f"{moved.name}-r{i}")  # a directory renamed: its files unread
    (live / f"new{i}").mkdir()
    (live / f"new{i}" / "n").write_bytes(rng.randbytes(20_000))
    touched.add((live / f"new{i}" / "n").stat().st_ino)
    # a copy of an unchanged file (the largest of "quiet"): a CLONE, the original unread
    big = max((live / "quiet").iterdir(), key=lambda p: p.stat().st_size)
    (live / f"new{i}" / "copy").write_bytes(big.read_bytes())
    touched.add((live / f"new{i}" / "copy").stat().st_ino)
    now = sorted(p for p in live.rglob("*") if p.is_file() and not p.is_symlink()
                 and "quiet" not in p.parts)
    rng.choice(now).unlink()
    keep = rng.choice([p for p in now if p.exists()])
    os.setxattr(keep, "user.round", str(i).encode())
    touched.add(keep.stat().st_ino)
    return {p.name for p in live.rglob("*") if p.is_file() and p.stat().st_ino in touched}


@pytest.mark.parametrize("compaction", ["whole", "squash"])
def test_rounds_carry_unchanged_rows_over(two_fs: tuple[Path, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str],
                                          compaction: str) -> None:
    """Rounds of sends against the newest record, each received by the kernel (tree-sum)
    and its record read back equal to a full scan's; the ninth compacts the chain: into a
    whole record, or (``squash``: the chain's rows fit in half of what a chain may hold,
    the rule's choice here) into one patch of the chain's whole record."""
    # (a tree this small would be compacted every few rounds: the chain's rows outweigh it)
    monkeypatch.setattr("btrdelta.tree.chain.SLACK", 10_000)
    if compaction == "whole":
        monkeypatch.setattr(View, "_squashed", lambda *_a: None)
    snd, rcv = two_fs
    run("mount", "-o", "remount,noatime", snd)  # tree-sum's reads must not change atimes
    live = snd / "live"
    run("btrfs", "subvolume", "create", live)
    rng = random.Random(5)
    for d in ("a", "b", "c", "quiet"):
        (live / d).mkdir()
        for k in range(12):  # (quiet: at least one of 16 KiB or more)
            (live / d / f"{d}{k}").write_bytes(rng.randbytes(rng.randrange(100, 60_000)))
    os.link(live / "a" / "a0", live / "b" / "a0-link")
    os.symlink("a/a1", live / "sym")
    store = SendshotStore(tmp_path / "store")
    stream = tmp_path / "s"
    with open(stream, "wb") as f:
        first = send_with_sendshots(f.write, live, store=store, name=b"r0").recorded
    assert first is not None
    run("btrfs", "receive", "-f", stream, rcv)
    sizes: list[int] = []
    for i in range(1, MAX_DEPTH + 3):  # a chain of patch records, compacted once
        touched = _round(live, rng, i)
        full: list[list[RecordInode]] = []
        opened: list[set[str]] = []

        def scan_whole(fz: Frozen, opened: list[set[str]] = opened,
                       full: list[list[RecordInode]] = full) -> None:
            """The record a full scan of the same (temporary) snapshot makes (after the
            send: what the send opened is kept aside first)."""
            opened.append(set(seen["open"]) | {f"listed:{d}" for d in seen["listdir"]} |
                          {f"stat:{n}" for n in seen["lstat"]})
            scan = TreeScan(fz.path, seed=store.seed(), extents=True)
            scan.hasher.wait()
            fd = os.open(fz.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                stamp_generations(scan.new, fd, extents=True)  # (as a full send records)
            finally:
                os.close(fd)
            full.append(list(record_inodes(scan.new)))

        with open(stream, "wb") as f, _watched() as seen:
            res = send_with_sendshots(f.write, live, store=store, from_sendshot="latest",
                                      name=f"r{i}".encode(), inflight=scan_whole)
        read = {os.path.basename(p) for p in opened[0] if p.startswith(str(snd))}
        visited = {p.split(":", 1)[1] for p in opened[0] if ":" in p}
        assert res.reused >= 40, i  # patched, not scanned whole
        assert res.recorded is not None
        assert not res.recorded.head.tree_digest  # made by patching
        # a patch record of its base (version 9), but the chain's ninth: a whole record,
        # or a patch of the whole record the chain started from (the first round's base)
        whole = i == MAX_DEPTH + 1 and compaction == "whole"
        assert res.recorded.head.version == (VERSION if whole else PATCH_WRITTEN), i
        assert res.recorded.head.base == (None if whole else first.digest
                                          if i == MAX_DEPTH + 1 else res.base.digest), i
        if i == MAX_DEPTH + 1:  # (what `sendshot list` says of it: the record it patches)
            assert main(["sendshot", "list", "--store", store.path]) == 0
            out = capsys.readouterr().out
            lines = [x for x in out.splitlines() if x.startswith(res.recorded.digest[:16])]
            assert len(lines) == 1, out
            line = lines[0]
            assert line.endswith(f" <- {res.base.digest[:12]}" + (
                "" if whole else f" (a patch of {first.digest[:12]})")), line
        sizes.append(res.recorded.size)
        assert read <= touched, (i, read - touched)
        assert not {v for v in visited if v.startswith("quiet")}, visited
        with open(stream, "rb") as f:
            clones = [ev for ev in StreamReader(f).events() if isinstance(ev, Clone)]
        # (from the quiet original, or from an earlier round's copy)
        assert any(c.path == b"new%d/copy" % i and c.offset == 0 and
                   c.length == (live / f"new{i}" / "copy").stat().st_size for c in clones)
        run("btrfs", "receive", "-f", stream, rcv)
        assert tree_sum(rcv / f"r{i}") == tree_sum(live), i
        _base, cols = load_base(store, res.recorded.digest, b"", None)
        got, want = _rows(list(cols.rows())), _rows(full[0])
        for ino, row in got.items():
            # a file read where its extents changed (from EXTENT_MIN up) has parts digests
            # of the blocks a full scan finds (docs/formats/sendshot.md §3a)
            if ino in want and row.digest != want[ino].digest:
                assert (row.digest, row.bdigest) == parts_digests(
                    row.size, row.segments or [], row.blocks), (i, ino)
                assert row.size >= EXTENT_MIN, (i, ino)
                assert row.blocks == want[ino].blocks, (i, ino)
                row.digest, row.bdigest = want[ino].digest, want[ino].bdigest
        assert got == want, i
    if compaction == "whole":
        assert max(sizes[:MAX_DEPTH]) < sizes[MAX_DEPTH] / 2, sizes  # a patch: what changed
    else:  # the chain's rows once
        assert max(sizes[:MAX_DEPTH]) < sizes[MAX_DEPTH] < sum(sizes[:MAX_DEPTH]), sizes


def test_a_file_changed_all_over_each_round_gets_whole_records(
        two_fs: tuple[Path, Path], tmp_path: Path) -> None:
    """A patch record holds the changed files' block digests: a database rewritten all over
    each round made patches as large as the whole record, and a chain of them grew the store
    by a whole record a round (SQLite in `benchmarks sendshot`: 1.66 % of the data after 4
    rounds against 0.42 % for one whole record; goal <= 1 %). Such a round now writes a
    whole record; a round that changes a small file still writes a patch; the kernel's
    `btrfs receive` of every stream gives the source's tree (tree-sum)."""
    snd, rcv = two_fs
    run("mount", "-o", "remount,noatime", snd)
    live = snd / "live"
    run("btrfs", "subvolume", "create", live)
    rng = random.Random(7)
    (live / "small").write_bytes(rng.randbytes(9000))
    store = SendshotStore(tmp_path / "store")
    stream = tmp_path / "s"
    bases, sizes = [], []
    for i, change in enumerate(("db", "db", "db", "small", "small")):
        with open(live / change, "r+b" if i and change == "db" else "wb") as f:
            f.write(rng.randbytes(32 << 20 if change == "db" else 9000 + i))
        with open(stream, "wb") as f:
            res = send_with_sendshots(f.write, live, store=store, name=f"r{i}".encode(),
                                      from_sendshot="latest" if i else None)
        assert res.recorded is not None
        bases.append(res.recorded.head.base)
        sizes.append(res.recorded.size)
        run("btrfs", "receive", "-f", stream, rcv)
        assert tree_sum(rcv / f"r{i}") == tree_sum(live), i
    # the full, two rounds of the db rewritten (whole records), then patches
    assert [b is None for b in bases] == [True, True, True, False, False], (bases, sizes)
    assert max(sizes[3:]) < min(sizes[:3]) / 10, sizes


def test_a_new_small_file_is_read_once(two_fs: tuple[Path, Path], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """In a send against a record, a new small file's bytes, kept as the hashing read them,
    are what the stream sends: the file is opened and read once (a changed file's written
    blocks are read again, its bytes are not kept, but from the descriptor the hashing
    opened). The kernel's `btrfs receive` of the streams gives the snapshots' trees."""
    from tests.send.conftest import count_reads

    snd, rcv = two_fs
    live = snd / "live"
    run("btrfs", "subvolume", "create", live)
    rng = random.Random(3)
    (live / "old").mkdir()
    for k in range(5):
        (live / "old" / f"f{k}").write_bytes(rng.randbytes(10_000 + 7_000 * k))
    run("btrfs", "subvolume", "snapshot", "-r", live, snd / "s0")
    store = SendshotStore(tmp_path / "store")
    with open(tmp_path / "s0", "wb") as f:
        send_with_sendshots(f.write, snd / "s0", store=store, name=b"s0")
    (live / "new").mkdir()
    sizes = {f"n{k}": 5_000 + 11_000 * k for k in range(4)}
    for name, size in sizes.items():
        (live / "new" / name).write_bytes(rng.randbytes(size))
    with open(live / "old" / "f3", "r+b") as f:
        f.seek(9_000)
        f.write(rng.randbytes(3_000))
    run("btrfs", "subvolume", "snapshot", "-r", live, snd / "s1")
    s1 = snd / "s1"
    opened, read = count_reads(monkeypatch, os.stat(s1).st_dev)
    with open(tmp_path / "s1", "wb") as f:
        send_with_sendshots(f.write, s1, store=store, from_sendshot="latest", name=b"s1")
    monkeypatch.undo()
    for name, size in sizes.items():
        ino = (s1 / "new" / name).stat().st_ino
        assert (opened.get(ino), read.get(ino)) == (1, size), name
    f3 = (s1 / "old" / "f3").stat().st_ino
    assert opened[f3] == 1  # hashed, then its blocks sent (read again)
    assert read[f3] >= 3_000  # (the stream's, from the descriptor the hashing opened)
    for name in ("s0", "s1"):
        run("btrfs", "receive", "-f", tmp_path / name, rcv)
        assert tree_sum(rcv / name) == tree_sum(snd / name), name
