"""Scenarios of classes the upstream send tests leave thin, built by hand (sessions 16-18).

Session 16 (a new user's trial): FALLOC_FL_ZERO_RANGE, renameat2(RENAME_EXCHANGE), default
POSIX ACLs, xattrs on moved directories, the subvolume root's metadata, clones of ranges
with holes, inode numbers reused across types, symlink times, set-user-ID after chown.
Session 17: rotations and type changes of names across directories, hard links leaving
removed directories, clones among new files, many extents, truncation to zero, nodatacow,
the largest xattrs, ``-c`` clone sources, Debian's merged /usr, a big directory's churn,
255-byte names, metadata at the limits of its fields, capabilities after writes, content
changed under a kept size and mtime, xattrs on special files, set-group-ID directories.
Session 18: device numbers at the ends of their fields, every byte in names, files around
the inline limit, 255-byte xattr names, immutable and append-only inodes. Session 19: one
file's extents under every compression with holes between, nodatacow files cloned, a
directory rotation with hard links moved across it, unaligned truncations and extensions.
Session 31: explicit times after directory changes, access ACLs and chmod, capabilities
the kernel clears (chown, write) and version 3 ones, xattrs on renamed hard links, inline
extents followed by holes or punched, whole files punched and holes filled, whiteouts,
O_TMPFILE files linked in, delayed directory moves with metadata, a removed directory's
name taken, preallocation inside data, copy_file_range, special files' owner and mode,
``chattr +c``/``+m``, 3,900-byte symlink targets.
:mod:`btrdelta.testing.scenarios` runs them with the upstream ones (none of these remounts
or holds files open).
"""

from __future__ import annotations

from .recipe import EXCHANGE, PROP, Scenario, renameat2

__all__ = ["BEYOND"]

#: rename with renameat2(RENAME_WHITEOUT): a whiteout (a character device 0:0 of mode 0)
#: takes the old name
_WHITEOUT = renameat2(4)
#: O_TMPFILE files linked into the tree (``linkat`` of ``/proc/self/fd/N``): a new file
#: ``linked``, and ``keep`` replaced atomically by one (linked as ``.tmp``, renamed over)
#: (``dst_dir_fd`` makes os.link call linkat with AT_SYMLINK_FOLLOW)
_TMPFILE_LINK = ("python3 -c 'import os\n"
                 "here = os.open(\".\", os.O_RDONLY)\n"
                 "def tmp(data):\n"
                 "    fd = os.open(\".\", os.O_TMPFILE | os.O_RDWR, 0o640)\n"
                 "    os.write(fd, data)\n"
                 "    return \"/proc/self/fd/%d\" % fd\n"
                 "os.link(tmp(b\"new\" * 2000), \"linked\", dst_dir_fd=here)\n"
                 "os.link(tmp(b\"replacement\"), \".tmp\", dst_dir_fd=here)\n"
                 "os.rename(\".tmp\", \"keep\")'")
#: POSIX ACL xattr values (version 2, then tag, permissions, id: u16, u16, u32 LE): owner
#: rwx, user 1000 rwx, group r-x, mask r-x, other r-x; and owner rwx, group r-x, group 50
#: rw-, mask rwx, other ---
_ACL_USER = ("0x02000000" "01000700ffffffff" "02000700e8030000" "04000500ffffffff"
             "10000500ffffffff" "20000500ffffffff")
_ACL_GROUP = ("0x02000000" "01000700ffffffff" "04000500ffffffff" "0800060032000000"
              "10000700ffffffff" "20000000ffffffff")

S = Scenario

BEYOND: list[Scenario] = [
    # FALLOC_FL_ZERO_RANGE inside a file, past its end (growing it) and kept in size
    S("zero-range",
      'xfs_io -f -c "pwrite -S 0xaa 0 1M" foo; xfs_io -f -c "pwrite -S 0xbb 0 256K" bar',
      'xfs_io -c "fzero 128K 256K" -c "fzero 1M 128K" foo; xfs_io -c "fzero -k 256K 512K" bar'),
    # renameat2(RENAME_EXCHANGE): two directories, a file and a directory, two files
    # across the swapped directories
    S("rename-exchange",
      "mkdir d1 d2 x; echo 1 > d1/f; echo 2 > d2/g; touch y; mkdir d1/sub; echo 3 > d1/sub/h",
      EXCHANGE + " d1 d2 x y d1/g d2/f; echo 4 >> d2/f"),
    # POSIX ACLs (their xattrs) on directories: a default ACL the receiver's new inodes
    # inherit unless told otherwise (a file created in such a directory, its ACL removed)
    S("acl-default-dirs",
      f"mkdir d e; setfattr -n system.posix_acl_default -v {_ACL_USER} d;"
      f" setfattr -n system.posix_acl_access -v {_ACL_USER} e; touch d/inherits; mkdir d/sub;"
      " touch d/plain; setfattr -x system.posix_acl_access d/plain; chmod 640 d/plain",
      f"setfattr -n system.posix_acl_default -v {_ACL_GROUP} d; touch d/new; mkdir d/newsub;"
      " setfattr -x system.posix_acl_access e; chmod 751 e; mv d/plain e/plain;"
      " touch d/new-noacl; setfattr -x system.posix_acl_access d/new-noacl;"
      " mkdir d/newsub-noacl; setfattr -x system.posix_acl_default d/newsub-noacl;"
      " mkfifo d/fifo; setfattr -x system.posix_acl_access d/fifo; ln -s x d/link"),
    # the subvolume root's default ACL: what the kernel's orphans (made in the root) inherit
    S("acl-default-root",
      f"setfattr -n system.posix_acl_default -v {_ACL_USER} .; mkdir sub; echo a > f;"
      " setfattr -x system.posix_acl_default sub; setfattr -x system.posix_acl_access sub",
      "touch sub/f2; mkdir sub/d; echo b > g; mkdir h;"
      f" setfattr -n system.posix_acl_default -v {_ACL_GROUP} .; touch h/x"),
    S("xattrs-on-moved-dirs",
      "mkdir -p a/b/c; for d in a a/b a/b/c; do setfattr -n user.k1 -v v1 $d;"
      " setfattr -n user.k2 -v v2 $d; done; echo f > a/b/c/f",
      "mv a/b/c c2; mv a/b c2/b2; mv a c2/b2/a3; setfattr -x user.k1 c2;"
      " setfattr -n user.k3 -v new c2/b2; setfattr -n user.k2 -v changed c2/b2/a3;"
      " setfattr -n user.k1 -v '' c2/b2/a3"),
    S("many-xattrs-dir",
      "mkdir d; for i in $(seq 1 100); do setfattr -n user.x$i -v val$i d; done",
      "for i in $(seq 1 50); do setfattr -x user.x$i d; done;"
      " for i in $(seq 51 60); do setfattr -n user.x$i -v changed$i d; done"),
    S("root-dir-metadata",
      "echo x > f; setfattr -n user.r -v one .",
      "chmod 0750 .; chown 5:6 .; setfattr -n user.r -v two .; setfattr -n user.s -v s .;"
      " touch -d '2011-11-11 11:11:11.111' ."),
    # holes cloned: ranges with a hole into a new file, past a new file's end, and over
    # another file's data (no-holes: the hole must punch it)
    S("clone-ranges-with-holes",
      'xfs_io -f -c "pwrite -S 0xa1 0 64K" -c "pwrite -S 0xa2 192K 64K" foo;'
      ' xfs_io -f -c "pwrite -S 0xc1 0 512K" bar2',
      'xfs_io -f -c "reflink foo 0 0 256K" bar; xfs_io -f -c "reflink foo 32K 1M 200K" baz;'
      ' xfs_io -c "reflink foo 0 64K 256K" bar2'),
    # the number of a removed file (xattrs, two links) reused by a symlink of one old name
    S("ino-reuse-file-to-symlink",
      "mkdir d; echo x > d/f; setfattr -n user.a -v b d/f; ln d/f g",
      "rm d/f g\nREMOUNT\nln -s tgt g"),
    # truncated inside a compressed extent, grown again, written past the cut; inline
    S("truncate-compressed-extent",
      "seq 1 30000 > foo; truncate -s 128K foo; seq 7 50000 > t; truncate -s 100K t;"
      " cat t >> foo; rm t; seq 1 2000 > inl",
      'truncate -s 70001 foo; truncate -s 300K foo; xfs_io -c "pwrite -S 0x5a 200K 1K" foo;'
      " echo appended >> inl"),
    # the size grown into preallocated space (reads zeros), a fallocate that grows it
    S("prealloc-grow-into",
      'xfs_io -f -c "falloc -k 0 1M" -c "pwrite -S 0x61 0 4K" foo',
      'xfs_io -c "truncate 512K" -c "falloc 2M 1M" -c "pwrite -S 0x62 2052K 4K" foo'),
    S("dir-name-3cycle-links",
      "mkdir x y z; echo 1 > x/f; echo 2 > y/f; echo 3 > z/f",
      "mv x tmp; mv y x; mv z y; mv tmp z; ln z/f x/f-link; ln y/f z/f-link"),
    S("symlink-times",
      "ln -s a l; ln -s b m; touch -h -d '2001-01-01 01:01:01.5' l m",
      "touch -h -d '2020-02-02 02:02:02.25' l; ln -sfn c m; touch -h -d '1999-09-09' m"),
    # chown clears set-user-ID and set-group-ID: the mode must come after the owner
    S("setuid-after-chown",
      "echo x > f; chmod 4755 f; mkdir d; chmod 2775 d; echo y > g; chmod 6711 g",
      "chown 1000:1000 f; chmod 4755 f; chown 7:8 d; chmod 2775 d; chown 9 g; chmod 6711 g;"
      " echo more >> g"),
    # -- session 17 --
    # one name rotated through three directories (files and directories alike), then two
    # of the directories moved under the third
    S("file-rotation-3dirs",
      "mkdir a b c; echo 1 > a/f; echo 2 > b/f; echo 3 > c/f; ln a/f a/g;"
      " mkdir a/d b/d c/d; echo da > a/d/x; echo db > b/d/x",
      "mv a/f t; mv c/f a/f; mv b/f c/f; mv t b/f; mv a/d t; mv b/d a/d; mv c/d b/d;"
      " mv t c/d; mv a b/a2; mv c b/a2/c2; echo 4 >> b/a2/f"),
    # a directory replaced by a file of the same name: its own child, a file of a removed
    # subtree; and a file that moves into a new directory taking its name
    S("file-takes-dir-name",
      "mkdir d e; echo x > d/f; echo y > e/g; mkdir e/sub; echo z > e/sub/h; echo w > k",
      "mv d/f df; rmdir d; mv df d; mv e/sub/h eh; rm -r e; mv eh e;"
      " mv k kk; mkdir k; mv kk k/k"),
    # hard links moved out of directories that are then removed (orphans while the stream
    # runs), new directories and links taking the removed names (a file where a dir was)
    S("links-out-of-removed-dirs",
      "mkdir -p d1/s d2; echo a > d1/a; ln d1/a d1/s/b; ln d1/a d2/c; echo q > d2/q;"
      " ln d2/q d1/s/q2",
      "mkdir n; mv d1/s/b n/b; mv d2/c n/c; rm -r d1; mv d2/q n/q; rm -r d2; mkdir d1;"
      " ln n/b d1/a; ln n/q d1/s"),
    # clones between files all new in B, no commit between them (a later inode the source
    # of an earlier one's clone), into an old file from a new one
    S("clones-new-files-one-transaction",
      'xfs_io -f -c "pwrite -S 0xa1 0 512K" base',
      'xfs_io -f -c "pwrite -S 0x11 0 256K" n1;'
      ' xfs_io -f -c "reflink n1 0 0 256K" -c "reflink base 128K 256K 128K" n2;'
      ' touch n0; xfs_io -c "reflink n2 64K 0 192K" n0; xfs_io -c "pwrite -S 0x22 16K 8K" n1;'
      ' xfs_io -c "reflink n0 0 300K 64K" base; cp --reflink=always n2 n3;'
      ' xfs_io -c "pwrite -S 0x33 100K 4K" n2'),
    # 1,000 extents with holes between them; every 14th block rewritten, every 22nd punched
    S("many-extents-sparse",
      'c=(); for i in $(seq 0 2 1999); do c+=(-c "pwrite -S $((i % 250 + 1)) $((i * 4))K 4K");'
      ' done; xfs_io -f "${c[@]}" foo',
      'c=(); for i in $(seq 1 14 1999); do c+=(-c "pwrite -S 0x77 $((i * 4))K 4K"); done;'
      ' for i in $(seq 0 22 1999); do c+=(-c "fpunch $((i * 4))K 4K"); done;'
      ' xfs_io "${c[@]}" -c "truncate 10M" -c "pwrite -S 0x55 8500K 4K" foo'),
    # files cut to 0 bytes: kept empty, regrown sparse, rewritten, an empty file truncated
    S("truncate-to-zero",
      "seq 1 100000 > big; printf small > inl; xfs_io -f -c 'pwrite -S 0x61 0 1M' mid;"
      " touch e0; seq 1 1000 > re; seq 1 5000 > grow",
      "truncate -s 0 big; truncate -s 0 inl; truncate -s 0 mid; truncate -s 1M mid;"
      " truncate -s 0 re; echo new > re; truncate -s 0 e0; truncate -s 0 grow;"
      " truncate -s 3000 grow"),
    # chattr +C (nodatacow: no compression, no checksums; the flag is not sent before v3)
    S("nocow-files",
      "mkdir nc; chattr +C nc; xfs_io -f -c 'pwrite -S 0x41 0 256K' nc/f;"
      " xfs_io -f -c 'falloc 0 1M' -c 'pwrite -S 0x42 64K 4K' nc/p; seq 1 10000 > nc/t",
      "xfs_io -c 'pwrite -S 0x43 4K 8K' nc/f; xfs_io -c 'pwrite -S 0x44 512K 4K' nc/p;"
      " cp --reflink=always nc/f nc/f2; echo x >> nc/t; mv nc/t t"),
    # xattrs of nearly the largest size a 16 KiB node holds, on a file, a dir, a symlink
    S("xattr-max-size",
      "touch f; mkdir d; ln -s tgt l; v=$(printf 'a%.0s' $(seq 16000));"
      " setfattr -n user.big -v $v f; setfattr -n user.big -v $v d",
      "v=$(printf 'b%.0s' $(seq 15999)); w=$(printf 'c%.0s' $(seq 12000));"
      " setfattr -n user.big -v $v f; setfattr -n user.two -v $w f; setfattr -x user.big d;"
      " setfattr -h -n trusted.big -v $w l",
      large_xattrs=True),
    # -p A -c C: new files cloned from a removed one and from each other
    S("clone-source-c-new-files",
      'xfs_io -f -c "pwrite -S 0x5a 0 1M" lib; mkdir app',
      'cp --reflink=always lib app/lib-copy; xfs_io -f -c "pwrite -S 0x6b 0 256K" app/new;'
      ' cp --reflink=always app/new app/new2; rm lib;'
      ' xfs_io -c "reflink app/new 0 512K 128K" app/lib-copy',
      clones=True),
    # Debian's merged /usr: directories replaced by symlinks to where their files went, and
    # a symlink replaced by a directory
    S("usrmerge-dir-to-symlink",
      "mkdir -p lib/x86 usr/lib bin usr/bin usr/lib32; echo so > lib/libc.so;"
      " echo so2 > lib/x86/ld.so; echo sh > bin/sh; ln -s sh bin/bash; echo u > usr/lib/u;"
      " ln lib/libc.so usr/lib/libc-link; ln -s usr/lib32 lib32; echo l > usr/lib32/l",
      "mv lib/* usr/lib/; rmdir lib; ln -s usr/lib lib; mv bin/sh bin/bash usr/bin/; rmdir bin;"
      " ln -s usr/bin bin; mkdir -p usr/lib/x86/new; echo n > usr/lib/x86/new/f;"
      " rm lib32; mkdir lib32; mv usr/lib32/l lib32/; rmdir usr/lib32"),
    # 1,200 names in one directory: half removed, renamed, new names, names reused
    S("big-dir-churn",
      "mkdir d; python3 -c 'import os\nfor i in range(1, 1201):\n"
      "    open(\"d/f%05d\" % i, \"w\").write(str(i) if i % 50 == 1 else \"\")'",
      "python3 -c 'import os\nfor i in range(2, 1201, 2): os.unlink(\"d/f%05d\" % i)\n"
      "for i in range(1, 300, 2): os.rename(\"d/f%05d\" % i, \"d/g%05d\" % i)\n"
      "for i in range(2, 401, 2): open(\"d/f%05d.n\" % i, \"w\")\n"
      "for i in range(401, 600, 2): os.rename(\"d/f%05d\" % i, \"d/f%05d\" % (i + 1))'"),
    # hard links to a device, a fifo, a symlink and a socket; names changing types
    S("special-files-links-types",
      "mknod c c 1 3; ln c c2; mkfifo p; ln p p2; ln -s t s; ln s s2;"
      " python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind(\"sock\")'; ln sock sock2",
      "rm c; mv c2 c; mv p pp; mkdir p; mv pp p/fifo; rm s; mknod s b 7 1; mv s2 s-old;"
      " rm sock; touch sock; chown 3:4 c; ln p2 p/fifo2"),
    # names of 255 bytes: renamed, linked, a new file under a moved directory
    S("max-name-255",
      "n=$(printf 'n%.0s' $(seq 255)); m=$(printf 'm%.0s' $(seq 254)); mkdir $m;"
      " echo a > $n; echo b > $m/$n; xfs_io -f -c 'pwrite -S 0x61 0 200K' $m/${m}x;"
      " ln $n $m/${m}y",
      "n=$(printf 'n%.0s' $(seq 255)); m=$(printf 'm%.0s' $(seq 254));"
      " o=$(printf 'o%.0s' $(seq 255));"
      " echo more >> $n; mv $m/$n $o; xfs_io -c 'pwrite -S 0x62 4K 4K' $m/${m}x;"
      " mv $m ${m}z; echo new > ${m}z/$n; ln ${m}z/${m}x ${m}q; rm ${m}z/${m}y"),
    # an owner of 2^32 - 2, a group past 2^31, times past 2262 (their ns past int64) and
    # before 1902, mode 7777, directories of mode 000 written into
    S("extreme-metadata",
      "echo a > f; mkdir d; echo b > g; mkdir z; chmod 000 z",
      "chown 4294967294:2147483653 f; touch -d '2262-04-11 23:47:16.999999999' f;"
      " touch -d '1901-12-14 00:00:00.000000001' g; chmod 7777 g; chmod 000 d;"
      " echo c > z/new; mkdir z/sub; chmod 000 z/sub; touch -d '1970-01-01 00:00:00' z/new"),
    # a write drops security.capability: set again after the data, the same value as in A
    S("caps-after-write",
      "printf 'v1' > tool; setcap cap_net_raw+ep tool; printf 'x' > t2;"
      " setcap cap_sys_nice=ep t2",
      "printf 'v2 longer' >> tool; setcap cap_net_raw+ep tool;"
      " xfs_io -c 'pwrite -S 0x41 0 1' t2; setcap cap_sys_nice=ep t2"),
    # content changed, the size and mtime of A kept (what a quick check by size and mtime
    # misses)
    S("content-changed-mtime-kept",
      "seq 1 20000 > f; xfs_io -f -c 'pwrite -S 0x61 0 64K' g; touch -d '2020-01-01' f g",
      "xfs_io -c 'pwrite -S 0x62 100 1' f; xfs_io -c 'pwrite -S 0x63 32K 4K' g;"
      " touch -d '2020-01-01' f g"),
    # trusted.* xattrs on a fifo, a device, a socket (user.* is refused there)
    S("xattrs-on-special-files",
      "mkfifo p; mknod c c 1 3;"
      " python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind(\"s\")';"
      " setfattr -n trusted.a -v 1 p; setfattr -n trusted.b -v 2 c; setfattr -n trusted.c -v 3 s",
      "setfattr -n trusted.a -v changed p; setfattr -x trusted.b c; mv s s2;"
      " setfattr -n trusted.d -v 4 s2; mkfifo q; setfattr -n trusted.e -v 5 q"),
    # a set-group-ID directory: what a receiver's new inodes inherit there (its group; a
    # new directory the bit too) unless the stream says otherwise
    S("setgid-dir-inheritance",
      "mkdir sg; chown 0:50 sg; chmod 2775 sg; mkdir sg/old",
      "touch sg/f; chgrp 0 sg/f; mkdir sg/d; chmod g-s sg/d; chgrp 0 sg/d; mkdir sg/d2;"
      " mkfifo sg/p; chgrp 0 sg/p; ln -s x sg/l; chgrp -h 0 sg/l; mkdir sg/old/n;"
      " chmod 755 sg/old/n; chgrp 0 sg/old/n; touch sg/g; chmod 2755 sg/g"),
    # -- session 18 --
    # device numbers at the ends of their fields (major 4095, minor 2^20 - 1: past the old
    # 8-bit encoding), changed, a character device replaced by a block device
    S("device-numbers-wide",
      "mknod c1 c 4095 1048575; mknod b1 b 259 1048575; mknod c2 c 256 256; mknod c3 c 0 0;"
      " mknod b2 b 4095 0",
      "rm c1; mknod c1 c 1 1048575; mknod c4 c 4000 70000; mv b1 b1m; mknod b1 b 4095 1;"
      " rm c2; mknod c2 b 256 257"),
    # every byte but NUL and '/' in names: one of each, a name of all 254, a symlink target
    # of all 255, an xattr name of bytes 0x80-0xff and a value of all 256
    S("all-byte-names",
      "python3 -c 'import os\n"
      "allb = bytes(b for b in range(1, 256) if b != 0x2f)\n"
      "os.mkdir(b\"d\")\n"
      "for b in range(1, 256):\n"
      "    if b not in (0x2e, 0x2f): open(b\"d/\" + bytes([b]), \"w\").write(str(b))\n"
      "open(allb, \"w\").write(\"all\")\n"
      "os.mkdir(allb[::-1])\n"
      "os.symlink(bytes(range(1, 256)), b\"sym\")\n"
      "os.setxattr(allb, b\"user.\" + bytes(range(0x80, 0x100)), bytes(range(256)))'",
      "python3 -c 'import os\n"
      "allb = bytes(b for b in range(1, 256) if b != 0x2f)\n"
      "for b in range(1, 256):\n"
      "    if b in (0x2e, 0x2f): continue\n"
      "    if b % 3 == 0: os.rename(b\"d/\" + bytes([b]), b\"d/\" + bytes([b, b]))\n"
      "    elif b % 3 == 1: os.unlink(b\"d/\" + bytes([b]))\n"
      "os.rename(allb, allb[::-1] + b\"/\" + allb)\n"
      "os.link(allb[::-1] + b\"/\" + allb, b\".\\xff..\")\n"
      "os.unlink(b\"sym\"); os.symlink(bytes(range(255, 0, -1)), b\"sym\")\n"
      "os.setxattr(b\".\\xff..\", b\"user.\\x01\\x7f\", b\"\\x00\")'"),
    # files around the inline limit (2,048 by default, 4,095 with max_inline=4096 on 64 KiB
    # nodes: make matrix) grown past it, cut below it, rewritten; an inline extent cloned
    S("inline-boundaries",
      "for n in 1 2047 2048 2049 4095 4096 4097; do head -c $n /dev/urandom > r$n;"
      " head -c $n /dev/zero | tr \"\\\\0\" a > z$n; done",
      "printf x >> r2047; printf xy >> z4095; truncate -s 100 r4096; truncate -s 2000 z2049;"
      " printf Q | dd of=r2048 bs=1 conv=notrunc status=none;"
      " head -c 4096 /dev/zero | tr \"\\\\0\" q > n4096;"
      " truncate -s 3000 z4097; printf tail >> z4097; cp --reflink=always z2047 zc;"
      " head -c 4000 /dev/urandom > n4000; truncate -s 0 r1; printf 12 > r1;"
      " truncate -s 8192 z2048"),
    # xattr names of 255 bytes (the limit), empty values, values with NULs
    S("xattr-long-names",
      "touch f; mkdir d; for c in a b c; do setfattr -n user.$(printf \"$c%.0s\" $(seq 250))"
      " -v val$c f; done; setfattr -n user.nul -v 0x00ff00 f; setfattr -n user.empty f;"
      " for i in $(seq 10 17); do setfattr -n user.$i$(printf 'x%.0s' $(seq 248))"
      " -v $(printf 'v%.0s' $(seq 60)) d; done",
      "setfattr -x user.$(printf 'a%.0s' $(seq 250)) f;"
      " setfattr -n user.$(printf 'b%.0s' $(seq 250)) -v 0x0000 f; setfattr -n user.empty -v e f;"
      " setfattr -n user.nul f; for i in $(seq 10 3 17); do"
      " setfattr -x user.$i$(printf 'x%.0s' $(seq 248)) d; done; mv f d/f"),
    # immutable and append-only files and directories (the flags are not sent before v3;
    # what is written while they are lifted is)
    S("immutable-append-only",
      "echo a > imm; chattr +i imm; echo b > app; chattr +a app; mkdir adir; echo c > adir/f;"
      " chattr +a adir; mkdir idir; echo d > idir/f; chattr +i idir; echo e > plain",
      "chattr -i imm; echo more >> imm; chattr +i imm; echo more >> app; touch adir/new;"
      " chattr -i idir; rm idir/f; chattr +i idir; chattr +i plain; chattr -a adir",
      btrfs_only=True),
    # -- session 19 --
    # one file whose extents were written under zlib, lzo, zstd and none (the compression
    # property changed between writes, each written back before the next), holes between;
    # B rewrites parts of them under another algorithm (v2: encoded writes of part of an
    # extent), punches holes in them, clones ranges within the file and into a new one
    # (lzo), dedupes the file with itself
    S("encoded-every-compression-holes",
      "touch f g; seq 1 40000 > text;"
      f" {PROP} f compression zlib;"
      " xfs_io -c 'pwrite -S 0x61 0 200K' -c 'pwrite -i text 256K 100K' -c fsync f;"
      f" {PROP} f compression lzo;"
      " xfs_io -c 'pwrite -S 0x62 512K 200K' -c 'pwrite -i text 800K 60K' -c fsync f;"
      f" {PROP} f compression zstd; xfs_io -c 'pwrite -S 0x63 1M 300K' -c fsync f;"
      f" {PROP} f compression no; xfs_io -c 'pwrite -S 0x64 1536K 64K' -c fsync f;"
      " head -c 70000 /dev/urandom > rnd; xfs_io -c 'pwrite -i rnd 1700K 70000' -c fsync f;"
      f" truncate -s 2M f; {PROP} g compression lzo;"
      " xfs_io -c 'pwrite -S 0x65 0 3000' -c fsync g",
      f"{PROP} f compression zstd; xfs_io -c 'pwrite -S 0x71 64K 8K' -c fsync f;"
      f" {PROP} f compression zlib;"
      " xfs_io -c 'pwrite -S 0x72 600K 16K' -c 'pwrite -S 0x73 1300K 100K' -c fsync f;"
      " xfs_io -c 'fpunch 540K 40K' -c 'fpunch 1100K 24K' f;"
      " xfs_io -c 'reflink f 512K 2176K 128K' -c 'reflink f 0 2432K 64K' f;"
      f" touch h; {PROP} h compression lzo;"
      " xfs_io -c 'reflink f 1M 0 256K' -c 'pwrite -S 0x74 300K 4K' -c fsync h;"
      " xfs_io -c 'dedupe f 0 128K 64K' f; xfs_io -c 'pwrite -S 0x75 3000 1000' -c fsync g;"
      f" {PROP} g compression zlib; xfs_io -c 'pwrite -S 0x76 8K 4K' -c fsync g",
      btrfs_only=True),
    # chattr +C files and clones among them (reflinks, dedupe, a clone over preallocation):
    # a write into a shared nodatacow extent is copied on write after all
    S("nocow-clones",
      "mkdir nc; chattr +C nc; xfs_io -f -c 'pwrite -S 0x41 0 512K' nc/a;"
      " cp --reflink=always nc/a nc/b;"
      " xfs_io -f -c 'pwrite -S 0x42 0 128K' -c 'reflink nc/a 128K 128K 128K' nc/c;"
      " xfs_io -f -c 'falloc 0 256K' nc/p",
      "xfs_io -c 'pwrite -S 0x43 64K 8K' nc/a; xfs_io -c 'reflink nc/b 0 256K 64K' nc/c;"
      " xfs_io -c 'fpunch 300K 40K' nc/b; truncate -s 1M nc/c;"
      " xfs_io -c 'reflink nc/a 0 64K 64K' -c 'pwrite -S 0x44 192K 4K' nc/p;"
      " xfs_io -c 'dedupe nc/b 128K 0 64K' nc/a; cp --reflink=always nc/p nc/p2;"
      " xfs_io -c 'pwrite -S 0x45 0 4K' nc/p2"),
    # directories rotated in a cycle (a -> c, b -> a, c -> b), hard links moved across
    # them, a subtree moved under another, a removed directory's name taken by a new one
    # that receives a rotated directory, a directory emptied and removed
    S("dir-cycle-links-moved",
      "mkdir -p a/x/deep b/y c/z e; echo 1 > a/x/f; ln a/x/f b/y/l1; ln a/x/f c/z/l2;"
      " echo 2 > a/x/deep/g; echo 3 > e/h; ln e/h a/hl",
      "mv a t; mv b a; mv c b; mv t c; mv c/x b/z/x; mv a/y/l1 c/l1moved; rm b/z/l2;"
      " mv e/h a/y/h; rmdir e; mkdir e; mv c e/c; mv b/z/x/deep deep; ln deep/g e/c/g2;"
      " mv b/z/x/f b/z/f; rmdir b/z/x"),
    # unaligned truncations and extensions: a tail zeroed past a cut, shrunk then grown,
    # grown into preallocation past EOF, a clone ending in a file's last partial block
    S("truncate-extend-unaligned",
      "head -c 300000 /dev/urandom > f; xfs_io -f -c 'pwrite -S 0x61 0 100001' g;"
      " cp --reflink=always f f2; head -c 5000 /dev/urandom > s",
      "truncate -s 123457 f; xfs_io -c 'pwrite -S 0x62 200000 5000' f; truncate -s 50000 g;"
      " truncate -s 150000 g; xfs_io -c 'falloc -k 300000 100000' f2; truncate -s 350000 f2;"
      " xfs_io -c 'pwrite -S 0x63 340000 100' f2; xfs_io -f -c 'reflink f2 0 0 299008' f3;"
      " truncate -s 4097 s; truncate -s 12288 s"),
    # -- session 22 --
    # hard links taking the paths of their removed parents (a file where its directory
    # was, a link where an ancestor two levels up was), a link taking its parent's name
    S("links-replace-parents",
      "mkdir -p p/q/r s/t; echo x > p/q/r/f; echo y > p/g; echo z > s/t/h; ln s/t/h s/h2",
      "mv p/q/r/f top; rm -r p; ln top p; mkdir q; ln top q/r; mv s/t/h s/hh; rmdir s/t;"
      " ln s/hh s/t; mv s/h2 tmp; mv s s2; mv tmp s"),
    # a chain of 40 directories, each with a file, turned inside out (the deepest becomes
    # the outermost) and its top renamed to the name the old top had
    S("deep-chain-reversed",
      "p=.; for i in $(seq 1 40); do p=$p/d$i; mkdir $p; echo $i > $p/f; done",
      "for i in $(seq 40 -1 2); do mv \"$(find . -type d -name d$i)\" x$i; done;"
      " mv d1 x2/; for i in $(seq 2 39); do mv x$i x$((i + 1))/; done; mv x40 d1"),
    # rename(2) over existing targets: a file over a file with another link, a directory
    # over an empty one (mv -T), a symlink over a file, a file over a removed directory's
    # name, a directory and a file exchanging names through a temporary one
    S("rename-over-existing",
      "echo a > a; echo b > b; ln b b2; mkdir d empty e; echo c > d/c; ln -s a s; echo t > t;"
      " echo f > f; mkdir g; echo gg > g/gg",
      "mv -f a b; mv -T d empty; mv -f s t; rmdir e; mv -T b2 e; mv g tmp; mv f g;"
      " mv tmp f; mv -f empty/c g"),
    # clones whose source file B renamed or removed: the clone source is the parent
    # snapshot's file at its old path
    S("clone-from-renamed-removed",
      "head -c 1M /dev/urandom > f; head -c 512K /dev/urandom > g; mkdir d",
      "mv f d/f2; cp --reflink=always d/f2 h; xfs_io -f -c 'reflink g 0 0 256K' k; rm g;"
      " xfs_io -c 'reflink d/f2 0 512K 128K' h; xfs_io -c 'pwrite -S 0x5a 0 4K' d/f2"),
    # preallocation and sizes: past EOF only (a sparse file), within EOF (falloc without
    # -k reads as zeros), a file grown into and written past its preallocation, zeroed
    # ranges kept past EOF, a clone past EOF leaving a hole before it
    S("prealloc-eof-sequences",
      "xfs_io -f -c 'pwrite -S 0x61 0 10K' -c 'falloc -k 10K 1M' a;"
      " xfs_io -f -c 'falloc 0 64K' b; xfs_io -f -c 'truncate 1M' -c 'falloc -k 2M 1M' c;"
      " xfs_io -f -c 'pwrite -S 0x62 0 64K' src",
      "truncate -s 600K a; xfs_io -c 'pwrite -S 0x63 700K 4K' a;"
      " xfs_io -c 'fpunch 16K 16K' -c 'falloc -k 128K 64K' -c 'pwrite -S 0x64 8K 1K' b;"
      " truncate -s 2500K c; xfs_io -c 'fzero -k 3M 64K' c;"
      " xfs_io -c 'reflink src 0 1M 64K' b"),
    # xattrs on directories through their lives: one removed and made again (another
    # inode, other xattrs), one moved under a directory moved under it first, one replaced
    # by a file of its name with the same xattr name, the root's changed
    S("xattrs-dirs-lifecycle",
      "mkdir -p a/b c z; setfattr -n user.x -v 1 a; setfattr -n user.y -v 2 a/b;"
      " setfattr -n user.c -v old c; setfattr -n user.z -v dir z; setfattr -n user.r -v r .",
      "rmdir c; mkdir c; setfattr -n user.c2 -v new c; mv a/b b; mv a b/a;"
      " setfattr -n user.y -v 3 b; rmdir z; echo f > z; setfattr -n user.z -v file z;"
      " setfattr -x user.r .; setfattr -n user.r2 -v q ."),
    # subvolumes inside the sent one (empty directories in its stream) renamed, moved,
    # deleted and replaced by a directory, and a snapshot of the subvolume inside itself
    S("nested-subvolumes-moved",
      "btrfs -q subvolume create sv; mkdir d; btrfs -q subvolume create d/sv2;"
      " echo x > sv/f; echo y > d/y",
      "mv sv d/sv-moved; btrfs -q subvolume delete d/sv2; mkdir d/sv2; echo z > d/sv2/z;"
      " btrfs -q subvolume snapshot . self",
      btrfs_only=True),
    # many directories with many hard links each to a few files, most directories removed
    # (with their links), the rest renamed, links added in new directories
    S("many-dirs-many-links",
      "echo 1 > f1; echo 2 > f2; head -c 20000 /dev/urandom > f3;"
      " for d in $(seq 1 30); do mkdir d$d;"
      " for i in $(seq 1 15); do ln f1 d$d/a$i; ln f2 d$d/b$i; done; ln f3 d$d/c; done",
      "for d in $(seq 1 24); do rm -r d$d; done; for d in $(seq 25 30); do mv d$d e$d; done;"
      " mkdir n; for i in $(seq 1 40); do ln f1 n/x$i; done; rm f2; ln f3 n/f2"),
    # nestings rotated: a directory moved under what was its sibling's child while that
    # sibling moves under it, two directories swapping parent and child with their names,
    # a directory moved ten levels up past one moved ten levels down
    S("nesting-rotations",
      "mkdir -p a/b c/d e/f/g k/1/2/3/4/5/6/7/8/9/10 m; echo 1 > a/b/x; echo 2 > c/d/y;"
      " echo 3 > e/f/g/z; echo 4 > k/1/2/3/4/5/6/7/8/9/10/w",
      "mv a/b t; mv c/d a/b; mv c t/c; mv t c; mv e/f/g g; mv e g/e; mv g/e/f g/f;"
      " mv k/1/2/3/4/5/6/7/8/9/10 m/ten;"
      " mv m k/1/2/3/4/5/6/7/8/9/m; mv k/1 one"),
    # -- session 23 --
    # many files replaced by directories of their names (some taking the file inside) and
    # directories replaced by files (some by their only file), in one incremental
    S("files-to-dirs-and-back",
      "for i in $(seq 1 40); do echo f$i > f$i; done;"
      " for i in $(seq 1 20); do mkdir d$i; echo in$i > d$i/in; done; mkdir keep; echo k > keep/f1",
      "for i in $(seq 1 30); do rm f$i; mkdir f$i; echo new$i > f$i/x; done;"
      " for i in $(seq 31 40); do mv f$i t; mkdir f$i; mv t f$i/f$i; done;"
      " for i in $(seq 1 10); do rm -r d$i; echo file$i > d$i; done;"
      " for i in $(seq 11 20); do mv d$i/in t; rmdir d$i; mv t d$i; done;"
      " mv keep/f1 f1/f1; rmdir keep; echo k2 > keep"),
    # a directory renamed to a name its own child or grandchild had: q/q/q's three names
    # rotated (each takes the name of another), p moved under its child as c/c, s moved
    # under its grandchild as u
    S("dir-takes-child-name",
      "mkdir -p q/q/q p/c/g s/t/u; echo 1 > q/q/q/f; echo 2 > p/c/g/f; echo 3 > s/t/u/f",
      "mv q/q/q q3; mv q/q q2; mv q q2/q; mv q2 q; mv q3 q/q/q; mv p/c c; mv p c/c;"
      " mv s/t/u x; mv s x/u"),
    # owner, mode, times and xattrs changed on inodes that are then unlinked: a file with
    # a link left elsewhere, one removed whole, a directory, a renamed file whose second
    # link goes, a symlink replaced
    S("metadata-then-unlinked",
      "echo a > f; mkdir d e; ln f d/f-link; echo b > g; echo c > e/h; echo x > h; ln h h2;"
      " ln -s t sl",
      "chown 5:6 f; touch -d '2005-05-05' f; setfattr -n user.m -v 1 f; rm f;"
      " touch -d '2006-06-06' g; chmod 600 g; chown 7 g; rm g;"
      " touch -d '2007-07-07' e/h e; chown 8 e; rm -r e;"
      " chmod 640 h; touch -d '2008-08-08' h; mv h h3; rm h2;"
      " touch -h -d '2009-09-09' sl; chown -h 9 sl; rm sl; ln -s t2 sl"),
    # the read-only snapshots made writable, changed and read-only again before the sends
    # (A: the parent then differs from what B was made of), B toggled without a change
    S("ro-toggled-snapshots",
      "echo a > f; mkdir d; echo b > d/g; echo keep > k; mkdir e",
      "echo c >> f; touch n; mkdir e/sub",
      btrfs_only=True,
      after="btrfs property set $A ro false; echo changed > $A/d/g; rm $A/k; mkdir $A/added;"
      " mv $A/e $A/d/e; btrfs property set $A ro true;"
      " btrfs property set $B ro false; btrfs property set $B ro true"),
    # extents shared with subvolumes outside the sent one (a sibling subvolume, a nested
    # one): no clone source holds them, so the kernel writes them
    S("reflinks-across-subvolumes",
      'x=../ext-$(basename "$PWD"); btrfs -q subvolume create $x;'
      " head -c 512K /dev/urandom > $x/big; xfs_io -f -c 'pwrite -S 0x71 0 128K' $x/small;"
      " cp --reflink=always $x/big f; btrfs -q subvolume create inner;"
      " head -c 256K /dev/urandom > inner/data; cp --reflink=always inner/data g",
      'x=../ext-$(basename "$PWD"); xfs_io -c "reflink $x/big 128K 0 128K" g;'
      ' xfs_io -f -c "reflink $x/small 0 64K 64K" -c "reflink inner/data 0 0 64K" h;'
      " xfs_io -c 'reflink g 0 512K 256K' f; cp --reflink=always inner/data inner-copy;"
      " head -c 64K /dev/urandom > $x/more; cp --reflink=always $x/more m",
      btrfs_only=True),
    # files recompressed in place (defragment -c: the same content, other extents), files
    # whose compression property has a level, a property changed between two appends,
    # a hole punched in a compressed file, an inline extent grown
    S("recompressed-same-content",
      "seq 1 40000 > f; seq 2 40000 > g; seq 3 40000 > h; touch p q;"
      " btrfs property set p compression zstd:15; btrfs property set q compression zlib:9;"
      " seq 1 30000 > p; seq 5 30000 > q; printf 'inline%.0s' $(seq 1 300) > i",
      "btrfs filesystem defragment -czstd f; btrfs filesystem defragment -clzo g h;"
      " btrfs filesystem defragment -czlib p; seq 1 100 >> q;"
      " btrfs property set q compression lzo; seq 1 100 >> q;"
      " xfs_io -c 'fpunch 8K 8K' p; printf x >> i",
      btrfs_only=True),
    # clones inside one file of ranges ending at its unaligned EOF, past the EOF (growing
    # it) and of an aligned block to the start
    S("same-file-clones-unaligned-eof",
      "head -c 100001 /dev/urandom > f; head -c 5000 /dev/urandom > g;"
      " head -c 12289 /dev/urandom > h",
      'xfs_io -c "reflink f 0 204800 100001" f;'
      ' xfs_io -c "reflink g 0 8192 5000" -c "reflink g 12288 16384 904" g;'
      ' xfs_io -c "reflink h 8192 0 4096" -c "reflink h 12288 20480 1" h'),
    # paths made again after their directories went: a/b/c moved out, its ancestors
    # removed and made again, moved back; x's child moved up to take x's place, a new
    # directory of the child's name made in it
    S("rmdir-recreated-same-path",
      "mkdir -p a/b/c x/y; echo 1 > a/b/c/f; echo 2 > x/y/g",
      "mv a/b/c c; rm -r a; mkdir -p a/b; mv c a/b/c; echo 3 >> a/b/c/f;"
      " mv x/y y; rmdir x; mv y x; mkdir x/y"),
    # 300 files' names shifted by one (each takes the next one's; the last the first's),
    # and a cycle of 60 directories, each with its file, renamed the same way
    S("names-shifted-cycles",
      "for i in $(seq 1 300); do echo $i > f$i; done;"
      " for i in $(seq 1 60); do mkdir d$i; echo $i > d$i/in; done",
      "mv f300 tmp; for i in $(seq 299 -1 1); do mv f$i f$((i + 1)); done; mv tmp f1;"
      " mv d60 tmp; for i in $(seq 59 -1 1); do mv d$i d$((i + 1)); done; mv tmp d1"),
    # names that change type in a rotation: a file, a directory and a symlink (to the
    # directory) exchange their names, a directory becomes a symlink to its own old name's
    # new place, a FIFO a directory, and a directory of one file becomes that file
    S("types-swap-names",
      "echo f > a; mkdir b; echo in > b/in; ln -s b c; mkfifo p; mkdir q; echo q > q/only",
      "mv a t; mv b a; mv c b; mv t c; mv a d; ln -s d a; rm p; mkdir p; mv c p/c;"
      " mv q/only t; rmdir q; mv t q"),
    # session 25: names in the root that look like the orphan names a sender picks
    # (o<ino>-<gen>-<idx>, for the inode numbers and generations this recipe's inodes get),
    # some removed, some made, while a swap and a deletion need orphans
    S("orphan-like-names",
      "mkdir a b c; echo 1 > a/f; echo 2 > b/g; echo 3 > c/h;"
      " for i in $(seq 256 262); do for g in $(seq 0 30); do touch o$i-$g-0; done;"
      " touch o$i-0-1 o$i-0-2; done",
      "mv a t; mv b a; mv t b; for i in $(seq 256 262); do for g in $(seq 0 2 30); do"
      " rm o$i-$g-0; done; mkdir o$i-1-1; done; mv c/h o257-0-3; rmdir c; mkdir c;"
      " mv o256-1-0 c/moved"),
    # compression properties removed from the root and a directory, then files and
    # directories made in them: new inodes inherit a directory's property when they are
    # made, so a stream must remove the property before it makes them
    S("compression-property-removed-new-files",
      "mkdir d e; btrfs property set . compression zstd; btrfs property set d compression lzo;"
      " btrfs property set e compression zlib; echo x > d/old; echo y > e/old",
      "btrfs property set . compression ''; btrfs property set d compression '';"
      " echo y > d/new; mkdir newdir; echo z > newdir/f; echo w > top; mkdir d/sub;"
      " btrfs property set e compression zstd; echo v > e/new",
      btrfs_only=True),
    # the root's compression property set once the tree exists (its directories do not
    # have it), then files and directories made in those directories: btrfs send makes
    # them as orphans in the root, where they inherit the property, and never removes it
    S("compression-property-root-new-files",
      "mkdir -p d/e; echo x > d/old; btrfs property set . compression zstd",
      "echo y > d/new; mkdir d/sub; echo z > d/e/f; mkdir top; echo w > top/g",
      btrfs_only=True),
    # -- session 31: classes of the upstream tests' kinds that no recipe held yet --
    # explicit times set on directories and files after their entries changed (a receiver
    # must set a directory's times after the last entry it makes or removes in it), an
    # atime alone, a moved directory's own times
    S("utimes-after-dir-changes",
      "mkdir -p d1/d2 d3; echo a > d1/f; echo b > d1/d2/g; ln d1/f d3/fl;"
      " touch -d @1000000000 d1/f d1/d2/g d1/d2 d1 d3",
      "echo c >> d1/d2/g; mv d1/f d3/f; touch d3/new; mv d1/d2 d3/d2;"
      " touch -d @1100000000.123456789 d3/d2/g; touch -d @1200000000.5 d3/d2;"
      " touch -m -d @1300000000 d1; touch -a -d @1400000000.25 d3/f; rm d3/fl;"
      " mkdir d4; touch -d @900000000 d4; mv d4 d3/d4; touch -d @1500000000 d3"),
    # access ACLs with named entries, then chmod (which rewrites the ACL's mask), an ACL
    # replaced on a new file and one removed with the mode changed after it
    S("acl-access-chmod",
      f"echo x > f; mkdir d; echo y > h; echo z > g;"
      f" setfattr -n system.posix_acl_access -v {_ACL_USER} f;"
      f" setfattr -n system.posix_acl_access -v {_ACL_GROUP} d;"
      f" setfattr -n system.posix_acl_access -v {_ACL_USER} h",
      f"chmod 640 f; chmod 705 d; setfattr -n system.posix_acl_access -v {_ACL_GROUP} g;"
      " setfattr -x system.posix_acl_access h; chmod 604 h; echo w >> f"),
    # file capabilities the kernel removes by itself: a chown (no setcap after it), a
    # write; one set again after its chown
    S("caps-cleared-by-chown",
      "printf a > t1; printf b > t2; printf c > t3; chmod 755 t1 t2 t3;"
      " setcap cap_net_raw+ep t1; setcap cap_sys_nice+ep t2; setcap cap_chown+ep t3",
      "chown 1000:1000 t1; chown 1000 t2; setcap cap_sys_nice+ep t2; chmod 700 t3;"
      " printf d >> t3"),
    # xattrs of a hard-linked file whose first name is removed and another renamed, the
    # same value set again, a directory moved while its xattrs change
    S("xattrs-on-renamed-links",
      "mkdir d e; echo x > d/f; ln d/f d/f2; ln d/f e/f3; setfattr -n user.a -v 1 d/f;"
      " setfattr -n user.same -v keep d/f; mkdir d/sub; setfattr -n user.dir -v 1 d/sub",
      "rm d/f; mv d/f2 e/renamed; setfattr -n user.a -v 2 e/f3;"
      " setfattr -n user.same -v keep e/f3; setfattr -n user.b -v new e/renamed;"
      " mv d/sub e/sub; setfattr -x user.dir e/sub; setfattr -n user.dir2 -v 2 e/sub;"
      " mv d e/moved"),
    # an inline extent followed by a hole and a regular extent (Linux "send, fix file hole
    # not being preserved due to inline extent"): compressed 4 KiB at 0 is inline, as
    # 1,000 bytes are without compression
    S("inline-extent-then-hole",
      "xfs_io -f -c 'pwrite -S 0xaa 0 4K' -c fsync -c 'pwrite -S 0xbb 8K 4K' foo;"
      " xfs_io -f -c 'pwrite -S 0x11 0 1000' -c fsync -c 'pwrite -S 0x22 64K 4K' bar",
      "xfs_io -c 'pwrite -S 0xcc 16K 4K' foo; xfs_io -c 'pwrite -S 0x33 200 100' bar;"
      " xfs_io -f -c 'pwrite -S 0x44 0 3000' -c fsync -c 'truncate 1M' baz"),
    # every extent of a file punched (its size kept), every hole of another filled
    S("punch-whole-fill-holes",
      "xfs_io -f -c 'pwrite -S 0x61 0 256K' dense;"
      " xfs_io -f -c 'truncate 256K' -c 'pwrite -S 0x62 64K 4K' -c 'pwrite -S 0x63 200K 4K'"
      " sparse",
      "xfs_io -c 'fpunch 0 256K' dense; xfs_io -c 'pwrite -S 0x64 0 64K'"
      " -c 'pwrite -S 0x65 68K 132K' -c 'pwrite -S 0x66 204K 52K' sparse"),
    # renameat2(RENAME_WHITEOUT) of a file and a directory: whiteouts (character devices
    # 0:0, mode 0) take their names
    S("rename-whiteout",
      "echo a > f; mkdir d; echo b > d/g",
      _WHITEOUT + " f f2 d d2; echo c > d2/g2"),
    # O_TMPFILE files linked in: a new file and an atomic replacement (linkat, rename over)
    S("tmpfile-linked-atomic-replace",
      "echo old > keep; echo other > other",
      _TMPFILE_LINK + "; echo more >> other"),
    # a parent/child inversion whose delayed directories get a new mode, owner, xattr and
    # times in B (sent while their renames wait)
    S("delayed-move-dir-metadata",
      "mkdir -p a/b/c d; echo 1 > a/b/c/f; setfattr -n user.x -v 1 a/b",
      "mv a/b/c d/c; mv a d/c/a; chmod 700 d/c/a; chown 5:6 d/c/a/b;"
      " setfattr -n user.x -v 2 d/c/a/b; chmod 750 d/c; touch -d @1234567890 d/c"),
    # a directory removed, another takes its name, and what the removed one held moves
    # below a new directory in it, with a directory of the old tree moved below that
    S("dir-takes-removed-dir-name-moved-in",
      "mkdir -p a/x b c; echo 1 > a/x/f; echo 2 > b/g",
      "mv a/x c/x; rmdir a; mv b a; mkdir a/new; mv c/x a/new/x; mv c a/new/x/c"),
    # preallocated (unwritten) extents inside a file's data, past its end with the size
    # grown (falloc without -k), then written in part and punched
    S("prealloc-inside-data",
      "xfs_io -f -c 'pwrite -S 0x61 0 64K' -c 'fpunch 16K 16K' -c 'falloc 16K 16K'"
      " -c 'falloc 64K 64K' f; xfs_io -f -c 'falloc 0 32K' -c 'pwrite -S 0x62 8K 4K' g",
      "xfs_io -c 'pwrite -S 0x63 20K 4K' -c 'falloc 128K 32K' f;"
      " xfs_io -c 'fpunch 8K 4K' -c 'falloc 40K 8K' g"),
    # copy_file_range(2) between files and within one: block-aligned ranges become
    # reflinks, unaligned ones copies; B also sent with a clone source (-p A -c C)
    S("copy-range-unaligned",
      "xfs_io -f -c 'pwrite -S 0x71 0 192K' src; xfs_io -f -c 'pwrite -S 0x72 0 64K' dst",
      "xfs_io -c 'copy_range -s 4097 -d 10000 -l 50000 src' dst;"
      " xfs_io -c 'copy_range -s 64K -d 128K -l 64K src' dst;"
      " xfs_io -c 'copy_range -s 0 -d 200K -l 12345 src' src",
      clones=True),
    # owner, mode and times of a fifo, a socket, a device and a symlink changed alone
    S("owner-mode-on-special-files",
      "mkfifo p; mknod c c 1 3; ln -s target l;"
      " python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind(\"sock\")'",
      "chown 3:4 p; chmod 600 p; chown -h 5:6 l; chmod 1750 c; chown 7 sock; chmod 700 sock;"
      " touch -d @1000000000 p c sock; touch -h -d @1100000000 l"),
    # chattr +c / -c / +m: the COMPRESS flag sets the btrfs.compression property (an xattr
    # in the stream), NOCOMPRESS is a flag alone (FILEATTR, which v2 streams carry too);
    # new inodes inherit both from their directory
    S("chattr-compress-flag",
      "mkdir d e; echo x > f; chattr +c d; chattr +c f; echo y > d/in; chattr +c e",
      "chattr -c f; chattr -c +m d; echo z > d/new; mkdir d/sub; touch g; chattr +c g;"
      " echo w > e/new; mkdir e/sub2; chattr -c e",
      btrfs_only=True),
    # holes punched and zeroed inside inline extents (btrfs writes the zeros inline)
    S("punch-inline",
      "xfs_io -f -c 'pwrite -S 0x61 0 3000' p1; xfs_io -f -c 'pwrite -S 0x62 0 3000' p2;"
      " xfs_io -f -c 'pwrite -S 0x63 0 2000' p3",
      "xfs_io -c 'fpunch 1000 500' p1; xfs_io -c 'fpunch 0 3000' p2;"
      " xfs_io -c 'fzero 100 100' -c 'fpunch 1500 1000' p3"),
    # symlink targets of 3,900 bytes (near what a 4 KiB node's inline item holds), one
    # replaced by another of the same name, one renamed
    S("long-symlink-targets",
      "ln -s $(printf 'd/%.0s' $(seq 1 1950)) l1; ln -s $(printf 'x%.0s' $(seq 1 255)) l2",
      "rm l1; ln -s $(printf 'e/%.0s' $(seq 1 1950))t l1; mv l2 l3;"
      " ln -s $(printf 'y/%.0s' $(seq 1 1000)) l4"),
    # namespaced (version 3) file capabilities, whose xattr holds a root user id
    S("caps-v3-rootid",
      "printf a > f; printf b > g; setcap -n 1000 cap_net_raw+ep f",
      "setcap -n 2000 cap_net_raw+ep f; setcap -n 1000 cap_sys_nice+ep g"),
]
del S
