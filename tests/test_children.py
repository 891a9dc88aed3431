"""The ``children`` fixture (:class:`tests.conftest.Children`): a test that fails with a child
still running leaves no process and no open pipe to a later test (the later test failed on
the pipes' ``ResourceWarning`` at a garbage collection, warnings being errors)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.conftest import Children


def test_a_child_left_running_is_killed_and_its_pipes_closed() -> None:
    with Children() as kids:  # (the fixture's end, when the test failed here)
        proc = kids.start([sys.executable, "-c", "import time; print('up', flush=True); "
                           "time.sleep(60)"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        proc.stdin.write(b"x" * 100)  # buffered input the killed child never takes
    assert proc.returncode == -signal.SIGKILL
    assert [p.closed for p in (proc.stdin, proc.stdout, proc.stderr)] == [True] * 3


def test_a_grandchild_holding_the_pipe_does_not_hold_up_the_end() -> None:
    """The pipes are closed, not read to their end: a grandchild (``sleep``) that still
    holds the child's standard output does not keep the test waiting."""
    with Children() as kids:
        proc = kids.start(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE,
                          text=True)
        assert proc.stdout is not None
        grandchild = int(proc.stdout.readline())
        t0 = time.monotonic()
    try:
        assert time.monotonic() - t0 < 10
        assert proc.returncode == -signal.SIGKILL
        assert proc.stdout.closed
    finally:
        os.kill(grandchild, signal.SIGKILL)
