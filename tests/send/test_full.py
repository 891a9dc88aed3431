"""Full sends streamed by directory (btrdelta.send.full): memory, reads, kernel receive."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from btrdelta.send import send_records, send_stream
from btrdelta.send.scan import hash_contents
from btrdelta.send.walk import scan_tree
from btrdelta.tree.treesum import tree_sum

from .conftest import Workspace, count_reads


def _many(root: Path, files: int, per_dir: int = 100) -> None:
    """``files`` small files, ``per_dir`` a directory, three levels deep."""
    root.mkdir()
    for i in range(files):
        d = root / f"a{i // (per_dir * 10):03d}" / f"b{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"file-{i:06d}").write_bytes(b"%d\n" % i)


def _peak_send(tree: Path) -> int:
    """Peak traced memory (bytes) while sending ``tree`` in full through the API."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        for _rec in send_records(tree, version=2):
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_full_send_memory_does_not_grow_with_files(tmp_path: Path) -> None:
    """1,000 vs 8,000 files: the peak grows by less than 48 bytes a file (the whole-tree model
    it replaced took ~1.5 KB a file; the table of inode numbers given, ``FullInos``, takes
    8-16); any larger per-inode structure kept for the whole tree fails."""
    warm, small, big = tmp_path / "warm", tmp_path / "small", tmp_path / "big"
    _many(warm, 10)
    _many(small, 1_000)
    _many(big, 8_000)
    _peak_send(warm)  # imports, codec tables
    p_small, p_big = _peak_send(small), _peak_send(big)
    per_file = (p_big - p_small) / 7_000
    assert per_file < 48, f"{per_file:.0f} bytes a file ({p_small} -> {p_big})"
    assert p_big < 4 << 20


def _tricky(root: Path) -> None:
    """Hard links across directories, copies (clones), holes, xattrs, a read-only dir."""
    (root / "a" / "b").mkdir(parents=True)
    (root / "c").mkdir()
    (root / "a" / "f").write_bytes(b"hello\n")
    big = os.urandom(300_000)
    (root / "a" / "big").write_bytes(big)
    (root / "c" / "big-copy").write_bytes(big)
    huge = os.urandom(1_500_000)
    (root / "huge").write_bytes(huge)
    (root / "a" / "b" / "huge-copy").write_bytes(huge)
    os.link(root / "a" / "f", root / "c" / "f-link")
    os.link(root / "huge", root / "c" / "huge-link")
    os.symlink("../a/f", root / "c" / "sym")
    os.mkfifo(root / "fifo")
    with open(root / "sparse", "wb") as f:
        f.truncate(3_000_000)
        f.seek(2_000_000)
        f.write(b"data in the middle")
    os.setxattr(root / "a" / "f", "user.k", b"v")
    os.setxattr(root / "a", "user.dir", b"1")
    os.chmod(root / "a" / "b", 0o555)


@pytest.mark.btrfs
def test_full_send_reads_each_file_once(btrfs_ws: Workspace,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every regular file is opened once and its bytes read once, except where a copy is
    confirmed byte by byte: the earlier file is read again, and a copy larger than 1 MiB
    (sent while it was read, before its digest was known) is compared from its file."""
    tree = btrfs_ws.fresh("once") / "t"
    tree.mkdir()
    _tricky(tree)
    sizes = {p.stat().st_ino: p.stat().st_size for p in tree.rglob("*")
             if p.is_file() and not p.is_symlink()}
    opened, read = count_reads(monkeypatch, tree.stat().st_dev)
    for _rec in send_records(tree):
        pass
    monkeypatch.undo()
    # the earlier file of each copy is read again to confirm the copy, and so is a copy
    # larger than 1 MiB (sent while it was read, before its digest was known)
    twice = {(tree / p).stat().st_ino for p in ("a/big", "huge", "a/b/huge-copy")}
    assert set(opened) == set(sizes)
    for ino, size in sizes.items():
        assert opened[ino] == (2 if ino in twice else 1), ino
        if ino not in twice:
            assert read.get(ino, 0) <= size + 1, (ino, read.get(ino), size)
    assert sum(read.values()) < 2 * sum(sizes.values())


@pytest.mark.btrfs
def test_full_send_kernel_receives_cli_stream(btrfs_ws: Workspace, tmp_path: Path) -> None:
    """``btrdelta send`` (CLI, v1 and v2 compressed) of hard links, copies, holes, xattrs, a
    read-only directory and 3,000 small files: ``btrfs receive`` makes an equal tree, the
    UUID is the one the whole-tree model derives, and the stream written to a file directly
    equals the one spooled for a pipe (the spool leaves nothing behind)."""
    base = btrfs_ws.fresh("full")
    tree = base / "t"
    _many(tree, 3_000)
    _tricky(tree)
    model = scan_tree(tree)
    hash_contents([model])
    for flags in ([], ["--proto", "2", "--compressed-data"]):
        dest = base / f"recv{len(flags)}"
        dest.mkdir()
        stream = tmp_path / f"full{len(flags)}.stream"
        proc = subprocess.run([sys.executable, "-m", "btrdelta", "send", str(tree), "-f",
                               str(stream), "--json", *flags], capture_output=True, check=False)
        assert proc.returncode == 0, proc.stderr
        assert str(model.subvol_uuid()) in proc.stdout.decode()
        subprocess.run(["btrfs", "receive", "-f", str(stream), str(dest)], check=True,
                       capture_output=True)
        assert tree_sum(dest / "t") == tree_sum(tree)
    # to a pipe the records go through a temporary spool: the same bytes
    again = tmp_path / "again.stream"
    subprocess.run([sys.executable, "-m", "btrdelta", "send", str(tree), "-f", str(again)],
                   check=True)
    piped = subprocess.run([sys.executable, "-m", "btrdelta", "send", str(tree)],
                           capture_output=True, check=True, env={**os.environ,
                                                                 "TMPDIR": str(tmp_path)})
    assert piped.stdout == again.read_bytes()
    assert {p.name for p in tmp_path.iterdir()} == {"full0.stream", "full3.stream",
                                                     "again.stream"}


@pytest.mark.btrfs
def test_full_then_incremental_from_the_model(btrfs_ws: Workspace, tmp_path: Path) -> None:
    """A full stream (by directory) and an incremental one (whole-tree model) chain: the
    kernel finds the parent by the UUID the full stream named."""
    base = btrfs_ws.fresh("chain")
    old, new = base / "old", base / "new"
    _many(old, 500)
    _tricky(old)
    subprocess.run(["cp", "-a", str(old), str(new)], check=True)
    os.chmod(new / "a" / "b", 0o755)
    os.rename(new / "a" / "b", new / "c" / "moved")
    (new / "huge").write_bytes(b"changed")
    full, inc = tmp_path / "full.stream", tmp_path / "inc.stream"
    with open(full, "wb") as f:
        send_stream(f.write, old)
    with open(inc, "wb") as f:
        send_stream(f.write, new, old)
    dest = base / "recv"
    dest.mkdir()
    for s in (full, inc):
        subprocess.run(["btrfs", "receive", "-f", str(s), str(dest)], check=True,
                       capture_output=True)
    assert tree_sum(dest / "new") == tree_sum(new)


def _atimes(dirs: list[str]) -> dict[str, int]:
    return {d: os.lstat(d).st_atime_ns for d in dirs}


def _age(dirs: list[str]) -> None:
    """Each directory's atime two days older than its mtime: relatime's next listing of it
    updates it."""
    for d in dirs:
        st = os.lstat(d)
        os.utime(d, ns=(st.st_mtime_ns - 2 * 86_400 * 10**9, st.st_mtime_ns),
                 follow_symlinks=False)


def test_send_leaves_directory_atimes_alone(tmp_path: Path) -> None:
    """A send of plain directory trees (full, and incremental with -p: CLI) lists their
    directories without updating their atimes, which the stream carries: the same trees
    sent again give the same bytes (a resumed replication makes its stream again and
    compares it), and the source's times are as they were."""
    probe = [str(tmp_path / "probe")]
    os.mkdir(probe[0])
    _age(probe)
    before = _atimes(probe)
    os.listdir(probe[0])
    assert _atimes(probe) != before, "this file system does not update atimes (noatime)"
    old, new = tmp_path / "old", tmp_path / "new"
    _many(old, 300, per_dir=20)
    _many(new, 300, per_dir=20)
    (new / "a000" / "b0001" / "file-000020").write_bytes(b"changed\n")
    dirs = [d for root in (old, new) for d, _sub, _files in os.walk(root)]
    for args, name in ((["send", str(new)], "full"), (["send", "-p", str(old), str(new)], "inc")):
        _age(dirs)
        atimes = _atimes(dirs)
        streams = []
        for i in range(2):
            out = tmp_path / f"{name}{i}.stream"
            subprocess.run([sys.executable, "-m", "btrdelta", *args, "-f", str(out)],
                           check=True, capture_output=True)
            streams.append(out.read_bytes())
        assert _atimes(dirs) == atimes, name
        assert streams[0] == streams[1], name


@pytest.mark.btrfs
@pytest.mark.parametrize("version", [1, 2])
def test_small_files_encoded_at_once_give_the_same_stream(
    btrfs_ws: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: int
) -> None:
    """A small file's records encoded at once in C (``_speedups.encode_inode``), and each
    inode's metadata: the stream is byte for byte the one of the records encoded one by one
    (every kind of inode, holes, copies, xattrs, capabilities, odd owners and times), and
    ``btrfs receive`` makes an equal tree of it."""
    from btrdelta import _native
    from btrdelta.send.full import FullSend
    from tests.send.test_emit_encoded import _fill

    tree = btrfs_ws.fresh("atonce") / "t"
    tree.mkdir()
    _fill(tree)
    assert _native.available("speedups"), "the C accelerator is not built"

    def send() -> bytes:
        out: list[bytes] = []
        FullSend(tree, version=version).write_to(lambda b: out.append(bytes(b)))
        return b"".join(out)

    send()  # (the directories' atimes set by reading them: relatime)
    with _native.use_backend("c", "speedups"):
        speedups = _native.live("speedups")
        encode, calls = speedups.encode_inode, []

        def counted(*args: object) -> object:
            calls.append(args[3])
            return encode(*args)

        monkeypatch.setattr(speedups, "encode_inode", counted)
        fast = send()
        assert len(calls) >= 12  # files, directories, symlinks, the device, ...
        assert sum(1 for c in calls if c) >= 5  # with data
        monkeypatch.delattr(speedups, "encode_inode")
        monkeypatch.delattr(speedups, "encode_head")
        slow = send()
    assert fast == slow
    stream = tmp_path / "s"
    stream.write_bytes(fast)
    dest = tree.parent / f"recv{version}"
    dest.mkdir()
    subprocess.run(["btrfs", "receive", "-f", str(stream), str(dest)], check=True,
                   capture_output=True)
    assert tree_sum(dest / "t") == tree_sum(tree)


def test_acls_of_a_tree_on_xfs_are_sent_as_posix_acls_only(btrfs_ws: Workspace) -> None:
    # XFS lists to root its own stored form of POSIX ACLs (trusted.SGI_ACL_FILE/_DEFAULT)
    # besides system.posix_acl_*: sent, a receiver would keep them as plain trusted xattrs
    from btrdelta.stream.records import SetXattr
    from btrdelta.testing.loopfs import loop_fs
    from btrdelta.testing.scenarios import kernel_receive
    from btrdelta.testing.scenarios_beyond import _ACL_USER
    from btrdelta.tree.treesum import diff_manifests, tree_manifest

    acl = bytes.fromhex(_ACL_USER[2:])
    with loop_fs("xfs", size="300M") as xfs:
        tree = xfs / "acl-xfs"
        (tree / "d").mkdir(parents=True)
        (tree / "d/f").write_bytes(b"x")
        os.setxattr(tree / "d/f", "system.posix_acl_access", acl)
        os.setxattr(tree / "d", "system.posix_acl_default", acl)
        names = sorted(r.name for r in send_records(tree) if isinstance(r, SetXattr))
        assert names == [b"system.posix_acl_access", b"system.posix_acl_default"]
        stream = btrfs_ws.fresh("acl-xfs") / "s"
        with open(stream, "wb") as f:
            send_stream(f.write, tree)
        kernel_receive(stream, stream.parent)
        got = stream.parent / "acl-xfs"
        assert not diff_manifests(tree_manifest(tree), tree_manifest(got))
        assert not [n for n in os.listxattr(got / "d/f") if n.startswith("trusted.")]
