"""Fixtures for device workflows: loop-mounted btrfs devices and real releases.

Real releases: the Debian bookworm minbase trees before and after ``apt-get upgrade``
(``$BTRDELTA_BENCH_CACHE``, ``/work/bench-cache`` or ``benchmarks/.cache``, built by
``benchmarks/trees.py``), read only, never modified; where they are not cached (a fresh
machine), a pair of the same kind made once per session from this machine's own packages
(:mod:`tests.device.hostrelease`; ``BTRDELTA_DEVICE_TREES=host`` makes it even where the
Debian pair is cached). Under ``CI=true`` a test that gets neither fails. And a small real
update cut out of the pair (apt's files and dpkg's status: 60-80 records), small enough to
crash an install after every one of its records.
"""

from __future__ import annotations

import json
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

from . import hostrelease

_CACHES = tuple(Path(p) for p in (os.environ.get("BTRDELTA_BENCH_CACHE", ""), "/work/bench-cache",
                                   Path(__file__).parents[2] / "benchmarks" / ".cache") if p)
#: read at import: the autouse _clean_env of tests/conftest.py clears BTRDELTA_* for each test
_HOST_TREES = os.environ.get("BTRDELTA_DEVICE_TREES") == "host"
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
    records: int  # the commands the delta expands to (``btrdelta stat``)


def btrdelta(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the CLI, capture its output."""
    proc = subprocess.run([*BTRDELTA, *map(os.fspath, args)], capture_output=True, text=True,
                          check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"btrdelta {args} failed ({proc.returncode}): {proc.stderr}")
    return proc


def cached_trees() -> tuple[Path, Path] | None:
    """The Debian pair of ``benchmarks/trees.py`` where a cache holds it whole."""
    for cache in () if _HOST_TREES else _CACHES:
        old, new = cache / "debian-old", cache / "debian-new"
        if (cache / "debian.done").exists() and old.is_dir() and new.is_dir():
            return old, new
    return None


@pytest.fixture(scope="session")
def release_trees(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(OLD, NEW): the cached Debian pair, else one made from this machine's packages (removed
    at the session's end); skipped without either, failed instead under CI=true."""
    cached = cached_trees()
    if cached:
        yield cached
        return
    out = tmp_path_factory.mktemp("host-release")
    try:
        trees = hostrelease.build(out)
    except (hostrelease.NoPackages, OSError, subprocess.CalledProcessError, RuntimeError) as exc:
        shutil.rmtree(out)
        msg = (f"no release trees: no Debian pair cached (make bench builds it: "
               f"benchmarks/trees.py) and none made from this machine's packages ({exc})")
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {msg}", pytrace=False)
        pytest.skip(msg)
    yield trees
    shutil.rmtree(out)


def _streams(out: Path, old: Path, new: Path) -> Release:
    full, stream, delta = out / "old.stream", out / "old-new.stream", out / "old-new.delta"
    btrdelta("send", old, "-o", full)
    btrdelta("send", "--parent", old, new, "-o", stream)
    btrdelta("delta", "make", "-f", stream, "--old", old, "-o", delta)
    records = json.loads(btrdelta("stat", "--json", delta).stdout)["expanded_commands"]
    return Release(old, new, tree_sum(old), tree_sum(new), full, stream, delta, records)


@pytest.fixture(scope="session")
def small_release(tmp_path_factory: pytest.TempPathFactory,
                  release_trees: tuple[Path, Path]) -> Iterator[Release]:
    """The small real update (cut out of the release pair)."""
    out = tmp_path_factory.mktemp("small-release")
    for tree, dst in zip(release_trees, (out / "old", out / "new"), strict=True):
        for rel in _SMALL:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-a", str(tree / rel), str(dst / rel)], check=True)
    yield _streams(out, out / "old", out / "new")
    shutil.rmtree(out)


@pytest.fixture(scope="session")
def debian_release(tmp_path_factory: pytest.TempPathFactory,
                   release_trees: tuple[Path, Path]) -> Iterator[Release]:
    """The whole minbase update (the Debian pair's, or this machine's)."""
    out = tmp_path_factory.mktemp("debian-release")
    yield _streams(out, *release_trees)
    shutil.rmtree(out)


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
