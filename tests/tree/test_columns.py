"""Record columns in memory (`btrdelta.tree.columns`): rows as encoded, directory entries
found by a search of the PARENT column, and the next record made by patching (rows dropped,
the root replaced, rows added) equal to the record encoded whole from the same inodes; on
both backends of the column offsets (``tree/_columns.c``, the ``columns`` accelerator, and
the Python reference), which give the same offsets and the same errors."""

from __future__ import annotations

import copy
import os
import random
import subprocess
import sys
from array import array
from collections.abc import Iterator

import pytest

from btrdelta import _native
from btrdelta.errors import StreamFormatError
from btrdelta.tree import columns as columns_mod
from btrdelta.tree.columns import EXTENT_SIZE, NO_EXTENTS, Columns, Encoded, encode_rows
from btrdelta.tree.sendshot import C_BLOCKS, C_NSEGS, C_SIZE, WHOLE, RecordInode
from tests.tree.test_sendshot_format import _inodes

_BUILT = _native.available("columns") or os.environ.get("CI") == "true"


@pytest.fixture(autouse=True, params=["c", "python"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test on both backends of the column offsets."""
    if request.param == "c" and not _BUILT:
        pytest.skip("the columns accelerator is not built")
    with _native.use_backend(request.param, "columns"):
        yield request.param


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


def _random_inodes(seed: int) -> list[RecordInode]:
    """A tree of a few hundred inodes: directories, files whole, with holes, empty, with
    and without extent items, large ones, links, symlinks, devices, xattrs."""
    rng = random.Random(seed)
    out = [RecordInode(256, 0o40755, 0, 0, 0, 1, 2, 3, [])]
    dirs = [256]
    for ino in range(257, 257 + rng.randrange(50, 400)):
        parent = rng.choice(dirs)
        kind = rng.random()
        names = [(parent, b"n%d" % ino)]
        if kind < 0.15:
            out.append(RecordInode(ino, 0o40755, 0, 0, 0, 1, 2, 3, names))
            dirs.append(ino)
            continue
        if kind < 0.25:
            out.append(RecordInode(ino, 0o120777, 0, 0, 0, 1, 2, 3, names,
                                   target=b"t" * rng.randrange(1, 40)))
            continue
        if kind < 0.28:
            out.append(RecordInode(ino, 0o20644, 0, 0, 0, 1, 2, 3, names, rdev=7))
            continue
        size = rng.choice([0, 1, 4095, 4096, 4097, rng.randrange(1 << 22), 2**40 + 1])
        segments = [(0, size)] if size else []
        if size > 3 * 4096 and rng.random() < 0.3:  # a hole in the middle
            segments = [(0, 4096), (8192, size - 8192)]
        nblocks = sum(-(-n // 4096) for _o, n in segments) if size >= 4096 else 0
        if size > 2**30:
            segments, nblocks = [(0, 4096), (size - 10, 10)], 2
        if rng.random() < 0.2:
            names.append((rng.choice(dirs), b"l%d" % ino))
        node = RecordInode(ino, 0o100644, 0, 0, size, 1, 2, 3, names, segments=segments,
                           digest=rng.randbytes(16), bdigest=rng.randbytes(32),
                           blocks=rng.randbytes(16 * nblocks))
        if rng.random() < 0.3:
            node.extents = rng.randbytes(EXTENT_SIZE * rng.randrange(4))
        if rng.random() < 0.1:
            node.xattrs = {b"user.x": rng.randbytes(rng.randrange(9))}
        out.append(node)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_both_backends_give_the_same_offsets(seed: int, backend: str) -> None:
    enc = encode_rows(_random_inodes(seed))
    got = _columns(enc)
    with _native.use_backend("python", "columns"):
        want = _columns(enc)
    for name, value in vars(want).items():
        if name != "_members":  # (the accelerator's function, or None)
            assert getattr(got, name) == value, name
    assert list(got.rows()) == list(want.rows())
    # every row's entries, in the record's order, found the same way (asked twice: cached)
    for r in range(want.count):
        assert got.children(r) == want.children(r) == got.children(r), r
    # several directories' entries found at once (one pass of the accelerator), then asked
    # one by one: the lists of one search each; rows asked twice, or with no entries
    rng = random.Random(seed)
    batch = _columns(enc)
    some = [*rng.sample(range(want.count), min(12, want.count)), 0, 0]
    batch.children_of(some)
    batch.children_of([])
    for r in range(want.count):
        assert batch.children(r) == want.children(r), r


def _corrupt(enc: Encoded, column: int, data: bytes) -> Encoded:
    cols, ends = enc
    return [(c, data if c == column else v) for c, v in cols], ends


def test_both_backends_refuse_the_same_bad_columns(backend: str) -> None:
    enc = encode_rows(_inodes())
    sizes = array("Q", dict(enc[0])[C_SIZE])
    sizes[5] = 5 * 4096  # a file of one block said to be five: BLOCKS does not add up
    bad = [_corrupt(enc, C_SIZE, sizes.tobytes()),
           _corrupt(enc, C_NSEGS, array("I", [WHOLE, 7, WHOLE, WHOLE]).tobytes()),
           _corrupt(enc, C_BLOCKS, dict(enc[0])[C_BLOCKS][:-16])]
    for b in bad:
        with pytest.raises(StreamFormatError) as c_err:
            _columns(b)
        with _native.use_backend("python", "columns"), \
                pytest.raises(StreamFormatError) as py_err:
            _columns(b)
        assert str(c_err.value) == str(py_err.value)


def test_the_c_offsets_are_the_references() -> None:
    if not _native.available("columns"):
        pytest.skip("the columns accelerator is not built")
    with _native.use_backend("c", "columns"):
        c = _native.live("columns")
    assert c is not None
    rng = random.Random(1)
    for code, top in (("B", 255), ("H", 2**16 - 1), ("I", 2**32 - 1), ("Q", 2**50)):
        values = array(code, [rng.choice([0, 1, top, rng.randrange(top)]) for _ in range(500)])
        assert columns_mod._q(c.prefix(values, 1, None)) == columns_mod._prefix(values)
        want = columns_mod._prefix(0 if v == top else 3 * v for v in values)
        assert columns_mod._q(c.prefix(values, 3, top)) == want
        rows, offsets = c.where(values, 0xF0, 0x10, True)
        flags = [v & 0xF0 == 0x10 for v in values]
        assert list(columns_mod._q(rows)) == [i for i, f in enumerate(flags) if f]
        assert columns_mod._q(offsets) == columns_mod._prefix(flags)
        rows, _ = c.where(values, 0xFF, 0, False)
        assert list(columns_mod._q(rows)) == [i for i, v in enumerate(values) if v & 0xFF]
    sizes = array("Q", [0, 1, 4095, 4096, 4097, 2**64 - 1])
    got = columns_mod._q(c.blocks(sizes, array("Q", [5, 4, 3, 2, 1, 0]), 4096))
    assert list(got) == [(s + 4095) // 4096 if s >= 4096 else 0 for s in reversed(sizes)]
    with pytest.raises(OverflowError):
        c.prefix(array("Q", [2**63, 2**63]), 1, None)
    with pytest.raises(OverflowError):
        columns_mod._prefix(array("Q", [2**63, 2**63]))
    with pytest.raises(OverflowError):
        c.prefix(array("I", [NO_EXTENTS - 1]), 2**40, NO_EXTENTS)
    with pytest.raises(IndexError):
        c.blocks(sizes, array("Q", [6]), 4096)
    # members: the dentries of a parent and their rows (doff: each row's running count)
    counts = [rng.choice([0, 0, 1, 1, 2, 5]) for _ in range(300)]
    doff = columns_mod._prefix(counts)
    parents = array("I", [rng.randrange(8) for _ in range(doff[-1])])
    owner = [r for r, n in enumerate(counts) for _ in range(n)]
    for want in (0, 3, 7, 8):
        pairs = list(columns_mod._q(c.members(parents, doff, want)))
        assert pairs == [x for d, p in enumerate(parents) if p == want for x in (d, owner[d])]
    with pytest.raises(IndexError):  # more dentries than the counts say
        c.members(array("I", [*parents, 3]), doff, 3)
    # the PARENT column is u32; any other buffer of unsigned integers gives the same
    for code in ("H", "Q"):
        wide = array(code, parents)
        assert c.members(wide, doff, 3) == c.members(parents, doff, 3)
    assert c.members(parents, doff, 2**32 + 3) == b""  # (not 3: no u32 equals it)
    assert c.members(array("Q", parents), doff, 2**32 + 3) == b""
    # leading: the records whose first 8 bytes are a key (the oracle: a Python scan); keys
    # that share their low 16 bits with most records' (the C loop's first test) but not
    # their value, repeated keys, any integer buffer, a partial last record ignored
    firsts = [rng.choice([5, 2**64 - 1, rng.randrange(2**64), (rng.randrange(8) << 16) | 7])
              for _ in range(400)]
    recs = b"".join(x.to_bytes(8, sys.byteorder) + rng.randbytes(40) for x in firsts)
    for keys in ([5, 7, 5, 2**64 - 1, (3 << 16) | 7, firsts[17]], [], [7], list(range(70))):
        got = list(columns_mod._q(c.leading(recs + b"part", 48, array("Q", keys))))
        assert got == [k for k, x in enumerate(firsts) if x in keys], keys
    assert list(columns_mod._q(c.leading(recs, 48, array("B", [5])))) == \
        [k for k, x in enumerate(firsts) if x == 5]
    assert c.leading(recs[:47], 48, array("Q", [5])) == b""
    with pytest.raises(ValueError, match="at least 8 bytes"):
        c.leading(recs, 7, array("Q", [5]))
    with pytest.raises(TypeError):
        c.prefix(array("i", [1]), 1, None)  # signed
    with pytest.raises(TypeError):
        c.prefix("text", 1, None)


_FUZZ_MEMBERS = """
import random, sys
from array import array
from btrdelta import _native
from btrdelta.tree.columns import _prefix, _q
c = _native.live("columns")
rng = random.Random(int(sys.argv[1]))
top = {"B": 255, "H": 2**16 - 1, "I": 2**32 - 1, "Q": 2**64 - 1}
for _ in range(300):
    counts = [rng.choice([0, 0, 1, 1, 2, 5]) for _ in range(rng.randrange(60))]
    doff = _prefix(counts)
    owner = [r for r, n in enumerate(counts) for _ in range(n)]
    code = rng.choice("BHIQ")
    pool = [0, 1, 2, 3, 7, top[code], top[code] - 1, rng.randrange(top[code] + 1)]
    parents = array(code, [rng.choice(pool) for _ in range(doff[-1])])
    raw = parents.tobytes()
    if code == "I" and rng.random() < 0.3:  # (a u32 column not aligned: read by item)
        parents = memoryview(bytearray(b"x" + raw))[1:].cast("B").cast("I")
    assert c.most(parents) == max(parents, default=0)
    wcode = rng.choice("BHIQ")
    wants = array(wcode, [rng.choice(pool) & top[wcode] for _ in range(rng.randrange(20))])
    want_set = set(wants)
    pairs = list(_q(c.members(parents, doff, wants)))
    assert pairs == [x for d, p in enumerate(parents) if p in want_set
                     for x in (d, owner[d])], (list(parents), list(wants))
    one = rng.choice(pool)
    assert list(_q(c.members(parents, doff, one))) == \
        [x for d, p in enumerate(parents) if p == one for x in (d, owner[d])]
    if len(parents) and len(wants):  # a dentry beyond the counts: refused, nothing read
        try:
            c.members(array(code, [*parents, wants[0]]), doff, wants)
        except IndexError:
            pass
        else:
            raise AssertionError("a dentry beyond the counts was taken")
print("ok")
"""


@pytest.mark.skipif(not _BUILT, reason="the columns accelerator is not built")
@pytest.mark.parametrize("seed", range(3))
def test_members_of_several_rows_and_most_fuzzed(seed: int) -> None:
    """``members`` with several rows (a set looked up per dentry; a row repeated, absent,
    the largest value of its type) and with one, and ``most``, against Python scans of
    random columns of every width (an unaligned u32 one too), under
    ``PYTHONMALLOC=debug``: a read past a buffer or a set's last slot changes a result or
    fails a check."""
    env = dict(os.environ, PYTHONMALLOC="debug")
    out = subprocess.run([sys.executable, "-c", _FUZZ_MEMBERS, str(seed)], env=env,
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ok"]


@pytest.mark.skipif(not _BUILT, reason="the columns accelerator is not built")
def test_leading_reads_no_key_past_the_last() -> None:
    """A record above every key, with a key's low 16 bits, is no match: the C bisection
    ends past the last key and must not read ``sorted[nk]``. Under ``PYTHONMALLOC=debug``
    the 8 bytes after a block are 0xFD, so a read there matched 0xFDFD...FD."""
    code = (
        "import sys\n"
        "from array import array\n"
        "from btrdelta import _native\n"
        "c = _native.live('columns')\n"
        "recs = (0xFDFDFDFDFDFDFDFD).to_bytes(8, sys.byteorder) + bytes(40)\n"
        "print(repr(bytes(c.leading(recs, 48, array('Q', [0xFDFD])))),"
        " repr(bytes(c.leading(recs, 48, array('Q', [0xFDFD, 0xFDFDFDFDFDFDFDFD])))))\n"
    )
    env = dict(os.environ, PYTHONMALLOC="debug")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["b''", repr(bytes(8))]


def test_the_c_copies_are_the_references() -> None:
    """``gather`` (runs of a column copied) and ``remap`` (names' directories renumbered), as
    ``Columns.patched`` uses them, against slicing in Python."""
    if not _native.available("columns"):
        pytest.skip("the columns accelerator is not built")
    with _native.use_backend("c", "columns"):
        c = _native.live("columns")
    assert c is not None
    rng = random.Random(2)
    values = array("I", [rng.randrange(50) for _ in range(300)])
    runs = [(0, 10), (10, 10), (12, 100), (250, 300)]
    flat = array("Q", [x for run in runs for x in run])
    assert c.gather(values, flat, 4) == b"".join(values[a:b].tobytes() for a, b in runs)
    raw = rng.randbytes(48 * 300)
    assert c.gather(raw, flat, 48) == b"".join(raw[48 * a:48 * b] for a, b in runs)
    assert c.gather(raw, array("Q"), 48) == b""
    new = array("q", [rng.randrange(1000) for _ in range(50)])
    got, bad = c.remap(values, flat, new)
    assert bad == -1
    assert got == array("I", [new[v] for a, b in runs for v in values[a:b]]).tobytes()
    new[values[40]] = -1  # a directory not kept: the first name in it is reported
    first = min(j for a, b in runs for j in range(a, b) if values[j] == values[40])
    assert c.remap(values, flat, new)[1] == first
    for bad_runs in ([(5, 4)], [(0, 301)]):
        with pytest.raises(IndexError):
            c.gather(values, array("Q", [x for r in bad_runs for x in r]), 4)
        with pytest.raises(IndexError):
            c.remap(values, array("Q", [x for r in bad_runs for x in r]), new)
    with pytest.raises(IndexError):
        c.remap(values, flat, new[:10])  # a value beyond new
    with pytest.raises(TypeError):
        c.gather(values, array("Q", [1, 2, 3]), 4)  # not pairs
    with pytest.raises(TypeError):
        c.remap(values, flat, array("Q", [1] * 50))  # new must be signed


def test_row_index_is_the_map_of_inode_numbers_to_rows(backend: str) -> None:
    """`row_index` (the accelerator's open-addressing table, else a dict) against a dict
    made by hand: the last row of a repeated number, lookups of numbers absent and beyond
    u64, then 50,000 random sets, deletions and lookups (the table grows, reuses deleted
    slots); `Columns.row_of` is it."""
    rng = random.Random(7)
    inos = array("Q", (rng.randrange(256, 1 << 40) for _ in range(3000)))
    inos[2999] = inos[10]  # a number repeated: its last row
    ix = columns_mod.row_index(inos)
    assert (type(ix).__name__ == "Index") == (backend == "c")
    want = {ino: r for r, ino in enumerate(inos)}
    assert ix[inos[10]] == 2999
    assert len(ix) == len(want) == 2999
    for k in [*want, 0, 255, (1 << 64) - 1, 1 << 64, -1]:
        assert ix.get(k) == want.get(k)
        assert (k in ix) == (k in want)
    keys = list(want)[:500] + [rng.randrange(1 << 64) for _ in range(500)]
    for _ in range(50_000):
        k, op = rng.choice(keys), rng.random()
        if op < 0.4:
            v = rng.randrange(1 << 32)
            ix[k] = want[k] = v
        elif op < 0.7:
            if k in want:
                del ix[k], want[k]
            else:
                with pytest.raises(KeyError):
                    del ix[k]
        else:
            assert ix.get(k) == want.get(k)
    assert len(ix) == len(want)
    assert all(ix[k] == v for k, v in want.items())
    with pytest.raises(KeyError):
        ix[1 << 64]
    if backend == "c":
        with pytest.raises(OverflowError):
            ix[-1] = 3
        with pytest.raises(OverflowError):
            ix[5] = -3
        with pytest.raises(TypeError):
            ix.get("5")  # type: ignore[arg-type]
    cols = _columns(encode_rows(_inodes()))
    assert {r.ino: cols.row_of()[r.ino] for r in cols.rows()} == \
        {r.ino: k for k, r in enumerate(cols.rows())}


def test_a_rows_names_are_made_once_and_not_kept_for_every_row() -> None:
    """dentries() gives the same list again for a row (a send asks ~5 times for each row
    it visits); reading every row whole (rows(): a full scan's old tree) keeps none."""
    cols = _columns(encode_rows(_inodes()))
    want = {r.ino: r for r in _inodes()}
    for r in range(cols.count):
        names = cols.dentries(r)
        assert cols.dentries(r) is names
        assert [(cols.inos[p], n) for p, n in names] == want[cols.inos[r]].dentries
    fresh = _columns(encode_rows(_inodes()))
    assert [r.dentries for r in fresh.rows()] == [want[i].dentries for i in fresh.inos]
    assert fresh._names == {}
    # a row read whole after its names were asked for: its own list, not the one given
    got = fresh.dentries(1)
    node = fresh.inode(1, by_row=True)
    assert node.dentries == got
    assert node.dentries is not got
