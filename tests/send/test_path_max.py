"""A path longer than PATH_MAX: the kernel refuses to send it, and so does our send.

Paths in a stream are whole paths, and ``btrfs receive`` hands them to system calls that
take at most PATH_MAX bytes: the kernel's send (6.18 here; a 2025 fix, "btrfs: send:
return -ENAMETOOLONG ...") fails with ENAMETOOLONG instead of writing one. Ours, full and
incremental (a rename that takes a directory past the limit, a file written there), fails
the same way: one line naming the path, a non-zero exit, no output file left.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from btrdelta.testing.loopfs import run

from .conftest import Workspace

pytestmark = pytest.mark.btrfs

_NAME = "d" * 200  # 25 levels of 201 bytes: 5,025 > PATH_MAX (4,096)


def _deep(top: Path, levels: int) -> Path:
    """``levels`` nested directories of 200-byte names under ``top`` (made relative to one
    another: their whole path is longer than a system call takes); a file at the bottom.
    The bottom directory's path, from ``top``."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir(_NAME, dir_fd=fd)
            nfd = os.open(_NAME, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        with open(os.open("file", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
            f.write(b"deep\n")
    finally:
        os.close(fd)
    return Path(*[_NAME] * levels)


def _move_deeper(vol: Path, bottom: Path) -> None:
    """x's subtree (``bottom``: 19 levels) moved under y's bottom (6 levels: 25 in all), its
    file written there."""
    deep_y = "/".join([_NAME] * 6)
    fd = os.open(vol, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(f"x/{_NAME}", f"y/{deep_y}/sub", src_dir_fd=fd, dst_dir_fd=fd)
        for part in ["y", *[_NAME] * 6, "sub", *bottom.parts[1:]]:
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        with open(os.open("file", os.O_WRONLY | os.O_APPEND, dir_fd=fd), "ab") as f:
            f.write(b"deeper\n")
    finally:
        os.close(fd)


def _our_send(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "btrdelta", "send", "-q", *map(str, args)],
                          capture_output=True, text=True, check=False)


def _refused(proc: subprocess.CompletedProcess[str], out: Path) -> None:
    assert proc.returncode not in (0, 2), proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("btrdelta send: error: "), lines[0]
    assert "File name too long" in lines[0], lines[0]
    # the path is named by its start and end, not 5 KB of it (its middle says its length)
    assert _NAME[:50] in lines[0], lines[0]
    assert re.search(r"\.\.\.\(\d{4} characters\)\.\.\.d{100}: File name too long$", lines[0]), \
        lines[0]
    assert len(lines[0]) < 400, lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_full_send_of_a_path_past_path_max(btrfs_ws: Workspace, tmp_path: Path) -> None:
    top = btrfs_ws.fresh("pathmax")
    vol = top / "vol"
    run("btrfs", "-q", "subvolume", "create", vol)
    _deep(vol, 25)
    run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, top / "A")
    kernel = subprocess.run(["btrfs", "send", "-f", str(tmp_path / "k"), str(top / "A")],
                            capture_output=True, text=True, check=False)
    assert kernel.returncode != 0, kernel.stderr
    assert "-36" in kernel.stderr, kernel.stderr  # ENAMETOOLONG
    _refused(_our_send(top / "A", "-o", tmp_path / "ours"), tmp_path / "ours")


def test_incremental_send_of_a_rename_past_path_max(btrfs_ws: Workspace,
                                                     tmp_path: Path) -> None:
    top = btrfs_ws.fresh("pathmax-inc")
    vol = top / "vol"
    run("btrfs", "-q", "subvolume", "create", vol)
    (vol / "x").mkdir()
    bottom = _deep(vol / "x", 19)  # 19 x 201 + "x/": under PATH_MAX
    (vol / "y").mkdir()
    _deep(vol / "y", 6)
    run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, top / "A")
    _move_deeper(vol, bottom)
    run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, top / "B")
    kernel = subprocess.run(["btrfs", "send", "-p", str(top / "A"), "-f", str(tmp_path / "k"),
                             str(top / "B")], capture_output=True, text=True, check=False)
    assert kernel.returncode != 0, kernel.stderr
    assert "-36" in kernel.stderr, kernel.stderr
    assert len(str(bottom)) < 4096
    _refused(_our_send("--parent", top / "A", top / "B", "-o", tmp_path / "ours"),
             tmp_path / "ours")


def test_sendshot_send_of_a_write_past_path_max(btrfs_ws: Workspace, tmp_path: Path) -> None:
    """--from-sendshot lists what changed instead of walking both trees: a write below a
    directory moved past PATH_MAX is refused there alike (one line, no output file),
    naming the path in the source (it named the temporary snapshot's, which is gone)."""
    top = btrfs_ws.fresh("pathmax-shot")
    vol = top / "vol"
    run("btrfs", "-q", "subvolume", "create", vol)
    (vol / "x").mkdir()
    bottom = _deep(vol / "x", 19)
    (vol / "y").mkdir()
    _deep(vol / "y", 6)
    store = tmp_path / "store"
    first = _our_send("--record", "--store", store, vol, "-o", tmp_path / "first")
    assert first.returncode == 0, first.stderr
    _move_deeper(vol, bottom)
    proc = _our_send("--from-sendshot", "latest", "--store", store, "--name", "vol.2", vol,
                     "-o", tmp_path / "ours")
    assert proc.returncode not in (0, 2), proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("btrdelta send: error: "), lines[0]
    assert re.search(r"\.\.\.\(\d{4} characters\)\.\.\.d{90,}/file: File name too long$",
                     lines[0]), lines[0]
    # the path in the source, not in the temporary snapshot read (gone by now)
    assert f"error: {vol}/y/ddd" in lines[0], lines[0]
    assert ".btrdelta-send-" not in lines[0], lines[0]
    assert not (tmp_path / "ours").exists()
