"""``delta make`` on files rewritten by many small writes: its work follows the file, not
the number of writes (the calls into HDiffPatch are counted, not timed), and a file that
is runs of equal bytes alone (a sparse file's holes sent as zeros by a v1 stream, blocks of
one byte) is not searched by HDiffPatch at all. Every delta expands back to the kernel's
stream byte for byte."""

from __future__ import annotations

import io
from pathlib import Path

import hdiffpatch
import pytest

from btrdelta.delta import MakeOptions, expand_to, make_delta, open_delta
from btrdelta.testing.loopfs import loop_fs
from btrdelta.testing.recipe import Scenario
from btrdelta.testing.scenarios import SCENARIOS, make_snapshots, send
from tests.conftest import require_btrfs

pytestmark = pytest.mark.btrfs

#: 4 KiB writes of text, every STEP blocks (the argument), into a 2 MiB file of random
#: bytes (random bytes written are not diffed at all since session 30: no patch can pay,
#: ``diffing._unrelated``)
_WRITES = ("python3 -c 'import os, sys\n"
           "fd = os.open(\"f\", os.O_WRONLY)\n"
           "for i in range(0, 512, int(sys.argv[1])):\n"
           "    os.pwrite(fd, (b\"block %d \" % i * 600)[:4096], i * 4096)'")
_REAL_DIFF = hdiffpatch.diff


def _round_trip(stream: Path, old: Path) -> bytes:
    """The delta of ``stream`` against ``old`` (one diff worker), after checking that it
    expands back to the stream."""
    out: list[bytes] = []
    with open(stream, "rb") as f:
        make_delta(f, old, out.append, MakeOptions(jobs=1))
    delta = b"".join(bytes(p) for p in out)
    back: list[bytes] = []
    expand_to(open_delta(io.BytesIO(delta)), old, back.append)
    assert b"".join(bytes(p) for p in back) == stream.read_bytes()
    return delta


def _diffed(tmp: Path, scenario: Scenario, proto: int,
            monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(old bytes, new bytes) of every HDiffPatch diff ``delta make`` ran on the
    scenario's stream, after checking that its delta expands back to the stream."""
    calls: list[tuple[int, int]] = []

    def spy(old: bytes, new: bytes, *args, **kw):  # type: ignore[no-untyped-def]
        calls.append((len(old), len(new)))
        return _REAL_DIFF(old, new, *args, **kw)

    monkeypatch.setattr(hdiffpatch, "diff", spy)
    with loop_fs("btrfs", size="512M") as mnt:
        pair = make_snapshots(mnt, scenario)
        stream = send(pair.b, tmp / f"{scenario.name}.stream", parent=pair.a, proto=proto)
        _round_trip(stream, pair.a)
    return calls


def test_many_small_writes_cost_one_diff_of_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_btrfs()
    seen = {}
    for step in (16, 2):  # 32 writes, then 256
        sc = Scenario(f"writes-{step}", "head -c 2M /dev/urandom > f", f"{_WRITES} {step}")
        seen[step] = _diffed(tmp_path, sc, 1, monkeypatch)
    # one diff of the whole old file against the written bytes, whatever their number
    assert seen[16] == [(2 << 20, 32 << 12)]
    assert seen[2] == [(2 << 20, 256 << 12)]


@pytest.mark.parametrize("proto", [1, 2])
def test_a_file_of_runs_alone_is_not_searched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, proto: int
) -> None:
    """many-extents-sparse: 1,000 blocks of one byte between holes, rewritten every 14th,
    punched every 22nd (v1 sends the holes as zeros): before, 1.7 s of CPU in HDiffPatch
    (v1) for a 718-byte patch."""
    require_btrfs()
    sc = next(s for s in SCENARIOS if s.name == "many-extents-sparse")
    assert _diffed(tmp_path, sc, proto, monkeypatch) == []


#: the second half of a 3 MiB file of random bytes rewritten in place, every other 4 KiB
#: block with 8 bytes changed: 192 WRITEs, the blocks between them left as they were
_HALF = ("python3 -c 'import os\n"
         "fd = os.open(\"f\", os.O_RDWR)\n"
         "for i in range(384, 768, 2): os.pwrite(fd, os.urandom(8), i * 4096 + 100)'")


def test_blocks_changed_in_place_are_diffed_where_they_are_in_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large old file is diffed in windows; the new content of a file changed in place
    is its changed blocks alone, each window of it is lined up with the old bytes where
    those blocks are in the file (their WRITEs' offsets), not where the content's size
    puts them. Here (windows scaled down) the content, 768 KiB, lined up by size would
    put its first window at the old file's start, 1.5 MiB before its blocks: the patch
    would be mostly its random bytes again (before: a delta of 509 KB, now ~2 KB)."""
    require_btrfs()
    from btrdelta.delta.codecs import hdiff as mod

    monkeypatch.setattr(mod, "WINDOW_MIN", 1 << 20)
    monkeypatch.setattr(mod, "WINDOW_STEP", 256 << 10)
    monkeypatch.setattr(mod, "WINDOW_OVERLAP", 32 << 10)
    sc = Scenario("half-in-place", "head -c 3M /dev/urandom > f", _HALF)
    with loop_fs("btrfs", size="512M") as mnt:
        pair = make_snapshots(mnt, sc)
        stream = send(pair.b, tmp_path / "s.stream", parent=pair.a)
        delta = _round_trip(stream, pair.a)
    assert len(stream.read_bytes()) > 700_000
    assert len(delta) < 20_000
