"""Atomic outputs: whole or nothing, never written through a planted symlink."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from btrdelta.errors import BtrdeltaError
from btrdelta.fs import atomic
from btrdelta.fs.atomic import atomic_output, create_file, write_atomic


@pytest.fixture(params=["tmpfile", "named"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of making the file aside: O_TMPFILE, and the O_EXCL|O_NOFOLLOW fallback."""
    if request.param == "named":
        monkeypatch.setattr(atomic, "_open_unnamed", lambda dir_fd, mode: None)
    return str(request.param)


def test_replaces_whole_and_leaves_nothing_behind(tmp_path: Path, mode: str) -> None:
    out = tmp_path / "out"
    out.write_bytes(b"old")
    with atomic_output(out) as f:
        f.write(b"new content")
        assert out.read_bytes() == b"old"  # not visible before the block ends
        f.seek(0)
        f.write(b"NEW")  # seekable (image compress writes its header last)
    assert out.read_bytes() == b"NEW content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_keeps_the_old_file(tmp_path: Path, mode: str) -> None:
    out = tmp_path / "out"
    out.write_bytes(b"old")
    def fail() -> None:
        with atomic_output(out) as f:
            f.write(b"half")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        fail()
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_planted_symlinks_are_never_followed(tmp_path: Path, mode: str) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "out"
    # the names the old code used, and the output itself, all pointing at the victim
    for name in (f"out.tmp-{os.getpid()}", f".out.tmp-{os.getpid()}"):
        (tmp_path / name).symlink_to(victim)
    out.symlink_to(victim)
    write_atomic(out, b"written")
    assert victim.read_bytes() == b"precious"
    assert not out.is_symlink()
    assert out.read_bytes() == b"written"


def test_directory_and_missing_parent_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(BtrdeltaError, match="is a directory"), atomic_output(tmp_path):
        pass
    with pytest.raises(BtrdeltaError, match="does not exist"), \
            atomic_output(tmp_path / "nope" / "out"):
        pass


def test_create_file_never_replaces(tmp_path: Path, mode: str) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert create_file(fd, "chunk", b"first")
        assert not create_file(fd, "chunk", b"second")
        (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
        assert not create_file(fd, "link", b"x")  # an existing name, even a symlink
    finally:
        os.close(fd)
    assert (tmp_path / "chunk").read_bytes() == b"first"
    assert not (tmp_path / "elsewhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunk", "link"]


def test_stale_temporary_names_of_gone_writers_are_removed(tmp_path: Path) -> None:
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid no process has any more
    target = tmp_path / "reg.json"
    write_atomic(target, b"{}")
    stale = tmp_path / f".reg.json.tmp-{gone.pid}-{'ab' * 6}"
    running = tmp_path / f".reg.json.tmp-1-{'cd' * 6}"  # init: still running
    mine = tmp_path / f".reg.json.tmp-{os.getpid()}-{'ef' * 6}"
    other = tmp_path / f".other.tmp-{gone.pid}-{'ab' * 6}"  # another file's
    for p in (stale, running, mine, other):
        p.write_bytes(b"x")
    assert atomic.remove_stale_temps(target) == [stale.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [target.name, running.name, mine.name, other.name])
