"""The reading half of a send: the parent tree scanned in a child process (send/scan.py).

Each case runs in a fresh interpreter: :class:`TreeScan` forks only while no other thread
runs, which a long pytest session cannot promise.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from btrdelta.send.scan import hash_contents, scan_tree

_SCRIPT = """
import os, signal, sys
from btrdelta.send.scan import TreeScan
scan = TreeScan(sys.argv[1], sys.argv[2], workers=2)
try:
    forked = scan._forked
    assert forked is not None, "no child was forked"
    if sys.argv[3] == "kill":
        os.kill(forked._pid, signal.SIGKILL)
    tree = scan.old_tree()
    assert tree is not None
    assert scan._forked is None
    scan.hasher.wait()  # a tree scanned here is hashed by the threads with the new one
    print(tree.identity().hex())
finally:
    scan.close()
"""


def _tree(root: Path) -> Path:
    for d in range(3):
        sub = root / f"d{d}"
        sub.mkdir(parents=True)
        for i in range(20):
            (sub / f"f{i}").write_bytes(os.urandom(100 + i * 37))
    os.link(root / "d0" / "f0", root / "link")
    os.symlink("d1/f1", root / "sym")
    return root


@pytest.mark.parametrize("child", ["kill", "keep"])
def test_the_parent_tree_whether_the_child_lives_or_is_killed(
    tmp_path: Path, child: str
) -> None:
    old = _tree(tmp_path / "old")
    new = _tree(tmp_path / "new")
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(new), str(old), child],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    expected = scan_tree(old)
    hash_contents([expected], workers=1)
    assert done.stdout.strip() == expected.identity().hex()
