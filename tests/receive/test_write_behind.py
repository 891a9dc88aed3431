"""receive(write_behind=True): a large file's data is written out as it is received (the C
fast path starts its write-out every 8 MiB), so that a caller's syncfs at the end (replicate's
receiver) does not write it all at once; checked against the kernel's own view of the
files' extents (FIEMAP: data only in the page cache is flagged delayed allocation)."""

from __future__ import annotations

import os
import subprocess

import pytest

from btrdelta import _native
from btrdelta.receive.applier import WRITE_BEHIND
from btrdelta.tree import tree_sum

from .conftest import Targets, our_receive
from .helpers import written_out_bytes


def test_a_large_file_is_written_out_as_it_is_received(targets: Targets) -> None:
    """The first 16 MiB of a 19 MiB file are on the disk right after the receive; a file
    of 4 MiB (below the threshold), received just before it, is not: it is the control
    that nothing else (another process's ``sync``, the flusher) wrote the files out. A
    receive where the control was written out too says nothing and is made again."""
    if not _native.available("fastapply"):
        pytest.skip("the C fast path (receive/_fastapply.c) is not built")
    top = targets.scratch_btrfs
    src = top / "wb-src"
    subprocess.run(["btrfs", "-q", "subvolume", "create", str(src)], check=True)
    (src / "a-small").write_bytes(os.urandom(WRITE_BEHIND // 2))
    (src / "b-big").write_bytes(os.urandom(2 * WRITE_BEHIND + (3 << 20)))
    snap, stream = top / "wb-snap", top / "wb.stream"
    subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(src), str(snap)],
                   check=True)
    subprocess.run(["btrfs", "-q", "send", "-f", str(stream), str(snap)], check=True)
    for attempt in range(5):
        dest = top / f"wb-dest{attempt}"
        dest.mkdir()
        with _native.use_backend("c", "fastapply"):
            our_receive(stream, dest, write_behind=True)
        got = dest / "wb-snap"
        # the kernel's stream writes 48 KiB at a time: the write-out of the first 8 MiB
        # and of the next (each a little more) was started, the rest left to the kernel
        big = written_out_bytes(got / "b-big", 2 * WRITE_BEHIND)
        small = written_out_bytes(got / "a-small", WRITE_BEHIND // 2, wait=0)
        assert tree_sum(got) == tree_sum(snap)
        if small < WRITE_BEHIND // 2:
            break
    assert big == 2 * WRITE_BEHIND
