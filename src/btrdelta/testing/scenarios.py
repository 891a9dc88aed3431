"""Send/receive scenarios from upstream tests (xfstests btrfs/*, btrfs-progs misc-tests).

Each :class:`Scenario` is two bash recipes run inside a fresh subvolume on a loop-mounted
btrfs: ``a`` builds the first snapshot, ``b`` changes it into the second (a line ``REMOUNT``
in ``b`` unmounts and mounts the filesystem again, to make btrfs reuse inode numbers).
:func:`make_streams` runs them and lets the *kernel* write the streams, which are then the
real data every stream test is checked on. Recipes follow the upstream tests they are
named after (the number in a name is the upstream test's).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .loopfs import run

__all__ = ["SCENARIOS", "Scenario", "SnapshotPair", "kernel_receive", "make_snapshots", "send"]


@dataclass(frozen=True)
class Scenario:
    """One A -> B recipe."""

    name: str
    a: str
    b: str
    #: only meaningful on btrfs (uses subvolumes), not buildable in plain directories
    btrfs_only: bool = False


S = Scenario

SCENARIOS: list[Scenario] = [
    S("inversion-030",
      "mkdir -p a/b/c/d a/b/c2; echo hello > a/b/c/file.txt",
      "mv a/b/c/d a/b/c2/d2; mv a/b/c a/b/c2/d2/cc; echo more >> a/b/c2/d2/cc/file.txt"),
    S("child-lower-ino-039",
      "mkdir -p a/b; mkdir d; mkdir a/b/c; mv d a/b/c; mkdir e; mkdir -p a/b/f/g; mv e a/b/f/g",
      "mv a/b/c a/b/x; mv a/b/x/d a/b/x/y; mv a/b/f a/b/w; mv a/b/w/g/e a/b/w/g/z"),
    S("rmdir-orphan-043",
      "mkdir -p a/b/c/x a/b/y a/b/c/x2; echo t > a/b/c/foo.txt",
      "rm a/b/c/foo.txt; mv a/b/y a/b/YY; mv a/b/c/x a/b/YY; mv a/b/c/x2 a/X2; rmdir a/b/c"),
    S("dir-rotation-083",
      "mkdir a b c; touch a/file; mkdir d e; touch e/file2; mkdir f",
      "mv c x; mv a x/y; mv b a; mv f f2; mv e f2/e2; mv d e"),
    S("new-dir-takes-name-077",
      "mkdir -p merlin/RC/OSD/Source Z/Z2",
      "mkdir OSD; mv merlin/RC/OSD OSD/OSD-Plane_788; mv OSD merlin/RC"),
    S("dir-vs-subvol-054",
      "mkdir testdir; btrfs -q subvolume create first_subvol",
      "rmdir testdir; btrfs -q subvolume create testdir;"
      " btrfs -q subvolume delete first_subvol; mkdir first_subvol",
      btrfs_only=True),
    S("file-to-dir-221",
      "echo data > x; mkdir y; touch y/inner",
      "rm x; mkdir x; touch x/f; rm -r y; echo now-a-file > y"),
    S("name-rotation-links-144",
      "touch f1 f2 f3; echo one > f1; echo two > f2",
      "mv f3 f4; ln f2 f5; mv f2 f3; mv f1 f2"),
    S("dir-renamed-file-takes-name-145",
      "mkdir -p dir1/dir2 dir1/dir3/dir4; touch dir1/dir2/file1 dir1/dir2/file3 dir1/dir3/file22",
      "mv dir1/dir2/file3 dir1/dir3/dir4/file33; mv dir1/dir2/file1 dir1/dir3/dir4/file11;"
      " mv dir1/dir3 dir1/file3; mv dir1/file3/file22 dir1/dir3"),
    S("link-in-moving-dir-147",
      "mkdir -p dir1/dir2/dir3/dir4 dir5; touch dir1/dir2/dir3/file1",
      "mkdir dir1/dir6; mv dir5 dir1/dir2/dir3/dir4/dir55;"
      " ln dir1/dir2/dir3/file1 dir1/dir2/dir3/dir4/file11;"
      " mv dir1/dir2/dir3/dir4 dir1/dir6/dir44; mv dir1/dir2/dir3/file1 dir1/dir2/dir3/dir4"),
    S("links-names-reused-241",
      "touch file1 file2 file3; mkdir A; ln file3 A/hard_link",
      "mv file1 A/file1; mv A/hard_link tmp; mv file2 A/hard_link; mv A B; ln B/hard_link A"),
    S("name-location-swap-222",
      "touch a b; mkdir testdir; mv a testdir/a",
      "mv testdir/a a2; touch testdir/a; mv b b2; ln a2 b; mv testdir testdir_2; mv a2 testdir"),
    S("many-links-272",
      "touch foo; for i in $(seq 1 300); do ln foo h$i; done",
      "for i in $(seq 1 300); do rm h$i; done; for i in $(seq 151 300); do ln foo h$i; done"),
    S("ino-reuse-133",
      "mkdir a1 a2",
      "rmdir a2\nREMOUNT\ntouch a2"),
    S("hole-punch-016",
      'xfs_io -f -c "pwrite -S 0xaa 0 1M" foo',
      'xfs_io -c "fpunch 256K 256K" foo; xfs_io -c "pwrite -S 0xbb 2M 64K" foo'),
    S("prealloc-punch-169",
      'xfs_io -f -c "falloc -k 0 4M" -c "pwrite -S 0xea 0 1M" foobar;'
      ' xfs_io -f -c "pwrite -S 0xab 0 500K" -c "falloc -k 1200K 800K" bar',
      'xfs_io -c "fpunch 1M 2M" foobar; xfs_io -c "fpunch 0 500K" bar'),
    S("write-into-prealloc-046",
      'xfs_io -f -c "falloc -k 0 16M" foo',
      'xfs_io -c "pwrite -S 0x01 -b 9216 1619021 9216" -c "pwrite -S 0x02 1234567 1121"'
      ' -c "pwrite -S 0x03 8000000 70000" foo'),
    S("shrink-grow-sparse-034",
      'xfs_io -f -c "truncate 100M" -c "pwrite -S 0xf0 1M 4K" -c "pwrite -S 0xf0 50M 4K" foo;'
      ' xfs_io -f -c "truncate 1G" sparse',
      'xfs_io -c "truncate 3882008" foo;'
      ' xfs_io -c "pwrite -S 0xab 0 64K" -c "pwrite -S 0xcd 512M 64K" sparse'),
    S("reflinks-same-file-200",
      'xfs_io -f -c "pwrite -S 0xb1 0 128K" -c "reflink foo 0 128K 128K" foo;'
      ' xfs_io -f -c "pwrite -S 0xab 0 128K" -c "pwrite -S 0xcd 128K 128K"'
      ' -c "pwrite -S 0xef 256K 256K" -c "pwrite -S 0x1a 512K 512K" bar',
      'xfs_io -c "pwrite -S 0xf2 512K 64K" -c "reflink foo 448K 192K 192K" foo;'
      ' xfs_io -c "reflink bar 64K 1M 960K" -c "reflink bar 0K 512K 256K"'
      ' -c "reflink bar 512K 128K 256K" -c "pwrite -S 0x73 384K 640K" bar'),
    S("reflink-deep-paths-108",
      'mkdir -p d1/d2; xfs_io -f -c "pwrite -S 0xaa 0 100K" foo;'
      ' cp --reflink=always foo d1/d2/bar;'
      ' xfs_io -c "pwrite -S 0xbb 50K 10K" -c "pwrite -S 0xcc 90K 10K" -c "fpunch 70K 10K" foo',
      'cp --reflink=always d1/d2/bar d1/baz; xfs_io -c "pwrite -S 0xdd 0 4K" d1/baz'),
    S("orphan-dir-early-W5",
      'xfs_io -f -c "pwrite -S 0x11 0 256K" foo',
      'mkdir dir; mv foo dir; cp --reflink=always dir/foo dir/foo2'),
    S("xattrs",
      "echo x > f; mkdir d; ln -s f l; setfattr -n user.a -v 1 f; setfattr -n user.b -v two d;"
      " setfattr -n user.bin -v 0x00ff0a f; setfattr -h -n trusted.t -v ok l",
      "setfattr -n user.a -v changed f; setfattr -x user.b d; setfattr -n user.new -v ''"
      " d; setfattr -n 'user.sp ace' -v 'va lue' f"),
    S("capabilities-214",
      "printf '#!/bin/sh\\n' > tool; chmod 755 tool; setcap cap_net_raw+ep tool",
      "chown 1000:1000 tool; setcap cap_net_raw,cap_net_admin+ep tool; chmod 750 tool"),
    S("special-files",
      "mknod cdev c 1 3; mknod bdev b 7 200; mkfifo fifo; ln -s target link;"
      " python3 -c 'import socket; s=socket.socket(socket.AF_UNIX); s.bind(\"sock\")'",
      "rm cdev; mknod cdev c 4 64; mv fifo fifo2; ln -sf other link; chown 1:2 bdev"),
    S("metadata-changes",
      "echo a > f; mkdir d; touch -d '2001-02-03 04:05:06.123456789' f;"
      " touch -h -d '1960-01-01 00:00:00' d; chmod 4751 f; chown 12:34 d",
      "chmod 0600 f; chown 1001:1002 f; touch -d '2030-01-01 00:00:00.5' d; chmod 1777 d"),
    S("odd-names-W8",
      "mkdir 'sp ace'; printf x > 'sp ace/new\nline'; printf y > \"$(printf 'tab\\tx')\";"
      " printf z > \"$(printf 'bin\\377\\001')\"; touch 'é-utf8' 'back\\\\slash'",
      "mv 'sp ace' 'sp  ace2'; printf more >> 'é-utf8';"
      " ln -s \"$(printf 'tgt\\nnl')\" 'sym link'"),
    S("long-paths-051",
      "p=.; for i in $(seq 1 14); do p=$p/$(printf 'd%.0s' $(seq 1 200))$i; done;"
      " mkdir -p $p; echo deep > $p/file",
      "p=.; for i in $(seq 1 14); do p=$p/$(printf 'd%.0s' $(seq 1 200))$i; done;"
      " echo deeper >> $p/file; mv $p $(dirname $p)/renamed"),
    S("compressible-data-W6",
      "seq 1 200000 > text; head -c 300000 /dev/urandom > rand;"
      " xfs_io -f -c 'pwrite -S 0x61 0 1M' big; printf small > inline",
      "seq 5 150000 > text; xfs_io -c 'pwrite -S 0x62 300K 200K' big; printf tiny2 > inline;"
      " cp --reflink=always big big-clone; truncate -s 100K rand"),
    S("fileattr-chattr",
      "echo a > f; echo b > g; mkdir d",
      "chattr +A f; chattr +d g; chattr +A d"),
    S("empty-and-truncate",
      "touch empty; printf 1234567890 > shrink; touch grow",
      "truncate -s 3 shrink; truncate -s 1M grow; rm empty; mkdir empty"),
]
del S


@dataclass
class SnapshotPair:
    """The two read-only snapshots a scenario produced on the source filesystem."""

    scenario: Scenario
    a: Path
    b: Path


def _mount_source(mnt: Path) -> tuple[str, str]:
    with open("/proc/mounts") as f:
        for line in f:
            dev, where, _fstype, opts, *_ = line.split()
            if where == str(mnt):
                return dev, opts
    raise RuntimeError(f"{mnt} is not mounted")


def _bash(script: str, cwd: Path) -> None:
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        capture_output=True,
        check=False,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"recipe failed ({proc.returncode}): {script!r}: {proc.stderr.decode(errors='replace')}"
        )


def make_snapshots(mnt: Path, scenario: Scenario, tag: str = "") -> SnapshotPair:
    """Run ``scenario`` in a new subvolume of the btrfs at ``mnt``; snapshot A and B (ro)."""
    name = scenario.name + tag
    vol = mnt / f"vol-{name}"
    run("btrfs", "-q", "subvolume", "create", vol)
    _bash(scenario.a, vol)
    run("sync")
    a = mnt / f"{name}-A"
    b = mnt / f"{name}-B"
    run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, a)
    for i, part in enumerate(scenario.b.split("\nREMOUNT\n")):
        if i:
            dev, opts = _mount_source(mnt)
            run("umount", mnt)
            run("mount", "-o", opts, dev, mnt)
        _bash(part, vol)
    run("sync")
    run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, b)
    return SnapshotPair(scenario, a, b)


def send(snapshot: Path, out: Path, *, parent: Path | None = None, proto: int = 1,
         compressed: bool = False, extra: tuple[str, ...] = ()) -> Path:
    """Write the kernel's send stream of ``snapshot`` (incremental from ``parent``) to ``out``."""
    cmd: list[str | os.PathLike[str]] = ["btrfs", "-q", "send", "--proto", str(proto)]
    if compressed:
        cmd.append("--compressed-data")
    if parent is not None:
        cmd += ["-p", parent]
    cmd += [*extra, "-f", out, snapshot]
    run(*cmd)
    return out


def kernel_receive(stream: Path, dest: Path, *extra: str) -> None:
    """The oracle receiver: ``btrfs receive -f stream dest``; raises with its stderr."""
    proc = subprocess.run(["btrfs", "receive", *extra, "-f", str(stream), str(dest)],
                          capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"btrfs receive {stream.name}: {proc.stderr.decode(errors='replace').strip()}"
        )
