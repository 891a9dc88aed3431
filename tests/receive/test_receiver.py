"""btrdelta.receive.receiver: the helper thread that reads ahead."""

from __future__ import annotations

import subprocess
import sys

_CHILD = """
import os
from btrdelta.receive.receiver import prefetch

def size():
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith("FDSize:")).split()[1])

before = size()
assert list(prefetch(iter([[1], [2]]))) == [[1], [2]]
print(before, size(), len(os.listdir("/proc/self/fd")))
"""


def test_read_ahead_grows_the_fd_table_before_its_thread_starts() -> None:
    """Linux's fd table (FDSize) is grown to 512 entries by the read-ahead before its thread
    starts (in a process of several threads each growth waits for an RCU grace period),
    and no descriptor is left open by it."""
    got = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                         check=True, close_fds=True).stdout.split()
    before, after, fds = map(int, got)
    assert before < 512 <= after
    opened = subprocess.run(
        [sys.executable, "-c", "import os; print(len(os.listdir('/proc/self/fd')))"],
        capture_output=True, text=True, check=True, close_fds=True).stdout
    assert fds == int(opened)
