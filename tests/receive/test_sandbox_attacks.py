"""Hostile streams (crafted with the codec) never change anything outside DEST.

Layout per test: ``tmp/outside`` holds files an attacker would like to change, ``tmp/dest``
is the receive destination. Every attack must fail with UnsafePathError (or another
BtrdeltaError), leave ``outside`` unchanged and leave no subvolume under its final name.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from btrdelta.errors import BtrdeltaError, MissingBaseError, UnsafePathError
from btrdelta.fs.sandbox import split_path
from btrdelta.receive import receive
from btrdelta.stream.records import (
    Chmod,
    Chown,
    Clone,
    End,
    Link,
    Mkdir,
    Mkfile,
    Mknod,
    Rename,
    Rmdir,
    SetXattr,
    Symlink,
    Truncate,
    Unlink,
    Utimes,
    Write,
)

from .helpers import UUID_A, UUID_B, events, snapshot_tree, subvol

# every test runs with the C fast path of the applier and with the Python handlers alone
pytestmark = pytest.mark.usefixtures("applier_impl")


@pytest.fixture
def world(tmp_path: Path) -> tuple[Path, Path]:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_bytes(b"root:x:0:0\n")
    (outside / "secret").write_bytes(b"s3cret" * 1000)
    (outside / "sub").mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    return outside, dest


def _attack(world: tuple[Path, Path], records: list, exc: type = UnsafePathError) -> BtrdeltaError:
    outside, dest = world
    before = snapshot_tree(outside.parent / "outside")
    with pytest.raises(exc) as info:
        receive(events([subvol(), *records, End()]), dest)
    assert snapshot_tree(outside) == before
    # nothing under the final name, no temporary left behind
    assert [p.name for p in dest.iterdir() if p.name != ".btrdelta-subvols.json"] == []
    assert info.value.index is not None
    return info.value


def _o(world: tuple[Path, Path]) -> bytes:
    return os.fsencode(world[0])


def test_dotdot_path(world: tuple[Path, Path]) -> None:
    err = _attack(world, [Mkfile(path=b"../../outside/evil", ino=257)])
    assert err.index == 1
    assert err.path == b"../../outside/evil"
    assert "record 1" in str(err)


def test_absolute_path(world: tuple[Path, Path]) -> None:
    _attack(world, [Mkfile(path=_o(world) + b"/evil", ino=257)])


@pytest.mark.parametrize("bad", [b"a//b", b"a/", b"./a", b"a/./b", b"a\0b", b"a/.."])
def test_malformed_paths_are_refused(bad: bytes, world: tuple[Path, Path]) -> None:
    with pytest.raises(UnsafePathError):
        split_path(bad)
    _attack(world, [Mkdir(path=b"a", ino=256), Mkfile(path=bad, ino=257)])


def test_write_through_planted_symlinked_directory(world: tuple[Path, Path]) -> None:
    # mkdir d; symlink d/x -> outside; write d/x/passwd
    _attack(world, [
        Mkdir(path=b"d", ino=257),
        Symlink(path=b"d/x", ino=258, target=_o(world)),
        Write(path=b"d/x/passwd", offset=0, data=b"hacked::0:0\n"),
    ])


def test_create_through_planted_symlink(world: tuple[Path, Path]) -> None:
    _attack(world, [Symlink(path=b"x", ino=258, target=_o(world)),
                    Mkfile(path=b"x/new", ino=259)])


def test_write_through_final_symlink(world: tuple[Path, Path]) -> None:
    _attack(world, [Symlink(path=b"l", ino=258, target=_o(world) + b"/passwd"),
                    Write(path=b"l", offset=0, data=b"hacked")])


def test_truncate_through_final_symlink(world: tuple[Path, Path]) -> None:
    _attack(world, [Symlink(path=b"l", ino=258, target=_o(world) + b"/passwd"),
                    Truncate(path=b"l", size=0)])


@pytest.mark.parametrize("rec", [
    Chmod(path=b"l", mode=0o777),
    Chown(path=b"l", uid=1234, gid=1234),
    Utimes(path=b"l", atime=0, mtime=0, ctime=0),
    SetXattr(path=b"l", name=b"trusted.evil", data=b"1"),
], ids=["chmod", "chown", "utimes", "xattr"])
def test_metadata_never_follows_a_symlink(rec: object, world: tuple[Path, Path]) -> None:
    outside, dest = world
    before = snapshot_tree(outside)
    xattrs_before = os.listxattr(outside / "passwd")
    receive(events([subvol(), Symlink(path=b"l", ino=258, target=os.fsencode(outside / "passwd")),
                    rec, End()]), dest)  # type: ignore[list-item]
    assert snapshot_tree(outside) == before
    assert os.listxattr(outside / "passwd") == xattrs_before
    assert (dest / "sv" / "l").is_symlink()


def test_rename_onto_symlinked_directory(world: tuple[Path, Path]) -> None:
    _attack(world, [Symlink(path=b"s", ino=258, target=_o(world)),
                    Mkfile(path=b"f", ino=259),
                    Rename(path=b"f", path_to=b"s/passwd")])


def test_rename_out_of_the_subvolume(world: tuple[Path, Path]) -> None:
    _attack(world, [Mkfile(path=b"f", ino=259), Rename(path=b"f", path_to=b"../f")])


def test_hard_link_to_a_file_outside(world: tuple[Path, Path]) -> None:
    _attack(world, [Link(path=b"stolen", path_link=b"../../outside/passwd")])


def test_hard_link_through_planted_symlink(world: tuple[Path, Path]) -> None:
    _attack(world, [Symlink(path=b"s", ino=258, target=_o(world)),
                    Link(path=b"stolen", path_link=b"s/passwd")])


def test_clone_from_a_file_outside(world: tuple[Path, Path]) -> None:
    _attack(world, [
        Mkfile(path=b"f", ino=259),
        Clone(offset=0, length=4096, path=b"f", clone_uuid=UUID_A, clone_ctransid=7,
              clone_path=b"../../outside/secret", clone_offset=0),
    ])


def test_clone_through_planted_symlink(world: tuple[Path, Path]) -> None:
    _attack(world, [
        Symlink(path=b"s", ino=258, target=_o(world)),
        Mkfile(path=b"f", ino=259),
        Clone(offset=0, length=4096, path=b"f", clone_uuid=UUID_A, clone_ctransid=7,
              clone_path=b"s/secret", clone_offset=0),
    ])


def _legit_clone() -> list:
    # a first clone from this subvolume (the C path then takes the next ones)
    return [
        Mkfile(path=b"g", ino=257), Write(path=b"g", offset=0, data=b"g" * 8192),
        Mkfile(path=b"f", ino=259),
        Clone(offset=0, length=4096, path=b"f", clone_uuid=UUID_A, clone_ctransid=7,
              clone_path=b"g", clone_offset=0),
    ]


@pytest.mark.parametrize("where", [b"s/secret", b"s", b"../../outside/secret", b"g/../s"])
def test_clone_after_a_legit_one_cannot_leave(world: tuple[Path, Path], where: bytes) -> None:
    _attack(world, [
        Symlink(path=b"s", ino=258, target=_o(world)),
        *_legit_clone(),
        Clone(offset=4096, length=4096, path=b"f", clone_uuid=UUID_A, clone_ctransid=7,
              clone_path=where, clone_offset=0),
    ], exc=BtrdeltaError)


def test_clone_from_an_unknown_subvolume(world: tuple[Path, Path]) -> None:
    _attack(world, [
        Mkfile(path=b"f", ino=259),
        Clone(offset=0, length=4096, path=b"f", clone_uuid=UUID_B, clone_ctransid=7,
              clone_path=b"f", clone_offset=0),
    ], exc=MissingBaseError)


def test_write_into_a_device_node_is_refused(world: tuple[Path, Path]) -> None:
    # the stream may create device nodes (as btrfs receive does) but never write into one
    _attack(world, [Mknod(path=b"null", ino=258, rdev=os.makedev(1, 3), mode=0o20600),
                    Write(path=b"null", offset=0, data=b"x")])


def test_unlink_outside(world: tuple[Path, Path]) -> None:
    _attack(world, [Unlink(path=b"../../outside/passwd")])


@pytest.mark.parametrize("name", [b"..", b"a/b", b"", b"/abs", b"."])
def test_bad_subvolume_names(name: bytes, world: tuple[Path, Path]) -> None:
    outside, dest = world
    before = snapshot_tree(outside.parent)
    with pytest.raises(UnsafePathError):
        receive(events([subvol(name), End()]), dest)
    assert snapshot_tree(outside.parent) == before


def test_snapshot_parent_must_be_inside_dest(world: tuple[Path, Path]) -> None:
    from btrdelta.stream.records import Snapshot

    _outside, dest = world
    with pytest.raises(MissingBaseError) as info:
        receive(events([Snapshot(path=b"s", uuid=UUID_B, ctransid=9, clone_uuid=UUID_A,
                                 clone_ctransid=7), End()]), dest)
    assert info.value.index == 0
    assert list(dest.iterdir()) == []


def test_remembered_parent_does_not_outlive_a_directory_rename(
    world: tuple[Path, Path],
) -> None:
    # d/f resolved (and remembered), then d renamed away and replaced by a symlink: the next
    # command on d/f must walk again and refuse the symlink, not reuse the old directory
    _attack(world, [
        Mkdir(path=b"d", ino=257),
        Mkfile(path=b"d/f", ino=258),
        Utimes(path=b"d/f", atime=0, mtime=0, ctime=0),
        Rename(path=b"d", path_to=b"e"),
        Symlink(path=b"d", ino=259, target=_o(world) + b"/sub"),
        Utimes(path=b"d/f", atime=0, mtime=0, ctime=0),
    ])


def test_remembered_parent_does_not_outlive_rmdir(world: tuple[Path, Path]) -> None:
    _outside, dest = world
    receive(events([
        subvol(),
        Mkdir(path=b"d", ino=257),
        Mkfile(path=b"d/f", ino=258),
        Unlink(path=b"d/f"),
        Rmdir(path=b"d"),
        Mkdir(path=b"d", ino=259),
        Mkfile(path=b"d/f", ino=260),
        Write(path=b"d/f", offset=0, data=b"new"),
        End(),
    ]), dest)
    (sub,) = [p for p in dest.iterdir() if p.is_dir()]
    assert (sub / "d" / "f").read_bytes() == b"new"


def test_remembered_parent_does_not_outlive_a_cache_trim(world: tuple[Path, Path]) -> None:
    # more than the cache bound of directories: the cache is cleared between records,
    # also between two commands on one path; each must still land in its own directory
    _outside, dest = world
    recs: list[object] = [subvol()]
    for i in range(300):
        d = b"d%d" % i
        recs += [Mkdir(path=d, ino=300 + 2 * i), Mkfile(path=d + b"/f", ino=301 + 2 * i),
                 Utimes(path=d + b"/f", atime=i, mtime=i, ctime=0),
                 Utimes(path=d + b"/f", atime=i, mtime=i * 1000, ctime=0)]
    receive(events([*recs, End()]), dest)
    (sub,) = [p for p in dest.iterdir() if p.is_dir()]
    assert sorted(p.name for p in sub.iterdir()) == sorted(f"d{i}" for i in range(300))
    for i in range(300):
        assert (sub / f"d{i}" / "f").stat().st_mtime_ns == i * 1000
