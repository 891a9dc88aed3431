"""tree/incremental: the tree-sum of a parent's copy after records, reading only the files
the records may have changed. Oracle: the full tree-sum of the result (every file read).

Each case changes file contents without changing sizes and puts every mtime back, so a
content digest reused where it must not be gives a different sum than the oracle's."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from btrdelta import stream as S
from btrdelta.fs.copy import copy_tree
from btrdelta.tree import incremental, tree_sum, treesum
from btrdelta.tree.incremental import Changes, Digests, verified_digests

T = 1_600_000_000_000_000_000


def _parent(tmp_path: Path) -> Path:
    root = tmp_path / "parent"
    for rel, data in [("d/f", b"f" * 100), ("d/g", b"g" * 100), ("d/h1", b"h" * 50),
                      ("e/keep", b"k" * 4000), ("top", b"t" * 10)]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    os.link(root / "d/h1", root / "d/h2")
    os.setxattr(root / "top", "user.a", b"1")
    for p in [*sorted(root.rglob("*"), reverse=True), root]:
        os.utime(p, ns=(T, T))
    return root


def _apply(root: Path, changes: Changes, records: list[object]) -> None:
    """Do what each record says to ``root`` (a minimal applier) and feed it to ``changes``;
    every mtime is put back to T afterwards."""
    for rec in records:
        changes.feed(rec)
        if isinstance(rec, S.Snapshot):
            continue
        p = root / os.fsdecode(rec.path)  # type: ignore[attr-defined]
        if isinstance(rec, S.Write):
            with open(p, "r+b") as f:
                f.seek(rec.offset)
                f.write(rec.data)
        elif isinstance(rec, S.Truncate):
            os.truncate(p, rec.size)
        elif isinstance(rec, S.Mkfile):
            p.touch()
        elif isinstance(rec, S.Rename):
            os.rename(p, root / os.fsdecode(rec.path_to))
        elif isinstance(rec, S.Link):
            os.link(root / os.fsdecode(rec.path_link), p)
        elif isinstance(rec, S.Unlink):
            os.unlink(p)
        elif isinstance(rec, S.SetXattr):
            os.setxattr(p, rec.name, rec.data)
        else:
            raise AssertionError(rec)
    for p in [*list(root.rglob("*")), root]:
        os.utime(p, ns=(T, T), follow_symlinks=False)


def _snap() -> S.Snapshot:
    return S.Snapshot(b"new", uuid.uuid4(), 2, uuid.uuid4(), 1)


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Paths whose contents tree_manifest reads."""
    seen: list[bytes] = []
    real = treesum._file_digest

    def spy(path: bytes, size: int, want_layout: bool, *stop: object) -> tuple[str, object]:
        seen.append(path)
        return real(path, size, want_layout, *stop)  # type: ignore[arg-type]

    monkeypatch.setattr(treesum, "_file_digest", spy)
    return seen


CASES = {
    "write in place": [S.Write(b"d/f", 3, b"XY")],
    "hard link written through its other name": [S.Write(b"d/h2", 0, b"Z")],
    "directory renamed away, written, renamed back": [
        S.Rename(b"d", b"x"), S.Write(b"x/g", 0, b"Q"), S.Rename(b"x", b"d")],
    "orphan renamed over a file": [
        S.Mkfile(b"o257-1-0", 257), S.Write(b"o257-1-0", 0, b"n" * 100),
        S.Rename(b"o257-1-0", b"d/f")],
    "link made, written through, unlinked": [
        S.Link(b"tmp", b"e/keep"), S.Write(b"tmp", 10, b"W"), S.Unlink(b"tmp")],
    "two files swapped": [
        S.Rename(b"d/f", b"o1"), S.Rename(b"d/g", b"d/f"), S.Rename(b"o1", b"d/g")],
    "truncated and written back to its size": [
        S.Truncate(b"e/keep", 0), S.Write(b"e/keep", 0, b"k" * 3999 + b"!")],
    "xattr only": [S.SetXattr(b"top", b"user.a", b"2")],
    "written past its end": [S.Write(b"d/f", 98, b"XYZW")],
    "truncated shorter": [S.Truncate(b"e/keep", 1000)],
    "truncated longer, then written": [S.Truncate(b"d/g", 300), S.Write(b"d/g", 250, b"Q")],
    "truncated to nothing, written back shorter": [
        S.Truncate(b"e/keep", 0), S.Write(b"e/keep", 0, b"k" * 2000)],
    "written, renamed, written again": [
        S.Write(b"e/keep", 5, b"A"), S.Rename(b"e/keep", b"e/moved"),
        S.Write(b"e/moved", 3990, b"B")],
}
#: cases whose changed files the overlay hashes (written ranges read from the new file,
#: the rest from the parent's): the file itself is never read whole
OVERLAID = {"write in place": b"d/f", "written past its end": b"d/f",
            "truncated shorter": b"e/keep", "truncated longer, then written": b"d/g",
            "truncated and written back to its size": b"e/keep",
            "written, renamed, written again": b"e/moved"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_incremental_sum_equals_the_full_one(tmp_path: Path, case: str,
                                             hashed: list[bytes]) -> None:
    parent = _parent(tmp_path)
    digests = verified_digests(parent)
    assert digests.identity == tree_sum(parent)
    new = tmp_path / "new"
    copy_tree(parent, new)
    changes = Changes()
    _apply(new, changes, [_snap(), *CASES[case]])
    hashed.clear()
    got = changes.tree_sum(new, digests)
    read = {os.path.relpath(p, os.fsencode(new)) for p in hashed}
    assert got.identity == tree_sum(new)
    assert got.identity != digests.identity or case == "two files swapped"
    assert b"top" not in read or case == "xattr only"  # untouched: never read
    assert len(read) < 6
    assert OVERLAID.get(case) not in read
    # the result's digests serve the next hop the same way
    again = Changes()
    _apply(new, again, [_snap()])
    assert again.tree_sum(new, got).identity == got.identity


def test_a_parent_changed_after_it_was_hashed_is_read_again(tmp_path: Path,
                                                            hashed: list[bytes]) -> None:
    """Changed after hashing, before the copy, same size and mtime: its ctime tells."""
    parent = _parent(tmp_path)
    digests = verified_digests(parent)
    with open(parent / "e/keep", "r+b") as f:
        f.write(b"changed")
    os.utime(parent / "e/keep", ns=(T, T))
    new = tmp_path / "new"
    copy_tree(parent, new)
    changes = Changes()
    _apply(new, changes, [_snap()])
    hashed.clear()
    got = changes.tree_sum(new, digests)
    read = [os.path.basename(p) for p in hashed]
    assert got.identity == tree_sum(new) != digests.identity
    # a hard-linked file is always read, for its first name (h2 is h1's inode)
    assert read == [b"h1", b"keep"]


def test_without_a_snapshot_every_file_is_read(tmp_path: Path, hashed: list[bytes]) -> None:
    parent = _parent(tmp_path)
    digests = verified_digests(parent)
    hashed.clear()
    got = Changes().tree_sum(parent, digests)
    assert got.identity == digests.identity
    assert len(hashed) == 5  # six names of five inodes: h1 and h2 are one file


def test_an_unknown_record_without_a_path_trusts_nothing(tmp_path: Path,
                                                         hashed: list[bytes]) -> None:
    parent = _parent(tmp_path)
    digests = verified_digests(parent)
    changes = Changes()
    changes.feed(_snap())
    changes.feed(object())
    hashed.clear()
    assert changes.tree_sum(parent, digests).identity == digests.identity
    assert len(hashed) == 5  # six names of five inodes: h1 and h2 are one file


def test_digests_keep_every_entry_with_its_lstat(tmp_path: Path) -> None:
    parent = _parent(tmp_path)
    got = verified_digests(parent)
    assert sorted(got.entries) == [b".", b"d", b"d/f", b"d/g", b"d/h1", b"d/h2", b"e",
                                   b"e/keep", b"top"]
    entry, key = got.entries[b"e/keep"]
    st = os.lstat(parent / "e/keep")
    assert entry.digest is not None
    assert entry.size == 4000
    assert key == (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode,
                   st.st_uid, st.st_gid, st.st_nlink)
    assert incremental.Digests(parent, "", {}).same_root(parent)
    assert not incremental.Digests(parent, "", {}).same_root(tmp_path)


def test_a_parent_changed_after_the_copy_gives_no_bytes_to_a_written_file(
        tmp_path: Path, hashed: list[bytes]) -> None:
    """The overlay reads a written file's other ranges from the parent: a parent changed
    after it was hashed (here after the copy, so the new tree still has the old bytes) is
    not used, its ctime tells; the new file is read whole instead."""
    parent = _parent(tmp_path)
    digests = verified_digests(parent)
    new = tmp_path / "new"
    copy_tree(parent, new)
    changes = Changes()
    _apply(new, changes, [_snap(), S.Write(b"e/keep", 0, b"W")])
    with open(parent / "e/keep", "r+b") as f:
        f.seek(3000)
        f.write(b"behind the update's back")
    os.utime(parent / "e/keep", ns=(T, T))
    hashed.clear()
    got = changes.tree_sum(new, digests)
    assert got.identity == tree_sum(new)
    assert b"keep" in [os.path.basename(p) for p in hashed]


def test_an_unchanged_inode_is_taken_whole_and_a_changed_one_is_read(
        tmp_path: Path, hashed: list[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """The tree itself after a SNAPSHOT with no records (what a btrfs snapshot keeps: inode
    numbers and ctimes): nothing is read, not even xattrs, but for hard-linked files. A
    file changed behind the update's back (same size, mtime put back) has a new ctime: it
    is read."""
    listed: list[bytes] = []
    real = treesum._target_and_xattrs

    def spy(path: bytes, ident: tuple[int, int], link: bool, exclude: frozenset[bytes]
            ) -> tuple[bytes | None, tuple[tuple[bytes, bytes], ...]]:
        listed.append(path)
        return real(path, ident, link, exclude)

    monkeypatch.setattr(treesum, "_target_and_xattrs", spy)
    parent = _parent(tmp_path)
    digests = verified_digests(parent)
    changes = Changes()
    changes.feed(_snap())
    hashed.clear()
    listed.clear()
    assert changes.tree_sum(parent, digests).identity == digests.identity
    # hard-linked files are always read (their group is made of paths), once an inode
    assert [os.path.basename(p) for p in hashed] == [b"h1"]
    assert [os.path.basename(p) for p in listed] == [b"h1"]
    hashed.clear()
    with open(parent / "d/g", "r+b") as f:
        f.write(b"G")
    os.utime(parent / "d/g", ns=(T, T))
    got = changes.tree_sum(parent, digests)
    read = [os.path.basename(p) for p in hashed]
    assert got.identity == tree_sum(parent) != digests.identity
    assert read == [b"g", b"h1"]


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the threads that hash written files from their ranges (``_overlaid``)."""
    seen: list[str] = []
    real = incremental._overlaid

    def spy(*args: object) -> str | None:
        seen.append(threading.current_thread().name)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(incremental, "_overlaid", spy)
    return seen


def _parent_with_large(tmp_path: Path, *names: str) -> Path:
    """:func:`_parent` with files of 600,000 random bytes ``e/NAME``."""
    parent = _parent(tmp_path)
    for name in names:
        (parent / "e" / name).write_bytes(os.urandom(600_000))
        os.utime(parent / "e" / name, ns=(T, T))
    os.utime(parent / "e", ns=(T, T))
    return parent


def test_a_large_written_file_is_hashed_from_its_ranges_while_the_walk_goes_on(
        tmp_path: Path, hashed: list[bytes], threads: list[str]) -> None:
    """A large written file is hashed (written ranges and the parent's) in a thread started
    before the walk; one renamed after its writes is found by the walk."""
    parent = _parent_with_large(tmp_path, "big", "moved")
    digests = verified_digests(parent)
    new = tmp_path / "new"
    copy_tree(parent, new)
    changes = Changes()
    _apply(new, changes, [_snap(), S.Write(b"e/big", 300_000, b"X" * 5000),
                          S.Truncate(b"e/big", 550_000), S.Write(b"e/moved", 0, b"Y"),
                          S.Rename(b"e/moved", b"d/moved")])
    hashed.clear()
    got = changes.tree_sum(new, digests)
    assert not [p for p in hashed if os.path.basename(p) in (b"big", b"moved")]
    assert got.identity == tree_sum(new)
    assert sorted(t.startswith("btrdelta-overlay") for t in threads) == [False, True]


def test_small_written_files_are_hashed_early_too(tmp_path: Path, hashed: list[bytes],
                                                  threads: list[str]) -> None:
    """:meth:`Changes.start` (before the seal's commits, which leave the walk's thread
    idle) starts the digest of every written file, a 100-byte one too: the walk only
    takes it."""
    parent = _parent(tmp_path)
    digests = verified_digests(parent)
    new = tmp_path / "new"
    copy_tree(parent, new)
    changes = Changes()
    _apply(new, changes, [_snap(), S.Write(b"d/f", 10, b"Q" * 20)])
    changes.start(new, digests)
    hashed.clear()
    got = changes.tree_sum(new, digests)
    assert not [p for p in hashed if p.endswith(b"/d/f")]  # not read whole by the walk
    assert [t.startswith("btrdelta-overlay") for t in threads] == [True]
    assert got.identity == tree_sum(new)


# -- on a btrfs snapshot: the C walk (tree/_treewalk.c) takes lines from the parent ---------


def _subvol_parent(mnt: Path) -> Path:
    """The parent tree of :func:`_parent` made as a subvolume of ``mnt``."""
    from btrdelta.fs.btrfs import create_subvolume

    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        create_subvolume(fd, b"parent")
    finally:
        os.close(fd)
    src = _parent(mnt / "src")
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if p.is_dir():
            (mnt / "parent" / rel).mkdir()
        elif os.lstat(p).st_nlink > 1 and rel.name == "h2":
            os.link(mnt / "parent" / rel.with_name("h1"), mnt / "parent" / rel)
        else:
            (mnt / "parent" / rel).write_bytes(p.read_bytes())
    os.setxattr(mnt / "parent" / "top", "user.a", b"1")
    os.symlink("d/f", mnt / "parent" / "link")
    root = mnt / "parent"
    for p in [*sorted(root.rglob("*"), reverse=True), root]:
        os.utime(p, ns=(T, T), follow_symlinks=False)
    return root


def _changed_snapshot(btrfs_mnt: Path, prefix: str, case: str
                      ) -> tuple[Path, Path, Changes, Digests]:
    """A parent subvolume and its verified digests, a snapshot of it changed by the case's
    records (through a :class:`Changes`): the parent, the snapshot, the changes, the
    digests."""
    mnt = btrfs_mnt / (prefix + case.replace(" ", "-").replace(",", ""))
    mnt.mkdir()
    parent = _subvol_parent(mnt)
    digests = verified_digests(parent)
    new = _snapshot(mnt, parent, "new")
    changes = Changes()
    _apply(new, changes, [_snap(), *CASES[case]])
    return parent, new, changes, digests


def _snapshot(mnt: Path, parent: Path, name: str) -> Path:
    from btrdelta.fs.btrfs import create_snapshot

    dfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    sfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        create_snapshot(dfd, name.encode(), sfd)
    finally:
        os.close(sfd)
        os.close(dfd)
    return mnt / name


@pytest.fixture(scope="module")
def btrfs_mnt() -> Iterator[Path]:
    from tests.conftest import btrfs_loop

    with btrfs_loop() as mnt:
        yield mnt


def _derived(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """[lines taken whole or restated by the C walk, entries handed back], counted."""
    from btrdelta import _native

    walk = _native.live("treewalk")
    assert walk is not None, "the C walk is not built"
    counts = [0, 0]

    class Spy:
        unchanged = staticmethod(walk.unchanged)

        @staticmethod
        def derive(*args: Any) -> None:
            *walked, out, keys, handed_back, proven = args if len(args) == 9 else (*args, None)

            backs: list[bytes] = []

            def back(rel: bytes) -> None:
                backs.append(rel)
                handed_back(rel)

            before = len(keys)
            walk.derive(*walked, out, keys, back, proven)
            counts[1] += len(backs)
            counts[0] += len(keys) - before - len(backs)  # (handed_back() keeps keys too)

    monkeypatch.setattr(_native, "live", lambda name: Spy if name == "treewalk" else None)
    return counts


@pytest.mark.parametrize("case", sorted(CASES))
def test_on_a_snapshot_the_c_walk_gives_the_full_sum(btrfs_mnt: Path, case: str,
                                                     hashed: list[bytes],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Every mtime is put back after the records (so every ctime moved): the lines of
    untouched inodes are restated from the parent's, not read; the result is the full
    tree-sum's, and the pure-Python walk gives the same digests."""
    from btrdelta import _native

    _, new, changes, digests = _changed_snapshot(btrfs_mnt, "", case)
    hashed.clear()
    with _native.use_backend("python", "treewalk"):
        py = changes.tree_sum(new, digests)
    counts = _derived(monkeypatch)
    got = changes.tree_sum(new, digests)
    read = {os.path.relpath(p, os.fsencode(new)) for p in hashed}
    assert got.identity == py.identity == tree_sum(new)
    assert got.entries == py.entries
    assert counts[0] >= 5  # ".", "d", "e", "link", "top" at least: none of them read
    assert b"top" not in read or case == "xattr only"
    assert OVERLAID.get(case) not in read


@pytest.mark.parametrize("case", sorted(CASES))
def test_on_a_snapshot_the_parent_looked_at_before_the_seal_gives_the_full_sum(
        btrfs_mnt: Path, case: str, hashed: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """:meth:`Changes.start` finds the parent's entries still as hashed (``unchanged``)
    before the seal; the walk after it looks at none of the parent's and gives the full
    tree-sum, the lines of untouched inodes still restated, not read. A change of the
    parent after that (after the snapshot: not in the new tree) changes nothing."""
    from btrdelta import _native

    parent, new, changes, digests = _changed_snapshot(btrfs_mnt, "early-", case)
    counts = _derived(monkeypatch)
    walk = _native.live("treewalk")
    assert walk is not None
    given: list[object] = []
    real_derive = walk.derive
    monkeypatch.setattr(walk, "derive", lambda *a: given.append(a[-1]) or real_derive(*a))
    changes.start(new, digests)
    assert changes._started is not None
    proven = changes._started[3].result()[1]
    assert proven is not None
    proven.result()
    with open(parent / "top", "r+b") as f:  # after the snapshot and start()'s look
        f.write(b"changed")
    hashed.clear()
    got = changes.tree_sum(new, digests)
    read = {os.path.relpath(p, os.fsencode(new)) for p in hashed}
    assert got.identity == tree_sum(new)
    assert len(given) == 1
    assert isinstance(given[0], set)
    assert b"top" in given[0]
    assert b"d/f" in given[0]
    assert counts[0] >= 5
    assert b"top" not in read or case == "xattr only"
    assert OVERLAID.get(case) not in read


def test_written_files_hashed_before_the_seal_keep_their_atime(btrfs_mnt: Path) -> None:
    """The early digests read the written files before the seal without updating their
    atime (the stream's, older than their ctime: a read updates it with ``relatime``,
    a transaction joined while the seal commits); a plain read afterwards does."""
    mnt = btrfs_mnt / "atime"
    mnt.mkdir()
    parent = _subvol_parent(mnt)
    digests = verified_digests(parent)
    new = _snapshot(mnt, parent, "new")
    changes = Changes()
    _apply(new, changes, [_snap(), S.Write(b"d/f", 10, b"X" * 20), S.Write(b"top", 0, b"Y")])
    changes.start(new, digests)
    assert changes._started is not None
    early = changes._started[3].result()[0]
    assert sorted(early) == [b"d/f", b"top"]
    for fut, _stamp in early.values():
        assert fut.result() is not None
    assert [os.lstat(new / p).st_atime_ns for p in ("d/f", "top")] == [T, T]
    assert changes.tree_sum(new, digests).identity == tree_sum(new)
    (new / "top").read_bytes()
    assert os.lstat(new / "top").st_atime_ns > T


def test_unchanged_tells_the_parent_entries_still_as_hashed(btrfs_mnt: Path) -> None:
    """``_treewalk.unchanged``: the entries whose inode, size, mtime and ctime are the
    hashed ones; not one changed since (its ctime moved, mtime put back), not one gone,
    and not one reached through a symlink that took its directory's place (the directory
    renamed: the very inode, unchanged, behind it)."""
    from btrdelta import _native

    walk = _native.live("treewalk")
    assert walk is not None
    mnt = btrfs_mnt / "unchanged"
    mnt.mkdir()
    parent = _subvol_parent(mnt)
    digests = verified_digests(parent)
    everything = set(digests.entries)
    assert walk.unchanged(os.fsencode(parent), digests.entries) == everything
    os.chmod(parent / "top", 0o600)
    os.chmod(parent / "top", 0o644)
    os.utime(parent / "top", ns=(T, T))
    os.unlink(parent / "link")
    os.rename(parent / "d", parent / "moved")
    os.symlink("moved", parent / "d")
    for p in (parent, parent / "d", parent / "moved"):
        os.utime(p, ns=(T, T), follow_symlinks=False)
    got = walk.unchanged(os.fsencode(parent), digests.entries)
    assert got == {rel for rel in everything
                   if rel not in (b".", b"top", b"link") and not rel.startswith(b"d")}
    assert b"e/keep" in got
    assert walk.unchanged(os.fsencode(mnt / "nothing"), digests.entries) == set()
    assert walk.unchanged(os.fsencode(parent), {}) == set()
    with pytest.raises(TypeError):
        walk.derive(b"/", b"/", {}, None, None, [], {}, print, [b"a list"])


@pytest.mark.parametrize("early", [False, True])
def test_on_a_snapshot_a_parent_changed_after_it_was_hashed_is_read_again(
        btrfs_mnt: Path, hashed: list[bytes], monkeypatch: pytest.MonkeyPatch,
        early: bool) -> None:
    """The parent changed behind the update's back after it was hashed, before its
    snapshot (same size, mtime put back): the C walk finds its ctime moved (``early``:
    :meth:`Changes.start`'s look at the parent does), the file is read, and the sum is the
    new tree's, not the parent's digests'. A symlink, an xattr and a directory's mode
    changed the same way are read again too."""
    mnt = btrfs_mnt / f"changed-{early}"
    mnt.mkdir()
    parent = _subvol_parent(mnt)
    digests = verified_digests(parent)
    with open(parent / "e/keep", "r+b") as f:
        f.write(b"changed")
    os.setxattr(parent / "top", "user.a", b"2")
    os.unlink(parent / "link")
    os.symlink("d/g", parent / "link")
    os.chmod(parent / "d", 0o700)
    for p in (parent / "e/keep", parent / "top", parent / "link", parent / "d"):
        os.utime(p, ns=(T, T), follow_symlinks=False)
    new = _snapshot(mnt, parent, "new")
    changes = Changes()
    _apply(new, changes, [_snap()])
    counts = _derived(monkeypatch)
    if early:
        changes.start(new, digests)
    hashed.clear()
    got = changes.tree_sum(new, digests)
    assert got.identity == tree_sum(new) != digests.identity
    assert b"keep" in [os.path.basename(p) for p in hashed]
    assert counts[1] >= 4


def test_the_c_walk_follows_the_python_walk_order_and_skips(btrfs_mnt: Path) -> None:
    """Entries in treesum._walk's order with its keys; a nested subvolume and the empty
    stub a snapshot leaves of it are skipped; a parent root that does not exist gives
    no lines."""
    from btrdelta import _native
    from btrdelta.fs.btrfs import create_subvolume

    walk = _native.live("treewalk")
    assert walk is not None
    mnt = btrfs_mnt / "order"
    mnt.mkdir()
    parent = _subvol_parent(mnt)
    (parent / "b c").mkdir()
    (parent / "b c" / "z").write_bytes(b"z")
    (parent / "a").mkdir()
    fd = os.open(parent / "a", os.O_RDONLY | os.O_DIRECTORY)
    try:
        create_subvolume(fd, b"nested")
    finally:
        os.close(fd)
    (parent / "a" / "nested" / "x").write_bytes(b"x")
    new = _snapshot(mnt, parent, "new")  # a/nested: an empty stub (inode 2) in the snapshot
    for tree in (parent, new):
        want = [(rel, incremental._key(st)) for rel, _full, st in treesum._walk(
            os.fsencode(tree))]
        got = walk.derive(os.fsencode(tree), os.fsencode(mnt / "none"), {}, set(), set())
        assert [(rel, key) for rel, key, _got in got] == want
        assert {g for _r, _k, g in got} == {None}
        assert b"a/nested" not in {rel for rel, _k, _g in got}
    with pytest.raises(FileNotFoundError):
        walk.derive(os.fsencode(mnt / "none"), os.fsencode(parent), {}, set(), set())


def test_the_c_walk_fills_the_callers_lists_as_it_returns_them(btrfs_mnt: Path) -> None:
    """derive(..., out, keys, on_held) gives what derive(...) returns: each entry's result
    appended to out and its key in keys, on_held called with each entry handed back, in
    walk order (while the walk's thread goes on); what on_held raises is raised."""
    from btrdelta import _native

    walk = _native.live("treewalk")
    assert walk is not None
    mnt = btrfs_mnt / "filled"
    mnt.mkdir()
    parent = _subvol_parent(mnt)
    digests = verified_digests(parent)
    new = _snapshot(mnt, parent, "new")
    (new / "d" / "added").write_bytes(b"a")
    os.chmod(new / "e" / "keep", 0o600)
    args = (os.fsencode(new), os.fsencode(parent), digests.entries, {b"d/f"}, None)
    listed = walk.derive(*args)
    out: list[object] = []
    keys: dict[bytes, object] = {}
    backs: list[bytes] = []
    assert walk.derive(*args, out, keys, backs.append) is None
    assert backs == [rel for rel, _key, got in listed if got is None]
    assert b"d/f" in backs
    assert b"d/added" in backs
    assert out == [got for _rel, _key, got in listed if got is not None]
    assert list(keys.items()) == [(rel, key) for rel, key, got in listed if got is not None]

    def refuse(rel: bytes) -> None:
        raise KeyError(rel)

    with pytest.raises(KeyError):
        walk.derive(*args, [], {}, refuse)
    with pytest.raises(TypeError):
        walk.derive(*args, [], {})


def test_digests_started_early_are_used_only_for_files_unchanged_since(
        tmp_path: Path, threads: list[str]) -> None:
    """:meth:`Changes.start` hashes large written files before the tree is sealed; one
    written again after that where the stream wrote (same size, mtime put back: its ctime
    moved) is hashed again by the walk, the other's early digest is used."""
    parent = _parent_with_large(tmp_path, "big", "late")
    digests = verified_digests(parent)
    new = tmp_path / "new"
    copy_tree(parent, new)
    changes = Changes()
    _apply(new, changes, [_snap(), S.Write(b"e/big", 1000, b"X" * 5000),
                          S.Write(b"e/late", 0, b"Y")])
    changes.start(new, digests)
    assert changes._started is not None
    for fut, _stamp in changes._started[3].result()[0].values():
        fut.result()
    with open(new / "e/late", "r+b") as f:  # after the early digests, in the range written
        f.write(b"Z")
    os.utime(new / "e/late", ns=(T, T))
    got = changes.tree_sum(new, digests)
    assert got.identity == tree_sum(new)
    early = [t for t in threads if t.startswith("btrdelta-overlay")]
    assert len(early) == 2
    assert len(threads) == 3  # "late" hashed again by the walk
    changes.close()  # nothing left to stop


def test_the_c_walk_holds_few_descriptors(tmp_path: Path) -> None:
    """A directory of 300 subdirectories is walked with 64 descriptors allowed: each
    subdirectory is opened when its turn comes."""
    import resource

    from btrdelta import _native

    walk = _native.live("treewalk")
    assert walk is not None
    for i in range(300):
        (tmp_path / "t" / f"d{i:03}" / "x").mkdir(parents=True)
    want = [rel for rel, _full, _st in treesum._walk(os.fsencode(tmp_path / "t"))]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    try:
        got = walk.derive(os.fsencode(tmp_path / "t"), os.fsencode(tmp_path / "t"), {},
                          set(), set())
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert [rel for rel, _k, _g in got] == want
    assert len(want) == 601


def _overlay_threads() -> set[int]:
    return {t.ident or 0 for t in threading.enumerate()
            if t.name.startswith("btrdelta-overlay")}


def _large_parent_copied(tmp_path: Path) -> tuple[Digests, Path]:
    """The digests of a parent with a large file ``e/big``, and a copy of it to write."""
    parent = _parent_with_large(tmp_path, "big")
    new = tmp_path / "new"
    copy_tree(parent, new)
    return verified_digests(parent), new


def test_warm_threads_serve_the_walk_and_stop(tmp_path: Path) -> None:
    """:meth:`Changes.warm` starts both hashing threads at once; :meth:`tree_sum` hashes in
    them, and they are gone after :meth:`close` (which joins them; without a walk too)."""
    before = _overlay_threads()
    digests, new = _large_parent_copied(tmp_path)
    changes = Changes()
    changes.warm()
    warm = _overlay_threads() - before
    assert len(warm) == 2
    _apply(new, changes, [_snap(), S.Write(b"e/big", 10, b"X")])
    assert changes.tree_sum(new, digests).identity == tree_sum(new)
    changes.close()
    assert not _overlay_threads() & warm
    idle = Changes()
    idle.warm()
    assert len(_overlay_threads() - before) == 2
    idle.close()
    assert not _overlay_threads() - before


def test_start_keeps_the_warm_threads(tmp_path: Path) -> None:
    """:meth:`Changes.start` gives the early digests to the threads :meth:`Changes.warm`
    started (it stopped them and started two more); they are gone after the walk's
    :meth:`close`."""
    before = _overlay_threads()
    digests, new = _large_parent_copied(tmp_path)
    changes = Changes()
    changes.warm()
    warm = _overlay_threads() - before
    _apply(new, changes, [_snap(), S.Write(b"e/big", 10, b"X")])
    changes.start(new, digests)
    assert _overlay_threads() - before == warm
    assert changes.tree_sum(new, digests).identity == tree_sum(new)
    changes.close()
    assert not _overlay_threads() - before
