"""Streams past the platform's limits: u64 values no system call takes, trees deeper than
Python's recursion limit. Each is a one-line error (exit 3/4), never a traceback, and
nothing is left in DEST (with ``-E 0`` the subvolume is finished without the bad command).
And a chain of directories deeper than the receiver's directory cache, received in time
linear in its depth.
"""

from __future__ import annotations

import os
import sys
import time
import zlib
from pathlib import Path

import pytest

from btrdelta.cli import main
from btrdelta.fs import sandbox
from btrdelta.stream.records import (
    Chmod,
    Chown,
    Clone,
    EncodedWrite,
    End,
    Mkdir,
    Mkfile,
    Mknod,
    Rename,
    Truncate,
    Utimes,
    Write,
)

from .conftest import Targets
from .helpers import UUID_A, stream_bytes, subvol

pytestmark = pytest.mark.usefixtures("applier_impl")

M = (1 << 64) - 1
FILE = [Mkfile(path=b"f", ino=257), Write(path=b"f", offset=0, data=b"x" * 4096)]
CASES = {
    "chown-u64": ([*FILE, Chown(path=b"f", uid=M, gid=0)], "uid 18446744073709551615"),
    "chown-u32+": ([*FILE, Chown(path=b"f", uid=0, gid=(1 << 32) + 5)], "gid 4294967301"),
    "write": ([*FILE, Write(path=b"f", offset=M, data=b"x")], "offset 18446744073709551615"),
    "write-2^63": ([*FILE, Write(path=b"f", offset=1 << 63, data=b"x")],
                   "offset 9223372036854775808"),
    "truncate": ([*FILE, Truncate(path=b"f", size=M)], "size 18446744073709551615"),
    "clone": ([*FILE, Clone(offset=M, length=4096, path=b"f", clone_uuid=UUID_A,
                            clone_ctransid=7, clone_path=b"f", clone_offset=0)],
              "offset 18446744073709551615"),
    "mknod": ([Mknod(path=b"n", ino=258, rdev=0, mode=M)], "mode 18446744073709551615"),
    "encoded": ([*FILE, EncodedWrite(path=b"f", offset=M, unencoded_file_len=4,
                                     unencoded_len=4, unencoded_offset=0, compression=1,
                                     data=zlib.compress(b"data"))],
                "offset 18446744073709551615"),
}


def _run(tmp_path: Path, records: list[object], *opts: str,
         capsys: pytest.CaptureFixture[str]) -> tuple[int, str, Path]:
    stream = tmp_path / "s.stream"
    stream.write_bytes(stream_bytes([subvol(), *records, End()], version=2))
    dest = tmp_path / "dest"
    dest.mkdir()
    capsys.readouterr()
    code = main(["receive", *opts, "-f", str(stream), str(dest)])
    return code, capsys.readouterr().err, dest


@pytest.mark.parametrize("max_errors", ["1", "0"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_u64_out_of_range(case: str, max_errors: str, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    records, named = CASES[case]
    code, err, dest = _run(tmp_path, records, "-E", max_errors, capsys=capsys)
    assert code == 3, err
    lines = [line for line in err.splitlines() if not line.startswith("At subvol")]
    assert len(lines) == 1, err
    assert f"{named} is out of range for this system" in lines[0]
    assert "record " in lines[0]
    left = sorted(p.name for p in dest.iterdir() if p.name != ".btrdelta-subvols.json")
    if max_errors == "0":  # the bad command skipped, the subvolume finished
        assert left == ["sv"]
        if records[0] is FILE[0]:
            assert (dest / "sv" / "f").read_bytes()[:4096] == b"x" * 4096
    else:
        assert left == []


@pytest.mark.btrfs
def test_encoded_write_out_of_range_on_btrfs(targets: Targets, applier_impl: str,
                                             tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """On btrfs an ENCODED_WRITE goes to the encoded-write ioctl, whose argument struct
    cannot hold the offset either: one line, exit 3 (was: struct.error, internal error)."""
    records, named = CASES["encoded"]
    stream = tmp_path / "s.stream"
    stream.write_bytes(stream_bytes([subvol(), *records, End()], version=2))
    dest = targets.scratch_btrfs / f"encoded-range-{applier_impl}-{tmp_path.name}"
    dest.mkdir()
    capsys.readouterr()
    assert main(["receive", "-f", str(stream), str(dest)]) == 3
    err = capsys.readouterr().err
    assert f"record 3 (encoded_write), path 'f': {named} is out of range" in err, err
    assert "internal error" not in err
    assert sorted(p.name for p in dest.iterdir() if p.name != ".btrdelta-subvols.json") == []


def test_tree_deeper_than_the_recursion_limit_then_an_error(
    deep_tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path = deep_tmp_path  # removed with rm -rf at teardown, even if this fails
    # c grows one level per round with paths of at most 3 bytes: mkdir t; c -> t/c; t -> c
    recs: list[object] = [Mkdir(path=b"c", ino=257)]
    for i in range(sys.getrecursionlimit() + 200):
        recs += [Mkdir(path=b"t", ino=258 + i), Rename(path=b"c", path_to=b"t/c"),
                 Rename(path=b"t", path_to=b"c")]
    recs.append(Mkfile(path=b"../escape", ino=1 << 20))
    code, err, dest = _run(tmp_path, recs, capsys=capsys)
    assert code == 4, err
    assert "Traceback" not in err
    assert "RecursionError" not in err
    assert err.splitlines()[-1].endswith("empty, '.' or '..' component in stream path")
    assert [p.name for p in dest.iterdir() if p.name != ".btrdelta-subvols.json"] == []


def _chain_records(depth: int) -> list[object]:
    """What btrfs send writes for a chain of ``depth`` directories ``d/d/.../d`` with a file
    at the bottom (scenario deep-chain-1000's snapshot A): each directory made as an orphan
    in the root, renamed to its place, its owner, mode and times set, then its parent's."""
    recs: list[object] = []
    path = b""
    for ino in range(257, 257 + depth):
        orphan, new = b"o%d-7-0" % ino, (path + b"/d" if path else b"d")
        recs += [Mkdir(path=orphan, ino=ino), Rename(path=orphan, path_to=new),
                 Chown(path=new, uid=0, gid=0), Chmod(path=new, mode=0o755),
                 Utimes(path=new, atime=1, mtime=2, ctime=3)]
        if path:
            recs.append(Utimes(path=path, atime=1, mtime=2, ctime=3))
        path = new
    return [*recs, Mkfile(path=b"o1-7-0", ino=1 << 20),
            Rename(path=b"o1-7-0", path_to=path + b"/f"),
            Write(path=path + b"/f", offset=0, data=b"bottom")]


def test_chain_deeper_than_the_directory_cache_in_linear_time(
    deep_tmp_path: Path, applier_impl: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a walk used to cache every directory it opened: past CACHE_MAX levels that filled the
    # cache, which was cleared at once, so every walk started at the root again (a chain of
    # 1,000: 1.9 million opens, 8.4 s of CPU where btrfs receive takes 0.25 s)
    depth = 1000
    opens = 0
    real_open_subdir = sandbox.open_subdir

    def counted(fd: int, name: bytes, path: bytes) -> int:
        nonlocal opens
        opens += 1
        return real_open_subdir(fd, name, path)

    monkeypatch.setattr(sandbox, "open_subdir", counted)
    cpu = time.process_time()
    code, err, dest = _run(deep_tmp_path, _chain_records(depth), capsys=capsys)
    cpu = time.process_time() - cpu
    assert code == 0, err
    fd = os.open(dest / "sv", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            assert os.listdir(fd) == ["d"]
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        assert os.listdir(fd) == ["f"]
        with open(os.open("f", os.O_RDONLY, dir_fd=fd), "rb") as f:
            assert f.read() == b"bottom"
    finally:
        os.close(fd)
    # the Python walk's opens, counted; the C walk's (its own openat), in CPU time: 0.1 s
    # here, 8.4 s before (2 shared cores)
    assert opens <= 3 * depth, opens
    assert cpu < 2.5, f"{cpu:.2f} s of CPU for a chain of {depth}"
