"""`btrdelta send` from the command line: output, progress, errors, --kernel, verify."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from btrdelta.cli import main
from btrdelta.stream import StreamHeader, StreamReader
from btrdelta.stream.records import EncodedWrite, Snapshot
from tests.conftest import require_btrfs


def _tree(root: Path) -> Path:
    root.mkdir()
    (root / "d").mkdir()
    (root / "d" / "text").write_bytes(b"compressible line\n" * 20000)
    (root / "link").symlink_to("d/text")
    return root


def _records(path: Path) -> list[object]:
    with open(path, "rb") as f:
        return [ev for ev in StreamReader(f).events() if type(ev) is not StreamHeader]


def test_full_and_incremental_then_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = _tree(tmp_path / "old")
    subprocess.run(["cp", "-a", str(old), str(tmp_path / "new")], check=True)
    new = tmp_path / "new"
    (new / "d" / "text").rename(new / "moved")
    assert main(["send", str(old), "-o", str(tmp_path / "full.s")]) == 0
    assert main(["send", str(new), "--parent", str(old), "-o", str(tmp_path / "incr.s"),
                 "--compress", "zstd", "--progress"]) == 0
    err = capsys.readouterr().err
    assert "records" in err
    for s in ("full.s", "incr.s"):
        assert main(["verify", str(tmp_path / s)]) == 0
        dump = subprocess.run(["btrfs", "receive", "--dump", "-f", str(tmp_path / s)],
                              capture_output=True, check=False)
        assert dump.returncode == 0, dump.stderr
    recs = _records(tmp_path / "incr.s")
    assert isinstance(recs[0], Snapshot)
    assert recs[0].path == b"new"
    assert not [r for r in recs if isinstance(r, EncodedWrite)]  # a move sends no data
    main(["send", str(new), "-o", str(tmp_path / "c.s"), "--compress", "zlib"])
    assert [r for r in _records(tmp_path / "c.s") if isinstance(r, EncodedWrite)]


def test_stdout(tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    tree = _tree(tmp_path / "t")
    assert main(["send", str(tree), "--proto", "2", "--name", "custom"]) == 0
    out = capfdbinary.readouterr().out
    assert out.startswith(b"btrfs-stream\0\x02\0\0\0")
    assert b"custom" in out


def test_proto_0_is_what_btrfs_receive_reads(tmp_path: Path) -> None:
    # `--proto 0` (btrfs send's "the highest") wrote version 3, which adds nothing a tree
    # send carries and which btrfs-progs 6.2 refuses: "stream version 3 not supported"
    tree = _tree(tmp_path / "t")
    assert main(["send", "-q", str(tree), "--proto", "0", "-o", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s").read_bytes().startswith(b"btrfs-stream\0\x02\0\0\0")
    dump = subprocess.run(["btrfs", "receive", "--dump", "-f", str(tmp_path / "s")],
                          capture_output=True, check=False)
    assert dump.returncode == 0, dump.stderr


@pytest.mark.parametrize(
    ("argv", "message", "code"),
    [
        (["send", "/nonexistent/dir"], "cannot scan", 1),
        (["send", "TREE", "--parent", "/nonexistent/dir"], "cannot scan", 1),
        (["send", "TREE", "--proto", "1", "--compress", "zstd"], "needs --proto 2", 2),
        (["send", "TREE", "--proto", "1", "--compressed-data"], "needs --proto 2", 2),
        (["send", "TREE", "--kernel"], "read-only btrfs snapshots", 1),
    ],
)
def test_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str,
    code: int,
) -> None:
    tree = _tree(tmp_path / "t")
    argv = [str(tree) if a == "TREE" else a for a in argv]
    rc = main([*argv, "-o", str(tmp_path / "out.s")])
    err = capsys.readouterr().err
    assert rc == code
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.s").exists()


@pytest.mark.btrfs
def test_kernel_mode_runs_btrfs_send(tmp_path: Path) -> None:
    require_btrfs()
    from btrdelta.testing.loopfs import loop_fs

    with loop_fs("btrfs", size="256M") as mnt:
        subprocess.run(["btrfs", "-q", "subvolume", "create", str(mnt / "vol")], check=True)
        _tree(mnt / "vol" / "t")
        subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(mnt / "vol"),
                        str(mnt / "A")], check=True)
        (mnt / "vol" / "added").write_bytes(b"x" * 1000)
        subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(mnt / "vol"),
                        str(mnt / "B")], check=True)
        out = tmp_path / "k.s"
        assert main(["send", str(mnt / "B"), "-p", str(mnt / "A"), "--kernel",
                     "-o", str(out)]) == 0
        recs = _records(out)
        assert isinstance(recs[0], Snapshot)
        assert recs[0].path == b"B"
        assert main(["verify", str(out)]) == 0


def test_a_symlink_given_as_a_tree_is_followed(tmp_path: Path) -> None:
    """``send LINK`` (and ``-p LINK``) sends the tree the link leads to, as ``tree-sum LINK``
    sums it and ``du``/``find -H`` take their arguments; it said 'not a directory'. Oracle:
    the streams of the directories themselves (the same bytes), the kernel's receive of
    both against the trees' sums; the link inside stays a link."""
    require_btrfs()
    from btrdelta.testing.loopfs import loop_fs
    from btrdelta.tree import tree_sum

    old = _tree(tmp_path / "old")
    subprocess.run(["cp", "-a", str(old), str(tmp_path / "new")], check=True)
    new = tmp_path / "new"
    (new / "d" / "added").write_bytes(b"x" * 5000)
    for name, target in (("old-link", old), ("new-link", new)):
        (tmp_path / name).symlink_to(target.name)
    pairs = {"inc": (["send", str(tmp_path / "new-link"), "-p", str(tmp_path / "old-link")],
                     ["send", str(new), "-p", str(old)]),
             "full": (["send", str(tmp_path / "old-link")], ["send", str(old)])}
    for kind, (via_link, direct) in pairs.items():
        assert main([*via_link, "-o", str(tmp_path / f"{kind}-link.s")]) == 0
        assert main([*direct, "-o", str(tmp_path / f"{kind}.s")]) == 0
        assert (tmp_path / f"{kind}-link.s").read_bytes() == (tmp_path / f"{kind}.s").read_bytes()
    with loop_fs("btrfs", size="256M") as mnt:
        for stream in ("full-link.s", "inc-link.s"):
            subprocess.run(["btrfs", "receive", "-q", "-f", str(tmp_path / stream), str(mnt)],
                           check=True)
        assert tree_sum(mnt / "old") == tree_sum(old)
        assert tree_sum(mnt / "new") == tree_sum(new)
        assert (mnt / "new" / "link").is_symlink()
