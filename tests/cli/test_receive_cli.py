"""`btrdelta receive`: options, exit codes, one-line errors (crafted streams, no root)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from btrdelta.cli import main
from btrdelta.stream.records import (
    End,
    Mkdir,
    Mkfile,
    RemoveXattr,
    SetXattr,
    Snapshot,
    Write,
)
from tests.receive.helpers import UUID_A, UUID_B, snapshot_tree, stream_bytes, subvol

GOOD = [subvol(b"A"), Mkdir(path=b"d", ino=257), Mkfile(path=b"d/f", ino=258),
        Write(path=b"d/f", offset=0, data=b"data\n"), End()]


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "dest"
    d.mkdir()
    return d


def _stream(tmp_path: Path, records: list, name: str = "s.stream") -> Path:
    p = tmp_path / name
    p.write_bytes(stream_bytes(records))
    return p


def test_receive_file(tmp_path: Path, dest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["receive", "-f", str(_stream(tmp_path, GOOD)), str(dest)]) == 0
    assert (dest / "A" / "d" / "f").read_bytes() == b"data\n"
    assert "At subvol A" in capsys.readouterr().err


def test_receive_stdin_subprocess(tmp_path: Path, dest: Path) -> None:
    stream = _stream(tmp_path, GOOD)
    with open(stream, "rb") as f:
        proc = subprocess.run([sys.executable, "-m", "btrdelta", "receive", "-v", str(dest)],
                              stdin=f, capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (dest / "A" / "d" / "f").read_bytes() == b"data\n"


def test_unsafe_path_exit_code_and_one_line(tmp_path: Path, dest: Path) -> None:
    bad = _stream(tmp_path, [subvol(b"A"), Mkfile(path=b"../escape", ino=257), End()])
    proc = subprocess.run([sys.executable, "-m", "btrdelta", "receive", "-f", str(bad),
                           str(dest)], capture_output=True, check=False)
    assert proc.returncode == 4
    err = proc.stderr.decode()
    assert err.count("\n") == 1
    assert "record 1 (mkfile)" in err
    assert "../escape" in err
    assert "Traceback" not in err
    assert not (tmp_path / "escape").exists()
    assert list(dest.iterdir()) == []


def test_a_missing_destination_says_to_make_it(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    s = _stream(tmp_path, GOOD)
    assert main(["receive", "-f", str(s), str(tmp_path / "new dir")]) == 1
    assert capsys.readouterr().err == (
        f"btrdelta receive: error: {tmp_path}/new dir: destination does not exist (make it "
        f"first: mkdir -p '{tmp_path}/new dir')\n")


def test_missing_parent_exit_code(tmp_path: Path, dest: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    s = _stream(tmp_path, [Snapshot(path=b"B", uuid=UUID_B, ctransid=2, clone_uuid=UUID_A,
                                    clone_ctransid=1), End()])
    assert main(["receive", "-f", str(s), str(dest)]) == 6
    # where it looked and what to do (it said only "cannot find parent subvolume U")
    # and which file's record (a delta's errors named it, a plain stream's did not)
    assert (f"btrdelta receive: error: {s}: record 0 (snapshot), path 'B': cannot find "
            f"parent subvolume {UUID_A} in "
            f"{dest}: this is an incremental stream; receive its parent there first\n"
            ) in capsys.readouterr().err


def test_bad_crc_exit_code(tmp_path: Path, dest: Path) -> None:
    s = _stream(tmp_path, GOOD)
    data = bytearray(s.read_bytes())
    data[-15] ^= 1
    s.write_bytes(bytes(data))
    assert main(["receive", "-f", str(s), str(dest)]) == 5
    assert list(dest.iterdir()) == []


def test_dump_is_btrdelta_dump(tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    s = _stream(tmp_path, GOOD)
    assert main(["dump", "-f", str(s)]) == 0
    ref = capfdbinary.readouterr().out
    assert main(["receive", "--dump", "-f", str(s)]) == 0
    assert capfdbinary.readouterr().out == ref
    assert b"mkfile" in ref


def test_dry_run(tmp_path: Path, dest: Path) -> None:
    s = _stream(tmp_path, GOOD)
    before = snapshot_tree(dest)
    assert main(["receive", "--dry-run", "-f", str(s), str(dest)]) == 0
    assert snapshot_tree(dest) == before
    bad = _stream(tmp_path, [subvol(b"A"), Mkfile(path=b"/etc/x", ino=257), End()], "b")
    assert main(["receive", "--dry-run", "-f", str(bad), str(dest)]) == 4


def test_stop_at_end(tmp_path: Path, dest: Path) -> None:
    two = [*GOOD, subvol(b"Z", UUID_B), Mkfile(path=b"z", ino=257), End()]
    s = _stream(tmp_path, two)
    assert main(["receive", "-e", "-f", str(s), str(dest)]) == 0
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(".")) == ["A"]
    dest2 = tmp_path / "dest2"
    dest2.mkdir()
    assert main(["receive", "-f", str(s), str(dest2)]) == 0
    assert sorted(p.name for p in dest2.iterdir() if not p.name.startswith(".")) == ["A", "Z"]


def test_max_errors(tmp_path: Path, dest: Path) -> None:
    from btrdelta.stream.records import Unlink

    s = _stream(tmp_path, [subvol(b"A"), Unlink(path=b"missing"), Mkfile(path=b"ok", ino=257),
                           End()])
    assert main(["receive", "-f", str(s), str(dest)]) == 8
    assert not (dest / "A").exists()
    assert main(["receive", "-E", "0", "-f", str(s), str(dest)]) == 8
    assert (dest / "A" / "ok").exists()


def test_dest_required(tmp_path: Path) -> None:
    assert main(["receive", "-f", str(_stream(tmp_path, GOOD))]) == 2


@pytest.mark.btrfs
def test_root_mount_finds_a_parent_outside_dest(btrfs_ok: None) -> None:
    """``-m ROOTMOUNT`` (btrfs receive -m): the parent received into another directory of
    the filesystem is found; with a ROOTMOUNT not holding it, it is not (without -m the
    whole filesystem is searched for parents: tests/receive/test_parent_lookup.py).
    Oracle: the kernel's ``btrfs receive -m`` of the same incremental stream, by tree-sum."""
    from btrdelta.testing.loopfs import loop_fs
    from btrdelta.testing.scenarios import kernel_receive
    from btrdelta.tree import tree_sum
    from tests.conftest import committed_streams

    full = next(s for s in committed_streams() if s.name == "dir-rotation-083.A.v1.stream")
    incr = full.with_name("dir-rotation-083.B.v1.stream")
    with loop_fs("btrfs", size="256M") as mnt:
        for d in ("a", "b", "k"):
            (mnt / d).mkdir()
        assert main(["receive", "-q", "-f", str(full), str(mnt / "a")]) == 0
        assert main(["receive", "-q", "-m", str(mnt / "k"), "-f", str(incr),
                     str(mnt / "b")]) == 6
        assert list((mnt / "b").iterdir()) == []
        assert main(["receive", "-q", "-m", str(mnt), "-f", str(incr), str(mnt / "b")]) == 0
        kernel_receive(incr, mnt / "k", "-m", str(mnt))
        (ours,) = (mnt / "b").iterdir()
        (theirs,) = (mnt / "k").iterdir()
        assert ours.name == theirs.name
        assert tree_sum(ours) == tree_sum(theirs)


def test_root_mount_needs_btrfs(tmp_path: Path, dest: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    stream = _stream(tmp_path, GOOD)
    argv = ["receive", "--backend", "dir", "-m", str(tmp_path), "-f", str(stream), str(dest)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "needs btrfs" in err
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("rec", [SetXattr(path=b"f", name=b"user.a\0b", data=b"x"),
                                 SetXattr(path=b"f", name=b"", data=b"x"),
                                 RemoveXattr(path=b"f", name=b"user.a\0b")])
def test_xattr_name_with_nul(tmp_path: Path, dest: Path,
                             capsys: pytest.CaptureFixture[str], rec: object) -> None:
    """An xattr name is a C string: a NUL in it is a malformed record (exit 3, one line),
    not Python's ValueError from os.setxattr (was: internal error, exit 1)."""
    bad = _stream(tmp_path, [subvol(b"A"), Mkfile(path=b"f", ino=257), rec, End()])
    assert main(["receive", "-f", str(bad), str(dest)]) == 3
    err = capsys.readouterr().err
    assert "record 2" in err
    assert "extended attribute name" in err
    assert "internal error" not in err
    assert list(dest.iterdir()) == []


def test_receiving_twice_names_what_exists(tmp_path: Path, dest: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    # a re-run said "destination subvolume already exists" (which one, where?)
    stream = _stream(tmp_path, GOOD)
    assert main(["receive", "-q", "-f", str(stream), str(dest)]) == 0
    capsys.readouterr()
    assert main(["receive", "-q", "-f", str(stream), str(dest)]) == 8
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{dest / 'A'} already exists (received before?" in err


@pytest.mark.btrfs
def test_a_taken_name_is_refused_as_btrfs_receive_refuses_it(tmp_path: Path) -> None:
    """The stream's subvolume name already taken in DEST (a subvolume, a directory, a
    file): `btrfs receive` fails ("creating subvolume sv failed: File exists", exit 1) and
    leaves the entry as it was; so does ours, with exit 8 (the table's class of a system
    call failing while applying: EEXIST; btrfs-progs exits 1 for every error), naming the
    path. Oracle: the kernel's tool on the same loop btrfs."""
    from tests.conftest import btrfs_loop

    with btrfs_loop() as mnt:
        subprocess.run(["btrfs", "subvolume", "create", str(mnt / "sv")], check=True,
                       capture_output=True)
        (mnt / "sv" / "f").write_text("new\n")
        subprocess.run(["btrfs", "property", "set", str(mnt / "sv"), "ro", "true"],
                       check=True)
        stream = mnt / "sv.stream"
        subprocess.run(["btrfs", "send", "-q", "-f", str(stream), str(mnt / "sv")],
                       check=True)
        for kind in ("subvolume", "directory", "file"):
            for tool in ("btrfs", "btrdelta"):
                dest = mnt / f"{tool}-{kind}"
                dest.mkdir()
                if kind == "subvolume":
                    subprocess.run(["btrfs", "subvolume", "create", str(dest / "sv")],
                                   check=True, capture_output=True)
                    (dest / "sv" / "old").write_text("old\n")
                elif kind == "directory":
                    (dest / "sv").mkdir()
                    (dest / "sv" / "old").write_text("old\n")
                else:
                    (dest / "sv").write_text("old\n")
                before = snapshot_tree(dest)
                argv = (["btrfs", "receive", "-f", str(stream), str(dest)] if tool == "btrfs"
                        else [sys.executable, "-m", "btrdelta", "receive", "-q", "-f",
                              str(stream), str(dest)])
                proc = subprocess.run(argv, capture_output=True, text=True, check=False)
                assert proc.returncode == (1 if tool == "btrfs" else 8), (kind, proc)
                assert "File exists" in proc.stderr if tool == "btrfs" else (
                    f"{dest / 'sv'} already exists" in proc.stderr), (kind, proc.stderr)
                assert snapshot_tree(dest) == before, (tool, kind)


def test_tree_sum_says_when_only_the_root_mtime_differs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the one difference a received incremental stream may leave (btrfs receive's too):
    # the README's tree-sum --compare then said only "trees differ"
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "f").write_bytes(b"same\n")
        os.utime(d / "f", ns=(0, 10**18))
    os.utime(a, ns=(0, 10**18))
    os.utime(b, ns=(0, 2 * 10**18))
    assert main(["tree-sum", str(a), "--compare", str(b)]) == 1
    assert "--ignore-root-mtime leaves it out" in capsys.readouterr().err
    assert main(["tree-sum", str(a), "--compare", str(b), "--ignore-root-mtime"]) == 0
    (b / "f").write_bytes(b"other\n")
    assert main(["tree-sum", str(a), "--compare", str(b)]) == 1
    assert "--ignore-root-mtime" not in capsys.readouterr().err
