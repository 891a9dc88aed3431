"""Ctrl-C while an incremental receive into a plain directory copies its parent.

On a filesystem without subvolumes the parent is copied (``cp -a``) under a temporary
name first. Found with the fsstress chains (tests/randwork/test_fsstress.py), whose
parents take a while to copy: interrupted then, the receive left the partial copy
(``.btrdelta-tmp-*``, as large as the parent) in DEST until a later receive swept it. It
is removed now, as on every other failure. ``cp`` is the real one, made slow at its end
(a copy of a large parent).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from btrdelta.stream.records import End, Snapshot, Write
from btrdelta.tree.treesum import tree_sum
from tests.conftest import Children

from .helpers import UUID_A, UUID_B, stream_bytes
from .test_failures import FULL, _entries

INCR = [Snapshot(path=b"B", uuid=UUID_B, ctransid=9, clone_uuid=UUID_A, clone_ctransid=7),
        Write(path=b"d/f", offset=0, data=b"HELLO"), End()]

SLOW_CP = """#!/bin/sh
/bin/cp "$@" || exit $?
touch "$BTRDELTA_TEST_MARK"
exec sleep 60
"""


def test_ctrl_c_while_the_parent_is_copied_leaves_no_copy(tmp_path: Path,
                                                          children: Children) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (tmp_path / "full").write_bytes(stream_bytes(FULL))
    (tmp_path / "incr").write_bytes(stream_bytes(INCR))
    cli = [sys.executable, "-m", "btrdelta", "receive", "-q"]
    subprocess.run([*cli, "-f", str(tmp_path / "full"), str(dest)], check=True)
    parent_sum = tree_sum(dest / "A")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "cp").write_text(SLOW_CP)
    (bin_ / "cp").chmod(0o755)
    mark = tmp_path / "copied"
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}",
           "BTRDELTA_TEST_MARK": str(mark)}
    # SIGINT at its default in the receiver: a suite started in the background (``&``)
    # has it ignored, and so would its children
    proc = children.start([*cli, "-f", str(tmp_path / "incr"), str(dest)], env=env,
                          stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not mark.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the parent was never copied"
        time.sleep(0.02)
    assert any(n.startswith(".btrdelta-tmp-") for n in os.listdir(dest))  # the copy
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip() == "btrdelta receive: interrupted", err
    assert _entries(dest) == ["A"]
    assert tree_sum(dest / "A") == parent_sum
