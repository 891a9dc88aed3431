"""Streams from btrfs-progs' own tests (tests/misc-tests), read and received as `btrfs
receive` reads and receives them (the oracle).

* misc-tests/016-send-clone-src ships ``multi-clone-src-v4.8.2.stream.xz`` (kept here in
  tests/data/streams/upstream, as upstream has it): what a 4.8.2 kernel sent for
  ``btrfs send -c snap1_1 -c snap2_1 snap1_2 snap1_3 snap2_2 snap2_3``, four incremental
  streams in a row, every one from the parent the kernel picked then (snap2_1, a subvolume
  of other files: upstream's bug was its size), with clones from snap1_1. The two bases are
  crafted as full streams with their UUIDs and transids (a received subvolume is found by
  its received UUID), so the kernel's receive of the four can be compared with ours.
* misc-tests/019: streams received into a filesystem mounted at a subvolume of it
  (``-o subvol=/dest``), the parent and a ``-c`` clone source found there (btrfs-progs had
  to strip the mounted subvolume's path from the paths the UUID tree gives).
* misc-tests/039: a full stream that clones from itself, received again where a
  subvolume with its received UUID exists (renamed and changed since): the clones come
  from the subvolume being received.
* misc-tests/035 (not run upstream since its fix was reverted): DEST beside a mount whose
  path is a prefix of DEST's (``MNT/ddis`` mounted, DEST ``MNT/ddis-not-a-mount``); the
  filesystem is DEST's own, and so are the parents looked up on it.
* fstests btrfs/110 and 111: snapshots *we* received into btrfs, sent again by the kernel
  (full, and incremental from them or from a snapshot of one made writable and changed), are
  received on another filesystem as the kernel's own receive would have them: the kernel
  names a received subvolume by its received UUID and stransid, which our receive sets.
  Sent back to the first filesystem (misc-tests/061's reverse receive), the parent is found
  there by its own UUID.
* fstests btrfs/186: a writable subvolume with data not yet written back (delalloc) turned
  read-only with ``btrfs property`` and sent itself, not a snapshot of it: the data is in
  the kernel's stream, and in ours.
* btrfs-progs cli-tests/004: ``btrfs send -p snap1 snap2 snap3``, two incremental streams in
  one file, dumped and received (both) as btrfs receive does.
* misc-tests/029: the parent given through another mount point of the filesystem: btrfs
  send refuses, ours sends streams the kernel receives as the snapshots.
* misc-tests/045: DEST on a tmpfs mounted inside the btrfs, and beside it with a name the
  tmpfs mount is a prefix of; misc-tests/050 and 051: the received subvolume is read-only
  with a received UUID, no warning, ro->rw refused unless forced; misc-tests/053: encoded
  writes of zlib, lzo and zstd, kept encoded, or decompressed with --force-decompress.
* misc-tests/041: a snapshot deleted while our send of it runs; the reproducers of
  btrfs-progs commits 5d4f3ea9 (a chrooted receive cloning from an older snapshot) and
  4b590938 (receive -e of one stream).
* fstests btrfs/152 (quotas, concurrent incremental receives) and 314 (two mounted copies
  of one filesystem image: one with a temporary fsid).
* btrfs-progs issues: 787 (a --no-data stream's clones, refused as btrfs receive refuses
  them), 606 (a reverse receive whose CLONE source is found by its UUID; btrfs-progs 6.2
  fails), 375 (send -c without a parent, which btrfs send cannot do) and 649 (the parent
  received twice, once where DEST's mount does not reach).
* misc-tests/017 and 036 feed `btrfs receive` (and ``--dump``) an empty stream, a short
  header, a bad magic and a header of version 0: refused, by us with one line.
* fstests btrfs/339: ``btrfs receive --dump`` of a stream another user owns (btrfs-progs
  opened it with O_NOATIME, refused to anyone but the owner).
"""

from __future__ import annotations

import io
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from btrdelta.send import send_stream
from btrdelta.stream import write_stream
from btrdelta.stream.records import Chmod, End, Mkfile, Subvol, Truncate, Utimes
from btrdelta.testing.loopfs import run
from btrdelta.testing.scenarios import kernel_receive, send
from btrdelta.tree.treesum import diff_manifests, tree_manifest
from tests.conftest import (
    DATA,
    Children,
    btrfs_loop,
    nobody_python,
    progs_dump,
    require_btrfs,
)

from .conftest import Targets, our_receive

PROGS_016 = DATA / "streams" / "upstream" / "multi-clone-src-v4.8.2.stream.xz"
#: the time every inode of PROGS_016 has (2016-11-09T00:07:00Z), in ns
_T_016 = 1478650020 * 10**9
#: the streams' names, in order
_SNAPS_016 = ["subv-snap1_2", "subv-snap1_3", "subv-snap2_2", "subv-snap2_3"]
def _cli(*argv: str, stdin: bytes | None = None,
         python: tuple[str, ...] = (sys.executable,)) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*python, "-m", "btrdelta", *argv], input=stdin,
                          capture_output=True, check=False, timeout=120,
                          env={**os.environ, "TZ": "UTC"})


def _progs_016(where: Path) -> Path:
    out = where / "multi-clone-src-v4.8.2.stream"
    out.write_bytes(lzma.decompress(PROGS_016.read_bytes()))
    return out


def _base_016(where: Path, name: bytes, u: str, ctransid: int, file: bytes) -> Path:
    """A parent or clone source of PROGS_016, as upstream's test made it: one 1 MiB file of
    zeros (sparse here: the streams clone it or unlink it, never read its blocks)."""
    out = io.BytesIO()
    write_stream([Subvol(path=name, uuid=uuid.UUID(u), ctransid=ctransid),
                  Mkfile(path=file, ino=257), Truncate(path=file, size=1 << 20),
                  Chmod(path=file, mode=0o644),
                  Utimes(path=file, atime=_T_016, mtime=_T_016, ctime=_T_016),
                  Utimes(path=b"", atime=_T_016, mtime=_T_016, ctime=_T_016), End()],
                 out.write)
    path = where / (name.decode() + ".stream")
    path.write_bytes(out.getvalue())
    return path


def test_dump_of_progs_016_stream_is_btrfs_receive_dump(tmp_path: Path) -> None:
    if shutil.which("btrfs") is None:
        pytest.skip("btrfs-progs not installed")
    stream = _progs_016(tmp_path)
    want = progs_dump(stream)
    assert want.returncode == 0, want.stderr
    ours = _cli("dump", "-f", str(stream))
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == want.stdout
    assert want.stdout.startswith(b"snapshot        ./subv-snap1_2 ")
    every = _cli("dump", "--all", "-f", str(stream))  # btrfs-progs stops after the first END
    assert every.returncode == 0, every.stderr
    assert every.stdout.startswith(want.stdout)
    heads = [line.split()[1] for line in every.stdout.decode().splitlines()
             if line.startswith("snapshot")]
    assert heads == [f"./{s}" for s in _SNAPS_016]


@pytest.mark.btrfs
def test_receive_of_progs_016_stream_is_btrfs_receive(tmp_path: Path, targets: Targets) -> None:
    require_btrfs()
    stream = _progs_016(tmp_path)
    bases = [_base_016(tmp_path, b"subv-snap2_1", "b0afcb2c-91d5-2f42-b817-6e073b881952", 12,
                       b"file2_1"),
             _base_016(tmp_path, b"subv-snap1_1", "e9afdf92-ac63-bb47-8f22-0acc185043e0", 8,
                       b"file1_1")]
    kernel = targets.kernel / "progs-016"
    dests = {"btrfs": targets.ours_btrfs / "progs-016", "ext4": targets.ours_ext4 / "progs-016"}
    kernel.mkdir()
    for dest in dests.values():
        dest.mkdir()
    for s in [*bases, stream]:
        kernel_receive(s, kernel)
        for key, dest in dests.items():
            proc = _cli("receive", "-f", str(s), str(dest))
            assert proc.returncode == 0, (key, s.name, proc.stderr)
    names = sorted(p.name for p in kernel.iterdir())
    assert names == sorted(["subv-snap1_1", "subv-snap2_1", *_SNAPS_016])
    assert sorted(os.listdir(kernel / "subv-snap1_3")) == ["file1_1", "file1_2", "file1_3"]
    for snap in names:
        ref = tree_manifest(kernel / snap, ignore_root_mtime=True)
        for key, dest in dests.items():
            diff = diff_manifests(ref, tree_manifest(dest / snap, ignore_root_mtime=True))
            assert not diff, (key, snap, diff)


def _mount_subvol(fs: Path, subvol: str, at: Path) -> None:
    """Mount the btrfs mounted at ``fs`` again at ``at``, its subvolume ``subvol`` as root."""
    with open("/proc/mounts") as f:
        dev = next(line.split()[0] for line in f if line.split()[1] == str(fs))
    at.mkdir()
    run("mount", "-o", f"subvol=/{subvol}", dev, at)


@pytest.mark.btrfs
def test_receive_into_a_mounted_subvolume_progs_019(tmp_path: Path, targets: Targets) -> None:
    require_btrfs()
    src = targets.scratch_btrfs / "progs-019"
    src.mkdir()
    for name in ("foo", "bar", "baz", "snap"):
        run("btrfs", "-q", "subvolume", "create", src / name)
    run("xfs_io", "-f", "-c", "pwrite -S 0x41 0 128K", src / "foo/file_a")
    run("xfs_io", "-f", "-c", "pwrite -S 0x42 0 128K", src / "bar/file_b")
    run("cp", "--reflink=always", src / "foo/file_a", src / "baz/file_a")
    run("cp", "--reflink=always", src / "bar/file_b", src / "baz/file_b")
    snap = src / "snap"
    run("btrfs", "-q", "subvolume", "snapshot", "-r", src / "foo", snap / "foo.0")
    run("btrfs", "-q", "subvolume", "snapshot", "-r", src / "bar", snap / "bar.0")
    run("cp", "--reflink=always", src / "foo/file_a", src / "foo/file_a.clone")
    (src / "foo/file_a").unlink()
    run("btrfs", "-q", "subvolume", "snapshot", "-r", src / "foo", snap / "foo.1")
    run("btrfs", "-q", "subvolume", "snapshot", "-r", src / "baz", snap / "baz.0")
    streams = [send(snap / "foo.0", tmp_path / "foo.0"), send(snap / "bar.0", tmp_path / "bar.0"),
               send(snap / "foo.1", tmp_path / "foo.1", parent=snap / "foo.0"),
               send(snap / "baz.0", tmp_path / "baz.0", parent=snap / "foo.1",
                    extra=("-c", str(snap / "bar.0")))]
    mounts = {"kernel": tmp_path / "kernel", "ours": tmp_path / "ours"}
    try:
        for key, fs in (("kernel", targets.kernel), ("ours", targets.ours_btrfs)):
            run("btrfs", "-q", "subvolume", "create", fs / "progs-019")
            _mount_subvol(fs, "progs-019", mounts[key])
        for s in streams:
            kernel_receive(s, mounts["kernel"])
            proc = _cli("receive", "-f", str(s), str(mounts["ours"]))
            assert proc.returncode == 0, (s.name, proc.stderr)
        for name in ("foo.0", "bar.0", "foo.1", "baz.0"):
            ref = tree_manifest(mounts["kernel"] / name, ignore_root_mtime=True)
            assert not diff_manifests(tree_manifest(snap / name, ignore_root_mtime=True), ref)
            ours = tree_manifest(mounts["ours"] / name, ignore_root_mtime=True)
            assert not diff_manifests(ref, ours), name
    finally:
        for at in mounts.values():
            if at.is_mount():
                run("umount", at)


def _ours(stream: Path, dest: Path) -> None:
    proc = _cli("receive", "-f", str(stream), str(dest))
    assert proc.returncode == 0, (stream.name, dest, proc.stderr)


@pytest.mark.btrfs
def test_receive_again_clones_from_the_subvolume_being_received_progs_039(
        tmp_path: Path, targets: Targets) -> None:
    require_btrfs()
    src = targets.scratch_btrfs / "progs-039"
    run("btrfs", "-q", "subvolume", "create", src)
    (src / "foo").write_bytes(os.urandom(1 << 20))
    run("cp", "--reflink=always", src / "foo", src / "bar")
    (src / "dir").mkdir()
    (src / "foo").rename(src / "dir/foo")
    run("btrfs", "property", "set", src, "ro", "true")
    stream = send(src, tmp_path / "send.data")
    want = tree_manifest(src, ignore_root_mtime=True)
    for fs, receiver in ((targets.kernel, kernel_receive), (targets.ours_btrfs, _ours),
                         (targets.ours_ext4, _ours)):
        dest = fs / "progs-039-dest"
        dest.mkdir()
        receiver(stream, dest)
        old = dest / "old"
        (dest / "progs-039").rename(old)
        if fs != targets.ours_ext4:
            run("btrfs", "property", "set", "-f", old, "ro", "false")
        run("xfs_io", "-c", "pwrite -S 0xee 0 1M", old / "dir/foo")  # not what is cloned now
        receiver(stream, dest)
        got = tree_manifest(dest / "progs-039", ignore_root_mtime=True)
        assert not diff_manifests(want, got), fs


@pytest.mark.btrfs
def test_receive_beside_a_mount_with_a_prefix_of_its_path_progs_035(
        tmp_path: Path, targets: Targets) -> None:
    require_btrfs()
    src = targets.scratch_btrfs / "progs-035"
    run("btrfs", "-q", "subvolume", "create", src)
    run("btrfs", "-q", "subvolume", "create", src.with_name("progs-035-empty"))
    (src / "file").write_text("some data\n")
    run("btrfs", "-q", "subvolume", "snapshot", "-r", src, src.with_name("progs-035-s1"))
    (src / "file2").write_text("more\n")
    run("btrfs", "-q", "subvolume", "snapshot", "-r", src, src.with_name("progs-035-s2"))
    full = send(src.with_name("progs-035-s1"), tmp_path / "full")
    incr = send(src.with_name("progs-035-s2"), tmp_path / "incr",
                parent=src.with_name("progs-035-s1"))
    mounted: list[Path] = []
    try:
        for fs, receiver in ((targets.kernel, kernel_receive), (targets.ours_btrfs, _ours)):
            parents = fs / "progs-035-parents"  # the parent: on DEST's filesystem, elsewhere
            parents.mkdir()
            receiver(full, parents)
            # where a prefix match of DEST's path leads: another btrfs (an empty subvolume of
            # the source's, which cannot reach the source's snapshots)
            prefix = fs / "progs-035"
            _mount_subvol(targets.scratch_btrfs, "progs-035-empty", prefix)
            mounted.append(prefix)
            dest = fs / "progs-035-not-a-mount"
            dest.mkdir()
            receiver(incr, dest)
            receiver(full, dest)
        for name in ("progs-035-s1", "progs-035-s2"):
            ref = tree_manifest(targets.kernel / "progs-035-not-a-mount" / name,
                                ignore_root_mtime=True)
            assert not diff_manifests(tree_manifest(src.with_name(name),
                                                    ignore_root_mtime=True), ref)
            got = targets.ours_btrfs / "progs-035-not-a-mount" / name
            assert not diff_manifests(ref, tree_manifest(got, ignore_root_mtime=True))
            assert got.stat().st_ino == 256  # a subvolume (of DEST's btrfs)
        assert [os.listdir(at) for at in mounted] == [[], []]
    finally:
        for at in mounted:
            run("umount", at)


@pytest.mark.btrfs
def test_resend_of_what_we_received_fstests_110_111(tmp_path: Path, targets: Targets) -> None:
    require_btrfs()
    src = targets.scratch_btrfs / "fst-110"
    run("btrfs", "-q", "subvolume", "create", src)
    run("xfs_io", "-f", "-c", "pwrite -S 0xaa 0K 32K", src / "foo")
    run("btrfs", "-q", "subvolume", "snapshot", "-r", src, src.with_name("fst-110-snap1"))
    run("xfs_io", "-c", "pwrite -S 0xbb 4K 4K", src / "foo")
    run("btrfs", "-q", "subvolume", "snapshot", "-r", src, src.with_name("fst-110-snap2"))
    s1 = send(src.with_name("fst-110-snap1"), tmp_path / "1.snap")
    s2 = send(src.with_name("fst-110-snap2"), tmp_path / "2.snap",
              parent=src.with_name("fst-110-snap1"))
    # the second filesystem: we receive both (111); a writable snapshot of snap1 changed (110)
    fs2 = targets.ours_btrfs / "fst-110"
    fs2.mkdir()
    _ours(s1, fs2)
    _ours(s2, fs2)
    run("sync")
    run("btrfs", "-q", "subvolume", "snapshot", fs2 / "fst-110-snap1", fs2 / "rw")
    run("xfs_io", "-c", "pwrite -S 0xcc 8K 4K", fs2 / "rw/foo")
    run("btrfs", "-q", "subvolume", "snapshot", "-r", fs2 / "rw", fs2 / "snap3")
    again = [send(fs2 / "fst-110-snap1", tmp_path / "1_2.snap"),
             send(fs2 / "fst-110-snap2", tmp_path / "2_2.snap", parent=fs2 / "fst-110-snap1"),
             send(fs2 / "snap3", tmp_path / "3.snap", parent=fs2 / "fst-110-snap1")]
    # a third filesystem receives the kernel's streams of what we received
    kernel = targets.kernel / "fst-110"
    dests = [targets.kernel / "fst-110-ours", targets.ours_ext4 / "fst-110"]
    for d in (kernel, *dests):
        d.mkdir()
    for stream in again:
        kernel_receive(stream, kernel)
        for d in dests:
            _ours(stream, d)
    for name in ("fst-110-snap1", "fst-110-snap2", "snap3"):
        ref = tree_manifest(kernel / name, ignore_root_mtime=True)
        orig = fs2 / name if name == "snap3" else src.with_name(name)
        assert not diff_manifests(tree_manifest(orig, ignore_root_mtime=True), ref), name
        for d in dests:
            assert not diff_manifests(ref, tree_manifest(d / name, ignore_root_mtime=True)), d
    assert (kernel / "snap3/foo").read_bytes() == b"\xaa" * 8192 + b"\xcc" * 4096 + b"\xaa" * 20480
    # back to the first filesystem (misc-tests/061's reverse receive): the stream's parent is
    # the received UUID of fs2's snap1, the UUID of the source's snap1 there
    for d, receiver in ((src.with_name("fst-110-back-k"), kernel_receive),
                        (src.with_name("fst-110-back-o"), _ours)):
        d.mkdir()
        receiver(again[2], d)
        assert not diff_manifests(tree_manifest(kernel / "snap3", ignore_root_mtime=True),
                                  tree_manifest(d / "snap3", ignore_root_mtime=True)), d


@pytest.mark.btrfs
def test_delalloc_subvolume_turned_read_only_fstests_186(tmp_path: Path,
                                                         targets: Targets) -> None:
    require_btrfs()
    sv = targets.scratch_btrfs / "fst-186"
    run("btrfs", "-q", "subvolume", "create", sv)
    run("xfs_io", "-f", "-c", "pwrite -S 0xea 0 108K", sv / "foo")  # no sync: delalloc
    run("btrfs", "property", "set", sv, "ro", "true")
    stream = send(sv, tmp_path / "sv.send")
    for fs, receiver in ((targets.kernel, kernel_receive), (targets.ours_btrfs, _ours),
                         (targets.ours_ext4, _ours)):
        dest = fs / "fst-186"
        dest.mkdir()
        receiver(stream, dest)
        assert (dest / "fst-186/foo").read_bytes() == b"\xea" * 108 * 1024, fs
        assert not diff_manifests(tree_manifest(sv), tree_manifest(dest / "fst-186")), fs
    ours = tmp_path / "ours.send"  # and our send of it, received by the kernel
    with open(ours, "wb") as f:
        send_stream(f.write, sv)
    dest = targets.kernel / "fst-186-ours"
    dest.mkdir()
    kernel_receive(ours, dest)
    assert not diff_manifests(tree_manifest(sv), tree_manifest(dest / "fst-186"))


#: misc-tests/017 (empty, short and bad headers) and 036 (stream version 0)
_BAD = [b"", b"1", b"12345678901234567", b"btrfs-stream\0\0\0\0\0"]


@pytest.mark.parametrize("data", _BAD, ids=["empty", "one-byte", "bad-magic", "version-0"])
def test_bad_headers_are_refused_as_btrfs_receive_refuses(tmp_path: Path, data: bytes) -> None:
    if shutil.which("btrfs") is None:
        pytest.skip("btrfs-progs not installed")
    progs = subprocess.run(["btrfs", "receive", "--dump"], input=data, capture_output=True,
                           check=False, timeout=60)
    assert progs.returncode != 0
    dest = tmp_path / "dest"
    dest.mkdir()
    for argv in (("dump",), ("dump", "--all"), ("receive", str(dest))):
        proc = _cli(*argv, stdin=data)
        err = proc.stderr.decode(errors="replace")
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 3, (argv, proc.returncode, err)
        assert len(lines) == 1, (argv, err)
        assert lines[0].startswith("btrdelta"), (argv, err)
        assert "Traceback" not in err, (argv, err)
        assert proc.stdout == b"", argv
    assert list(dest.iterdir()) == []


def test_dump_of_a_stream_another_user_owns(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run as another user")
    world = Path(tempfile.mkdtemp(prefix="btrdelta-339-"))  # pytest's own is 0700
    try:
        world.chmod(0o755)
        stream = world / "s.stream"
        shutil.copy(DATA / "streams" / "inversion-030.B.v2.stream", stream)
        stream.chmod(0o644)  # root's, readable by all (btrfs/339's chmod a+r)
        ours = _cli("dump", "-f", str(stream), python=tuple(nobody_python()))
        assert ours.returncode == 0, ours.stderr
        want = (DATA / "streams" / "inversion-030.B.v2.dump").read_bytes()
        assert ours.stdout == want
    finally:
        shutil.rmtree(world, ignore_errors=True)


@pytest.mark.btrfs
def test_one_stream_of_two_incrementals_progs_cli_004(tmp_path: Path, targets: Targets) -> None:
    require_btrfs()
    src = targets.scratch_btrfs / "cli-004"
    src.mkdir()
    run("btrfs", "-q", "subvolume", "create", src / "subv-parent")
    snaps = [src / f"subv-snap{i}" for i in (1, 2, 3)]
    for snap in snaps:  # upstream: 10 MiB of random data, written again for every snapshot
        (src / "subv-parent/file").write_bytes(os.urandom(1 << 20))
        run("btrfs", "-q", "subvolume", "snapshot", "-r", src / "subv-parent", snap)
    full = send(snaps[0], tmp_path / "full")
    # btrfs send -p subv-snap1 subv-snap2 subv-snap3: two incremental streams in one file
    both = send(snaps[1], tmp_path / "both", parent=snaps[0], extra=(str(snaps[2]),))
    want = progs_dump(both)
    assert want.returncode == 0, want.stderr
    ours = _cli("dump", "-f", str(both))
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == want.stdout
    every = _cli("dump", "--all", "-f", str(both))
    heads = sorted(line.split()[1] for line in every.stdout.decode().splitlines()
                   if line.startswith("snapshot"))
    assert heads == ["./subv-snap2", "./subv-snap3"]
    dests = [(targets.kernel / "cli-004", kernel_receive), (targets.ours_btrfs / "cli-004", _ours),
             (targets.ours_ext4 / "cli-004", _ours)]
    for dest, receiver in dests:
        dest.mkdir()
        receiver(full, dest)
        receiver(both, dest)  # both streams of the file (btrfs receive without -e)
    for snap in snaps:
        ref = tree_manifest(snap, ignore_root_mtime=True)
        for dest, _ in dests:
            assert not diff_manifests(ref, tree_manifest(dest / snap.name,
                                                         ignore_root_mtime=True)), (dest, snap)


@pytest.mark.btrfs
def test_send_with_the_parent_on_another_mount_progs_029(tmp_path: Path,
                                                          targets: Targets) -> None:
    require_btrfs()
    top = targets.scratch_btrfs
    run("btrfs", "-q", "subvolume", "create", top / "progs-029-subv1")
    sv = top / "progs-029-test-subvol"
    run("btrfs", "-q", "subvolume", "create", sv)
    (sv / "file").write_text("one\n")
    at = tmp_path / "subvol_mnt"  # subv1 mounted on its own: the parent is reached there
    _mount_subvol(top, "progs-029-subv1", at)
    try:
        parent = at / "test-subvol-mnt-subvol"
        run("btrfs", "-q", "subvolume", "snapshot", "-r", sv, parent)
        (sv / "file").write_text("two\n")
        (sv / "dir").mkdir()
        new = top / "progs-029-test-subvol-mnt-root"
        run("btrfs", "-q", "subvolume", "snapshot", "-r", sv, new)
        # btrfs send refuses (btrfs-progs' fix: 'not on mount point'), and so does --kernel
        progs = subprocess.run(["btrfs", "send", "-f", "/dev/null", "-p", str(parent), str(new)],
                               capture_output=True, check=False, timeout=60)
        assert progs.returncode != 0
        assert b"not on mount point" in progs.stderr
        kern = _cli("send", "--kernel", "-f", str(tmp_path / "k"), "-p", str(parent), str(new))
        err = kern.stderr.decode(errors="replace").strip()
        assert kern.returncode != 0, err
        assert len(err.splitlines()) == 1, err
        assert "not on mount point" in err
        assert "Traceback" not in err
        # ours reads trees, not a mount's subvolumes: paths stay whole, the kernel receives it
        full, incr = tmp_path / "full", tmp_path / "incr"
        for argv in (("-f", str(full), str(parent)), ("-f", str(incr), "-p", str(parent),
                                                      str(new))):
            proc = _cli("send", *argv)
            assert proc.returncode == 0, proc.stderr
        dest = targets.kernel / "progs-029"
        dest.mkdir()
        kernel_receive(full, dest)
        kernel_receive(incr, dest)
        for snap in (parent, new):
            assert not diff_manifests(tree_manifest(snap, ignore_root_mtime=True),
                                      tree_manifest(dest / snap.name, ignore_root_mtime=True))
    finally:
        run("umount", at)


@pytest.mark.btrfs
def test_receive_into_and_beside_a_tmpfs_on_btrfs_progs_045(tmp_path: Path,
                                                            targets: Targets) -> None:
    require_btrfs()
    mnt = targets.scratch_btrfs / "progs-045"
    mnt.mkdir()
    run("btrfs", "-q", "subvolume", "create", mnt / "subvol")
    (mnt / "subvol/file").write_text("data\n")
    run("btrfs", "-q", "subvolume", "snapshot", "-r", mnt / "subvol", mnt / "snap")
    stream = send(mnt / "snap", tmp_path / "send.data")
    (mnt / "foo").mkdir()
    (mnt / "foobar").mkdir()
    run("mount", "-t", "tmpfs", "tmpfs", mnt / "foo")
    try:
        for d in ("foo/bar", "foo/bar-btrfs", "foo/bar-kernel"):
            (mnt / d).mkdir()
        # btrfs receive refuses a tmpfs (and a directory of it), not foobar beside it
        for d in ("foo", "foo/bar-kernel"):
            progs = subprocess.run(["btrfs", "receive", "-f", str(stream), str(mnt / d)],
                                   capture_output=True, check=False, timeout=60)
            assert progs.returncode != 0, d
        (mnt / "foobar-kernel").mkdir()
        kernel_receive(stream, mnt / "foobar-kernel")
        want = tree_manifest(mnt / "foobar-kernel/snap", ignore_root_mtime=True)
        assert not diff_manifests(tree_manifest(mnt / "snap", ignore_root_mtime=True), want)
        # ours: foobar is on DEST's btrfs (the longest mount prefix 'foo' is not its mount)
        _ours(stream, mnt / "foobar")
        got = mnt / "foobar/snap"
        assert got.stat().st_ino == 256  # a subvolume
        assert not diff_manifests(want, tree_manifest(got, ignore_root_mtime=True))
        assert run("btrfs", "property", "get", got, "ro").strip() == "ro=true"
        # on the tmpfs a directory (our dir backend), or with --backend btrfs one line
        _ours(stream, mnt / "foo/bar")
        assert (mnt / "foo/bar/.btrdelta-subvols.json").is_file()
        assert not diff_manifests(want, tree_manifest(mnt / "foo/bar/snap",
                                                      ignore_root_mtime=True))
        proc = _cli("receive", "--backend", "btrfs", "-f", str(stream), str(mnt / "foo/bar-btrfs"))
        err = proc.stderr.decode(errors="replace").strip()
        assert proc.returncode != 0, err
        assert len(err.splitlines()) == 1, err
        assert "not on btrfs" in err
        assert os.listdir(mnt / "foo/bar-btrfs") == []
    finally:
        run("umount", mnt / "foo")


def _show(subvol: Path) -> dict[str, str]:
    """`btrfs subvolume show`: its "Key: value" lines (and "WARNING" for any warning)."""
    proc = subprocess.run(["btrfs", "subvolume", "show", str(subvol)], capture_output=True,
                          check=True, timeout=60)
    out: dict[str, str] = {}
    for line in (proc.stdout + proc.stderr).decode().splitlines():
        key, sep, value = line.strip().partition(":")
        if "WARNING" in line:
            out["WARNING"] = line
        elif sep:
            out[key] = value.strip()
    return out


@pytest.mark.btrfs
def test_received_subvolumes_keep_ro_and_received_uuid_progs_050_051(
        tmp_path: Path, targets: Targets) -> None:
    require_btrfs()
    src = targets.scratch_btrfs / "progs-050"
    src.mkdir()
    run("btrfs", "-q", "subvolume", "create", src / "subvol1")
    (src / "subvol1/file").write_bytes(b"\0" * 10240)
    run("btrfs", "-q", "subvolume", "snapshot", "-r", src / "subvol1", src / "snap1")
    (src / "subvol1/file-new").write_bytes(b"\0" * 1024)
    run("btrfs", "-q", "subvolume", "snapshot", "-r", src / "subvol1", src / "snap2")
    s1 = send(src / "snap1", tmp_path / "send1.stream")
    s2 = send(src / "snap2", tmp_path / "send2.stream", parent=src / "snap1")
    shown: dict[str, dict[str, str]] = {}
    for key, fs in (("kernel", targets.kernel), ("ours", targets.ours_btrfs)):
        dst = fs / "progs-050"
        dst.mkdir()
        for s in (s1, s2):  # -m: parents looked up below the filesystem's top
            if key == "kernel":
                kernel_receive(s, dst, "-m", str(fs))
            else:
                proc = _cli("receive", "-f", str(s), "-m", str(fs), str(dst))
                assert proc.returncode == 0, proc.stderr
        info = _show(dst / "snap2")
        assert info["Received UUID"] == _show(src / "snap2")["UUID"], key
        assert "readonly" in info["Flags"], key
        assert "WARNING" not in info, (key, info)  # 051: no rw subvolume with a received UUID
        shown[key] = info
        # 050: ro -> rw refused while the received UUID is set, unless forced
        flip = subprocess.run(["btrfs", "property", "set", str(dst / "snap2"), "ro", "false"],
                              capture_output=True, check=False, timeout=60)
        assert flip.returncode != 0, key
        assert b"received_uuid" in flip.stderr, (key, flip.stderr)
        run("btrfs", "property", "set", "-f", dst / "snap2", "ro", "false")
        after = _show(dst / "snap2")
        assert "WARNING" not in after, (key, after)
        shown[key + "-rw"] = after
    assert shown["ours"]["Send transid"] == shown["kernel"]["Send transid"]
    assert shown["ours-rw"]["Received UUID"] == shown["kernel-rw"]["Received UUID"]
    assert shown["ours-rw"]["Flags"] == shown["kernel-rw"]["Flags"]


@pytest.mark.btrfs
def test_send_and_receive_between_clones_of_one_filesystem_fstests_314(
        tmp_path: Path, targets: Targets) -> None:
    """Two mounted copies of one btrfs image: the same fsid, the same subvolume UUIDs (the
    second mounted gets a temporary fsid). Parents are found on DEST's own copy."""
    require_btrfs()
    if not Path("/sys/fs/btrfs/features/temp_fsid").exists():
        pytest.skip("the kernel has no temp_fsid")
    src = targets.scratch_btrfs / "fst-314"
    run("btrfs", "-q", "subvolume", "create", src)
    run("xfs_io", "-f", "-c", "pwrite -S 0x61 0 9000", src / "foo")
    run("btrfs", "-q", "subvolume", "snapshot", "-r", src, src.with_name("fst-314-snap1"))
    run("xfs_io", "-c", "pwrite -S 0x62 4096 9000", src / "foo")
    run("cp", "--reflink=always", src / "foo", src / "bar")
    run("btrfs", "-q", "subvolume", "snapshot", "-r", src, src.with_name("fst-314-snap2"))
    s1 = send(src.with_name("fst-314-snap1"), tmp_path / "1")
    s2 = send(src.with_name("fst-314-snap2"), tmp_path / "2", parent=src.with_name("fst-314-snap1"))
    images = [tmp_path / "a.img", tmp_path / "b.img"]
    mnts = [tmp_path / "m1", tmp_path / "m2"]
    devs: list[str] = []
    try:
        with open(images[0], "wb") as f:
            f.truncate(256 << 20)
        devs.append(run("losetup", "-f", "--show", images[0]).strip())
        run("mkfs.btrfs", "-q", "-f", devs[0])
        for m in mnts:
            m.mkdir()
        run("mount", devs[0], mnts[0])
        for key in ("k", "o"):
            (mnts[0] / key).mkdir()
        kernel_receive(s1, mnts[0] / "k")
        _ours(s1, mnts[0] / "o")
        run("umount", mnts[0])
        run("cp", "--sparse=always", images[0], images[1])  # the clone: same fsid, same UUIDs
        devs.append(run("losetup", "-f", "--show", images[1]).strip())
        run("mount", devs[0], mnts[0])
        run("mount", devs[1], mnts[1])
        temp = [p for p in Path("/sys/fs/btrfs").glob("*/temp_fsid")
                if p.read_text().strip() == "1"]
        assert temp, "the clone was not mounted with a temporary fsid"
        want = tree_manifest(src.with_name("fst-314-snap2"), ignore_root_mtime=True)
        # the incremental into the clone mounted second, then into the first: the parent
        # each time is the copy on DEST's own filesystem, the other left as it was
        for m, other in ((mnts[1], mnts[0]), (mnts[0], mnts[1])):
            kernel_receive(s2, m / "k")
            _ours(s2, m / "o")
            for key in ("k", "o"):
                got = m / key / "fst-314-snap2"
                assert not diff_manifests(want, tree_manifest(got, ignore_root_mtime=True))
                assert got.stat().st_ino == 256  # a subvolume
            if m == mnts[1]:
                assert sorted(os.listdir(other / "o")) == ["fst-314-snap1"]
        # and sent from the clone (upstream's other direction), ours and the kernel's
        again = [tmp_path / "3o", send(mnts[1] / "o/fst-314-snap2", tmp_path / "3k",
                                       parent=mnts[1] / "o/fst-314-snap1")]
        proc = _cli("send", "-f", str(again[0]), "-p", str(mnts[1] / "o/fst-314-snap1"),
                    str(mnts[1] / "o/fst-314-snap2"))
        assert proc.returncode == 0, proc.stderr
        for s, base in zip(again, (None, s1), strict=True):
            dest = targets.kernel / f"fst-314-{s.name}"
            dest.mkdir()
            if base is None:  # our incremental names our full stream's subvolume
                full = tmp_path / "3o-full"
                proc = _cli("send", "-f", str(full), str(mnts[1] / "o/fst-314-snap1"))
                assert proc.returncode == 0, proc.stderr
                kernel_receive(full, dest)
            else:
                kernel_receive(base, dest)
            kernel_receive(s, dest)
            assert not diff_manifests(want, tree_manifest(dest / "fst-314-snap2",
                                                          ignore_root_mtime=True)), s.name
    finally:
        for m in mnts:
            if m.is_mount():
                run("umount", m)
        for dev in devs:
            run("losetup", "-d", dev)


def _popen_ours(kids: Children, stream: Path, dest: Path) -> subprocess.Popen[bytes]:
    return kids.start([sys.executable, "-m", "btrdelta", "receive", "-q", "-f", str(stream),
                       str(dest)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                      env={**os.environ, "TZ": "UTC"})


@pytest.mark.btrfs
def test_concurrent_incremental_receives_with_quotas_fstests_152(tmp_path: Path) -> None:
    """Quotas on; two subvolumes' snapshots received incrementally, four receives at a time
    (upstream: ten rounds, here three). Each parent is found on the filesystem itself by its
    UUID (recv2_* never received subvol2's first snapshot: upstream sends subvol1's to all)."""
    with btrfs_loop("512M") as mnt, Children() as kids:  # (the receives end before umount)
        run("btrfs", "quota", "enable", mnt)
        for sv in ("subvol1", "subvol2", "recv1_1", "recv1_2", "recv2_1", "recv2_2"):
            run("btrfs", "-q", "subvolume", "create", mnt / sv)
        for sv in ("subvol1", "subvol2"):
            (mnt / sv / ".snapshots").mkdir()
            (mnt / sv / "foo").touch()
            run("btrfs", "-q", "subvolume", "snapshot", "-r", mnt / sv, mnt / sv / ".snapshots/1")
        base = send(mnt / "subvol1/.snapshots/1", tmp_path / "base")
        for recv in ("recv1_1", "recv1_2", "recv2_1", "recv2_2"):
            _ours(base, mnt / recv)
        for i in range(1, 4):
            streams = {}
            for sv in ("subvol1", "subvol2"):
                (mnt / sv / f"file{i}").write_bytes(os.urandom(4096 * i))  # upstream: none
                run("btrfs", "-q", "subvolume", "snapshot", "-r", mnt / sv,
                    mnt / sv / f".snapshots/{i + 1}")
                streams[sv] = send(mnt / sv / f".snapshots/{i + 1}", tmp_path / f"{sv}.{i + 1}",
                                   parent=mnt / sv / f".snapshots/{i}")
            procs = [(recv, _popen_ours(kids, streams[f"subvol{recv[4]}"], mnt / recv))
                     for recv in ("recv1_1", "recv1_2", "recv2_1", "recv2_2")]
            for recv, proc in procs:
                _, err = proc.communicate(timeout=120)
                assert proc.returncode == 0, (i, recv, err)
        for recv in ("recv1_1", "recv1_2", "recv2_1", "recv2_2"):
            sv = f"subvol{recv[4]}"
            assert sorted(os.listdir(mnt / recv)) == ["1", "2", "3", "4"], recv
            for n in ("2", "3", "4"):
                ref = tree_manifest(mnt / sv / ".snapshots" / n, ignore_root_mtime=True)
                got = tree_manifest(mnt / recv / n, ignore_root_mtime=True)
                assert not diff_manifests(ref, got), (recv, n)
        qg = subprocess.run(["btrfs", "qgroup", "show", str(mnt)], capture_output=True,
                            check=False, timeout=60)
        assert qg.returncode == 0, qg.stderr
        listed = subprocess.run(["btrfs", "subvolume", "list", str(mnt)], capture_output=True,
                                text=True, check=True).stdout
        paths = {line.split()[1]: line.split(" path ", 1)[1] for line in listed.splitlines()}
        with open("/proc/mounts") as f:
            dev = next(line.split()[0] for line in f if line.split()[1] == str(mnt))
        run("umount", mnt)  # upstream's concern: the metadata (qgroups) left consistent
        # the device stays open a moment after umount when another mount namespace (a
        # process unshared meanwhile) still held a copy of the mount: EBUSY, try again
        for _ in range(40):
            check = subprocess.run(["btrfs", "check", "--readonly", "--check-data-csum", dev],
                                   capture_output=True, check=False, timeout=120)
            if b"Device or resource busy" not in check.stderr:
                break
            time.sleep(0.25)
        assert check.returncode == 0 or _only_source_qgroups_differ(
            (check.stdout + check.stderr).decode(), paths), (check.stdout + check.stderr).decode()


_QGROUP = re.compile(r"Counts for qgroup id: 0/(\d+) are different")


def _only_source_qgroups_differ(report: str, paths: dict[str, str]) -> bool:
    """Whether the only errors of `btrfs check` are qgroup counts of subvolumes the test
    made with `btrfs subvolume snapshot` (never a receive's): kernel 6.18 with btrfs-progs
    6.2 counts the exclusive bytes of subvol1/.snapshots/1 differently in about one run in
    ten under load (session 12: 1 of 15 with `btrfs receive` as the receiver, 1 of 15 with
    ours, 2 of 10 of this test; never on a received subvolume), not something a receiver
    does. Every other error still fails the test."""
    ids = _QGROUP.findall(report)
    if not ids or any(paths.get(i, "").startswith("recv") for i in ids):
        return False
    rest = [line for line in report.splitlines() if not (
        _QGROUP.search(line) or line.strip().startswith(("our:", "disk:", "diff:"))
        or "error(s) found" in line)]
    return not any(re.search(r"error|mismatch|corrupt|invalid|wrong|bad ", line, re.I)
                   for line in rest)


def _encoded(path: Path) -> bool:
    """Whether every extent of ``path`` is stored encoded (compressed), as filefrag sees it."""
    out = run("filefrag", "-v", path).splitlines()
    rows = [line for line in out if line.strip()[:1].isdigit()]
    assert rows, out
    return all("encoded" in line for line in rows)


#: the compression field of ENCODED_WRITE (lzo: 3 to 7, by sector size)
_CODES = {"zlib": {1}, "zstd": {2}, "lzo": {3, 4, 5, 6, 7}}


@pytest.mark.btrfs
def test_encoded_writes_of_every_algorithm_progs_053(tmp_path: Path, targets: Targets) -> None:
    """Files of zeros stored compressed by zlib, lzo and zstd (written under a compression
    property here, removed before the snapshot; compress-force upstream), sent with
    --compressed-data (v2) and as v1: received with the data kept encoded, with
    --force-decompress, into ext4, and the three in one DEST."""
    require_btrfs()
    mixed = {"btrfs": targets.ours_btrfs / "progs-053-mixed",
             "ext4": targets.ours_ext4 / "progs-053-mixed"}
    for d in mixed.values():
        d.mkdir()
    for alg, codes in _CODES.items():
        sv = targets.scratch_btrfs / f"progs-053-{alg}"
        run("btrfs", "-q", "subvolume", "create", sv)
        run("btrfs", "property", "set", sv, "compression", alg)
        (sv / "file1").write_bytes(b"\0" * (1 << 20))
        (sv / "file2").write_bytes(b"\0" * (500 << 10))
        run("sync")  # written compressed; the property gone again, as a mount option leaves none
        for p in (sv, sv / "file1", sv / "file2"):  # (the files inherited it)
            run("btrfs", "property", "set", p, "compression", "")
        snap = sv.with_name(f"progs-053-{alg}-snap")
        run("btrfs", "-q", "subvolume", "snapshot", "-r", sv, snap)
        assert _encoded(snap / "file1")
        v2 = send(snap, tmp_path / f"{alg}.v2", proto=2, compressed=True)
        v1 = send(snap, tmp_path / f"{alg}.v1")
        dump = _cli("dump", "-f", str(v2))
        assert dump.stdout == progs_dump(v2).stdout
        seen = {int(w.split("compression=")[1].split(",")[0].split(" ")[0])
                for w in dump.stdout.decode().splitlines() if w.startswith("encoded_write")}
        assert seen, alg
        assert seen <= codes, (alg, seen)
        want = tree_manifest(snap, ignore_root_mtime=True)
        runs = [("kernel", targets.kernel, v2, ()), ("kernel-force", targets.kernel, v2,
                                                     ("--force-decompress",)),
                ("btrfs", targets.ours_btrfs, v2, ()),
                ("btrfs-force", targets.ours_btrfs, v2, ("--force-decompress",)),
                ("btrfs-v1", targets.ours_btrfs, v1, ()), ("ext4", targets.ours_ext4, v2, ()),
                ("ext4-v1", targets.ours_ext4, v1, ())]
        encoded = {}
        for key, fs, stream, extra in runs:
            dest = fs / f"progs-053-{alg}-{key}"
            dest.mkdir()
            if key.startswith("kernel"):
                kernel_receive(stream, dest, *extra)
            else:
                our_receive(stream, dest, force_decompress=bool(extra))
            got = dest / snap.name
            assert not diff_manifests(want, tree_manifest(got, ignore_root_mtime=True)), key
            if not key.startswith("ext4"):
                encoded[key] = _encoded(got / "file1")
        # the kernel keeps the data compressed (its encoded write), and so do we
        assert encoded == {"kernel": True, "kernel-force": False, "btrfs": True,
                           "btrfs-force": False, "btrfs-v1": False}, (alg, encoded)
        for d in mixed.values():
            our_receive(v2, d)
    for alg in _CODES:
        want = tree_manifest(targets.scratch_btrfs / f"progs-053-{alg}-snap",
                             ignore_root_mtime=True)
        for d in mixed.values():
            got = d / f"progs-053-{alg}-snap"
            assert not diff_manifests(want, tree_manifest(got, ignore_root_mtime=True))


@pytest.mark.btrfs
def test_no_data_stream_clones_are_refused_as_btrfs_receive_refuses_progs_787(
        tmp_path: Path, targets: Targets) -> None:
    """btrfs-progs issue 787: a --no-data stream (update_extent in place of the data) fed
    to receive. Its CLONE of a reflinked copy reads a source it never wrote: btrfs
    receive fails ('failed to clone extents'); so do we, with one line, into btrfs and
    ext4, leaving nothing under the subvolume's name (we made the file up as a hole)."""
    require_btrfs()
    sv = targets.scratch_btrfs / "progs-787"
    run("btrfs", "-q", "subvolume", "create", sv)
    for d in ("lib64", "lib"):
        (sv / d).mkdir()
    run("xfs_io", "-f", "-c", "pwrite -S 0x61 0 128K", sv / "lib64/x.so")
    run("cp", "--reflink=always", sv / "lib64/x.so", sv / "lib/x.so")
    snap = sv.with_name("progs-787-snap")
    run("btrfs", "-q", "subvolume", "snapshot", "-r", sv, snap)
    stream = send(snap, tmp_path / "nodata", extra=("--no-data",))
    assert b"\nclone " in progs_dump(stream).stdout
    kdest = targets.kernel / "progs-787"
    kdest.mkdir()
    progs = subprocess.run(["btrfs", "receive", "-f", str(stream), str(kdest)],
                           capture_output=True, check=False, timeout=60)
    assert progs.returncode != 0
    assert b"failed to clone extents" in progs.stderr
    for fs in (targets.ours_btrfs, targets.ours_ext4):
        dest = fs / "progs-787"
        dest.mkdir()
        proc = _cli("receive", "-f", str(stream), str(dest))
        err = [line for line in proc.stderr.decode().splitlines() if "error" in line]
        assert proc.returncode == 8, proc.stderr
        assert len(err) == 1, proc.stderr
        assert "clone source 'lib64/x.so' has 0 bytes" in err[0]
        assert not (dest / "progs-787-snap").exists()


@pytest.mark.btrfs
def test_reverse_receive_clones_from_the_parent_by_its_uuid_progs_606(
        tmp_path: Path, targets: Targets) -> None:
    """btrfs-progs issue 606 (fixed in 6.10.1, PR 862): snapshots received on another
    filesystem, a writable snapshot of one changed there and sent back. The stream's
    parent and its CLONE source are the received UUID over there, the UUID of the
    original here: btrfs receive looked the clone source up by received UUID only ('clone:
    did not find source subvol', as 6.2 still fails). Ours finds both by UUID."""
    require_btrfs()
    home = targets.scratch_btrfs / "progs-606"
    home.mkdir()
    run("btrfs", "-q", "subvolume", "create", home / "profile")
    run("xfs_io", "-f", "-c", "pwrite -S 0x61 0 256K", home / "profile/a")
    run("btrfs", "-q", "subvolume", "snapshot", "-r", home / "profile", home / "@1")
    run("xfs_io", "-c", "pwrite -S 0x62 0 4K", home / "profile/a")
    run("btrfs", "-q", "subvolume", "snapshot", "-r", home / "profile", home / "@2")
    away = targets.kernel / "progs-606"
    away.mkdir()
    kernel_receive(send(home / "@1", tmp_path / "1"), away)
    kernel_receive(send(home / "@2", tmp_path / "2", parent=home / "@1"), away)
    run("btrfs", "-q", "subvolume", "snapshot", away / "@2", away / "rw")
    (away / "rw/a").rename(away / "rw/tmp")  # a's extents: now only in c and in the parent
    run("cp", "--reflink=always", away / "rw/tmp", away / "rw/c")
    (away / "rw/tmp").unlink()
    run("xfs_io", "-c", "pwrite -S 0x63 8K 4K", away / "rw/c")
    run("btrfs", "-q", "subvolume", "snapshot", "-r", away / "rw", away / "@3")
    back = send(away / "@3", tmp_path / "3", parent=away / "@2")
    assert b"\nclone " in progs_dump(back).stdout
    want = tree_manifest(away / "@3", ignore_root_mtime=True)
    progs_dest = home / "back-progs"
    progs_dest.mkdir()
    progs = subprocess.run(["btrfs", "receive", "-f", str(back), str(progs_dest)],
                           capture_output=True, check=False, timeout=60)
    if progs.returncode == 0:  # btrfs-progs >= 6.10.1
        assert not diff_manifests(want, tree_manifest(progs_dest / "@3",
                                                      ignore_root_mtime=True))
    else:
        assert b"did not find source subvol" in progs.stderr
    ours = home / "back-ours"
    ours.mkdir()
    _ours(back, ours)
    assert not diff_manifests(want, tree_manifest(ours / "@3", ignore_root_mtime=True))


@pytest.mark.btrfs
def test_clone_sources_without_a_parent_progs_375(tmp_path: Path, targets: Targets) -> None:
    """btrfs-progs issue 375: a directory split off into a subvolume of its own, whose
    snapshot is sent with the old snapshot as a clone source and no parent (send -c A0
    fB10): btrfs send fails ('parent determination failed'), --kernel says so in one
    line; ours sends it full with its files cloned from A0, which the kernel receives."""
    require_btrfs()
    top = targets.scratch_btrfs / "progs-375"
    top.mkdir()
    a = top / "A"
    run("btrfs", "-q", "subvolume", "create", a)
    (a / "fB").mkdir()
    (a / "other").write_bytes(os.urandom(50_000))
    for i in range(3):
        (a / "fB" / f"f{i}").write_bytes(os.urandom(100_000 + i))
    run("btrfs", "-q", "subvolume", "snapshot", "-r", a, top / "A0")
    (a / "fB").rename(a / "fB.bak")
    run("btrfs", "-q", "subvolume", "create", a / "fB")
    for f in (a / "fB.bak").iterdir():  # mv between subvolumes: a copy (reflinked)
        run("mv", f, a / "fB" / f.name)
    (a / "fB.bak").rmdir()
    run("btrfs", "-q", "subvolume", "snapshot", "-r", a / "fB", top / "fB10")
    progs = subprocess.run(["btrfs", "send", "-f", str(tmp_path / "k"), "-c", str(top / "A0"),
                            str(top / "fB10")], capture_output=True, check=False, timeout=60)
    if progs.returncode != 0:
        assert b"parent determination failed" in progs.stderr
        kern = _cli("send", "--kernel", "-f", str(tmp_path / "kk"), "-c", str(top / "A0"),
                    str(top / "fB10"))
        err = kern.stderr.decode(errors="replace").strip()
        assert kern.returncode != 0, err
        assert len(err.splitlines()) == 1, err
    base, split = tmp_path / "A0.ours", tmp_path / "fB10.ours"
    for argv in (("-f", str(base), str(top / "A0")),
                 ("-f", str(split), "-c", str(top / "A0"), str(top / "fB10"))):
        proc = _cli("send", *argv)
        assert proc.returncode == 0, proc.stderr
    dump = progs_dump(split).stdout.decode()
    assert dump.count("\nclone ") == 3, dump
    assert "\nwrite " not in dump, dump
    dest = targets.kernel / "progs-375"
    dest.mkdir()
    kernel_receive(base, dest)
    kernel_receive(split, dest)
    assert not diff_manifests(tree_manifest(top / "fB10", ignore_root_mtime=True),
                              tree_manifest(dest / "fB10", ignore_root_mtime=True))


@pytest.mark.btrfs
def test_parent_found_where_the_mount_reaches_it_progs_649(tmp_path: Path,
                                                          targets: Targets) -> None:
    """btrfs-progs issue 649 (open): the parent received twice on DEST's filesystem, first
    into a subvolume the mount of DEST does not reach (DEST's filesystem mounted with
    -o subvol). btrfs receive takes the first copy the UUID tree gives and fails ('parent
    subvol is not reachable from inside the root subvol'); ours takes the copy DEST's
    mount reaches. Where no copy is reachable, both fail (ours: one line, exit 6)."""
    require_btrfs()
    src = targets.scratch_btrfs / "progs-649"
    run("btrfs", "-q", "subvolume", "create", src)
    (src / "f").write_text("one\n")
    run("btrfs", "-q", "subvolume", "snapshot", "-r", src, src.with_name("progs-649-s1"))
    (src / "g").write_text("two\n")
    run("btrfs", "-q", "subvolume", "snapshot", "-r", src, src.with_name("progs-649-s2"))
    s1 = send(src.with_name("progs-649-s1"), tmp_path / "1")
    s2 = send(src.with_name("progs-649-s2"), tmp_path / "2", parent=src.with_name("progs-649-s1"))
    fs = targets.ours_btrfs
    for v in ("progs-649-a", "progs-649-k", "progs-649-o", "progs-649-none"):
        run("btrfs", "-q", "subvolume", "create", fs / v)
    kernel_receive(s1, fs / "progs-649-a")  # the first copy: unreachable from the mounts
    kernel_receive(s1, fs / "progs-649-k")
    _ours(s1, fs / "progs-649-o")
    at = {v: tmp_path / v for v in ("k", "o", "none")}
    try:
        for v, m in at.items():
            _mount_subvol(fs, f"progs-649-{v}", m)
        progs = subprocess.run(["btrfs", "receive", "-f", str(s2), str(at["k"])],
                               capture_output=True, check=False, timeout=60)
        if progs.returncode != 0:  # (the first copy found)
            assert b"not reachable" in progs.stderr
        _ours(s2, at["o"])
        assert not diff_manifests(tree_manifest(src.with_name("progs-649-s2"),
                                                ignore_root_mtime=True),
                                  tree_manifest(at["o"] / "progs-649-s2", ignore_root_mtime=True))
        none = _cli("receive", "-f", str(s2), str(at["none"]))
        err = none.stderr.decode(errors="replace").strip().splitlines()
        assert none.returncode == 6, err
        assert len([line for line in err if not line.startswith("At ")]) == 1, err
        assert os.listdir(at["none"]) == []
    finally:
        for m in at.values():
            if m.is_mount():
                run("umount", m)


@pytest.mark.btrfs
def test_snapshot_deleted_while_we_send_it_progs_041(tmp_path: Path, targets: Targets,
                                                     children: Children) -> None:
    """btrfs-progs misc-tests/041: deleting a snapshot the kernel is sending fails (EPERM
    while the send runs). Our send reads the tree, which the kernel lets go: deleted while
    our send is stopped on a full pipe, the snapshot stays readable through what the send
    holds open, and the stream is the whole snapshot (the kernel receives it as it was)."""
    require_btrfs()
    sv = targets.scratch_btrfs / "progs-041"
    run("btrfs", "-q", "subvolume", "create", sv)
    for i in range(12):
        (sv / f"file{i}").write_bytes(os.urandom(256 << 10))
    snap = sv.with_name("progs-041-snap1")
    run("btrfs", "-q", "subvolume", "snapshot", "-r", sv, snap)
    want = tree_manifest(snap, ignore_root_mtime=True)
    proc = children.start([sys.executable, "-m", "btrdelta", "send", "-f", "-", str(snap)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                          env={**os.environ, "TZ": "UTC"})
    assert proc.stdout is not None
    first = proc.stdout.read(4096)  # the send has started, and now waits on the full pipe
    assert first
    delete = subprocess.run(["btrfs", "subvolume", "delete", str(snap)], capture_output=True,
                            check=False, timeout=60)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert delete.returncode == 0, delete.stderr  # (the kernel's own send would refuse it)
    assert not snap.exists()
    stream = tmp_path / "s"
    stream.write_bytes(first + rest)
    dest = targets.kernel / "progs-041"
    dest.mkdir()
    kernel_receive(stream, dest)
    assert not diff_manifests(want, tree_manifest(dest / snap.name, ignore_root_mtime=True))


@pytest.mark.btrfs
def test_chrooted_receive_clones_from_an_older_snapshot_progs_5d4f3ea(
        tmp_path: Path, targets: Targets) -> None:
    """btrfs-progs commit 5d4f3ea9 (its reproducer): a file deleted after snap1 and
    reflinked back from snap1 before snap3; snap3 sent from snap2 with snap1 as a clone
    source, received with -C (chroot, where btrfs receive opened the clone source by its
    path outside the chroot and failed). Kernel, ours into btrfs and ext4. And -e (commit
    4b590938: one stream, or the first of two, then stop)."""
    require_btrfs()
    sv = targets.scratch_btrfs / "progs-5d4f3ea"
    run("btrfs", "-q", "subvolume", "create", sv)
    run("xfs_io", "-f", "-c", "pwrite -S 0x5d 0 192K", sv / "file")
    snaps = [sv.with_name(f"progs-5d4f3ea-snap{i}") for i in (1, 2, 3)]
    run("btrfs", "-q", "subvolume", "snapshot", "-r", sv, snaps[0])
    (sv / "file").unlink()
    run("btrfs", "-q", "subvolume", "snapshot", "-r", sv, snaps[1])
    run("cp", "--reflink=always", snaps[0] / "file", sv / "file")
    run("btrfs", "-q", "subvolume", "snapshot", "-r", sv, snaps[2])
    streams = [send(snaps[0], tmp_path / "1"), send(snaps[1], tmp_path / "2", parent=snaps[0]),
               send(snaps[2], tmp_path / "3", parent=snaps[1], extra=("-c", str(snaps[0])))]
    assert b"\nclone " in progs_dump(streams[2]).stdout
    for fs, receiver in ((targets.kernel, kernel_receive), (targets.ours_btrfs, None),
                         (targets.ours_ext4, None)):
        dest = fs / "progs-5d4f3ea"
        dest.mkdir()
        for s in streams:
            if receiver is not None:
                receiver(s, dest, "-C")
            else:  # (confined to DEST always: -C is ours by default)
                our_receive(s, dest)
        for snap in snaps:
            assert not diff_manifests(tree_manifest(snap, ignore_root_mtime=True),
                                      tree_manifest(dest / snap.name, ignore_root_mtime=True))
    both = tmp_path / "both"  # -e: a stream alone, and the first of two in a row
    both.write_bytes(streams[0].read_bytes() + streams[1].read_bytes())
    for fs in (targets.kernel, targets.ours_btrfs):
        for name, s in (("one", streams[0]), ("two", both)):
            dest = fs / f"progs-4b59093-{name}"
            dest.mkdir()
            if fs == targets.kernel:
                kernel_receive(s, dest, "-e")
            else:
                proc = _cli("receive", "-e", "-f", str(s), str(dest))
                assert proc.returncode == 0, proc.stderr
            assert os.listdir(dest) == [snaps[0].name], (fs, name)
