"""``receive --fileattr`` of an incremental whose parent has more flagged inodes than the
process may hold descriptors (``ulimit -n 256``): every flag set, through the stream's
renames and deletions; the oracle is ``lsattr`` of the sent snapshots."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import pytest

from btrdelta.testing.loopfs import loop_fs
from tests.cli.test_newuser27 import _flags, _sent

N = 1500


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def _contents(top: Path) -> dict[str, bytes]:
    return {str(p.relative_to(top)): p.read_bytes() if p.is_file() else b"/"
            for p in sorted(top.rglob("*"))}


def _received_on(fs: Path, backend: str) -> AbstractContextManager[Path]:
    """Where the streams are received: ``fs`` itself (btrfs), or a loop ext4 (dir)."""
    return nullcontext(fs) if backend == "btrfs" else loop_fs("ext4", size="64M")


@pytest.mark.btrfs
@pytest.mark.parametrize("backend", ["btrfs", "dir"])
def test_fileattr_of_more_inodes_than_descriptors(tmp_path: Path, backend: str) -> None:
    """An incremental flagging 1,500 files (1,500 FILEATTR records), then one from that
    parent (1,500 immutable or append-only inodes) renaming their directory, deleting one
    flagged file, rewriting one and adding one: ``[Errno 24] Too many open files`` before
    (one descriptor per record or flagged inode), on btrfs and in an ext4 directory (whose
    copy of the parent has no flags: every flagged inode)."""
    from tests.conftest import btrfs_loop

    with btrfs_loop("400M") as fs:
        src = fs / "src"
        subprocess.run(["btrfs", "-q", "subvolume", "create", str(src)], check=True)
        (src / "a").mkdir()
        names = [f"a/f{i}" for i in range(N)]
        for name in names:
            (src / name).write_bytes(name.encode())

        def chattr(flags: str, *files: str) -> None:
            subprocess.run(["chattr", flags, *files], cwd=src, check=True)

        def snap(name: str) -> Path:
            subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(src),
                            str(fs / name)], check=True)
            return fs / name

        s0 = snap("s0")  # (a full stream carries no flags: the next one sets them)
        chattr("+i", *names[10:])
        chattr("+a", *names[:10])
        s1 = snap("s1")
        chattr("-i", "a/f20", "a/f21")
        (src / "a/f20").unlink()
        (src / "a/f21").write_bytes(b"rewritten")
        chattr("+i", "a/f21")
        (src / "a").rename(src / "b")
        (src / "b/new").write_bytes(b"new")  # (no FILEATTR for a new inode: kernel's)
        s2 = snap("s2")
        streams = _sent((s0, s1, s2), tmp_path)
        with _received_on(fs, backend) as top:
            dest = top / "dest"
            dest.mkdir()
            env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
            try:
                for stream in streams:
                    run = subprocess.run(
                        [sys.executable, "-m", "btrdelta", "receive", "-q", "--fileattr",
                         "--backend", backend, "-f", str(stream), str(dest)],
                        preexec_fn=_limit, capture_output=True, text=True, env=env,
                        check=False)
                    assert (run.returncode, run.stderr) == (0, ""), stream
                for s in (s0, s1, s2):
                    got = _flags(dest / s.name)
                    assert got == _flags(s)
                    assert _contents(dest / s.name) == _contents(s)
                assert (got["./b/f0"], got["./b/f21"], "./b/f20" in got) == ("a", "i", False)
            finally:
                subprocess.run(["chattr", "-R", "-i", "-a", str(dest)], capture_output=True,
                               check=False)


def _root_flags(top: Path) -> str:
    """``lsattr -d``'s letters i, a and A of directory ``top`` itself."""
    out = subprocess.run(["lsattr", "-d", str(top)], capture_output=True, text=True,
                         check=True).stdout
    return "".join(c for c in out.split()[0] if c in "iaA")


@pytest.mark.btrfs
@pytest.mark.parametrize("backend", ["btrfs", "dir"])
def test_every_inode_found_again_by_number(tmp_path: Path, backend: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """With no descriptor held (``HELD`` 0) every flagged inode is found again by the walk
    at the end: the subvolume's root (no entry names it), a hard link's inode, a renamed
    directory, a file under it; one deleted is not; oracle lsattr of the sent snapshots."""
    from btrdelta.cli import main
    from btrdelta.receive import fileattrs
    from tests.conftest import btrfs_loop

    monkeypatch.setattr(fileattrs, "HELD", 0)
    with btrfs_loop("200M") as fs:
        src = fs / "src"
        subprocess.run(["btrfs", "-q", "subvolume", "create", str(src)], check=True)
        (src / "d").mkdir()
        for name in ("d/f", "g", "gone"):
            (src / name).write_bytes(name.encode())
        os.link(src / "g", src / "d/g-link")

        def snap(name: str) -> Path:
            subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(src),
                            str(fs / name)], check=True)
            return fs / name

        s0 = snap("s0")
        subprocess.run(["chattr", "+A", ".", "d", "gone"], cwd=src, check=True)
        subprocess.run(["chattr", "+i", "d/f", "g"], cwd=src, check=True)
        s1 = snap("s1")
        subprocess.run(["chattr", "-i", "g"], cwd=src, check=True)
        (src / "gone").unlink()
        (src / "d").rename(src / "e")
        (src / "new").write_bytes(b"new")  # (possibly the deleted one's number, on ext4)
        subprocess.run(["chattr", "+a", "g"], cwd=src, check=True)
        s2 = snap("s2")
        streams = _sent((s0, s1, s2), tmp_path)
        with _received_on(fs, backend) as top:
            dest = top / "dest"
            dest.mkdir()
            try:
                for stream in streams:
                    assert main(["receive", "-q", "--fileattr", "--backend", backend, "-f",
                                 str(stream), str(dest)]) == 0
                for s in (s0, s1, s2):
                    assert _flags(dest / s.name) == _flags(s)
                    assert _root_flags(dest / s.name) == _root_flags(s)
                assert (_root_flags(dest / "s2"), _flags(dest / "s2")["./g"]) == ("A", "a")
            finally:
                subprocess.run(["chattr", "-R", "-i", "-a", str(dest)], capture_output=True,
                               check=False)
