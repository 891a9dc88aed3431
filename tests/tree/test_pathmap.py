"""PathMap: current stream paths -> paths in the parent snapshot."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from btrdelta.stream import StreamReader
from btrdelta.stream import records as R
from btrdelta.tree.pathmap import PathMap

DATA = Path(__file__).parent.parent / "data" / "streams"


def test_rebuilt_file_matches_old_file_at_final_path() -> None:
    m = PathMap()
    m.feed(R.Snapshot(b"B", uuid.uuid4(), 2, uuid.uuid4(), 1))
    m.feed(R.Rename(b"lib/x.so", b"o260-5-0"))  # old inode orphaned
    m.feed(R.Mkfile(b"o300-9-0", 300))
    m.feed(R.Rename(b"o300-9-0", b"lib/x.so"))
    assert m.origin(b"lib/x.so") is None
    assert m.base(b"lib/x.so") == b"lib/x.so"
    assert m.origin(b"o260-5-0") == b"lib/x.so"
    m.feed(R.Unlink(b"o260-5-0"))
    assert m.origin(b"o260-5-0") is None


def test_renamed_file_and_directory_keep_their_origin() -> None:
    m = PathMap()
    m.feed(R.Rename(b"a/b", b"o259-1-0"))
    m.feed(R.Rename(b"o259-1-0", b"c/d"))
    assert m.origin(b"c/d/deep/file") == b"a/b/deep/file"
    assert m.base(b"c/d/new-file") == b"a/b/new-file"
    m.feed(R.Rename(b"c/d/deep/file", b"top"))
    assert m.origin(b"top") == b"a/b/deep/file"
    assert m.origin(b"c/d/deep/file") is None
    assert m.origin(b"untouched/f") == b"untouched/f"


def test_new_directory_maps_children_by_position() -> None:
    m = PathMap()
    m.feed(R.Rename(b"usr", b"o270-1-0"))
    m.feed(R.Mkdir(b"o400-2-0", 400))
    m.feed(R.Rename(b"o400-2-0", b"usr"))
    m.feed(R.Mkfile(b"o401-2-0", 401))
    m.feed(R.Rename(b"o401-2-0", b"usr/bin"))
    assert m.origin(b"usr/bin") is None
    assert m.base(b"usr/bin") == b"usr/bin"
    assert m.origin(b"o270-1-0/bin") == b"usr/bin"


def test_links_and_removals() -> None:
    m = PathMap()
    m.feed(R.Link(b"x/hard", b"y/orig"))
    assert m.origin(b"x/hard") == b"y/orig"
    m.feed(R.Rmdir(b"z"))
    assert m.origin(b"z") is None
    m.feed(R.Rename(b"same", b"same"))
    assert m.origin(b"same") == b"same"


def test_moved_names_every_path_whose_origin_may_differ() -> None:
    """Each path of ``moved()`` has another origin; a path below none of them, or named
    back to where it was, is its own origin."""
    m = PathMap()
    m.feed(R.Rename(b"a/b", b"o259-1-0"))
    m.feed(R.Rename(b"o259-1-0", b"c/d"))
    m.feed(R.Mkfile(b"e/new", 300))
    m.feed(R.Unlink(b"e/gone"))
    m.feed(R.Rename(b"f/g", b"o1"))
    m.feed(R.Rename(b"o1", b"f/g"))
    m.feed(R.Link(b"h/link", b"e/kept"))
    moved = m.moved()
    assert moved == {b"a/b", b"c/d", b"e/new", b"e/gone", b"h/link", b"o259-1-0", b"o1"}
    for path in (b"c/d/x", b"e/new", b"h/link", b"a/b"):
        assert m.origin(path) != path
    for path in (b"f/g", b"f/g/x", b"e/kept", b"e", b"c", b"untouched/f"):
        assert m.origin(path) == path


def test_full_stream_maps_by_name() -> None:
    m = PathMap()
    m.feed(R.Subvol(b"A", uuid.uuid4(), 1))
    m.feed(R.Mkfile(b"o257-1-0", 257))
    m.feed(R.Rename(b"o257-1-0", b"etc/passwd"))
    assert m.full
    assert m.base(b"etc/passwd") == b"etc/passwd"


@pytest.mark.parametrize("stream", sorted(DATA.glob("*.B.v1.stream"))[:12], ids=lambda p: p.name)
def test_kernel_streams_do_not_confuse_the_map(stream: Path) -> None:
    """Every name record of real incremental streams is accepted; renamed inodes resolve."""
    m = PathMap()
    with open(stream, "rb") as f:
        for rec in StreamReader(f):
            m.feed(rec)
            if isinstance(rec, R.Rename):
                assert m.base(rec.path_to)


def test_rename_onto_the_root_frees_the_name_first() -> None:
    """A (hostile) RENAME onto the subvolume root: the old name is freed, then ValueError;
    what delta make and expand both do (their listings of old directories must agree)."""
    m = PathMap()
    m.rename(b"a/b", b"c")
    with pytest.raises(ValueError, match="root"):
        m.rename(b"c", b"")
    assert m.origin(b"c") is None
    assert m.moved() == {b"a/b", b"c"}
    with pytest.raises(ValueError, match="root"):
        m.rename(b"", b"d")
    assert m.moved() == {b"a/b", b"c"}
