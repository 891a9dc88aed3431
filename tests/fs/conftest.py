"""Fixtures for the filesystem primitives: one loop-mounted btrfs for the module."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import btrfs_loop


@pytest.fixture(scope="module")
def btrfs_mnt() -> Iterator[Path]:
    """A fresh loop-mounted btrfs (the top-level subvolume mounted)."""
    with btrfs_loop(size="256M") as mnt:
        yield mnt


def progs(*args: str | os.PathLike[str]) -> str:
    """Run ``btrfs ARGS`` (btrfs-progs, the oracle) and return its standard output."""
    proc = subprocess.run(["btrfs", *map(str, args)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def subvolume_show(path: Path) -> dict[str, str]:
    """``btrfs subvolume show PATH`` as a dict (``UUID``, ``Received UUID``, ``Flags``...)."""
    out = progs("subvolume", "show", path)
    return {k.strip(): v.strip() for k, _, v in
            (line.partition(":") for line in out.splitlines()[1:]) if v.strip()}


def mount_source(mnt: Path) -> str:
    """The device mounted on ``mnt``."""
    return subprocess.run(["findmnt", "-no", "SOURCE", str(mnt)], capture_output=True,
                          text=True, check=True).stdout.split("[")[0].strip()
