"""update.holdings clean-up of what an interrupted or refused update left in DEST: trees of
any depth (a version that failed its check is untrusted), on the directory backend."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from btrdelta.receive.subvolumes import TMP_PREFIX
from btrdelta.update.holdings import HOP_PREFIX, cleanup, remove_entry
from tests.fs.test_remove import _deep


def test_trees_deeper_than_the_recursion_limit_are_removed(deep_tmp_path: Path) -> None:
    dest = deep_tmp_path / "dest"
    dest.mkdir()
    (dest / "v1").mkdir()
    (dest / "v1" / "f").write_bytes(b"kept")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    for name in (f"{TMP_PREFIX}0123456789ab-{dead}", f"{HOP_PREFIX}v2"):
        (dest / name).mkdir()
        _deep(dest / name, sys.getrecursionlimit() + 200)  # shutil.rmtree fails on these
    remove_entry(dest, f"{HOP_PREFIX}v2")
    cleanup(dest)
    assert sorted(p.name for p in dest.iterdir()) == ["v1"]
    assert (dest / "v1" / "f").read_bytes() == b"kept"
