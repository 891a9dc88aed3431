"""Fixtures for device workflows: loop-mounted btrfs devices and real releases.

Real releases: the Debian bookworm minbase trees before and after ``apt-get upgrade``
(``$BTRDELTA_BENCH_CACHE``, ``/work/bench-cache`` or ``benchmarks/.cache``, built by
``benchmarks/trees.py``), read only, never modified; and a small real update cut out of them
(apt's files and dpkg's status: 80 records), small enough to crash an install after every one
of its records.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from btrdelta.tree import tree_sum
from tests.conftest import btrfs_loop

_CACHES = tuple(Path(p) for p in (os.environ.get("BTRDELTA_BENCH_CACHE", ""), "/work/bench-cache",
                                   Path(__file__).parents[2] / "benchmarks" / ".cache") if p)
_SMALL = ("usr/lib/apt", "etc/apt", "home", "var/lib/dpkg/status", "var/lib/dpkg/info/apt.list",
          "var/lib/dpkg/info/apt.md5sums")
BTRDELTA = [sys.executable, "-m", "btrdelta"]


@dataclass(frozen=True)
class Release:
    """A release pair: OLD and NEW trees, their tree-sums, streams from OLD to NEW."""

    old: Path
    new: Path
    old_sum: str
    new_sum: str
    full: Path  # full stream of OLD
    stream: Path  # incremental OLD -> NEW
    delta: Path  # delta stream of it


def btrdelta(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the CLI, capture its output."""
    proc = subprocess.run([*BTRDELTA, *map(os.fspath, args)], capture_output=True, text=True,
                          check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"btrdelta {args} failed ({proc.returncode}): {proc.stderr}")
    return proc


def debian_trees() -> tuple[Path, Path]:
    for cache in _CACHES:
        if (cache / "debian.done").exists():
            return cache / "debian-old", cache / "debian-new"
    pytest.skip("no Debian release trees (make bench builds them: benchmarks/trees.py)")


def _streams(out: Path, old: Path, new: Path) -> Release:
    full, stream, delta = out / "old.stream", out / "old-new.stream", out / "old-new.delta"
    btrdelta("send", old, "-o", full)
    btrdelta("send", "--parent", old, new, "-o", stream)
    btrdelta("delta", "make", "-f", stream, "--old", old, "-o", delta)
    return Release(old, new, tree_sum(old), tree_sum(new), full, stream, delta)


@pytest.fixture(scope="session")
def small_release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    """The small real update (cut out of the Debian pair)."""
    old_tree, new_tree = debian_trees()
    out = tmp_path_factory.mktemp("small-release")
    for tree, dst in ((old_tree, out / "old"), (new_tree, out / "new")):
        for rel in _SMALL:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-a", str(tree / rel), str(dst / rel)], check=True)
    return _streams(out, out / "old", out / "new")


@pytest.fixture(scope="session")
def debian_release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    """The whole Debian minbase update."""
    old_tree, new_tree = debian_trees()
    return _streams(tmp_path_factory.mktemp("debian-release"), old_tree, new_tree)


@pytest.fixture
def btrfs_dev() -> Iterator[Path]:
    """A fresh loop-mounted btrfs (its top level): one device."""
    with btrfs_loop(size="2G") as mnt:
        yield mnt


def copy_tree(src: Path, dst: Path) -> None:
    """``cp -a`` (keeps hard links, xattrs, times)."""
    if dst.exists():
        shutil.rmtree(dst)
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
