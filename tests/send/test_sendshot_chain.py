"""Patch records (versions 5 and 7, ``docs/formats/sendshot.md`` §2b) on a committed
version 4 record (a chain of both kinds of patches, compacted into a version 6 record): a
chain read back gives the rows that whole-record patching (``Columns.patched``, what
every earlier release wrote) gives for the same changes; the store keeps the bases of what
it keeps, refuses to delete a base, and ``latest`` falls back past a broken chain; hostile
patches are refused with the record and the offset named.

The committed record (``tests/data/sendshot``) was written by main at 3cd0a97 (session 23)
from a plain directory: files, a hard link, a symlink, an xattr, a sparse file. (Rounds of
real sends on btrfs, each received by the kernel: ``test_sendshot_patch.py``.)"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from unittest import mock

import pytest

from btrdelta._value import replace
from btrdelta.cli import main
from btrdelta.errors import BtrdeltaError, StreamFormatError
from btrdelta.send import store as store_mod
from btrdelta.send.sendshot import load_base
from btrdelta.send.store import SendshotStore, StoredSendshot
from btrdelta.tree.chain import MAX_DEPTH, View
from btrdelta.tree.columns import Columns, encode_rows
from btrdelta.tree.sendshot import PATCH, PATCH_WRITTEN, VERSION, Patch, RecordInode

DATA = Path(__file__).resolve().parents[1] / "data" / "sendshot"
V4 = "acce0a8bb4b7a7b3a63a7749ebb85c1c626604a3e30d49be9ab4e0914c7ee2af"
_REG, _DIR = 0o100000, 0o040000


def _store(tmp_path: Path) -> tuple[SendshotStore, StoredSendshot]:
    store = SendshotStore(tmp_path / "store")
    Path(store.records).mkdir(parents=True)
    shutil.copy(DATA / f"{V4}.sendshot", store.records)
    rec = store.resolve(V4)
    assert rec.head.version == 4
    return store, rec


def _rows(rows: object) -> dict[int, RecordInode]:
    out = {r.ino: r for r in rows}  # type: ignore[attr-defined]
    for r in out.values():
        r.dentries.sort()
    return out


def _file(ino: int, parent: int, name: bytes, rng: random.Random) -> RecordInode:
    return RecordInode(ino, _REG | 0o644, 0, 0, 100, 1, 2, 3, [(parent, name)],
                       segments=[(0, 100)], digest=rng.randbytes(16), bdigest=rng.randbytes(32))


def _step(view: View, rng: random.Random, k: int
          ) -> tuple[set[int], list[RecordInode], RecordInode]:
    """One send's changes, by inode: dropped inodes, changed and new inodes, the root."""
    rows = list(view.rows())
    root = rows[0]
    files = [r for r in rows if r.mode & 0o170000 == _REG and len(r.dentries) == 1]
    dirs = [r for r in rows[1:] if r.mode & 0o170000 == _DIR]
    gone = {rng.choice(files).ino}
    changed = [replace(rng.choice([f for f in files if f.ino not in gone]),
                       mtime_ns=k, digest=rng.randbytes(16))]
    d = rng.choice(dirs)
    changed.append(replace(d, dentries=[(d.dentries[0][0], b"ren%d" % k)]))
    new_dir = RecordInode(2_000_000 + k, _DIR | 0o755, 0, 0, 0, 1, 2, 3,
                          [(root.ino, b"nd%d" % k)])
    added = [*changed, new_dir, _file(1_000_000 + k, new_dir.ino, b"f", rng),
             _file(3_000_000 + k, d.ino, b"g%d" % k, rng)]
    if k % 3 == 0:  # a directory of an earlier step deleted with what it holds
        old = [r for r in dirs if r.ino >= 2_000_000]
        todo = [old[0].ino] if old else []
        while todo:  # (and everything below it)
            ino = todo.pop()
            gone.add(ino)
            todo += [r.ino for r in rows if any(p == ino for p, _n in r.dentries)]
        added = [r for r in added if r.ino not in gone and all(p not in gone for p, _n in
                                                                 r.dentries)]
    return gone, added, replace(root, mtime_ns=k)


def _apply(cols: View | Columns, gone: set[int], added: list[RecordInode],
           root: RecordInode) -> object:
    row_of = cols.row_of()
    drop = sorted(row_of[i] for i in gone | {r.ino for r in added} if i in row_of)
    return cols.patched(drop, added, root)


def _save(store: SendshotStore, prev: StoredSendshot, got: object, k: int) -> StoredSendshot:
    """A patch of version 5 (odd ``k``) or 9 (even: a mixed chain, as a lineage's that moves
    to version 9), or a whole record of version 8."""
    h = prev.head
    if isinstance(got, Patch):
        head = replace(h, version=PATCH if k % 2 else PATCH_WRITTEN, base=got.base or prev.digest,
                       parent=prev.digest, kind="sent",
                       created_ns=h.created_ns + 1, tree_digest=b"", stream_ctransid=k)
    else:
        head = replace(h, version=VERSION, base=None, parent=prev.digest, kind="sent",
                       created_ns=h.created_ns + 1, tree_digest=b"", stream_ctransid=k)
    return store.save(head, got)  # type: ignore[arg-type]


def _chain(tmp_path: Path, steps: int, squash: bool = False
           ) -> tuple[SendshotStore, list[StoredSendshot], list[dict[int, RecordInode]]]:
    """The committed record and ``steps`` records after it, each read back and checked
    against the whole-record patching of the same changes; the rows after each (a chain
    compacted by its length: the tree is too small for the rows' rule,
    ``test_a_chain_is_compacted_when_its_rows_outweigh_the_tree``; into a whole record, or
    with ``squash`` into one patch of the committed record)."""
    if not squash:
        with mock.patch.object(View, "_squashed", return_value=None):
            return _chain(tmp_path, steps, True)
    store, rec = _store(tmp_path)
    reader, f = store.open(rec)
    with f:
        whole = reader.columns()
    rng = random.Random(15)
    records, wants = [rec], [_rows(whole.rows())]
    view = store.view(rec)
    for k in range(1, steps + 1):
        gone, added, root = _step(view, rng, k)
        got = _apply(view, gone, added, root)
        squashed = View._squashed is _SQUASHED  # (else the mock of a whole compaction)
        assert isinstance(got, Patch) == (k != MAX_DEPTH + 1 or squashed), k  # compacted once
        if k == MAX_DEPTH + 1 and squashed:
            assert isinstance(got, Patch)
            assert got.base == rec.digest
        cols, n = _apply(whole, gone, added, root), None  # the oracle: a whole record
        enc, (n, _f, _b, nblk) = cols  # type: ignore[misc]
        whole = Columns(dict(enc), n, nblk)
        records.append(_save(store, records[-1], got, k))
        view = store.view(records[-1])  # read back from the store
        wants.append(_rows(whole.rows()))
        assert _rows(view.rows()) == wants[-1], k
    return store, records, wants


_SQUASHED = View._squashed


@pytest.fixture(autouse=True)
def _long_chains(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("btrdelta.tree.chain.SLACK", 10_000)


def test_a_chain_is_compacted_when_its_rows_outweigh_the_tree(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("btrdelta.tree.chain.SLACK", 12)
    store, rec = _store(tmp_path)
    view = store.view(rec)
    rng = random.Random(3)
    kinds = []
    for k in range(1, 5):
        held = view.held
        got = _apply(view, *_step(view, rng, k))
        kinds.append(isinstance(got, Patch))
        rec = _save(store, rec, got, k)
        view = store.view(rec)
        # a patch holds its rows on top of the chain's; a whole record starts a new chain
        assert view.held > held if kinds[-1] else (view.held, view.depth) == (0, 0), k
    # ~7-10 rows a step, a tree of ~20: the second patch would hold more than 12 + 20 // 16
    assert kinds[0], kinds
    assert not kinds[1], kinds


def test_a_chain_reads_back_what_whole_records_hold(tmp_path: Path) -> None:
    _s, records, _wants = _chain(tmp_path, MAX_DEPTH + 2)
    versions = [r.head.version for r in records]
    # a mixed chain: patches of both versions on a version 4 base, compacted into version 8
    assert versions == [4] + [PATCH, PATCH_WRITTEN] * (MAX_DEPTH // 2) + [VERSION, PATCH_WRITTEN]
    # a patch holds what changed: a small part of the whole record of the same tree
    assert max(r.size for r in records[1:9]) < records[9].size
    assert all(records[k].head.base == records[k - 1].digest for k in range(1, 9))


def test_a_compaction_copies_the_chains_rows_by_column(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole record of a compaction takes the rows its chain carries (each patch's
    rows still in the view) by column runs, as it takes the base's: no row is made a
    :class:`RecordInode` and encoded again (~8 µs a row: ~7 ms for the ~900 rows of a
    chain of 8 patches on issue 15's large tree). The records are the oracle's
    (``_chain``: the rows read back equal the whole-record patching of each step)."""
    made: list[int] = []
    inode, whole = Columns.inode, View._whole
    compacting = []

    def counted(self: Columns, r: int, by_row: bool = False) -> RecordInode:
        if compacting:
            made.append(r)
        return inode(self, r, by_row)

    def compact(self: View, *args: object) -> object:
        compacting.append(1)
        try:
            return whole(self, *args)  # type: ignore[arg-type]
        finally:
            compacting.pop()

    monkeypatch.setattr(Columns, "inode", counted)
    monkeypatch.setattr(View, "_whole", compact)
    _s, records, _wants = _chain(tmp_path, MAX_DEPTH + 1)
    assert records[-1].head.base is None  # (compacted)
    assert made == []


def test_a_long_chain_is_squashed_into_one_patch_of_its_whole_record(tmp_path: Path) -> None:
    """A chain at its length whose rows would fit in half of what a chain may hold is
    compacted into one patch of its whole record (its BASE), not a whole record: read
    back (a chain of one), it holds what the whole-record patching gives (``_chain``'s
    oracle), and the next send patches it; the records between are no longer needed."""
    store, records, wants = _chain(tmp_path, MAX_DEPTH + 3, squash=True)
    versions = [r.head.version for r in records]
    assert versions == [4] + [PATCH, PATCH_WRITTEN] * (MAX_DEPTH // 2) + \
        [PATCH, PATCH_WRITTEN, PATCH]
    squash = records[MAX_DEPTH + 1]
    assert squash.head.base == records[0].digest
    assert squash.head.parent == records[MAX_DEPTH].digest  # (what it was sent against)
    # it holds the chain's rows once: less than the chain's patches together
    assert squash.size < sum(r.size for r in records[1:MAX_DEPTH + 1])
    view = store.view(squash)
    assert (view.depth, view.whole) == (1, records[0].digest)
    assert store.view(records[-1]).depth == 3
    doomed = {s.digest for s in store.prune(keep=1, dry_run=True)}
    assert doomed == {r.digest for r in records[1:MAX_DEPTH + 1]}
    store.prune(keep=1)
    assert _rows(store.view(store.resolve(records[-1].digest)).rows()) == wants[-1]


def test_the_store_keeps_the_bases_of_what_it_keeps(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    store, records, wants = _chain(tmp_path, MAX_DEPTH + 2)
    digests = [r.digest for r in records]
    doomed = {s.digest for s in store.prune(keep=1, dry_run=True)}
    assert doomed == set(digests[:9])  # the newest (a patch) keeps its whole base
    store.edit_cursor("rx", lambda _: (digests[3], {}))
    doomed = {s.digest for s in store.prune(keep=1, dry_run=True)}
    assert doomed == set(digests[4:9])  # what the receiver holds needs its chain
    with pytest.raises(BtrdeltaError, match="is the base of patch record"):
        store.delete(digests[0])
    assert main(["sendshot", "delete", digests[5][:16], "--store", store.path]) == 1
    assert "is the base of patch record" in capsys.readouterr().err
    store.prune(keep=1)
    left = {s.digest for s in store.records_list()}
    assert left == {*digests[:4], *digests[9:]}
    for k in (3, 10):  # every record kept still reads whole
        assert _rows(store.view(store.resolve(digests[k])).rows()) == wants[k]


def test_latest_falls_back_past_a_broken_chain(tmp_path: Path) -> None:
    store, records, wants = _chain(tmp_path, MAX_DEPTH + 2)
    store.delete(records[9].digest, force=True)  # the newest patch's base
    damaged: list[str] = []
    rec, view = load_base(store, "latest", records[0].head.source, None, damaged=damaged)
    assert rec.digest == records[8].digest
    assert _rows(view.rows()) == wants[8]
    assert damaged
    assert f"sendshot {records[10].digest[:12]} cannot be read" in damaged[0]
    assert "is missing" in damaged[0]
    with pytest.raises(StreamFormatError, match="is missing"):
        load_base(store, records[10].digest, b"", None)


def test_a_chains_bases_are_taken_from_the_listing(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A send lists the store (``latest``) and then reads the chain of the record chosen:
    the bases' heads are the listing's (its head cache), not read from their files again
    (each a file opened and a zstd context made: ~0.1-0.3 ms a base); each file is still
    read whole and checked against its name and the head listed. A base gone since the
    listing is missing, naming the record that names it."""
    store, records, wants = _chain(tmp_path, 3)
    fresh = SendshotStore(store.path)
    rec = fresh.resolve(records[-1].digest)  # (a listing, as a send's)
    heads: list[object] = []
    real = store_mod.read_head
    monkeypatch.setattr(store_mod, "read_head", lambda *a, **k: heads.append(a) or real(*a, **k))
    assert _rows(fresh.view(rec).rows()) == wants[-1]
    assert heads == []
    # without a listing (or for a record it did not have) the head is read as before
    assert _rows(SendshotStore(store.path).view(rec).rows()) == wants[-1]
    assert len(heads) == 3
    Path(records[1].path).unlink()  # gone after the listing
    with pytest.raises(StreamFormatError, match=f"its base {records[1].digest[:12]} is missing"
                       ) as got:
        fresh.view(rec)
    assert got.value.source == records[2].path


def _hostile(tmp_path: Path, make: object, version: int
             ) -> tuple[SendshotStore, StoredSendshot]:
    store, rec = _store(tmp_path)
    view = store.view(rec)
    patch = make(view)  # type: ignore[operator]
    head = replace(rec.head, version=version, base=rec.digest, parent=rec.digest,
                   created_ns=rec.head.created_ns + 1)
    return store, store.save(head, patch)


def _root_file(view: View, rng: random.Random) -> RecordInode:
    return _file(5_000_000, view.ino(0), b"x", rng)


rng0 = random.Random(1)
HOSTILE = {
    "a drop beyond the base": (lambda v: Patch([v.span + 3], [], encode_rows([], {}), v.span,
                                               v.live - 1), "DROP row", True),
    "drops out of order": (lambda v: Patch([3, 2], [], encode_rows([], {}), v.span,
                                           v.live - 2), "DROP row", True),
    "a row that is not its inode": (
        lambda v: Patch([], [2], encode_rows([replace(v.inode(2), ino=77)], {v.ino(0): 0}),
                        v.span, v.live), "SLOTS row 2", True),
    "a parent beyond the result": (
        lambda v: Patch([], [v.span], encode_rows([_root_file(v, rng0)], {v.ino(0): v.span + 9}),
                        v.span + 1, v.live + 1), "parent beyond", True),
    "a parent that is no directory": (
        lambda v: Patch([], [v.span], encode_rows([_root_file(v, rng0)], {
            v.ino(0): v.file_rows[0]}), v.span + 1, v.live + 1), "not a directory", True),
    "counts that lie": (
        lambda v: Patch([], [v.span], encode_rows([_root_file(v, rng0)], {v.ino(0): 0}),
                        v.span + 1, v.live + 5), "END counts", True),
    "rows SLOTS do not place": (
        lambda v: Patch([], [], encode_rows([_root_file(v, rng0)], {v.ino(0): 0}),
                        v.span, v.live), "SLOTS holds", True),
    "a root that is no directory": (
        lambda v: Patch([], [0], encode_rows([replace(_root_file(v, rng0), ino=v.ino(0),
                                                      dentries=[])], {}), v.span, v.live),
        "the root is replaced", True),
    "a directory made a file, its entries kept": (
        lambda v: Patch([], [1], encode_rows([replace(_root_file(v, rng0), ino=v.ino(1))],
                                             {v.ino(0): 0}), v.span, v.live), "is kept", True),
    "a dropped directory's kept entry": (
        lambda v: Patch([next(r for r in range(1, v.span) if v.modes[r] & 0o170000 == _DIR)],
                        [], encode_rows([], {}), v.span, v.live - 1), "is kept", True),
}


@pytest.mark.parametrize("version", [PATCH, PATCH_WRITTEN])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_patch_is_refused_naming_the_record(
        tmp_path: Path, case: str, version: int, capsys: pytest.CaptureFixture[str]) -> None:
    make, says, located = HOSTILE[case]
    store, rec = _hostile(tmp_path, make, version)
    with pytest.raises(StreamFormatError, match=says) as got:
        store.view(rec)
    assert got.value.source == rec.path
    if located:
        assert got.value.offset is not None
        assert got.value.offset > 0
    capsys.readouterr()
    assert main(["sendshot", "show", rec.digest, "--store", store.path]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert rec.digest in err[0]
    assert says in err[0]


def test_a_base_that_is_not_the_one_named_or_a_cycle_is_refused(tmp_path: Path) -> None:
    store, records, _wants = _chain(tmp_path, 2)
    # the base's file holds another record (its name is not its content's digest)
    p1 = Path(records[1].path)
    saved = p1.read_bytes()
    p1.write_bytes(Path(records[0].path).read_bytes())
    with pytest.raises(StreamFormatError, match="its name says"):
        store.view(records[2])
    p1.write_bytes(saved)
    # two records naming each other as their base (misnamed files)
    a, b = "a" * 64, "b" * 64
    for name, base in ((a, b), (b, a)):
        head = replace(records[2].head, base=base, created_ns=records[2].head.created_ns + 5)
        got = store.save(head, Patch([], [], encode_rows([], {}), 0, 0))
        Path(got.path).rename(Path(store.records) / f"{name}.sendshot")
    with pytest.raises(StreamFormatError, match="cycle"):
        store.view(store.resolve(a))
    # a base of another seed
    head = replace(records[2].head, base=records[1].digest, seed=records[1].head.seed + 1)
    view = store.view(records[1])
    other = store.save(head, Patch([], [], encode_rows([], {}), view.span, view.live))
    with pytest.raises(StreamFormatError, match="another subvolume, seed"):
        store.view(other)


@pytest.mark.parametrize("version", [PATCH, PATCH_WRITTEN])
def test_a_hostile_patch_names_the_offset_of_its_value(tmp_path: Path, version: int) -> None:
    """The offset an error of a patch names is the one of the value it names, in BODY (in
    version 7 after the column's padding): the u32 there is that row."""
    import zstandard

    for case, row in (("drops out of order", 2), ("a row that is not its inode", 2)):
        store, rec = _hostile(tmp_path / case.replace(" ", "-"), HOSTILE[case][0], version)
        with pytest.raises(StreamFormatError, match=f"row {row} ") as got:
            store.view(rec)
        data = Path(rec.path).read_bytes()
        body = zstandard.ZstdDecompressor().decompressobj().decompress(data[22:])
        at = got.value.offset
        assert at is not None
        assert int.from_bytes(body[at:at + 4], "little") == row, case
