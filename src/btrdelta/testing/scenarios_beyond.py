"""Scenarios of classes the upstream send tests leave thin, built by hand.

Session 16 (a new user's trial): FALLOC_FL_ZERO_RANGE, renameat2(RENAME_EXCHANGE), default
POSIX ACLs, xattrs on moved directories, the subvolume root's metadata, clones of ranges
with holes, inode numbers reused across types, symlink times, set-user-ID after chown.
:mod:`btrdelta.testing.scenarios` runs them with the upstream ones (none of these remounts
or holds files open).
"""

from __future__ import annotations

from .recipe import Scenario

__all__ = ["BEYOND"]

#: exchange names pairwise with renameat2(RENAME_EXCHANGE): ``$_EXCHANGE a b c d``
_EXCHANGE = ("python3 -c 'import ctypes, os, sys\nlibc = ctypes.CDLL(None, use_errno=True)\n"
             "for a, b in zip(sys.argv[1::2], sys.argv[2::2]):\n"
             "    if libc.renameat2(-100, a.encode(), -100, b.encode(), 2):\n"
             "        raise OSError(ctypes.get_errno(), a)'")
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
      _EXCHANGE + " d1 d2 x y d1/g d2/f; echo 4 >> d2/f"),
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
]
del S
