"""The applier is a record sink: ``feed`` drives it to the tree ``receive`` makes."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from btrdelta.receive import receive
from btrdelta.receive.applier import Applier
from btrdelta.stream import StreamReader
from btrdelta.stream.sink import RecordSink, feed
from btrdelta.tree.treesum import tree_sum
from tests.conftest import committed_streams

#: kernel-made (full, incremental) pairs committed beside each other
PAIRS = [(a, a.with_name(a.name.replace(".A.", ".B."))) for a in committed_streams()
         if ".A." in a.name and a.with_name(a.name.replace(".A.", ".B.")).exists()]


def _events(path: Path) -> object:
    return StreamReader(io.BytesIO(path.read_bytes())).events()


def test_pairs_found() -> None:
    assert len(PAIRS) >= 3


@pytest.mark.parametrize(("full", "incr"), PAIRS, ids=lambda p: p.name)
def test_feed_into_applier_is_receive(tmp_path: Path, full: Path, incr: Path) -> None:
    started = time.time_ns()
    fed, received = tmp_path / "fed", tmp_path / "received"
    fed.mkdir()
    received.mkdir()
    for path in (full, incr):
        with Applier(fed, backend="dir") as applier:
            assert isinstance(applier, RecordSink)
            assert feed(_events(path), applier) > 0  # type: ignore[arg-type]
        receive(_events(path), received, backend="dir")  # type: ignore[arg-type]
    names = sorted(p.name for p in received.iterdir() if not p.name.startswith("."))
    assert names == sorted(p.name for p in fed.iterdir() if not p.name.startswith("."))
    assert len(names) == 2
    for name in names:
        assert tree_sum(fed / name, ignore_root_mtime=True) == \
            tree_sum(received / name, ignore_root_mtime=True), name
        # a root the stream never stamps keeps the time of the run (reflink-deep-paths-108)
        times = {(fed / name).stat().st_mtime_ns, (received / name).stat().st_mtime_ns}
        assert len(times) == 1 or min(times) >= started, name
