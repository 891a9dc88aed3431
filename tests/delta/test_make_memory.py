"""``delta make``'s peak memory on a file the size where HDiffPatch's zstd tables and the
windowed diff dominate (issue 12's goal: 64 MiB + 4x the largest file diffed), measured on
the CLI in a child process (``wait4``'s peak RSS) and checked against the kernel's stream
(the delta expands back to it byte for byte)."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

from btrdelta.testing.loopfs import loop_fs, run
from btrdelta.testing.scenarios import send
from tests.conftest import require_btrfs, run_peak_rss

pytestmark = pytest.mark.btrfs

#: the file's size: above hdiff's WINDOW_MIN (diffed in windows), its raw patch's new-data
#: stream above the size where zstd level 19 takes its largest tables
SIZE = 12 << 20


def _contents() -> tuple[bytes, bytes]:
    """An old file and a new one sharing nothing (a rebuilt compressed payload, as the
    kernel image's): the new bytes are 4 KiB blocks drawn from a pool, so they compress
    (zstd works through the whole raw patch) but no old byte covers them."""
    rng = random.Random(12)
    old = rng.randbytes(SIZE)
    pool = [rng.randbytes(4096) for _ in range(1024)]
    new = b"".join(rng.choice(pool) for _ in range(SIZE // 4096))
    return old, new


def _run(*args: str) -> tuple[int, str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BTRDELTA_")}
    return run_peak_rss([sys.executable, "-m", "btrdelta", *args], env)


def test_make_of_a_large_rewritten_file_stays_within_the_goal(tmp_path: Path) -> None:
    require_btrfs()
    old, new = _contents()
    with loop_fs("btrfs", size="512M") as mnt:
        vol = mnt / "vol"
        run("btrfs", "-q", "subvolume", "create", vol)
        (vol / "image").write_bytes(old)
        run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, mnt / "A")
        with open(vol / "image", "r+b") as f:
            f.write(new)
        run("sync")
        run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, mnt / "B")
        stream = send(mnt / "B", tmp_path / "B.stream", parent=mnt / "A")
        delta = tmp_path / "B.delta"
        code, err, rss = _run("delta", "make", "-f", str(stream), "--old", str(mnt / "A"),
                              "-o", str(delta), "-j", "1")
        assert code == 0, err
        goal = (64 << 20) + 4 * SIZE
        assert rss <= goal, f"delta make peaked at {rss >> 20} MiB, the goal is {goal >> 20}"
        assert delta.stat().st_size < len(new) // 2  # (the file was patched, compressed)
        back = tmp_path / "B.again"
        code, err, _ = _run("delta", "expand", "-f", str(delta), "--old", str(mnt / "A"),
                            "-o", str(back))
        assert code == 0, err
        assert back.read_bytes() == stream.read_bytes()
