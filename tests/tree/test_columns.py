"""Record columns in memory (`btrdelta.tree.columns`): rows as encoded, directory entries
found by a search of the PARENT column, and the next record made by patching (rows dropped,
the root replaced, rows added) equal to the record encoded whole from the same inodes."""

from __future__ import annotations

import copy

import pytest

from btrdelta.tree.columns import Columns, Encoded, encode_rows
from btrdelta.tree.sendshot import RecordInode
from tests.tree.test_sendshot_format import _inodes


def _columns(enc: Encoded) -> Columns:
    cols, (count, _files, _bytes, nblk) = enc
    return Columns({c: memoryview(v) for c, v in cols}, count, nblk)


def _rows(cols: Columns) -> dict[int, RecordInode]:
    return {r.ino: r for r in cols.rows()}


def test_rows_and_entries() -> None:
    want = _inodes()
    want[5].blocks = b""  # below a block: none kept
    cols = _columns(encode_rows(_inodes()))
    assert list(cols.rows()) == want
    assert sorted(cols.children(0)) == [(b"big", 1), (b"holey", 4), (b"ln", 2), (b"ln2", 2),
                                        (b"sub", 3)]
    assert sorted(cols.children(3)) == [(b"again", 4), (b"dev", 7), (b"empty", 6),
                                        (b"small", 5)]
    assert cols.children(1) == []
    assert cols.row_of()[259] == 3


def test_patched_equals_encoded_whole() -> None:
    base = _columns(encode_rows(_inodes()))
    new = copy.deepcopy(_inodes())
    root = new[0]
    root.mtime_ns = 99
    holey = new[4]
    holey.dentries = [(259, b"again"), (264, b"moved")]  # renamed into a new directory
    subdir = RecordInode(264, 0o40755, 0, 0, 0, 4, 5, 6, [(256, b"newdir")], generation=9)
    extra = RecordInode(265, 0o100644, 0, 0, 5000, 4, 5, 6, [(264, b"f")], segments=[(0, 5000)],
                        digest=b"d" * 16, bdigest=b"D" * 32, blocks=b"b" * 32)
    # rows: 0 root (replaced), 2 link (dropped: deleted), 4 holey (dropped, added again)
    got = _columns(base.patched([2, 4], [holey, subdir, extra], root))
    del new[2]
    want = {r.ino: r for r in [*new, subdir, extra]}
    want[261].blocks = b""
    assert _rows(got) == want
    assert got.inos[0] == 256
    assert next(got.rows()).mtime_ns == 99
    # the same inodes encoded whole make the same rows
    assert _rows(_columns(encode_rows([*new, subdir, extra]))) == want


def test_patch_that_orphans_a_name_is_refused() -> None:
    base = _columns(encode_rows(_inodes()))
    with pytest.raises(ValueError, match="259"):
        base.patched([3], [])  # directory "sub" dropped: its entries would dangle
    with pytest.raises(ValueError, match="both kept and added"):
        base.patched([], [_inodes()[1]])
