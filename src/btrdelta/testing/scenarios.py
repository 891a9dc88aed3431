"""Send/receive scenarios from upstream tests (xfstests btrfs/*, btrfs-progs misc-tests).

Each :class:`Scenario` is two bash recipes run inside a fresh subvolume on a loop-mounted
btrfs: ``a`` builds the first snapshot, ``b`` changes it into the second (a line ``REMOUNT``
in ``b`` unmounts and mounts the filesystem again, to make btrfs reuse inode numbers).
A scenario may also unlink files in a snapshot while they are open (``a_held``, ``b_held``:
upstream's inodes without links, btrfs/168 and 278): those descriptors stay open as long as
the filesystem is mounted, so the kernel sends the snapshots with the unlinked inodes in them.
``a_open`` keeps a file open in the live subvolume while snapshot A is taken (an O_TMPFILE:
an orphan inode in both snapshots, upstream's btrfs/058). ``clones`` adds a snapshot C, a
clone source for B's stream besides its parent A (btrfs/117). ``after`` runs once the
read-only snapshots exist (btrfs/187: extents deduplicated between them, a balance).
:func:`make_streams` runs them and lets the *kernel* write the streams, which are then the
real data every stream test is checked on. Recipes follow the upstream tests they are
named after (the number in a name is the upstream test's: xfstests' btrfs/NNN, or with
``misc`` btrfs-progs' tests/misc-tests/NNN; a hex suffix is the Linux commit whose message
holds the reproducer, after ``progs-`` a btrfs-progs commit's; ``btrbkNNN`` a btrbk issue's
recipe).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .loopfs import held, hold, run
from .recipe import Scenario
from .scenarios_beyond import BEYOND
from .scenarios_corners import CORNERS, STRESS
from .scenarios_subcases import SUBCASES

__all__ = ["MATRIX_SCENARIOS", "SCENARIOS", "Scenario", "SnapshotPair", "kernel_receive",
           "make_snapshots", "send"]

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
    S("file-to-dir-same-name",
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
    S("name-location-swap-221",
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
    # -- session 7: more of the catalogue (send-scenarios.md §4), after the upstream tests --
    S("unaligned-prealloc-truncate-025",
      'xfs_io -f -c "truncate 819200" foo; sync; xfs_io -c "falloc -k 819200 667648" foo; sync;'
      ' xfs_io -c "pwrite 1482752 2978" foo; sync',
      'xfs_io -c "truncate 883305" foo'),
    S("compressed-data-offset-038",
      'xfs_io -f -c "truncate 118811" -c "pwrite -S 0x0d -b 39987 92267 39987" foo;'
      ' cp --reflink=always foo bar',
      'xfs_io -c "pwrite -S 0x3e -b 80000 200000 80000" foo; sync;'
      ' xfs_io -c "pwrite -S 0xdc -b 10000 250000 10000" -c "pwrite -S 0xff -b 10000 300000 10000"'
      ' foo; cp --reflink=always foo baz'),
    S("outdated-paths-044",
      "umask 0; mkdir -p a/b/c/d/e; mkdir a/b/c/f; echo 'ola ' > a/b/c/d/e/file.txt;"
      " chmod 0777 a/b/c/d/e",
      "echo mundo >> a/b/c/d/e/file.txt; mv a/b/c/d/e/file.txt a/b/c/d/e/file2.txt;"
      " mv a/b/c/f a/b/f2; mv a/b/c/d/e a/b/f2/e2; mv a/b/c a/b/c2; mv a/b/c2/d a/b/c2/d2;"
      " chmod 0700 a/b/f2/e2"),
    S("extref-only-050",
      "mkdir -p home/john/series; touch home/john/series/foobar; python3 -c '"
      "import os\nfor i in range(1, 2551): os.link(\"home/john/series/foobar\","
      " \"home/john/series/foobar_link_%04d\" % i)';"
      " ln home/john/series/foobar home/john/series/final_foobar_name;"
      " rm home/john/series/foobar home/john/series/foobar_link_*",
      "mv home/john/series/final_foobar_name home/john/renamed;"
      " ln home/john/renamed home/john/series/again; echo data >> home/john/renamed"),
    S("xattrs-past-path-max-053",
      "touch foobar; setfattr -n user.xattr_name_1 -v \"$(printf 'A%.0s' $(seq 6000))\" foobar",
      "setfattr -n user.xattr_name_1 -v \"$(printf 'Z%.0s' $(seq 6666))\" foobar;"
      " setfattr -n user.xattr_name_2 -v \"$(printf 'U%.0s' $(seq 5555))\" foobar",
      large_xattrs=True),
    S("clone-compressed-094",
      'xfs_io -f -c "pwrite -S 0xaa 64K 128K" -c fsync foo;'
      ' xfs_io -c "pwrite -S 0xbb 64K 112K" -c fsync foo;'
      ' xfs_io -c "pwrite -S 0xcc 180K 12K" -c fsync foo',
      'touch bar; xfs_io -c "reflink foo 176K 176K 4K" bar'),
    S("clone-lower-offset-097",
      'xfs_io -f -c "pwrite -S 0xaa 128K 64K" foo',
      'xfs_io -c "reflink foo 144K 0 16K" -c "reflink foo 176K 16K 16K" foo'),
    S("reflink-compressed-overwrite-109",
      'xfs_io -f -c "pwrite -S 0xaa 0K 100K" -c fsync -c "pwrite -S 0xbb 0K 40K"'
      ' -c "pwrite -S 0xcc 100K 100K" foo; cp --reflink=always foo bar',
      'xfs_io -c "pwrite -S 0xdd 60K 20K" bar; cp --reflink=always bar baz;'
      ' xfs_io -c "reflink foo 100K 0 64K" baz'),
    S("inode-switch-127",
      "mkdir -p case_1/d/p1 case_1/p1 case_2/a case_2/d case_2/e case_2/f case_2/ance"
      " case_2/d/ance case_2/a/c; mv case_2/e case_2/d/ance; mv case_2/f case_2/d/ance;"
      " mv case_2/ance case_2/d/ance; mkdir -p case_3/d case_3/a case_3/waiting_dir"
      " case_3/pre/ance case_3/d/ance case_3/a/c; mv case_3/waiting_dir case_3/d/ance;"
      " mkdir -p case_4/tmp case_4/below_ance case_4/pre/wait_dir case_4/desc case_4/ance;"
      " mv case_4/below_ance case_4/ance; mkdir case_4/other_dir",
      "mv case_1/d/p1 case_1/p1/; mv case_1/p1 case_1/d/;"
      " mv case_2/a/c case_2; mv case_2/d/ance case_2/c; mv case_2/c/ance/ance case_2/d;"
      " mv case_2/c/ance/f case_2; mv case_2/c/ance/e case_2/f;"
      " mv case_3/d/ance case_3/a; mv case_3/a/c case_3; mv case_3/a/ance/waiting_dir case_3/c;"
      " mv case_3/pre/ance case_3/d; mv case_3/pre case_3/c/waiting_dir;"
      " mv case_4/other_dir case_4/tmp; mv case_4/ance/below_ance case_4/tmp/other_dir;"
      " mv case_4/pre/wait_dir case_4/tmp/other_dir;"
      " mv case_4/pre case_4/tmp/other_dir/below_ance;"
      " mv case_4/desc case_4/tmp/other_dir/wait_dir;"
      " mv case_4/ance case_4/tmp/other_dir/wait_dir/desc"),
    S("heavily-deduped-130",
      'r=(); for i in $(seq 1 63); do r+=(-c "reflink foobar 0 $((i * 128))K 128K"); done;'
      ' xfs_io -f -c "pwrite -S 0xab 0 128K" "${r[@]}" foobar',
      'r=(); for i in $(seq 64 95); do r+=(-c "reflink foobar 128K $((i * 128))K 128K"); done;'
      ' xfs_io -c "pwrite -S 0xcd 4K 8K" "${r[@]}" -c "reflink foobar 4K 1000K 8K" foobar'),
    S("ino-reuse-dirs-134",
      "mkdir dir257 dir258 dir259; mv dir257 dir258/dir257",
      "mv dir258/dir257 dir257; rmdir dir258 dir259\nREMOUNT\n"
      "touch file258; mkdir new_dir259; mv dir257 new_dir259/dir257"),
    S("holes-preserved-137",
      'xfs_io -f -c "pwrite -S 0xaa -b 64k 0 64K" foo;'
      ' xfs_io -f -c "pwrite -S 0xaa -b 64k 0 64K" -c "pwrite -S 0xbb -b 64k 1088K 64K" bar',
      'xfs_io -c "pwrite -S 0xbb -b 64k 1088K 64K" foo;'
      ' xfs_io -c "pwrite -S 0xcc -b 64k 1088K 64K" bar'),
    S("shared-sector-at-zero-149",
      'xfs_io -f -d -c "pwrite -S 0xab 0 4K" foobar',
      'xfs_io -c "reflink foobar 0 8K 4K" foobar'),
    S("eof-block-clone-189",
      'for f in foo:0xb1 bar:0xc7 baz:0x4d zoo:0xe2; do'
      ' xfs_io -f -c "pwrite -S ${f#*:} 0 2M" ${f%:*}; done',
      'xfs_io -c "reflink bar 1600K 640K 128K" bar; xfs_io -c "reflink bar 1600K 0 128K" zoo;'
      ' xfs_io -c "truncate 710K" bar'),
    S("dedupe-same-file-191",
      'xfs_io -f -s -c "pwrite -S 0xb8 -b 64K 0 512K" foo;'
      ' xfs_io -c "pwrite -S 0xb8 512K 512K" foo',
      'xfs_io -f -c "pwrite -S 0xb8 0 1M" bar; xfs_io -c "dedupe bar 0 0 512K" foo;'
      ' xfs_io -c "dedupe foo 0 512K 512K" foo'),
    S("capabilities-235",
      "touch foo bar baz; setcap cap_net_raw=p foo",
      "touch foo2 bar2 baz2; setcap cap_net_raw=p bar; setcap cap_sys_nice=ep foo2"),
    S("compressed-partial-share-281",
      'xfs_io -f -c "pwrite -S 0xab 0 65K" foo; xfs_io -f -c "pwrite -S 0xcd 0 128K" bar;'
      ' xfs_io -c "reflink bar 0 0 64K" foo',
      'xfs_io -f -c "reflink bar 64K 0 64K" -c "pwrite -S 0xef 64K 1K" baz;'
      ' xfs_io -c "reflink foo 0 64K 64K" bar'),
    S("best-clone-source-283",
      'xfs_io -f -c "pwrite -S 0xab -b 128K 0 128K" foo; cp --reflink=always foo bar;'
      ' cp --reflink=always foo baz; xfs_io -c "pwrite -S 0xcd -b 64K 64K 64K" foo',
      'cp --reflink=always baz qux; xfs_io -c "pwrite -S 0xee 0 4K" bar'),
    S("trailing-hole-303",  # upstream: 1G file, write at 512M (a quarter here, for time)
      'xfs_io -f -c "truncate 256M" foobar',
      'xfs_io -c "pwrite -S 0xab -b 64K 0 64K" -c "pwrite -S 0xcd -b 64K 128M 64K" foobar'),
    S("compressed-extent-merge-312",
      'xfs_io -f -c "pwrite -S 0xab 111K 30K" foo',
      'xfs_io -c "pwrite -S 0xcd 120K 8K" foo; xfs_io -c "pwrite -S 0xef 160K 4K" foo'),
    S("unaligned-eof-clone-319",
      'xfs_io -f -d -c "pwrite -S 0xab -b 1048581 0 1048581" foo; cp --reflink=always foo bar',
      'cp --reflink=always foo baz; xfs_io -c "pwrite -S 0x11 1048581 10" bar'),
    S("shrunk-by-clone-322",
      'xfs_io -f -d -c "pwrite -S 0xab -b 128K 0 128K" -c "pwrite -S 0xcd -b 131077 128K 131077"'
      ' foo; xfs_io -f -c "pwrite 0 1M" bar',
      'xfs_io -c "truncate 0" -c "reflink foo" bar'),
    S("dirs-recreated-019",
      "mkdir test; touch test/baz test/blah; mkdir test/foo; touch test/foo/bar",
      "rm -rf test; mkdir test; touch test/baz; mkdir test/foo; touch test/foo/bar test/blah"),
    S("links-rmdir-once-040",
      "mkdir -p a/b/c; echo hello > a/b/c/foo.txt; ln a/b/c/foo.txt a/b/c/bar.txt;"
      " ln a/b/c/foo.txt a/b/baz.txt; echo x > a/b/c/hel.txt",
      "rm -f a/b/c/foo.txt a/b/c/bar.txt a/b/c/hel.txt; rmdir a/b/c"),
    S("orphanized-delayed-rename-092",
      "mkdir -p data/n1/n2 data/n4 data/t6/t7 data/t5 data/t7 data/n4/t2 data/t4 data/t3;"
      " mv data/t7 data/n4/t2; mv data/t4 data/n4/t2/t7; mv data/t5 data/n4/t2/t7/t4;"
      " mv data/t6 data/n4/t2/t7/t4/t5; mv data/n1/n2 data/n4/t2/t7/t4/t5/t6;"
      " mv data/n1 data/n4/t2/t7/t4/t5/t6;"
      " mv data/n4/t2/t7/t4/t5/t6/t7 data/n4/t2/t7/t4/t5/t6/n2;"
      " mv data/t3 data/n4/t2/t7/t4/t5/t6/n2/t7",
      "mv data/n4/t2/t7/t4/t5/t6/n1 data/n4; mv data/n4/t2 data/n4/n1;"
      " mv data/n4/n1/t2/t7/t4/t5/t6/n2 data/n4/n1/t2; mv data/n4/n1/t2/n2/t7/t3 data/n4/n1/t2;"
      " mv data/n4/n1/t2/t7/t4/t5/t6 data/n4/n1/t2; mv data/n4/n1/t2/t7/t4 data/n4/n1/t2/t6;"
      " mv data/n4/n1/t2/t7 data/n4/n1/t2/t3; mv data/n4/n1/t2/n2/t7 data/n4/n1/t2"),
    S("premature-rmdir-129",
      "mkdir a tmp del; mv tmp del; mkdir a/c del/x",
      "mv a/c .; mv del/x a; mv del/tmp c; rmdir del"),
    S("ancestry-inversion-178",
      "mkdir 257 258; mv 257 258/257; mkdir 259 260 261 262 263 264; mv 258 264/258;"
      " mkdir 265 266; mv 259 266/259; mv 260 266/260; mv 264 266/264; mv 265 266/265;"
      " mkdir 266/260/267 266/268 266/269; mv 262 266/269/262; mkdir 266/270 271;"
      " mv 266 271/266; mkdir 271/266/272; mv 263 271/266/272/263; mkdir 273 271/266/274;"
      " mv 273 271/266/274/273; mkdir 271/266/272/275; mv 271 261/271",
      "mv 261/271/266/272/275 275; mv 261/271/266/274 275/274;"
      " mv 261/271/266/269/262 275/274/273/262; mv 261/271/266/269 275/274/273/262/269;"
      " mv 261/271/266/264/258/257 261/271/266/272;"
      " mv 261/271/266/264/258 275/274/273/262/269/258;"
      " mv 261/271 275/274/273/262/269/258/271;"
      " mv 275/274/273/262/269/258/271/266/268 275/274/273/262/269/258/271/268"),
    S("extref-links-rmdir-338",
      "mkdir a b; touch a/foo; python3 -c 'import os\nfor i in range(1, 1001):"
      " os.link(\"a/foo\", \"a/foo.%d\" % i); os.link(\"a/foo\", \"b/foo.%d\" % i)'",
      "rm -fr a b"),
    # -- session 8: the rest of the catalogue a recipe can build (send-scenarios.md §4) --
    S("nested-snapshot-008",
      "mkdir -p testdir/1 testdir/2;"
      " od -N 1800 /dev/urandom > testdir/aa; od -N 1800 /dev/urandom > testdir/bb;"
      " mkdir snapshots; btrfs -q subvolume snapshot -r . snapshots/backup2",
      "btrfs -q subvolume snapshot -r . snapshots/backup3; echo more >> testdir/aa;"
      " mv testdir/2 testdir/1/2",
      btrfs_only=True),
    S("swapped-subtree-roots-084",
      "mkdir -p data/n1/n2/p1/p2 data/n4 data/p1/p2",
      "mv data/p1/p2 data; mv data/n1/n2/p1/p2 data/p1; mv data/p2 data/n1/n2/p1;"
      " mv data/n1/n2 data/p1; mv data/p1 data/n4; mv data/n4/p1/n2/p1 data"),
    S("same-name-ino-replaced-105",  # upstream: in a writable snapshot; the remount here
      'mkdir foo; xfs_io -f -c "pwrite -S 0xaa 0 64K" foo/bar',  # gives bar's ino again
      'rm -f foo/bar\nREMOUNT\nxfs_io -f -c "pwrite -S 0xbb 0 96K" foo/bar'),
    S("ino-reuse-same-entry-135",  # upstream: on a fresh fs; the remount reuses 257..259
      "touch f; mkdir d1; mkdir d259_old; mv d1 d259_old/d1",
      "rm -r f d259_old\nREMOUNT\nmkdir d1 dir258 dir259; mv d1 dir259/d1"),
    S("links-renamed-name-reused-155",
      "mkdir a; touch a/f1; mkdir -p a/b/c; ln a/f1 a/b/c/f1l1; touch a/b/f2; mkdir d;"
      " mv a/b/c/f1l1 d/f1l1_2; ln a/b/f2 a/f2l1; ln a/b/f2 d/f2l2; mv a/f1 d/f1_2",
      "mv d a/b/d2; mv a/f2l1 d; mkdir a/f2l1; ln a/b/d2/f1_2 a/b/f1l2; mv a/b a/f2l1/b2;"
      " mv a/f2l1/b2/d2 a/f2l1/b2/c/d3; mv a/f2l1/b2/c/d3/f2l2 a/f2l1/b2/c/d3/f2l2_2"),
    S("self-shared-hole-grow-203",
      'xfs_io -f -c "pwrite -S 0xf1 0 64K" foobar',
      'xfs_io -c "pwrite -S 0xab 512K 64K" -c "pwrite -S 0xcd 576K 64K"'
      ' -c "pwrite -S 0xef 640K 64K" -c "pwrite -S 0x64 704K 64K"'
      ' -c "pwrite -S 0x73 768K 64K" -c "reflink foobar 448K 192K 192K" foobar'),
    # btrfs/222: a file with a new hard link swaps names with a directory and with that
    # directory's child
    S("dir-file-swap-links-222",
      "touch f1 f2; mkdir -p d1/d2",
      "ln f2 d1/f2_link; mv f1 d1/d2/f1; mv d1 tmp; mv f2 d1; mv tmp f2; mv f2/d2 tmp;"
      " mv f2/f2_link f2/d2; mv tmp f2/f2_link"),
    # Linux 84471e2 ("incremental send, don't rename a directory too soon"): a directory
    # named "file" moves with its parent into a directory that takes a new name
    S("dir-named-file-moved-84471e2",
      "mkdir a b c a/file",
      "mv c x; mv a x/y; mv b q"),
    # inode numbers of a hard-linked file, a directory with children and a symlink reused
    # after a remount by inodes of other types under the same and other names
    S("ino-reuse-hardlinked",
      "touch a; ln a b; mkdir d; echo x > d/in; ln -s a s",
      "rm -r a b d s\nREMOUNT\nmkdir a; echo y > b; ln b d; ln -s b s2; mkdir s"),
    S("rm-dir-remount-new-inode-227",
      "mkdir dir; touch dir/file1 dir/file2 dir/file3",
      "rm -fr dir\nREMOUNT\ntouch newfile"),
    S("path-build-loops-045",
      "mkdir -p a/b; mkdir a/c a/b/d; touch a/file1 a/b/file2; mv a/file1 a/b/d/file3;"
      " ln a/b/d/file3 a/b/file4; mkdir a/b/f; mv a/b a/c/b2; touch a/c/b2/d/file5;"
      " mkdir -p a/x1/x2; mkdir a/Z; mkdir -p a/x1/x2/x3/x4/x5;"
      " mkdir -p _a/_b/_c/_d; mkdir _a/_b/_c/_d/_e _a/_b/_c/_d/_f;"
      " mv _a/_b/_c/_d/_e _a/_b/_c/_d/_f/_E2; mkdir _a/_b/_c/_g; mv _a/_b/_c/_d _a/_b/_D2;"
      " mkdir -p za/zb/zc/zd; mkdir za/zb/ze; mv za/zb/zc za/zb/ze/zCC;"
      " mkdir za/zb/ze/zCC/zd/zf za/zg;"
      " mkdir -p y_a/y_b y_a/y_c/y_d; mkdir y_a/y_b/y_e y_a/y_c/y_d/y_f;"
      " mv y_a/y_b y_a/y_c/y_d/y_2b; mkdir y_a/y_x y_a/y_y;"
      " mkdir -p w_a/w_b w_a/w_c/w_d; mkdir w_a/w_b/w_e w_a/w_c/w_d/w_f;"
      " mv w_a/w_b w_a/w_c/w_d/w_2b;"
      " mkdir -p xa/xb; mkdir xa/xc; mv xa/xb xa/xc/xb2; mkdir xa/xe;"
      " mkdir -p %a/%b; mkdir %a/%c %a/%b/%d %a/%c/%e",
      "ln a/c/b2/file4 a/c/b2/f/file6; mv a/c/b2/d/file5 a/c/file7; touch a/c/b2/d/file8;"
      " touch a/c/b2/file9; ln a/c/b2/file9 a/c/b2/file10; mv a/c/b2/f a/f2; mv a/c a/c2;"
      " mv a/c2/b2 a/f2/b3; mv a/c2 a/f2/b3/c3; touch a/f2/b3/c3/file11; mv a a2;"
      " mv a2/x1/x2/x3 a2/Z/X33; mv a2/x1/x2 a2/Z/X33/x4/x5/X22;"
      " mkdir _a/_o; mv _a/_b/_c/_g _a/_b/_D2/_f/_G2; mv _a/_b/_D2 _a/_b/_dd;"
      " mv _a/_b/_c _a/_C2; mv _a/_b/_dd/_f _a/_o/_FF; mv _a/_b _a/_o/_FF/_E2/_BB;"
      " mkdir za/zg/zh; mv za/zb/ze za/zg/zh/zEE; mv za/zg/zh/zEE/zCC/zd za/zg/zh/zEE/zDD;"
      " mv za/zg/zh/zEE/zDD/zf za/zg/zh/zEE/zDD/zFF;"
      " mv y_a/y_x y_a/y_y; mv y_a/y_c/y_d/y_2b/y_e y_a/y_c/y_d/y_2b/y_2e;"
      " mv y_a/y_c/y_d y_a/y_y/y_x/y_2d; mv y_a/y_c y_a/y_y/y_x/y_2d/y_2b/y_2c;"
      " mv w_a/w_c/w_d/w_2b/w_e w_a/w_c/w_d/w_2b/w_2e; mkdir w_a/w_h;"
      " mv w_a/w_c/w_d w_a/w_h/w_2d; mv w_a/w_c w_a/w_h/w_2d/w_2b/w_2c;"
      " mv xa/xc/xb2 xa/xe/xb3; mkdir xa/xe/xb3/xf xa/xh; mv xa/xc xa/xe/xb3/xf/xc2;"
      " mv xa/xe xa/xh/xe2;"
      " echo hello > %a/foo; mkdir %a/%b/%d/%f %a/%b/%g; mv %a/%c/%e %a/%b/%g/%e2;"
      " mv %a/%c %a/%b/%d/%f/%c2; mv %a/%b/%d/%f %a/%b/%g/%e2/%f2; mv %a/foo %a/%b/%g/%e2/%f2"),
    S("hierarchy-reshuffle-087",
      "D=data; mkdir -p $D/n1/n2/p1/p2 $D/n4 $D/t6 $D/t7 $D/t5/t7 $D/t2 $D/t4 $D/t1/t3 $D/p1;"
      " mv $D/t1 $D/p1; mkdir -p $D/p1/p2; mv $D/t4 $D/p1/p2/t1; mv $D/t5 $D/n4/t5;"
      " mv $D/n1/n2/p1/p2 $D/n4/t5/p2; mv $D/t7 $D/n4/t5/p2/t7; mv $D/t2 $D/n4/t1;"
      " mv $D/p1 $D/n4/t5/p2/p1; mv $D/n1/n2 $D/n4/t5/p2/p1/p2/n2;"
      " mv $D/n4/t5/p2/p1/p2/t1 $D/n4/t5/p2/p1/p2/n2/t1;"
      " mv $D/n4/t5/t7 $D/n4/t5/p2/p1/p2/n2/t1/t7;"
      " mv $D/n4/t5/p2/p1/t1/t3 $D/n4/t5/p2/p1/p2/n2/t1/t3;"
      " mv $D/n4/t5/p2/p1/p2/n2/p1 $D/n4/t5/p2/p1/p2/n2/t1/t7/p1;"
      " mv $D/t6 $D/n4/t5/p2/p1/p2/n2/t1/t3/t5;"
      " mv $D/n4/t5/p2/p1/t1 $D/n4/t5/p2/p1/p2/n2/t1/t3/t1;"
      " mv $D/n1 $D/n4/t5/p2/p1/p2/n2/t1/t7/p1/n1",
      "D=data/n4; mv $D/t1 $D/t5/p2/p1/p2/n2/t1/t7/p1/t1; mv $D/t5/p2/p1/p2/n2/t1 $D/;"
      " mv $D/t5/p2/p1/p2/n2 $D/t1/n2; mv $D/t1/t7/p1 $D/t1/n2/p1; mv $D/t1/t3/t1 $D/t1/n2/t1;"
      " mv $D/t1/t3 $D/t1/n2/t1/t3; mv $D/t5/p2/p1/p2 $D/t1/n2/p1/p2;"
      " mv $D/t1/t7 $D/t1/n2/p1/t7; mv $D/t5/p2/p1 $D/t1/n2/p1/p2/p1;"
      " mv $D/t1/n2/t1/t3/t5 $D/t1/n2/p1/p2/t5; mv $D/t5 $D/t1/n2/p1/p2/p1/t5;"
      " mv $D/t1/n2/p1/p2/p1/t5/p2 $D/t1/n2/p1/p2/p1/p2; mv $D/t1/n2/p1/p2/p1/p2/t7 $D/t1/t7"),
    S("clone-source-multi-step-117",  # B is also sent with -p A -c C (C: B's state)
      'mkdir -p a/b/c; xfs_io -f -c "pwrite -S 0xfd 0 128K" a/b/c/x',
      "for ((i = 1; i <= 1000; i++)); do echo -n > a/b/c/z_$i; done;"
      " cp --reflink=always a/b/c/x a/b/c/y; xfs_io -c \"pwrite -S 0xab 32K 16K\" a/b/c/y",
      clones=True),
    # -- session 9: upstream send tests beyond the catalogue (xfstests, btrfs-progs misc) --
    S("fragmented-backrefs-033",  # upstream: 10240 blocks (a quarter here, for time)
      'c=(); for i in $(seq 2560 -1 1); do c+=(-c "pwrite $((i * 4))K 4K"); done;'
      ' xfs_io -f -d "${c[@]}" foo; mkdir snaps;'
      ' for i in $(seq 0 50); do btrfs -q subvolume snapshot -r . snaps/snap_$i; done',
      'xfs_io -d -c "pwrite -S 0xab 1M 64K" -c "pwrite -S 0xab 9M 8K" foo;'
      ' btrfs -q subvolume snapshot -r . snaps/after',
      btrfs_only=True),
    S("compression-property-048",  # btrfs.compression xattrs, inherited, on the root too
      "mkdir -p testdir/subdir1; touch testdir/file1;"
      " btrfs property set testdir/file1 compression zlib;"
      " btrfs property set testdir/subdir1 compression lzo; touch testdir/subdir1/foobar;"
      " xfs_io -f -c 'pwrite -S 0x61 0 256K' testdir/subdir1/data",
      "touch testdir/subdir1/foobar2; btrfs property set testdir/file1 compression '';"
      " btrfs property set testdir/subdir1 compression zstd; btrfs property set . compression lzo;"
      " xfs_io -f -c 'pwrite -S 0x62 0 256K' testdir/subdir1/data2",
      btrfs_only=True),
    S("orphan-dir-two-children-128",
      "mkdir a tmp del; mv tmp del; mkdir a/c del/x del/y",
      "mv a/c .; mv del/x a; mv del/y a; mv del/tmp c; rmdir del"),
    S("inversions-all-030",  # upstream's whole test (inversion-030 is its first part)
      "mkdir -p a/b/c; echo hello > a/b/c/file.txt; mkdir a/b/c/d a/b/c2 a/b/www;"
      " echo hey > a/b/foobar.txt; mkdir -p a/b/c3/x/y a/b/foo1/foo2;"
      " echo hey > a/b/foo1/foo2/f.txt; mkdir a/b/foo3; mkdir -p a/b/bar1/bar2/bar3/bar4;"
      " echo ola > a/b/bar1/bar2/bar3/bar4/hello.txt",
      "echo ' world' >> a/b/c/file.txt; mv a/b/c/d a/b/c2/d2; mv a/b/c a/b/c2/d2/cc;"
      " mv a/b/c3/x/y a/b/c2/y2; mv a/b/c3/x a/b/c2/y2/x2; mv a/b/c3 a/b/c2/y2/x2/Z;"
      " mv a/b/www a/b/c2/y2/x2/WWW; mv a/b/foobar.txt a/b/c2/y2/x2/qwerty.txt;"
      " ln a/b/c2/d2/cc/file.txt a/b/c2/y2/x2/Z/file_link.txt;"
      " mv a/b/c2/d2/cc/file.txt a/b/c2/y2/x2; mv a/b/foo3 a/b/foo1/foo33;"
      " mv a/b/foo1/foo2 a/b/foo1/foo33/foo22;"
      " mv a/b/foo1/foo33/foo22/f.txt a/b/foo1/foo33/foo22/fff.txt;"
      " echo ' hello' >> a/b/bar1/bar2/bar3/bar4/hello.txt;"
      " mv a/b/bar1/bar2/bar3/bar4/hello.txt a/b/bar1/bar2/bar3/bar4/hello2.txt;"
      " mv a/b/bar1/bar2/bar3/bar4 a/b/k44; mv a/b/bar1/bar2/bar3 a/b/k44;"
      " mv a/b/bar1/bar2 a/b/k44/bar3; mv a/b/bar1 a/b/k44/bar3/bar2/k11"),
    # reproducers in Linux send fixes' commit messages (the name ends with the commit's
    # hash): a file renamed in a directory moved under a new one, a four-level inversion
    # on its own (btrfs/030 has it among others, other inode numbers), a delayed directory
    # move whose new parent moves too
    S("renamed-file-moved-dirs-03cb4fb",
      "mkdir -p a/b/c/d a/b/x; touch a/b/c/d/file",
      "mv a/b/x a/b/c/x2; mv a/b/c/d a/b/c/x2/d2; mv a/b/c/x2/d2/file a/b/c/x2/d2/file2"),
    S("four-level-inversion-5ed7f9f",
      "mkdir -p a/b/bar1/bar2/bar3/bar4",
      "mv a/b/bar1/bar2/bar3/bar4 a/b/k44; mv a/b/bar1/bar2/bar3 a/b/k44;"
      " mv a/b/bar1/bar2 a/b/k44/bar3; mv a/b/bar1 a/b/k44/bar3/bar2/k11"),
    S("delayed-move-new-parent-7b119a8",
      "mkdir A B C; mv C A; mv B A/C; mkdir A/C/D",
      "mv A/C/D A/D2; mv A/C/B A/D2/B2; mv A/C A/D2/B2/C2"),
    S("dir-renames-ancestors-f959492",
      "mkdir -p a/b a/c/d; mkdir a/b/e a/c/d/f; mv a/b a/c/d/2b; mkdir a/x a/y",
      "mv a/x a/y; mv a/c/d/2b/e a/c/d/2b/2e; mkdir a/h; mv a/c/d a/h/2d;"
      " mv a/c a/h/2d/2b/2c"),
    S("orphan-dirs-path-strings-c992ec9",
      "mkdir -p a/b/c/d; mkdir a/b/e; mv a/b/c a/b/e/CC; mkdir a/b/e/CC/d/f; mkdir a/g",
      "mkdir a/g/h; mv a/b/e a/g/h/EE; mv a/g/h/EE/CC/d a/g/h/EE/DD"),
    # names, link and symlink targets, xattr names and values, clone sources with a newline
    # then 'failed': upstream checks that no dump line starts so, which btrfs-progs >= 6.10
    # meets; 6.2's dump, and so ours, escape names and targets but not xattrs or clone paths
    S("newlines-in-dump-misc054",
      "ln -s $'file\\nfailed symlink source' $'file\\nfailed symlink target';"
      " touch $'file\\nfailed link source';"
      " ln $'file\\nfailed link source' $'file\\nfailed link target'; touch xattr-file;"
      " setfattr -n $'user.name\\nfailed xattr name' -v $'123\\nfailed xattr value' xattr-file;"
      " dd if=/dev/zero of=$'clone-source\\nfailed clone source write' bs=1M count=1 status=none;"
      " cp --reflink=always $'clone-source\\nfailed clone source write'"
      " $'clone-target\\nfailed clone target'",
      "mv $'file\\nfailed link target' $'renamed\\nfailed rename dest';"
      " setfattr -x $'user.name\\nfailed xattr name' xattr-file;"
      " setfattr -n $'user.new\\nfailed xattr' -v $'v\\nfailed value' xattr-file;"
      " cp --reflink=always $'clone-source\\nfailed clone source write' $'clone2\\nfailed clone';"
      " ln -s $'t\\nfailed' $'s\\nfailed'"),
    S("empty-snapshots-misc018", ":", ":"),
    S("overwritten-files-misc018",
      "for i in 1 2 3; do dd if=/dev/zero of=file1_$i bs=1M count=1 status=none; done",
      "for i in 1 2 3; do dd if=/dev/urandom of=file1_$i bs=1M count=1 status=none; done"),
    # btrbk issue 608 (a 'Directory not empty' receive failure reported against btrbk): a
    # directory turned into a subvolume of the same name, its files reflinked into it, the
    # old directory removed. The new subvolume is not in the stream (an empty directory in
    # the snapshot, as every nested subvolume is); the old directory and its files go
    S("dir-to-subvolume-btrbk608",
      "mkdir -p videos/sub; for i in 1 2 3; do xfs_io -f -c \"pwrite -S 0x4$i 0 200K\""
      " videos/v$i; done; echo note > videos/sub/note",
      "mv videos videos.old; btrfs -q subvolume create videos;"
      " cp -a --reflink=always videos.old/. videos; rm -r videos.old; echo new > videos/v4",
      btrfs_only=True),
    # reproducers in btrfs-progs receive fixes' commit messages (``progs-`` and the commit):
    # a file of 127 KiB (unaligned) grown to 128 KiB by fallocate, sent compressed, whose
    # decompression by receive left 4 bytes of garbage past the data (zstd); an encoded
    # extent partly shared (the first 32 KiB cloned into another file), whose fallback from
    # an encoded write at an unaligned offset to decompress-and-write wrote nothing
    S("unaligned-then-fallocated-progs-e3209f8",
      'xfs_io -f -c "pwrite -S 0xab 0 3" -c "pwrite -S 0xcd 3 130042"'
      ' -c "pwrite -S 0xef 130045 3" foo; xfs_io -c "falloc 0 128K" foo',
      'xfs_io -c "pwrite -S 0x11 130048 100" foo; cp --reflink=always foo bar'),
    S("encoded-write-unaligned-offset-progs-6f4a518",
      'xfs_io -f -c "pwrite -S 0xab 0 33K" foo; xfs_io -f -c "pwrite -S 0xcd 0 64K" bar;'
      ' xfs_io -c "reflink bar 0 0 32K" foo',
      'xfs_io -f -c "pwrite -S 0xef 0 65K" baz; xfs_io -c "reflink baz 0 0 32K" foo;'
      ' xfs_io -c "reflink foo 0 0 32K" bar'),
    # btrfs/272 at upstream's size (many-links-272 has 300 links, all in inode refs): 2000
    # links named 1..2000 overflow the inode's ref item into extended refs, where the
    # kernel once sent a link to a path that already existed
    S("link-existing-path-extrefs-272",
      "touch foo; python3 -c 'import os\nfor i in range(1, 2001): os.link(\"foo\", str(i))'",
      "python3 -c 'import os\nfor i in range(1, 2001): os.unlink(str(i))\n"
      "for i in range(1001, 2001): os.link(\"foo\", str(i))'"),
    # btrfs/187 (upstream: 40000 + 40000 files, every xattr 3800 bytes, dedupe and a
    # metadata balance racing with the sends): files of one content, xattrs on all of them
    # in B, then extents deduplicated between the two read-only snapshots both ways (B's new
    # files onto A's, some of A's onto B's) and the metadata relocated before they are sent
    S("dedupe-balance-snapshots-187",
      'for i in $(seq 1 100); do xfs_io -f -c "pwrite -S 0xea 0 64K" file_$i >/dev/null; done',
      'for i in $(seq 101 200); do xfs_io -f -c "pwrite -S 0xea 0 64K" file_$i >/dev/null; done;'
      " x=$(printf 'X%.0s' $(seq 1 3800));"
      " for i in $(seq 1 200); do setfattr -n user.x1 -v $x file_$i; done",
      after='for i in $(seq 1 40); do'
      ' xfs_io -r -c "dedupe $A/file_$i 0 0 64K" $B/file_$((i + 100)); done;'
      ' for i in $(seq 41 60); do'
      ' xfs_io -r -c "dedupe $B/file_$((i + 100)) 0 0 64K" $A/file_$i; done;'
      ' btrfs -q balance start -m .'),
    # classes the upstream tests leave thin (sessions 16 and 17): scenarios_beyond.py
    *BEYOND,
    *CORNERS,  # session 32: scenarios_corners.py
    *SUBCASES,  # session 33: scenarios_subcases.py
    # held descriptors last: a later REMOUNT on the same filesystem would find it busy
    S("deleted-open-file-168",
      'xfs_io -f -c "pwrite -S 0xf1 0 64K" foo; xfs_io -f -c "pwrite -S 0x7b 0 90K" bar;'
      ' xfs_io -f -c "pwrite -S 0xea 0 256K" baz',
      'rm bar; xfs_io -c "pwrite -S 0x19 4K 8K" baz',
      a_held="exec 73<bar; unlink bar",
      b_held="exec 73<foo; unlink foo"),
    S("nlink-zero-inodes-278",
      "touch deleted.file changed_subcase1.file changed_subcase2.file; mkdir deleted.dir;"
      " mkdir changed_subcase1.dir changed_subcase2.dir;"
      " touch changed_subcase1.dir/foo changed_subcase2.dir/foo",
      "unlink deleted.file; rmdir deleted.dir; touch new.file; mkdir new.dir",
      a_held="exec 71<deleted.file 72<deleted.dir 73<changed_subcase1.file"
      " 74<changed_subcase1.dir; unlink deleted.file; rmdir deleted.dir;"
      " unlink changed_subcase1.file; unlink changed_subcase1.dir/foo;"
      " rmdir changed_subcase1.dir",
      b_held="exec 81<changed_subcase1.file 82<changed_subcase1.dir"
      " 83<changed_subcase2.file 84<changed_subcase2.dir 85<new.file 86<new.dir;"
      " unlink changed_subcase1.file; unlink changed_subcase1.dir/foo;"
      " rmdir changed_subcase1.dir; unlink changed_subcase2.file;"
      " unlink changed_subcase2.dir/foo; rmdir changed_subcase2.dir; unlink new.file;"
      " rmdir new.dir"),
    # upstream: xfs_io -T fed by a fifo. The tmpfile (inode and orphan item) is in the
    # snapshot as taken, but the kernel's orphan clean-up at the snapshot's first lookup
    # (even read-only) drops it, so the stream, like upstream's, has no trace of it
    S("tmpfile-orphan-in-snapshot-058",
      "mkfifo fifo",
      "touch after",
      a_open="exec python3 -c 'import os, sys\n"
      "fd = os.open(\".\", os.O_TMPFILE | os.O_RDWR, 0o600)\n"
      "os.pwrite(fd, b\"\\xcd\" * 65536, 0)\n"
      "print(\"ready\", flush=True)\nsys.stdin.read()'"),
]
del S


#: what ``make matrix`` runs: :data:`SCENARIOS` and the stress scenarios (session 32), whose
#: cost ``make test`` does not take (docs/upstream-tests.md)
MATRIX_SCENARIOS: list[Scenario] = [*SCENARIOS, *STRESS]


@dataclass
class SnapshotPair:
    """The two read-only snapshots a scenario produced on the source filesystem."""

    scenario: Scenario
    a: Path
    b: Path
    #: the clone-source snapshot of a ``clones`` scenario (taken just before ``b``)
    c: Path | None = None


def _mount_source(mnt: Path) -> tuple[str, str]:
    with open("/proc/mounts") as f:
        for line in f:
            dev, where, _fstype, opts, *_ = line.split()
            if where == str(mnt):
                return dev, opts
    raise RuntimeError(f"{mnt} is not mounted")


def _bash(script: str, cwd: Path, **env: str) -> None:
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        capture_output=True,
        check=False,
        env={**os.environ, "LC_ALL": "C.UTF-8", **env},
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"recipe failed ({proc.returncode}): {script!r}: {proc.stderr.decode(errors='replace')}"
        )


def _hold(mnt: Path, where: Path, script: str) -> None:
    """Run ``script`` in ``where``, its descriptors kept open (the process waits on its
    stdin, :func:`loopfs.release` ends it)."""
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", f"{script}\ncd /\necho ready\nread -r _ || :"],
        cwd=where, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    if proc.stdout.readline() != b"ready\n":
        err = proc.stderr.read().decode(errors="replace")
        proc.wait()
        raise RuntimeError(f"recipe failed ({proc.returncode}): {script!r}: {err}")
    hold(mnt, proc)


def _hold_in_snapshot(mnt: Path, snap: Path, script: str) -> None:
    """:func:`_hold` in the read-only ``snap`` made writable for it, then read-only again."""
    run("btrfs", "property", "set", snap, "ro", "false")
    _hold(mnt, snap, script)
    run("btrfs", "property", "set", snap, "ro", "true")


def make_snapshots(mnt: Path, scenario: Scenario, tag: str = "",
                   between: Callable[[Path], object] | None = None) -> SnapshotPair:
    """Run ``scenario`` in a new subvolume of the btrfs at ``mnt``; snapshot A and B (ro).
    ``between`` is called with the live subvolume once A is taken, before ``b`` runs."""
    name = scenario.name + tag
    vol = mnt / f"vol-{name}"
    run("btrfs", "-q", "subvolume", "create", vol)
    _bash(scenario.a, vol)
    if scenario.a_open:
        _hold(mnt, vol, scenario.a_open)
    run("sync")
    a = mnt / f"{name}-A"
    b = mnt / f"{name}-B"
    run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, a)
    if between is not None:
        between(vol)
    for i, part in enumerate(scenario.b.split("\nREMOUNT\n")):
        if i:
            if held(mnt):
                raise RuntimeError(f"{scenario.name}: cannot remount {mnt}: files are held "
                                   "open there (build REMOUNT scenarios before held ones)")
            dev, opts = _mount_source(mnt)
            run("umount", mnt)
            run("mount", "-o", opts, dev, mnt)
        _bash(part, vol)
    run("sync")
    c = None
    if scenario.clones:
        c = mnt / f"{name}-C"
        run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, c)
    run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, b)
    if scenario.after:
        _bash(scenario.after, mnt, A=str(a), B=str(b))
        run("sync")
    if scenario.a_held:
        _hold_in_snapshot(mnt, a, scenario.a_held)
    if scenario.b_held:
        _hold_in_snapshot(mnt, b, scenario.b_held)
    return SnapshotPair(scenario, a, b, c)


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
