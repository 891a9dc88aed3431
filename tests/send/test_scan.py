"""The reading half of a send: the parent tree scanned in a child process (send/scan.py)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from btrdelta.send.scan import TreeScan, hash_contents, scan_tree


def _tree(root: Path) -> Path:
    for d in range(3):
        sub = root / f"d{d}"
        sub.mkdir(parents=True)
        for i in range(20):
            (sub / f"f{i}").write_bytes(os.urandom(100 + i * 37))
    os.link(root / "d0" / "f0", root / "link")
    os.symlink("d1/f1", root / "sym")
    return root


def _expected(path: Path) -> bytes:
    tree = scan_tree(path)
    hash_contents([tree], workers=1)
    return tree.identity()


def test_a_child_killed_by_a_signal_is_replaced_by_a_scan_here(tmp_path: Path) -> None:
    old = _tree(tmp_path / "old")
    new = _tree(tmp_path / "new")
    scan = TreeScan(new, old, workers=2)
    try:
        forked = scan._forked
        assert forked is not None
        assert forked._pid is not None
        os.kill(forked._pid, signal.SIGKILL)
        tree = scan.old_tree()
        assert tree is not None
        scan.hasher.wait()  # scanned here: hashed by the threads with the new tree
        assert tree.identity() == _expected(old)
        assert scan._forked is None
    finally:
        scan.close()


def test_the_child_scan_equals_a_scan_here(tmp_path: Path) -> None:
    old = _tree(tmp_path / "old")
    new = _tree(tmp_path / "new")
    scan = TreeScan(new, old, workers=2)
    try:
        tree = scan.old_tree()
        assert tree is not None
        assert tree.identity() == _expected(old)
    finally:
        scan.close()
