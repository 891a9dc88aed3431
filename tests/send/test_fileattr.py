"""FILEATTR: changed ``chattr`` flags are sent as the kernel sends them (v2+, incremental,
only for inodes that existed in the parent), checked against the kernel's own stream."""

from __future__ import annotations

import uuid

import pytest

from btrdelta.send import send_records
from btrdelta.stream.records import Fileattr
from btrdelta.testing.scenarios import SCENARIOS, kernel_receive, make_snapshots
from btrdelta.testing.scenarios import send as kernel_send_file
from tests.send.conftest import Workspace, make_stream, progs_dump_ok
from tests.send.test_scenarios import assert_same_tree


def _fileattr_lines(dump: str) -> list[str]:
    return sorted(" ".join(line.split()) for line in dump.splitlines()
                  if line.startswith("fileattr"))


@pytest.mark.btrfs
@pytest.mark.parametrize("name", ["fileattr-chattr", "chattr-compress-flag"])
def test_fileattr_like_kernel(btrfs_ws: Workspace, name: str) -> None:
    # fileattr-chattr: f (+A), g (+d), d (+A); chattr-compress-flag: f and e (-c: 0),
    # d (-c +m: NOCOMPRESS), their btrfs.compression properties removed
    sc = next(s for s in SCENARIOS if s.name == name)
    sp = make_snapshots(btrfs_ws.mnt, sc, tag="-" + uuid.uuid4().hex[:6])
    base = btrfs_ws.fresh("fileattr-" + name)
    kernel = kernel_send_file(sp.b, base / "kernel.s", parent=sp.a, proto=2)
    ours = make_stream(base / "ours.s", sp.b, sp.a, version=2)
    want = _fileattr_lines(progs_dump_ok(kernel))
    got = _fileattr_lines(progs_dump_ok(ours))
    assert len(want) == 3, want
    assert got == want, (got, want)
    # v1 cannot carry FILEATTR; a full stream never does (like the kernel)
    assert not [r for r in send_records(sp.b, sp.a, version=1) if isinstance(r, Fileattr)]
    assert not [r for r in send_records(sp.b, version=2) if isinstance(r, Fileattr)]
    # and the kernel receives the stream (btrfs-progs ignores FILEATTR)
    dest = base / "recv"
    dest.mkdir()
    kernel_receive(make_stream(base / "full.s", sp.a, version=2), dest)
    kernel_receive(ours, dest)
    assert_same_tree(sp.b, dest / sp.b.name)
