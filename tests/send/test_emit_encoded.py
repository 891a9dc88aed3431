"""A full send's created inodes encoded at once by the C accelerator
(``Sender.encoded_records``, ``_speedups.encode_inode``): the same stream, byte for byte, as
the records made and encoded one by one, on a tree of every kind of inode; the kernel
receives it."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from btrdelta import _native
from btrdelta.send.sendshot import send_with_sendshots
from btrdelta.send.store import SendshotStore
from btrdelta.tree import tree_sum
from tests.send.conftest import run

pytestmark = pytest.mark.btrfs

KIB = 1024


def _fill(live: Path) -> None:
    """Files of every size around the writes' (48 KiB in v1, 128 KiB in v2) and the copies'
    (16 KiB) limits, copies, holes, hard links, xattrs and capabilities, symlinks, a device,
    a FIFO, a socket, odd owners, modes and times, directories with xattrs."""
    rng = __import__("random").Random(5)
    d = live / "d"
    (d / "sub" / "deep").mkdir(parents=True)
    sizes = [0, 1, 4095, 4096, 16 * KIB - 1, 16 * KIB, 48 * KIB, 48 * KIB + 1, 100 * KIB,
             128 * KIB, 128 * KIB + 1, 300 * KIB, (1 << 20) + 7]
    for i, size in enumerate(sizes):
        (d / f"f{i:02}").write_bytes(rng.randbytes(size))
    same = rng.randbytes(20 * KIB)
    for name in ("copy-a", "sub/copy-b", "sub/deep/copy-c"):  # CLONEs of the first
        (d / name).write_bytes(same)
    with open(d / "holes", "wb") as f:  # a hole, data, a hole at the end
        f.seek(12 * KIB)
        f.write(rng.randbytes(5000))
        f.truncate(40 * KIB)
    os.link(d / "f03", d / "sub" / "f03-again")
    os.link(d / "f03", live / "z-link")
    os.symlink("f01", d / "sym")
    os.symlink("x" * 300, d / "sub" / "long-sym")
    os.mknod(d / "null", stat.S_IFCHR | 0o640, os.makedev(1, 3))
    os.mkfifo(d / "fifo")
    import socket

    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(d / "sock"))
    finally:
        sock.close()
    os.setxattr(d / "f02", "user.k", b"v")
    os.setxattr(d / "sub", "user.dir", b"1")
    # a capability (version 2, CAP_NET_RAW effective and permitted)
    os.setxattr(d / "f04", "security.capability",
                bytes.fromhex("01000002") + (1 << 13).to_bytes(4, "little") + bytes(12))
    os.chown(d / "f05", 1234, 5678)
    os.chown(d / "sym", 42, 43, follow_symlinks=False)
    os.chmod(d / "f06", 0o4755)
    os.chmod(d / "sub" / "deep", 0o500)
    os.utime(d / "f07", ns=(-1_500_000_001, 1_700_000_000_123_456_789))
    os.utime(d / "f00", ns=(0, 0))


def _counted(speedups: Any, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What ``encode_inode`` returns from now on, call by call."""
    made: list[Any] = []
    encode = speedups.encode_inode

    def counted(*args: Any) -> Any:
        got = encode(*args)
        made.append(got)
        return got

    monkeypatch.setattr(speedups, "encode_inode", counted)
    return made


def _send(snap: Path, store: Path, version: int) -> bytes:
    out: list[bytes] = []
    send_with_sendshots(lambda b: out.append(bytes(b)), snap, store=SendshotStore(store),
                        version=version, snapshot=False)
    return b"".join(out)


@pytest.mark.parametrize("version", [1, 2])
def test_encoded_inodes_are_the_records_encoded_one_by_one(
    two_fs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: int
) -> None:
    snd, rcv = two_fs
    live = snd / "live"
    run("btrfs", "subvolume", "create", live)
    _fill(live)
    run("btrfs", "subvolume", "snapshot", "-r", live, snd / "S")
    assert _native.available("speedups"), "the C accelerator is not built"
    with _native.use_backend("c", "speedups"):
        _compare(snd, rcv, tmp_path, monkeypatch, version)


def _compare(snd: Path, rcv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
             version: int) -> None:
    speedups = _native.live("speedups")
    assert speedups is not None
    made = _counted(speedups, monkeypatch)
    fast = _send(snd / "S", tmp_path / "store1", version)
    # files with data, empty ones, directories, symlinks, the device and others
    encoded = [m for m in made if m is not None]
    assert len(encoded) >= 12
    assert sum(1 for m in encoded if m[1] is not None) >= 5
    monkeypatch.delattr(speedups, "encode_inode")
    slow = _send(snd / "S", tmp_path / "store2", version)
    assert fast == slow
    stream = tmp_path / "s"
    stream.write_bytes(fast)
    run("btrfs", "receive", "-f", stream, rcv)
    assert tree_sum(rcv / "S") == tree_sum(snd / "S")


def test_a_plain_directory_hashed_first_gives_the_same_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain directory (its stream's UUID the content's: every file hashed before the
    stream, not as it is sent): the same bytes with and without the C encoder."""
    tree = tmp_path / "t"
    tree.mkdir()
    _fill(tree)
    _send(tree, tmp_path / "store0", 2)  # (the directories' atimes set by reading them)
    assert _native.available("speedups"), "the C accelerator is not built"
    with _native.use_backend("c", "speedups"):
        speedups = _native.live("speedups")
        assert speedups is not None
        made = _counted(speedups, monkeypatch)
        fast = _send(tree, tmp_path / "store1", 2)
        assert sum(1 for m in made if m is not None and m[1] is not None) >= 5
        monkeypatch.delattr(speedups, "encode_inode")
        slow = _send(tree, tmp_path / "store2", 2)
    assert fast == slow


def test_the_same_inodes_come_encoded_whatever_the_threads_kept(
    two_fs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which records come as one encoded group does not depend on the files the hashing
    threads kept (their budget): a replication's segments end at record boundaries, so a cut
    transfer's stream, made again, must be cut alike."""
    from btrdelta.send import hashing

    snd, _rcv = two_fs
    live = snd / "live"
    run("btrfs", "subvolume", "create", live)
    _fill(live)
    run("btrfs", "subvolume", "snapshot", "-r", live, snd / "S")

    def shape(store: Path) -> tuple[bytes, list[str]]:
        out: list[bytes] = []
        seen: list[str] = []
        send_with_sendshots(lambda b: out.append(bytes(b)), snd / "S",
                            store=SendshotStore(store), version=2, snapshot=False,
                            on_record=lambda r: seen.append(
                                f"{r[3]}" if isinstance(r, tuple) else type(r).__name__))
        return b"".join(out), seen

    assert _native.available("speedups"), "the C accelerator is not built"
    with _native.use_backend("c", "speedups"):
        kept = shape(tmp_path / "store1")
        monkeypatch.setattr(hashing, "KEEP_BUDGET", 0)  # nothing kept: read by the send
        assert shape(tmp_path / "store2") == kept
    assert sum(1 for s in kept[1] if s.isdigit()) >= 12
