"""A failed receive leaves no half-made subvolume and never changes the parent.

Failures: a CRC error half-way, a missing parent, a full disk, Ctrl-C, too many errors;
on the directory backend (tmp dir) and on btrfs (real subvolumes).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from btrdelta.errors import ApplyError, ChecksumError, MissingBaseError, StreamFormatError
from btrdelta.receive import Registry, find_parent, receive
from btrdelta.stream import StreamReader
from btrdelta.stream.records import (
    Chmod,
    End,
    Mkdir,
    Mkfile,
    Rename,
    Snapshot,
    Truncate,
    Unlink,
    Utimes,
    Write,
)
from btrdelta.testing.loopfs import loop_fs
from btrdelta.tree.treesum import tree_sum

from .helpers import UUID_A, UUID_B, events, snapshot_tree, stream_bytes, subvol

# every test runs with the C fast path of the applier and with the Python handlers alone
pytestmark = pytest.mark.usefixtures("applier_impl")

FULL = [subvol(b"A"), Mkdir(path=b"d", ino=257), Mkfile(path=b"d/f", ino=258),
        Write(path=b"d/f", offset=0, data=b"hello" * 100), Chmod(path=b"d/f", mode=0o644),
        Utimes(path=b"d/f", atime=10**18, mtime=10**18, ctime=10**18), End()]
INCR = [Snapshot(path=b"B", uuid=UUID_B, ctransid=9, clone_uuid=UUID_A, clone_ctransid=7),
        Write(path=b"d/f", offset=0, data=b"HELLO"), Mkfile(path=b"new", ino=300),
        Rename(path=b"d/f", path_to=b"moved"), Unlink(path=b"new"), End()]


def _entries(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if p.name != ".btrdelta-subvols.json")


@pytest.fixture(params=["dir", "btrfs"])
def dest(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    if request.param == "dir":
        d = tmp_path / "dest"
        d.mkdir()
        yield d
        return
    from tests.conftest import require_btrfs

    require_btrfs()
    with loop_fs("btrfs", size="256M") as mnt:
        d = mnt / "dest"
        d.mkdir()
        yield d


def test_full_then_incremental_roundtrip(dest: Path) -> None:
    done = receive(events(FULL), dest)
    assert [s.name for s in done] == ["A"]
    assert (dest / "A" / "d" / "f").read_bytes() == b"hello" * 100
    assert find_parent(dest, INCR[0]) == dest / "A"  # type: ignore[arg-type]
    receive(events(INCR), dest)
    assert (dest / "B" / "moved").read_bytes() == b"HELLO" + b"hello" * 99
    assert not (dest / "B" / "d" / "f").exists()
    assert (dest / "A" / "d" / "f").read_bytes() == b"hello" * 100
    assert _entries(dest) == ["A", "B"]
    if not done[0].btrfs:
        assert [e.name for e in Registry(dest).entries()] == ["A", "B"]


def test_bad_crc_half_way_leaves_nothing_and_parent_unchanged(dest: Path) -> None:
    receive(events(FULL), dest)
    parent_sum = tree_sum(dest / "A")
    data = bytearray(stream_bytes(INCR))
    data[-20] ^= 0xFF  # inside the UNLINK record, after several records were applied
    with pytest.raises(ChecksumError) as info:
        receive(StreamReader(io.BytesIO(bytes(data))).events(), dest)
    assert info.value.index is not None
    assert info.value.index >= 3
    assert _entries(dest) == ["A"]
    assert tree_sum(dest / "A") == parent_sum


def test_missing_parent(dest: Path) -> None:
    with pytest.raises(MissingBaseError) as info:
        receive(events(INCR), dest)
    assert info.value.index == 0
    assert str(UUID_A) in str(info.value)
    assert _entries(dest) == []


def test_apply_error_names_record_and_path(dest: Path) -> None:
    receive(events(FULL), dest)
    parent_sum = tree_sum(dest / "A")
    bad = [INCR[0], Write(path=b"d/f", offset=0, data=b"x"), Unlink(path=b"nope/x"), End()]
    with pytest.raises(ApplyError) as info:
        receive(events(bad), dest)
    assert info.value.index == 2
    assert info.value.path == b"nope/x"
    assert "record 2 (unlink)" in str(info.value)
    assert _entries(dest) == ["A"]
    assert tree_sum(dest / "A") == parent_sum


def test_max_errors_zero_keeps_going(dest: Path) -> None:
    bad = [subvol(b"A"), Unlink(path=b"nope"), Mkfile(path=b"ok", ino=257),
           Unlink(path=b"nope2"), End()]
    with pytest.raises(ApplyError) as info:
        receive(events(bad), dest, max_errors=0)
    assert "1 more errors" in str(info.value)
    assert (dest / "A" / "ok").exists()


def test_ctrl_c_half_way(dest: Path) -> None:
    receive(events(FULL), dest)
    parent_sum = tree_sum(dest / "A")

    def interrupted() -> Iterator[object]:
        for i, ev in enumerate(events(INCR)):
            if i == 4:
                raise KeyboardInterrupt
            yield ev

    with pytest.raises(KeyboardInterrupt):
        receive(interrupted(), dest)  # type: ignore[arg-type]
    assert _entries(dest) == ["A"]
    assert tree_sum(dest / "A") == parent_sum


def test_stream_without_end(dest: Path) -> None:
    with pytest.raises(StreamFormatError):
        receive(events(FULL[:-1]), dest)
    assert _entries(dest) == []


def test_existing_name_is_not_replaced(dest: Path) -> None:
    (dest / "A").mkdir()
    (dest / "A" / "mine").write_bytes(b"keep")
    with pytest.raises(ApplyError):
        receive(events(FULL), dest)
    assert (dest / "A" / "mine").read_bytes() == b"keep"
    assert _entries(dest) == ["A"]


def test_dry_run_writes_nothing(dest: Path) -> None:
    receive(events(FULL), dest)
    before = snapshot_tree(dest)
    done = receive(events(INCR), dest, dry_run=True)
    assert [s.name for s in done] == ["B"]
    assert snapshot_tree(dest) == before
    with pytest.raises(MissingBaseError):
        receive(events([Snapshot(path=b"C", uuid=UUID_B, ctransid=9, clone_uuid=UUID_B,
                                 clone_ctransid=1), End()]), dest, dry_run=True)


def test_disk_full(tmp_path: Path) -> None:
    from tests.conftest import require_btrfs

    require_btrfs()  # loop devices
    with loop_fs("ext4", size="16M") as mnt:
        dest = mnt / "dest"
        dest.mkdir()
        chunk = bytes(range(256)) * 256  # 64 KiB, incompressible enough for ext4
        recs = [subvol(b"big"), Mkfile(path=b"f", ino=257)]
        recs += [Write(path=b"f", offset=i * len(chunk), data=chunk) for i in range(400)]
        recs += [Truncate(path=b"f", size=1), End()]
        with pytest.raises(ApplyError) as info:
            receive(events(recs, version=2), dest)
        assert "No space left" in str(info.value)
        assert info.value.path == b"f"
        assert _entries(dest) == []


def test_read_ahead_thread_gives_same_result_and_errors(dest: Path) -> None:
    receive(events(FULL), dest, read_ahead=True)
    parent_sum = tree_sum(dest / "A")
    data = bytearray(stream_bytes(INCR))
    data[-20] ^= 0xFF
    with pytest.raises(ChecksumError):
        receive(StreamReader(io.BytesIO(bytes(data))).events(), dest, read_ahead=True)
    assert _entries(dest) == ["A"]
    receive(events(INCR), dest, read_ahead=True)
    assert (dest / "B" / "moved").read_bytes() == b"HELLO" + b"hello" * 99
    assert tree_sum(dest / "A") == parent_sum


def test_error_names_the_record_after_a_long_run_of_applied_ones(dest: Path) -> None:
    # hundreds of records the fast path applies, then one that fails: the error carries
    # that record's index and path, and nothing is left under the final name
    recs = [subvol(b"A")]
    for i in range(300):
        name = b"f%d" % i
        recs += [Mkfile(path=name, ino=257 + i), Write(path=name, offset=0, data=b"x" * i),
                 Chmod(path=name, mode=0o644)]
    recs += [Write(path=b"missing/file", offset=0, data=b"y"), End()]
    with pytest.raises(ApplyError) as info:
        receive(events(recs), dest)
    assert info.value.index == len(recs) - 2
    assert info.value.path == b"missing/file"
    assert _entries(dest) == []


def test_a_subvolume_that_cannot_be_made_is_named_as_text() -> None:
    """A DEST where no directory can be made (``/proc``): the temporary name in the one
    line is text, not a bytes repr (it was ``(b'.btrdelta-tmp-...')``)."""
    with pytest.raises(ApplyError) as info:
        receive(events([subvol(), End()]), Path("/proc"))
    text = str(info.value)
    assert "subvol failed" in text, text
    assert "(.btrdelta-tmp-" in text, text
    assert "b'" not in text, text
