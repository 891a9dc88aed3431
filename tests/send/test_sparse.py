"""Sparse files: holes are never read or mapped (a tmpfs would allocate pages for them)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from btrdelta.send import send_records
from btrdelta.stream.records import Clone, Fallocate, Truncate, Write


@pytest.fixture
def tmpfs_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on tmpfs (/dev/shm) when there is one, else ``tmp_path``."""
    if not os.path.isdir("/dev/shm"):
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="btrdelta-sparse-", dir="/dev/shm"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_sparse_files_stay_sparse(tmpfs_dir: Path) -> None:
    old = tmpfs_dir / "old"
    old.mkdir()
    with open(old / "sparse", "wb") as f:
        f.truncate(1 << 30)
    with open(old / "image", "wb") as f:
        f.truncate(256 << 20)
        f.seek(100 << 20)
        f.write(os.urandom(256 * 1024))
    subprocess.run(["cp", "-a", "--sparse=always", str(old), str(tmpfs_dir / "new")],
                   check=True)
    new = tmpfs_dir / "new"
    with open(new / "sparse", "r+b") as f:
        f.seek(512 << 20)
        f.write(b"\xcd" * 65536)
    with open(new / "image", "r+b") as f:  # 64 KiB more data, and whole blocks shifted
        f.seek(100 << 20)
        f.write(os.urandom(64 * 1024) + (old / "image").read_bytes()[100 << 20:][:192 * 1024])
    blocks = {p: p.stat().st_blocks for d in (old, new) for p in d.iterdir()}
    for version in (1, 2):
        recs = list(send_records(new, old, version=version))
        written = sum(len(r.data) for r in recs if isinstance(r, Write))
        # the 64 KiB in each file, plus at most a chunk or two at the edges of the shift
        assert written <= 65536 + 64 * 1024 + 64 * 1024, written
        assert sum(r.length for r in recs if isinstance(r, Clone)) >= 128 * 1024
        assert not [r for r in recs if isinstance(r, (Truncate, Fallocate))]
    # reading the trees allocated nothing
    assert {p: p.stat().st_blocks for p in blocks} == blocks
