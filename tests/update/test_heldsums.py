"""update.heldsums: a held version's digests kept between updates, on a real btrfs (the
kernel's ctransid and lstat are the oracle's inputs; tree-sum of the tree is the oracle):
a hit reads no file; any change, another subvolume at the path, a stale, corrupt or
foreign cache file, or a directory that is no subvolume, is hashed whole, and a wrong tree
is not held."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from btrdelta.fs import btrfs as sv
from btrdelta.tree import tree_sum
from btrdelta.update import heldsums, holdings
from tests.conftest import btrfs_loop

pytestmark = pytest.mark.btrfs


class _Counted:
    """holdings.verified_digests, counting the trees it hashes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = holdings.verified_digests
        self.hashed: list[str] = []
        monkeypatch.setattr(holdings, "verified_digests", self)

    def __call__(self, path: Path) -> object:
        self.hashed.append(path.name)
        return self.real(path)


@pytest.fixture
def mnt() -> Iterator[Path]:
    with btrfs_loop("256M") as m:
        yield m


class _Dest(NamedTuple):
    """DEST (``mnt/dest``) holding one version: what most tests start from."""

    mnt: Path
    #: DEST's state directory (the cache is its ``held/``)
    state: Path
    #: ``DEST/v1``: a read-only subvolume holding a copy of the first release
    v1: Path
    #: its tree-sum
    want: str


@pytest.fixture
def dest(mnt: Path, releases: list[Path]) -> _Dest:
    return _Dest(mnt, mnt / "dest" / ".btrdelta", _sub(mnt, "v1", releases[0]),
                 tree_sum(releases[0]))


def _sub(mnt: Path, name: str, tree: Path) -> Path:
    """A read-only subvolume ``mnt/dest/name`` holding a copy of ``tree``."""
    path = mnt / "dest" / name
    path.parent.mkdir(exist_ok=True)
    subprocess.run(["btrfs", "-q", "subvolume", "create", str(path)], check=True)
    shutil.copytree(tree, path, symlinks=True, dirs_exist_ok=True)
    _ro(path, True)
    return path


def _ro(path: Path, flag: bool) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sv.set_readonly(fd, flag)
    finally:
        os.close(fd)


def _ctransid(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return sv.subvol_info(fd).ctransid
    finally:
        os.close(fd)


def _held(path: Path, identity: str, state: Path) -> bool:
    return path.name in holdings.find_held(path.parent, {path.name: identity}, state)


def test_a_hit_reads_nothing_and_any_change_is_hashed_again(
    dest: _Dest, monkeypatch: pytest.MonkeyPatch,
) -> None:
    mnt, state, v1, want = dest
    count = _Counted(monkeypatch)
    first = holdings.find_held(v1.parent, {"v1": want}, state)["v1"]
    assert count.hashed == ["v1"]
    assert sorted(os.listdir(state / "held")) == [f"{_uuid(v1)}.json"]
    again = holdings.find_held(v1.parent, {"v1": want}, state)["v1"]
    assert count.hashed == ["v1"]  # the hit read no file
    assert again.identity == want
    assert again.entries == first.entries
    assert again.root == v1
    # a rename changes the root's ctime in memory (not its item): still a hit
    os.rename(v1, mnt / "dest" / "v1b")
    os.rename(mnt / "dest" / "v1b", v1)
    assert _held(v1, want, state)
    assert count.hashed == ["v1"]
    # the wrong identity wanted: hashed, not held
    assert not _held(v1, "0" * 64, state)
    assert count.hashed == ["v1", "v1"]

    # made writable, a file rewritten (same size, mtime set back), read-only again
    victim = next(p for p in v1.rglob("*.py") if p.stat().st_size > 10)
    st = victim.stat()
    _ro(v1, False)
    with open(victim, "r+b") as f:
        f.write(b"#")
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    _ro(v1, True)
    assert not _held(v1, want, state)
    assert count.hashed == ["v1", "v1", "v1"]


def test_a_write_through_a_descriptor_opened_before_the_seal_is_seen(
    dest: _Dest, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kernel lets a descriptor opened while the subvolume was writable write after it
    is read-only, and moves the ctransid only at writeback: the stamps see it at once."""
    _mnt, state, v1, want = dest
    victim = next(p for p in v1.rglob("*.py") if p.stat().st_size > 10)
    _ro(v1, False)
    fd = os.open(victim, os.O_WRONLY)
    try:
        _ro(v1, True)
        count = _Counted(monkeypatch)
        assert _held(v1, want, state)
        assert count.hashed == ["v1"]
        before = _ctransid(v1)
        assert os.pwrite(fd, b"#", 0) == 1
        assert _ctransid(v1) == before  # (not written back yet)
        assert not _held(v1, want, state)
        assert count.hashed == ["v1", "v1"]
    finally:
        os.close(fd)


def test_another_subvolume_at_the_path_and_bad_cache_files_are_misses(
    dest: _Dest, releases: list[Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    mnt, state, v1, want = dest
    count = _Counted(monkeypatch)
    assert _held(v1, want, state)
    cache = state / "held" / f"{_uuid(v1)}.json"
    good = cache.read_bytes()
    doc = json.loads(good)

    def edited(**changes: object) -> bytes:
        return json.dumps({**doc, **changes}).encode()

    row = list(doc["entries"][-1])
    row[7] = "0" * 64 if row[7] is not None else row[7]  # a content digest changed
    for bad in (good[:len(good) // 2], b"", edited(ctransid=doc["ctransid"] - 1),
                edited(algorithm="tree-sum-1"), edited(format="btrdelta-held-0"),
                edited(entries=[*doc["entries"][:-1], row]), edited(entries=[["x"]])):
        cache.write_bytes(bad)
        n = len(count.hashed)
        assert _held(v1, want, state)  # the right tree: hashed, held
        assert len(count.hashed) == n + 1
    assert json.loads(cache.read_bytes()) == doc  # written again by the hash

    # another subvolume of the same content at the same path: a new UUID, hashed once
    subprocess.run(["btrfs", "-q", "subvolume", "delete", str(v1)], check=True)
    v1 = _sub(mnt, "v1", releases[0])
    n = len(count.hashed)
    assert _held(v1, want, state)
    assert len(count.hashed) == n + 1
    assert sorted(os.listdir(state / "held")) == [f"{_uuid(v1)}.json"]  # the old one pruned
    # one of another content there, given the first one's file under its UUID and
    # ctransid: its entries' stamps are not this tree's
    v2 = _sub(mnt, "v2", releases[1])
    forged = json.loads((state / "held" / f"{_uuid(v1)}.json").read_bytes())
    subprocess.run(["btrfs", "-q", "subvolume", "delete", str(v1)], check=True)
    os.rename(v2, v1)
    forged.update(uuid=_uuid(v1), ctransid=_ctransid(v1))
    (state / "held" / f"{_uuid(v1)}.json").write_text(json.dumps(forged))
    n = len(count.hashed)
    assert not _held(v1, want, state)
    assert len(count.hashed) == n + 1
    assert tree_sum(v1) != want


def test_a_name_added_at_the_root_with_its_mtime_set_back_is_seen(
    dest: _Dest, releases: list[Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between a tree's check and its saving (no ctransid known from the check yet) the
    root is made again and its names listed: its ctime is not compared (a rename moves it)."""
    mnt, state, v1, want = dest
    checked = holdings.verified_digests(v1)
    st = v1.stat()
    _ro(v1, False)
    (v1 / "extra").write_bytes(b"x")
    os.utime(v1, ns=(st.st_atime_ns, st.st_mtime_ns))
    _ro(v1, True)
    assert not heldsums.save(state, checked)
    count = _Counted(monkeypatch)
    assert not _held(v1, want, state)
    assert count.hashed == ["v1"]
    # the same with an extended attribute set on the root (its ctime only moves)
    v2 = _sub(mnt, "v2", releases[0])
    checked = count.real(v2)
    _ro(v2, False)
    os.setxattr(v2, "user.extra", b"1")
    _ro(v2, True)
    assert not heldsums.save(state, checked)
    assert heldsums.save(state, count.real(v2))
    assert _held(v2, tree_sum(v2), state)
    assert count.hashed == ["v1"]


def test_writable_subvolumes_and_plain_directories_are_never_kept(
    dest: _Dest, releases: list[Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    mnt, state, v1, want = dest
    _ro(v1, False)
    shutil.copytree(releases[1], mnt / "dest" / "v2", symlinks=True)
    wanted = {"v1": want, "v2": tree_sum(releases[1])}
    count = _Counted(monkeypatch)
    for _ in range(2):
        assert sorted(holdings.find_held(mnt / "dest", wanted, state)) == ["v1", "v2"]
    assert count.hashed == ["v1", "v2", "v1", "v2"]
    assert not (state / "held").exists() or not os.listdir(state / "held")
    assert not heldsums.save(state, count.real(mnt / "dest" / "v2"))


def _uuid(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return sv.subvol_info(fd).uuid.hex
    finally:
        os.close(fd)


def test_a_kept_parent_is_proven_unchanged_by_its_ctransid_after_the_snapshot(
    dest: _Dest,
) -> None:
    """The hop's look at the parent after its snapshot (incremental._unchanged): none
    while the parent's ctransid is the one its digests were seen at; a write through a
    descriptor opened before the seal, made before the snapshot, is written back by the
    snapshot, moves the ctransid, and the entries are looked at (the written one found
    changed)."""
    from btrdelta import _native
    from btrdelta.tree import incremental

    real = _native.live("treewalk")
    if real is None:
        pytest.skip("the treewalk accelerator is not built")

    class Walk:
        calls = 0

        def unchanged(self, *args: object) -> set[bytes]:
            Walk.calls += 1
            got: set[bytes] = real.unchanged(*args)
            return got

    mnt, state, v1, want = dest
    victim = next(p for p in v1.rglob("*.py") if p.stat().st_size > 10)
    _ro(v1, False)
    fd = os.open(victim, os.O_WRONLY)
    _ro(v1, True)
    try:
        for write in (False, True):
            digests = holdings.find_held(v1.parent, {"v1": want}, state)["v1"]
            assert digests.ctransid == _ctransid(v1)
            if write:
                assert os.pwrite(fd, b"#", 0) == 1
            snap = mnt / f"snap-{write}"
            src = os.open(v1, os.O_RDONLY | os.O_DIRECTORY)
            top = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
            try:
                sv.create_snapshot(top, snap.name.encode(), src)
            finally:
                os.close(src)
                os.close(top)
            calls = Walk.calls
            found = incremental._unchanged(Walk(), digests)
            assert Walk.calls == calls + write
            rel = os.fsencode(victim.relative_to(v1))
            assert (rel in found) != write
            assert len(found) == len(digests.entries) - write
    finally:
        os.close(fd)


def test_update_hashes_again_past_a_held_file_nested_too_deep_or_of_huge_integers(
    mnt: Path, releases: list[Path], tmp_path: Path,
) -> None:
    """``btrdelta update`` (a process) into a btrfs DEST whose kept file is damaged in ways
    json decodes, or fails on with other errors than ValueError: nested deeper than the
    decoder's recursion limit (RecursionError), an inode number past 64 bits (the C walk's
    OverflowError), a float where an integer is (a mode). Each is a miss: the version is
    hashed again and held (exit 0, nothing on stderr) and its file written again."""
    from btrdelta import trust
    from tests.update.signing import run

    repo, root, ts, pub = (tmp_path / n for n in ("repo", "root.pem", "ts.pem", "root.pub"))
    trust.save_key_pair(trust.generate_key(), str(root), str(pub))
    trust.save_key_pair(trust.generate_key(), str(ts), str(tmp_path / "ts.pub"))
    for words in (["init", repo], ["add", repo, "v1", releases[0]],
                  ["sign", repo, "--key", root, "--timestamp-key", ts, "--expires", "1d"]):
        assert run("repo", *words).returncode == 0
    dest = mnt / "dest"
    assert run("update", repo, dest, "--key", pub).returncode == 0
    [cache] = (dest / ".btrdelta" / "held").iterdir()
    good = json.loads(cache.read_bytes())

    def row_with(field: int, value: object) -> bytes:
        row = list(good["entries"][-1])
        row[field] = value
        return json.dumps({**good, "entries": [*good["entries"][:-1], row]}).encode()

    key = good["entries"][-1][14]
    for bad in (b"[" * 100_000 + b"]" * 100_000, row_with(14, [1 << 64, *key[1:]]),
                row_with(2, 0.5)):
        cache.write_bytes(bad)
        got = run("update", repo, dest, "--json", process=True)
        assert (got.returncode, got.stderr) == (0, b""), got.stderr.decode()[-600:]
        assert json.loads(got.stdout)["held"] == ["v1"]
        assert json.loads(cache.read_bytes()) == good
