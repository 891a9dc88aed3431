"""Sendshots on real workloads: rounds of `send --from-sendshot latest --record` of a live
btrfs subvolume (no old snapshot kept: `btrfs subvolume list`, `btrfs filesystem du`), each
applied by the kernel's `btrfs receive` and by `btrdelta receive` (one through `delta make` and
`delta expand`); oracle: tree-sum of the received tree equals the source at send time.
"""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from btrdelta.cli import main
from btrdelta.stream import StreamHeader, StreamReader
from btrdelta.stream.records import Snapshot, Subvol, Write
from btrdelta.tree import diff_manifests, tree_manifest, tree_sum
from tests.send.conftest import run as _run

pytestmark = pytest.mark.btrfs


def _rand(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def _same(a: Path, b: Path) -> None:
    ma, mb = tree_manifest(a, holes=True), tree_manifest(b, holes=True)
    assert not diff_manifests(ma, mb), diff_manifests(ma, mb)


def _records(stream: Path) -> list[object]:
    with open(stream, "rb") as f:
        return [ev for ev in StreamReader(f).events() if type(ev) is not StreamHeader]


def _exclusive(live: Path) -> None:
    """The live subvolume shares no extent with anything (no old snapshot pins its data):
    ``btrfs filesystem du`` counts all of it as exclusive, once deleted subvolumes are gone
    (``filesystem sync`` commits and wakes the cleaner that drops them)."""
    _run("btrfs", "filesystem", "sync", live.parent)
    _run("btrfs", "subvolume", "sync", live.parent)
    total, exclusive = _run("btrfs", "filesystem", "du", "-s", "--raw", live
                            ).splitlines()[-1].split()[:2]
    assert int(total) > 0
    assert total == exclusive, (total, exclusive)


def _through_a_delta(stream: Path, old: Path, tmp: Path) -> Path:
    """``delta make`` of ``stream`` against the receiver's copy of its parent, expanded
    again: the same bytes (the kernel then receives the expanded stream)."""
    delta, back = tmp / f"{stream.name}.delta", tmp / f"{stream.name}.expanded"
    assert main(["delta", "make", "-f", str(stream), "--old", str(old), "-o", str(delta)]) == 0
    assert main(["delta", "expand", "-f", str(delta), "--old", str(old), "-o", str(back)]) == 0
    assert back.read_bytes() == stream.read_bytes()
    return back


def _rounds(tmp: Path, snd: Path, rcv: Path, live: Path,
            change: Callable[[int], None], rounds: int = 3, delta: bool = False) -> list[Path]:
    """Full then `rounds` incrementals; every stream checked on both receivers (with
    ``delta``, the last one reaches the kernel through ``delta make``/``delta expand``)."""
    store = tmp / "store"
    dirdest = tmp / "dirdest"
    dirdest.mkdir()
    kdest = rcv / "k"
    kdest.mkdir()
    streams = []
    for i in range(rounds + 1):
        if i:
            change(i)
        stream = tmp / f"s{i}"
        args = ["send", str(live), "-o", str(stream), "--record", "--store", str(store),
                "--name", f"data.{i}", "--proto", "2"]
        if i:
            args += ["--from-sendshot", "latest"]
        assert main(args) == 0
        expected = tree_sum(live, holes=True)
        kstream = stream
        if delta and i == rounds:
            kstream = _through_a_delta(stream, kdest / f"data.{i - 1}", tmp)
        _run("btrfs", "receive", "-f", kstream, kdest)
        assert main(["receive", "-f", str(stream), str(dirdest)]) == 0
        for got in (kdest / f"data.{i}", dirdest / f"data.{i}"):
            if tree_sum(got, holes=True) != expected:
                _same(live, got)
        # the sender keeps no snapshot: only the live subvolume
        listing = _run("btrfs", "subvolume", "list", snd)
        assert [ln.split()[-1] for ln in listing.splitlines()] == [live.name], listing
        streams.append(stream)
    _exclusive(live)
    return streams


def test_tree_modified_in_place(two_fs: tuple[Path, Path], tmp_path: Path) -> None:
    snd, rcv = two_fs
    live = snd / "live"
    _run("btrfs", "subvolume", "create", live)
    rng = random.Random(7)
    (live / "d").mkdir()
    for n in range(20):
        (live / "d" / f"f{n}").write_bytes(_rand(rng, rng.randrange(1, 200_000)))
    (live / "big").write_bytes(_rand(rng, 2 << 20))
    (live / "sparse").write_bytes(b"")
    with open(live / "sparse", "r+b") as f:
        f.seek(1 << 20)
        f.write(b"tail" * 1024)
    os.setxattr(live / "d" / "f1", "user.k", b"v0")
    os.symlink("d/f2", live / "ln")

    def change(i: int) -> None:
        with open(live / "big", "ab") as f:  # appended
            f.write(_rand(rng, 10_000))
        with open(live / "big", "r+b") as f:  # overwritten in the middle
            f.seek(512 * 1024 + i * 4096)
            f.write(_rand(rng, 8192))
        os.truncate(live / "d" / "f3", 1000 * i)  # truncated
        os.rename(live / "d" / f"f{4 + i}", live / f"moved{i}")  # renamed
        os.link(live / "d" / "f10", live / f"hard{i}")  # hard-linked
        (live / "d" / f"f{12 + i}").unlink()  # deleted
        os.setxattr(live / "d" / "f1", "user.k", f"v{i}".encode())  # xattr changed
        subprocess.run(["fallocate", "-p", "-o", str(i * 65536), "-l", "65536",
                        str(live / "big")], check=True)  # hole punched
        (live / f"new{i}").write_bytes(_rand(rng, 50_000))
        (live / "d" / f"f{17}").write_bytes((live / "big").read_bytes()[:300_000])

    streams = _rounds(tmp_path, snd, rcv, live, change, delta=True)
    # an incremental names the previous stream's UUID and does not resend unchanged files
    recs = _records(streams[2])
    head = recs[0]
    assert isinstance(head, Snapshot)
    assert isinstance(_records(streams[1])[0], Snapshot)
    assert isinstance(_records(streams[0])[0], Subvol)
    assert head.clone_uuid == _records(streams[1])[0].uuid  # type: ignore[attr-defined]
    written = {r.path for r in recs if isinstance(r, Write)}
    assert b"d/f0" not in written
    assert b"d/f11" not in written


def test_sqlite_under_write_load(two_fs: tuple[Path, Path], tmp_path: Path) -> None:
    snd, rcv = two_fs
    live = snd / "db"
    _run("btrfs", "subvolume", "create", live)
    con = sqlite3.connect(live / "app.db")
    con.execute("create table t (k integer primary key, v blob)")
    rng = random.Random(3)
    con.executemany("insert into t values (?, ?)", [(k, _rand(rng, 500)) for k in range(4000)])
    con.commit()
    con.close()

    def change(i: int) -> None:
        c = sqlite3.connect(live / "app.db")
        for _ in range(50):
            c.execute("update t set v = ? where k = ?", (_rand(rng, 500), rng.randrange(4000)))
        c.executemany("insert into t (v) values (?)", [(_rand(rng, 300),) for _ in range(100)])
        c.execute("delete from t where k % 97 = ?", (i,))
        c.commit()
        c.close()

    streams = _rounds(tmp_path, snd, rcv, live, change)
    size = (live / "app.db").stat().st_size
    # changed pages only: each incremental is a fraction of the database
    for s in streams[1:]:
        assert s.stat().st_size < size / 2


def test_directory_rebuilt_from_scratch(two_fs: tuple[Path, Path], tmp_path: Path) -> None:
    snd, rcv = two_fs
    live = snd / "rel"
    _run("btrfs", "subvolume", "create", live)
    rng = random.Random(5)
    content = {f"pkg/m{n}.py": _rand(rng, rng.randrange(100, 60_000)) for n in range(30)}

    def build(i: int) -> None:
        if (live / "pkg").exists():
            subprocess.run(["rm", "-rf", str(live / "pkg")], check=True)
        (live / "pkg").mkdir()
        for name, data in content.items():
            if i and name.endswith(f"{i}.py"):
                data = data[:100] + b"changed" + data[100:]
            target = name.replace("m2", "renamed2") if i >= 2 else name
            (live / target).write_bytes(data)

    build(0)
    streams = _rounds(tmp_path, snd, rcv, live, build, rounds=2)
    # new inodes with old content: clones from the parent, not data
    total = sum(len(v) for v in content.values())
    assert streams[2].stat().st_size < total / 4
