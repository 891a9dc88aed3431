"""Incremental sends after a read of the live tree (issue 15, session 28): a ``find``, ``du``
or ``cat`` of every file moves every atime, which rewrites each inode item (its transid
moves) but not its sequence; a record of version 8 keeps the sequences, so the send lists,
stats and reads only what changed beyond the atime (`btrdelta.send.rescan.loud`).

Every kind of change, each after a read of the whole tree (``strictatime``: every read moves
the atime, as the first read after a change does on ``relatime``): the kernel's ``btrfs
receive`` of our stream on its copy of the base gives the source's tree (tree-sum), our
stream touches the paths the kernel's ``send -p`` of the same change touches beyond its
``utimes`` (``btrfs receive --dump``), and the files opened and directories listed are only
those of the change (none of the directory no change touches). A lineage of records
without sequences (version 6 and its patches) keeps today's behaviour and gains the
sequences of the rows it sends again."""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from btrdelta.send.rescan import loud
from btrdelta.tree.columns import Columns, encode_rows
from btrdelta.tree.sendshot import NO_SEQUENCE, RecordInode
from tests.send.conftest import run
from tests.send.test_rescan import CHANGES, first_send, only_touched, send_round

pytestmark = pytest.mark.btrfs


def _read_all(live: Path) -> None:
    """What a user checking the tree does: every directory listed, every file read."""
    run("sh", "-c", f"find '{live}' -type f -exec cat {{}} + > /dev/null; du -s '{live}'")


def _mapped_write(p: Path, off: int, data: bytes) -> None:
    with open(p, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        m[off:off + len(data)] = data
        m.flush()


def _mkdir(p: Path) -> None:
    p.mkdir()


#: changes of directories' entries and metadata (then those of test_rescan), each after a
#: read of the tree: (what, the change, the names of the files it may read)
DIRECTORY_CHANGES: list[tuple[str, Callable[[Path], object], set[str]]] = [
    ("empty file created", lambda L: (L / "a/empty").touch(), {"empty"}),
    ("rename within a directory", lambda L: (L / "a/empty").rename(L / "a/renamed"),
     {"renamed"}),
    ("xattr set on a directory", lambda L: os.setxattr(L / "c", "user.dir", b"d"), set()),
    ("xattr removed from a directory", lambda L: os.removexattr(L / "c", "user.dir"), set()),
    ("chmod a directory", lambda L: os.chmod(L / "a", 0o700), set()),
    ("directory created", lambda L: _mkdir(L / "c/sub"), set()),
    ("empty directory removed", lambda L: (L / "c/sub").rmdir(), set()),
    ("fifo created", lambda L: os.mkfifo(L / "c/fifo2"), set()),
    ("symlink created", lambda L: os.symlink("a/f2", L / "a/sym2"), set()),
    ("times of a directory set", lambda L: os.utime(L / "c", ns=(10**18, 10**18)), set()),
    ("write through a mapping", lambda L: _mapped_write(L / "a/f2", 5000, b"M" * 300),
     {"f2"}),
    ("write through a mapping (inline file)", lambda L: _mapped_write(L / "c/small", 1, b"I"),
     {"small"}),
]

_ORPHAN = re.compile(r"^o\d+-\d+-\d+$")


def _paths(stream: Path) -> set[str]:
    """The paths named by a stream's commands but ``utimes`` (``btrfs receive --dump``: the
    path and a ``dest=``), without the subvolume's name and orphan names."""
    out = set()
    name = ""
    for line in run("btrfs", "receive", "--dump", "-f", stream).splitlines():
        cmd, *words = line.split()
        if cmd in ("subvol", "snapshot"):
            name = words[0].removeprefix("./")
            continue
        if cmd == "utimes":
            continue
        for word in [words[0], *(w[5:] for w in words[1:] if w.startswith("dest="))]:
            parts = word.removeprefix("./").split("/")
            parts = parts[1:] if parts[0] == name else parts
            if parts and not any(_ORPHAN.match(p) for p in parts):
                out.add("/".join(parts))
    return out


def _covered(paths: set[str], by: set[str]) -> bool:
    """Whether each of ``paths`` is one of ``by`` or below one (a directory deleted: the
    kernel renames it to an orphan name and removes what it holds there)."""
    def ancestors(p: str) -> Iterator[str]:
        while "/" in p:
            p = p.rsplit("/", 1)[0]
            yield p

    return all(p in by or any(a in by for a in ancestors(p)) for p in paths)


def test_after_a_read_each_kind_of_change(two_fs: tuple[Path, Path], tmp_path: Path) -> None:
    snd, _rcv = two_fs
    res = first_send(two_fs, tmp_path, "strictatime")
    assert res.recorded is not None
    assert res.recorded.head.version == 8
    live, kstream = snd / "live", tmp_path / "k"
    run("btrfs", "subvolume", "snapshot", "-r", live, snd / "k0")
    for i, (what, change, touched) in enumerate([*DIRECTORY_CHANGES, *CHANGES], 1):
        _read_all(live)
        change(live)
        res, seen = send_round(two_fs, tmp_path, i, what)
        run("btrfs", "subvolume", "snapshot", "-r", live, snd / f"k{i}")
        run("btrfs", "send", "-q", "-p", snd / f"k{i - 1}", "-f", kstream, snd / f"k{i}")
        ours, kernels = _paths(tmp_path / "s"), _paths(kstream)
        assert _covered(ours, kernels), (what, ours, kernels)
        assert _covered(kernels, ours), (what, ours, kernels)
        run("btrfs", "subvolume", "delete", snd / f"k{i - 1}")
        only_touched(snd, what, touched, res, seen)


def test_a_lineage_without_sequences_reads_as_before_then_gains_them(
        two_fs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A version 6 record (an earlier release's) knows no sequence: after a read, every
    file is hashed again and every directory listed, as before; the patch record written
    (version 9) keeps the sequences of the rows it replaced, so after the next read none
    is."""
    with monkeypatch.context() as m:
        m.setattr("btrdelta.send.sendshot.VERSION", 6)
        res = first_send(two_fs, tmp_path, "strictatime")
    assert res.recorded is not None
    assert res.recorded.head.version == 6
    live = two_fs[0] / "live"
    files = sum(1 for p in live.rglob("*") if p.is_file() and not p.is_symlink())
    for i in (1, 2):
        _read_all(live)
        res, seen = send_round(two_fs, tmp_path, i, "a read")
        assert res.recorded is not None
        assert res.recorded.head.version == 9
        # (every file and directory of the tree again, then none)
        assert res.stats.files_scanned >= files if i == 1 else res.stats.files_scanned == 0
        assert (res.stats.bytes_read > 0) == (i == 1), i
        assert ("quiet" in seen["listdir"]) == (i == 1)


def _row(ino: int, mode: int, seq: int, gen: int = 5, flags: int = 0) -> RecordInode:
    parent = [] if ino == 256 else [(256, str(ino).encode())]
    reg = mode == 0o100644
    return RecordInode(ino, mode, 0, 0, 0, 0, 0, 0, parent, generation=gen, flags=flags,
                       segments=[] if reg else None, digest=bytes(16 if reg else 0),
                       bdigest=bytes(32 if reg else 0), sequence=seq)


def test_what_is_taken_as_an_atime_alone() -> None:
    """Only the recorded sequence and generation, and for a regular file no extent item
    written since and not ``NOCOW``: anything else is a change."""
    d, f = 0o40755, 0o100644
    rows = [_row(256, d, 3), _row(257, d, 4), _row(258, f, 9), _row(259, f, 9),
            _row(260, f, 9, flags=0x2), _row(261, d, NO_SEQUENCE), _row(262, d, 7),
            _row(263, 0o120777, 2)]
    cols, (count, _f, _b, nblk) = encode_rows(rows)
    view = Columns(dict(cols), count, nblk)
    changed = {256: (5, 90, 3), 257: (5, 90, 5), 258: (5, 90, 9), 259: (5, 90, 9),
               260: (5, 90, 9), 261: (5, 90, NO_SEQUENCE), 262: (6, 90, 7), 263: (5, 90, 2),
               300: (8, 90, 1)}
    got = loud(view, changed, {259})
    # the root and the symlink: atime alone; 258 too (no extent written, not NOCOW)
    assert set(got) == {257, 259, 260, 261, 262, 300}
    assert got[257] == changed[257]
    # without the extents written since, no regular file is taken as unchanged
    assert set(loud(view, changed, None)) == {257, 258, 259, 260, 261, 262, 300}
