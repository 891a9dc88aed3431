"""Delta fixtures: kernel snapshot pairs kept mounted (the old trees make and expand need)."""

from __future__ import annotations

import os
import random
import shutil
import sysconfig
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from btrdelta.delta import expand as expand_mod
from btrdelta.delta import patching
from btrdelta.delta.parser import EOF, NEED_DATA, DeltaParser
from btrdelta.delta.recompress import compress_extent
from btrdelta.testing.loopfs import BtrfsUnavailable, loop_fs, run
from btrdelta.testing.scenarios import SCENARIOS, make_snapshots, send
from tests.conftest import require_btrfs


@dataclass
class Pair:
    """A kernel snapshot pair with its incremental streams (v1, v2 --compressed-data)."""

    name: str
    a: Path
    b: Path
    streams: dict[str, Path]
    mnt: Path
    #: a ``clones`` scenario's snapshot C (B's clone source besides A)
    c: Path | None = None


def delta_items(delta: bytes) -> list[object]:
    """Every item of a whole delta stream, parsed at once."""
    p = DeltaParser()
    p.feed(delta)
    p.feed(b"")
    items = []
    while (item := p.next_item()) not in (NEED_DATA, EOF):
        items.append(item)
    return items


def rebuilt_edit(data: bytes, rnd: random.Random) -> bytes:
    """A small, realistic change: a few bytes patched, a short insertion, a deletion."""
    buf = bytearray(data)
    if not buf:
        return b"new"
    for _ in range(3):
        i = rnd.randrange(len(buf))
        buf[i : i + 4] = rnd.randbytes(4)
    i = rnd.randrange(len(buf))
    buf[i:i] = b"/* rebuilt */"
    j = rnd.randrange(len(buf))
    del buf[j : j + 16]
    return bytes(buf)


#: the base interpreter's standard library (/usr/lib/python3.X: 3.11 on Debian 12, 3.13 on 13)
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def build_release(root: Path) -> None:
    """A small 'release': stdlib modules and a few binaries."""
    (root / "lib").mkdir(parents=True)
    (root / "bin").mkdir()
    for src in sorted(STDLIB.glob("*.py"))[:120]:
        shutil.copy2(src, root / "lib" / src.name)
    for name in ("bash", "zstd", "btrfs"):
        path = shutil.which(name)
        if path:
            shutil.copy2(path, root / "bin" / name)
    os.symlink("bin/bash", root / "sh")


def rebuild_release(root: Path, seed: int = 7) -> None:
    """Rewrite every file with small changes as a fresh copy (new inodes everywhere)."""
    rnd = random.Random(seed)
    fresh = root.parent / (root.name + ".new")
    shutil.copytree(root, fresh, symlinks=True)
    for path in sorted(fresh.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = rebuilt_edit(path.read_bytes(), rnd)
            path.unlink()
            path.write_bytes(data)
            path.chmod(0o755 if "bin" in path.parts else 0o644)
    shutil.rmtree(root)
    fresh.rename(root)


def release_snapshots(mnt: Path, prefix: str = "release-") -> tuple[Path, Path]:
    """Snapshots A (a release) and B (the same release rebuilt) on the btrfs at ``mnt``."""
    vol = mnt / f"vol-{prefix}"
    run("btrfs", "-q", "subvolume", "create", vol)
    build_release(vol / "usr")
    run("sync")
    a, b = mnt / f"{prefix}A", mnt / f"{prefix}B"
    run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, a)
    rebuild_release(vol / "usr")
    run("sync")
    run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, b)
    return a, b


def _make_release_pair(mnt: Path, out: Path) -> Pair:
    a, b = release_snapshots(mnt)
    streams = {
        "v1": send(b, out / "release.v1", parent=a, proto=1),
        "v2": send(b, out / "release.v2", parent=a, proto=2, compressed=True),
        "v2plain": send(b, out / "release.v2plain", parent=a, proto=2),
    }
    return Pair("rebuilt-release", a, b, streams, mnt)


def _make_same_pair(mnt: Path, out: Path) -> Pair:
    """A release rebuilt with most files unchanged in content (new inodes, same bytes), as
    an image rebuilt from scratch is; plus a sparse file and one file that really
    changed."""
    vol = mnt / "vol-same"
    run("btrfs", "-q", "subvolume", "create", vol)
    usr = vol / "usr"
    build_release(usr)
    with open(usr / "sparse", "wb") as f:
        f.write(os.urandom(300_000))
        f.seek(3 << 20)
        f.write(os.urandom(70_001))
    run("sync")
    a, b = mnt / "same-A", mnt / "same-B"
    run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, a)
    for path in sorted(p for p in usr.rglob("*") if p.is_file() and not p.is_symlink()):
        fresh = path.with_name(path.name + ".fresh")
        run("cp", "-p", "--sparse=always", "--reflink=never", str(path), str(fresh))
        fresh.rename(path)
    lib = sorted((usr / "lib").iterdir())[3]
    lib.write_bytes(rebuilt_edit(lib.read_bytes(), random.Random(3)))
    run("sync")
    run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, b)
    streams = {
        "v1": send(b, out / "same.v1", parent=a, proto=1),
        "v2plain": send(b, out / "same.v2plain", parent=a, proto=2),
        "v2": send(b, out / "same.v2", parent=a, proto=2, compressed=True),
    }
    return Pair("rebuilt-same", a, b, streams, mnt)


@pytest.fixture(scope="session")
def delta_pairs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Pair]]:
    """Every scenario (and a rebuilt release) as mounted snapshots + incremental streams."""
    require_btrfs()
    out = tmp_path_factory.mktemp("delta-streams")
    try:
        with loop_fs("btrfs", size="2G", options="compress=zstd") as mnt:
            pairs: dict[str, Pair] = {}
            for sc in SCENARIOS:
                sp = make_snapshots(mnt, sc)
                streams = {
                    "v1": send(sp.b, out / f"{sc.name}.v1", parent=sp.a, proto=1),
                    "v2": send(sp.b, out / f"{sc.name}.v2", parent=sp.a, proto=2,
                               compressed=True),
                }
                pairs[sc.name] = Pair(sc.name, sp.a, sp.b, streams, mnt, sp.c)
            pairs["rebuilt-release"] = _make_release_pair(mnt, out)
            pairs["rebuilt-same"] = _make_same_pair(mnt, out)
            yield pairs
    except BtrfsUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but btrfs is unavailable: {exc}")
        pytest.skip(str(exc))


@pytest.fixture
def penc_pool(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Force the thread pool (4 threads, a 512 KiB window) and scramble completion order:
    each recompression in a worker sleeps 0-3 ms. Returns the names of the threads that
    recompressed an extent."""
    names: list[str] = []

    def slow(raw: memoryview, compression: int, level: int) -> bytes:
        name = threading.current_thread().name
        names.append(name)
        if name.startswith("btrdelta-penc"):
            time.sleep((len(raw) * 7919 + len(names)) % 4 / 1000)
        return compress_extent(raw, compression, level)

    monkeypatch.setattr(patching, "_WORKERS", 4)
    monkeypatch.setattr(expand_mod, "_WINDOW", 512 << 10)
    monkeypatch.setattr(patching, "compress_extent", slow)
    return names
