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
* misc-tests/017 and 036 feed `btrfs receive` (and ``--dump``) an empty stream, a short
  header, a bad magic and a header of version 0: refused, by us with one line.
* fstests btrfs/339: ``btrfs receive --dump`` of a stream another user owns (btrfs-progs
  opened it with O_NOATIME, refused to anyone but the owner).
"""

from __future__ import annotations

import io
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from btrdelta.send import send_stream
from btrdelta.stream import write_stream
from btrdelta.stream.records import Chmod, End, Mkfile, Subvol, Truncate, Utimes
from btrdelta.testing.loopfs import run
from btrdelta.testing.scenarios import kernel_receive, send
from btrdelta.tree.treesum import diff_manifests, tree_manifest
from tests.conftest import DATA, progs_dump, require_btrfs

from .conftest import Targets

PROGS_016 = DATA / "streams" / "upstream" / "multi-clone-src-v4.8.2.stream.xz"
#: the time every inode of PROGS_016 has (2016-11-09T00:07:00Z), in ns
_T_016 = 1478650020 * 10**9
#: the streams' names, in order
_SNAPS_016 = ["subv-snap1_2", "subv-snap1_3", "subv-snap2_2", "subv-snap2_3"]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _cli(*argv: str, stdin: bytes | None = None,
         prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*prefix, sys.executable, "-m", "btrdelta", *argv], input=stdin,
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
        ours = _cli("dump", "-f", str(stream), prefix=tuple(NOBODY))
        assert ours.returncode == 0, ours.stderr
        want = (DATA / "streams" / "inversion-030.B.v2.dump").read_bytes()
        assert ours.stdout == want
    finally:
        shutil.rmtree(world, ignore_errors=True)
