"""Delta streams vs peer tools on real tree pairs (needs root, btrfs, zstd, rsync, xdelta3).

Pairs: two adjacent numpy wheels unpacked into trees (downloaded once with ``pip download``
into a cache), and a "rebuilt release" (stdlib modules and binaries, every file rewritten
with small edits as new inodes). For each pair, side by side in one run: the delta stream
(``btrdelta delta make``, as downloaded), the kernel's incremental stream with
``zstd -19 --long``, an ``rsync --only-write-batch`` batch with ``zstd -19``, and ext4 images
of both trees (``mkfs.ext4 -d``, same size and UUID) with ``xdelta3 -9 -B <size>`` and
``zstd -19 --long=31 --patch-from``; plus make / expand throughput.

Run: ``.venv/bin/python -m benchmarks.bench_delta``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from btrdelta.testing.loopfs import loop_fs
from btrdelta.testing.loopfs import run as sh

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "btrdelta-bench"
NUMPY = ("1.26.3", "1.26.4")
PY = sys.executable


def _numpy_trees(work: Path) -> tuple[Path, Path] | None:
    trees = []
    for ver in NUMPY:
        dest = CACHE / f"numpy-{ver}"
        if not dest.exists():
            wheels = CACHE / "wheels"
            wheels.mkdir(parents=True, exist_ok=True)
            proc = subprocess.run(
                [PY, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                 "-d", str(wheels), f"numpy=={ver}"], capture_output=True, check=False,
            )
            found = sorted(wheels.glob(f"numpy-{ver}-*.whl"))
            if proc.returncode != 0 or not found:
                return None
            tmp = dest.with_suffix(".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            with zipfile.ZipFile(found[0]) as z:
                z.extractall(tmp)
            tmp.rename(dest)
        trees.append(dest)
    return trees[0], trees[1]


def _release_trees(work: Path) -> tuple[Path, Path]:
    from tests.delta.conftest import build_release, rebuild_release

    a = work / "rel-a" / "usr"
    build_release(a)
    b = work / "rel-b" / "usr"
    shutil.copytree(a, b, symlinks=True)
    rebuild_release(b)
    return a.parent, b.parent


def _size(path: Path) -> int:
    return path.stat().st_size


def _zstd(src: Path, *args: str) -> int:
    out = src.with_suffix(".zst")
    sh("zstd", "-q", "-f", *args, str(src), "-o", str(out))
    return _size(out)


def _tree_bytes(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _ext4_images(a: Path, b: Path, work: Path) -> dict[str, int]:
    size_mb = max(64, (max(_tree_bytes(a), _tree_bytes(b)) * 2) // (1 << 20) + 32)
    uid = "0b9c2f35-3a3e-4c36-9d0a-2a2d5b7c1e11"
    imgs = []
    for name, tree in (("a", a), ("b", b)):
        img = work / f"{name}.ext4"
        with open(img, "wb") as f:
            f.truncate(size_mb << 20)
        sh("mkfs.ext4", "-q", "-F", "-U", uid, "-E", "hash_seed=" + uid, "-d", str(tree),
           str(img))
        imgs.append(img)
    res = {}
    xd = work / "img.xdelta"
    sh("xdelta3", "-9", "-f", "-B", str(size_mb << 20), "-e", "-s", str(imgs[0]), str(imgs[1]),
       str(xd))
    res["ext4 xdelta3 -9 -B"] = _size(xd)
    pf = work / "img.patch.zst"
    sh("zstd", "-q", "-f", "-19", "--long=31", "--patch-from=" + str(imgs[0]), str(imgs[1]),
       "-o", str(pf))
    res["ext4 zstd -19 --long=31 --patch-from"] = _size(pf)
    return res


def _measure(name: str, a_tree: Path, b_tree: Path, work: Path) -> list[str]:
    lines = [f"== {name}: {_tree_bytes(a_tree) / 1e6:.1f} MB -> {_tree_bytes(b_tree) / 1e6:.1f} MB"]
    with loop_fs("btrfs", size="2G", options="compress=zstd") as mnt:
        vol = mnt / "vol"
        sh("btrfs", "-q", "subvolume", "create", vol)
        sh("cp", "-a", f"{a_tree}/.", str(vol))
        sh("sync")
        sh("btrfs", "-q", "subvolume", "snapshot", "-r", vol, mnt / "A")
        # B as a fresh copy (new inodes), as a rebuilt image would be
        for child in vol.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        sh("cp", "-a", f"{b_tree}/.", str(vol))
        sh("sync")
        sh("btrfs", "-q", "subvolume", "snapshot", "-r", vol, mnt / "B")
        stream = work / f"{name}.stream"
        sh("btrfs", "-q", "send", "-p", mnt / "A", "-f", stream, mnt / "B")
        delta = work / f"{name}.delta"
        t0 = time.monotonic()
        sh(PY, "-m", "btrdelta", "delta", "make", "-f", stream, "--old", mnt / "A", "-o", delta)
        t_make = time.monotonic() - t0
        back = work / f"{name}.back"
        t0 = time.monotonic()
        sh(PY, "-m", "btrdelta", "delta", "expand", "-f", delta, "--old", mnt / "A", "-o", back)
        t_expand = time.monotonic() - t0
        assert back.read_bytes() == stream.read_bytes(), "expand(make(S)) != S"
        sizes = {"delta stream (btrdelta)": _size(delta),
                 "kernel stream zstd -19 --long": _zstd(stream, "-19", "--long=27")}
    batch = work / "rsync.batch"
    dst = work / "rsync-dst"
    shutil.copytree(a_tree, dst, symlinks=True)
    sh("rsync", "-a", "--delete", f"--only-write-batch={batch}", f"{b_tree}/", f"{dst}/")
    sizes["rsync batch zstd -19"] = _zstd(batch, "-19")
    sizes.update(_ext4_images(a_tree, b_tree, work))
    s = _size(stream)
    lines.append(f"  kernel stream (raw)                    {s:>12,d} B")
    for label, n in sorted(sizes.items(), key=lambda kv: kv[1]):
        lines.append(f"  {label:<38} {n:>12,d} B  ({n / s:6.2%} of stream)")
    lines.append(
        f"  make {s / t_make / 1e6:.1f} MB/s of stream ({t_make:.1f}s), "
        f"expand {s / t_expand / 1e6:.1f} MB/s ({t_expand:.1f}s) [CLI, incl. startup]"
    )
    return lines


def run() -> list[str]:
    """Measure every pair; one printable line per result."""
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-delta-") as tmp:
        work = Path(tmp)
        pairs: list[tuple[str, Path, Path]] = []
        np_trees = _numpy_trees(work)
        if np_trees is not None:
            pairs.append((f"numpy {NUMPY[0]} -> {NUMPY[1]}", *np_trees))
        else:
            lines.append("numpy wheels unavailable (pip download failed): skipped")
        pairs.append(("rebuilt-release", *_release_trees(work)))
        for name, a, b in pairs:
            sub = work / name.split()[0]
            sub.mkdir()
            lines += _measure(name.split()[0], a, b, sub)
    return lines


if __name__ == "__main__":
    for line in run():
        print(line)
