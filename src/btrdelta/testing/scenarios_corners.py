"""Scenarios of session 32: corner cases of the kernel's send.c, and streams under stress.

:data:`CORNERS` (in ``make test`` with the others): inode numbers reused across special
types, paths near PATH_MAX, clones into holes and holes over data, compressed inline
extents of every algorithm and level, a removed tree whose children moved first, xattrs on
replaced symlinks, punches and zeroes across EOF, names taken from removed parents, name
swaps among hard links, renames over special files, RENAME_EXCHANGE with links, an
inversion with links, a directory's times alone, the root's mtime the kernel's UTIMES cache
loses. :data:`STRESS` (``make matrix`` only, :data:`~btrdelta.testing.scenarios.MATRIX_SCENARIOS`):
2,000 renames into new directories, 1,000 entries made again, 600 255-byte names, a chain
of 600 directories inverted halfway.
"""

from __future__ import annotations

from .recipe import EXCHANGE, PROP, Scenario

__all__ = ["CORNERS", "STRESS"]

#: make a Unix socket: ``$_SOCKET path``
_SOCKET = "python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])'"
#: ``L c n``: ``n`` times the character ``c``; ``$p``: 14 nested directories of 250-byte
#: names (3,514 bytes), ``$q`` its parent
_DEEP = ("L() { printf \"$1%.0s\" $(seq $2); }; p=.;"
         " for c in a b c d e f g h i j k l m n; do p=$p/$(L $c 250); done; q=$(dirname $p)")

S = Scenario

CORNERS: list[Scenario] = [
    # the inode numbers of a fifo, a device, a symlink, a socket, a directory with a child
    # and a file reused after a remount by other types, most under their old names
    S("ino-reuse-special-types",
      "mkfifo p; mknod c c 1 3; ln -s t l;"
      f" {_SOCKET} s; mkdir d; echo x > d/in; echo f > f",
      "rm -r p c l s d f\nREMOUNT\nmkdir p; echo data > c; mkfifo l; ln -s p s;"
      f" mknod d b 7 0; {_SOCKET} f; echo more > g"),
    # paths of 3,700-3,800 bytes (14 directories of 250-byte names): two deep siblings
    # swap names, the deepest file moves up, a 255-byte name is made at the bottom, a
    # directory halfway down takes another 250-byte name
    S("paths-near-path-max",
      f"{_DEEP}; mkdir -p $p $q/x $q/y; echo deep > $p/$(L z 200); echo 1 > $q/x/f;"
      " echo 2 > $q/y/g",
      f"{_DEEP}; mv $q/x $q/t; mv $q/y $q/x; mv $q/t $q/y; mv $p/$(L z 200) ./$(L m 250);"
      " echo new > $p/$(L w 255); mv ./$(L a 250)/$(L b 250)/$(L c 250)/$(L d 250)/$(L e 250)"
      "/$(L f 250)/$(L g 250) ./$(L a 250)/$(L b 250)/$(L c 250)/$(L d 250)/$(L e 250)"
      "/$(L f 250)/$(L G 250)"),
    # ranges cloned into holes, a range of holes cloned over data (which becomes a hole),
    # a clone past EOF growing the file, clones inside one file into its own hole
    S("clone-into-hole",
      "xfs_io -f -c 'pwrite -S 0x41 0 256K' src;"
      " xfs_io -f -c 'truncate 1M' -c 'pwrite -S 0x42 0 64K' -c 'pwrite -S 0x43 768K 64K' dst;"
      " xfs_io -f -c 'truncate 512K' holes;"
      " xfs_io -f -c 'pwrite -S 0x44 0 128K' -c 'truncate 512K' self",
      "xfs_io -c 'reflink src 0 256K 128K' -c 'reflink holes 0 0 64K'"
      " -c 'reflink src 64K 1M 64K' dst;"
      " xfs_io -c 'reflink self 0 256K 128K' -c 'reflink holes 0 32K 64K' self"),
    # inline extents compressed by each algorithm and level (the btrfs.compression property
    # with a level: zlib:1, zlib:9, lzo, zstd:1, zstd:15, zstd:-3; v2 sends them as encoded
    # writes), rewritten inline, grown past the inline limit, cut, written into, given
    # another algorithm, cloned whole into a new file
    S("inline-encoded-levels",
      "for p in zlib:1 zlib:9 lzo zstd:1 zstd:15 zstd:-3; do f=i${p/:/_}; touch $f;"
      f" {PROP} $f compression $p; seq 1 500 > $f; done; touch big;"
      f" {PROP} big compression zstd:15; seq 1 100000 > big",
      "seq 1 600 > izlib_1; seq 1 5000 >> izlib_9; truncate -s 1000 ilzo;"
      f" {PROP} izstd_1 compression zlib:3; seq 2 501 > izstd_1;"
      " xfs_io -c 'pwrite -S 0x61 100 10' izstd_15; cp --reflink=always izstd_-3 copy;"
      " truncate -s 8K izstd_-3; xfs_io -c 'pwrite -S 0x62 64K 4K' big",
      btrfs_only=True),
    # a directory tree removed whose deepest directory's children went elsewhere first:
    # a file into a directory that itself moves, a directory into that, one to the root
    # taking a file along; the removed top's name taken by a directory from inside it
    S("rmdir-after-children-moved-deep",
      "mkdir -p a/b/c/d/sub1 a/b/c/d/sub2/deep x y; echo 1 > a/b/c/d/f1;"
      " echo 2 > a/b/c/d/sub2/deep/f2; echo 3 > a/b/f3",
      "mv a/b/c/d/f1 x/; mv x y/x; mv a/b/c/d/sub2 y/x/sub2; mv a/b/c/d/sub1 sub1;"
      " mv a/b/f3 sub1/; rm -r a; mv y/x/sub2/deep a"),
    # trusted and security xattrs on symlinks and directories: a symlink replaced by a new
    # one of its name, one moved and its xattr changed, a directory renamed and another
    # made under its name with the same xattr name
    S("xattrs-symlinks-replaced",
      "ln -s t1 l1; ln -s t2 l2; ln -s t3 l3; mkdir d; setfattr -h -n trusted.a -v 1 l1;"
      " setfattr -h -n security.s -v sec l2; setfattr -h -n trusted.b -v 2 l3;"
      " setfattr -n trusted.d -v dir d; ln -s t4 d/l4; setfattr -h -n trusted.c -v 4 d/l4",
      "rm l1; ln -s t1new l1; setfattr -h -n trusted.new -v 5 l1; mv l2 d/l2;"
      " setfattr -h -n security.s -v changed d/l2; setfattr -h -x trusted.b l3;"
      " setfattr -h -n trusted.b2 -v x l3; mv d e; setfattr -x trusted.d e; mkdir d;"
      " setfattr -n trusted.d -v newdir d; mv e/l4 d/l4"),
    # holes punched and ranges zeroed across EOF (the size kept, or grown by fzero),
    # preallocation through EOF growing the file, written into
    S("punch-zero-across-eof",
      "xfs_io -f -c 'pwrite -S 0x61 0 70000' a; xfs_io -f -c 'pwrite -S 0x62 0 64K' b;"
      " xfs_io -f -c 'pwrite -S 0x63 0 10000' c;"
      " xfs_io -f -c 'pwrite -S 0x64 0 5000' -c 'falloc -k 8K 56K' d",
      "xfs_io -c 'fpunch 60000 100000' a; xfs_io -c 'fzero 60K 100K' b;"
      " xfs_io -c 'fzero -k 8000 20000' c;"
      " xfs_io -c 'falloc 10000 10000' -c 'pwrite -S 0x65 12000 100' d"),
    # a directory takes the name of its removed grandparent, a file the name of its
    # removed parent
    S("child-takes-parent-name",
      "mkdir -p a/b/c p; echo 1 > a/b/c/f; echo 2 > p/q",
      "mv a/b/c c; rm -r a; mv c a; mv p/q q; rmdir p; mv q p"),
    # names of one directory swapped between a file's hard links and other files, a link
    # replaced by a new file, a new link renamed over an old one
    S("links-swap-names-same-dir",
      "echo f > f; for i in 1 2 3 4 5; do ln f l$i; done; echo g > g; echo h > h",
      "mv l1 t; mv g l1; mv t g; rm l3; echo new > l3; mv h l2.tmp; mv l2 h; mv l2.tmp l2;"
      " ln l1 l5x; mv l5x l5"),
    # special files renamed over each other: a fifo over a device, a block device over a
    # symlink, a socket over a file, then over a new fifo
    S("special-files-renamed-over",
      f"mkfifo p; mknod c c 1 3; mknod b b 7 1; ln -s tgt l; {_SOCKET} s; echo f > f",
      "mv p c; mv b l; mv s f; mkfifo p; mv f p"),
    # renameat2(RENAME_EXCHANGE) of two directories holding hard links of each other's
    # files, then of two of those links across them
    S("exchange-dirs-with-cross-links",
      "mkdir a b; echo 1 > a/f; echo 2 > b/g; ln a/f b/fl; ln b/g a/gl; mkdir a/sub",
      EXCHANGE + " a b a/fl b/gl; mv b/sub a/sub; rm a/g"),
    # a file exchanged with a directory that holds another link of it
    S("exchange-file-with-dir-holding-link",
      "mkdir d; echo x > f; ln f d/fl; echo y > d/other",
      EXCHANGE + " f d; echo z >> d; mv f/other o; ln d f/fl2"),
    # a parent/child inversion of directories that hold links of one file
    S("inversion-with-links",
      "mkdir -p a/b; echo 1 > a/f; ln a/f a/b/fl",
      "mv a/b b; mv a b/a; ln b/a/f b/f2; rm b/fl"),
    # a directory's entries changed and changed back (no entry differs, its times do), in
    # a kept directory and in a renamed one
    S("dir-times-only-entries-back",
      "mkdir d e; echo 1 > d/k; touch -d @1000000000 d e",
      "touch d/tmp; rm d/tmp; mv e e2; touch e2/x; rm e2/x; mv d/k d/k2; mv d/k2 d/k"),
    # 70 directories that each get a file after the root's last entry: the kernel's full
    # stream sends the root's times while it still makes orphans there (Linux 6.3's
    # UTIMES cache of 64 directories), so btrfs receive gives the root the receive's time
    S("root-mtime-past-utimes-cache",
      "mkdir top; for i in $(seq 70); do mkdir top/s$i; done;"
      " for i in $(seq 70); do echo $i > top/s$i/f; done; touch -d @1000000000 .",
      "echo new > top/s1/g", root_mtime_lost=True),
]

#: stress, in ``make matrix`` only: what they add to ``make test`` is large
#: (docs/upstream-tests.md); what they found has tests of its own
STRESS: list[Scenario] = [
    # 2,000 files moved into 20 new directories, which then take the first 20 files'
    # names; the directory renamed and a new one made under its name
    S("big-dir-into-buckets",
      "mkdir d; python3 -c 'for i in range(2000):\n"
      "    open(\"d/f%04d\" % i, \"w\").write(str(i) if i % 100 == 0 else \"\")'",
      "python3 -c 'import os\nfor k in range(20): os.mkdir(\"d/b%02d\" % k)\n"
      "for i in range(2000): os.rename(\"d/f%04d\" % i, \"d/b%02d/f%04d\" % (i % 20, i))\n"
      "for k in range(20): os.rename(\"d/b%02d\" % k, \"d/f%04d\" % k)\n"
      "os.rename(\"d\", \"e\"); os.mkdir(\"d\"); os.rename(\"e/f0000\", \"d/f0000\")'"),
    # a directory of 1,000 entries removed and made again with the same names (new inodes,
    # every tenth a directory)
    S("big-dir-replaced-same-names",
      "mkdir d; python3 -c 'for i in range(1000): open(\"d/n%04d\" % i, \"w\").write(\"a%d\" % i)'",
      "rm -r d; mkdir d; python3 -c 'import os\nfor i in range(1000):\n"
      "    if i % 10: open(\"d/n%04d\" % i, \"w\").write(\"b%d\" % i)\n"
      "    else: os.mkdir(\"d/n%04d\" % i)'"),
    # 600 names of 255 bytes in one directory: half renamed to other 255-byte names, a
    # quarter removed, new ones made, the directory moved
    S("many-255-byte-names",
      "mkdir d; python3 -c 'for i in range(600):\n"
      "    open(\"d/\" + (\"%03d\" % i) * 85, \"w\").write(str(i))'",
      "python3 -c 'import os\nfor i in range(0, 600, 2):\n"
      "    os.rename(\"d/\" + (\"%03d\" % i) * 85, \"d/\" + (\"%03d\" % i) * 84 + \"new\")\n"
      "for i in range(1, 600, 4): os.unlink(\"d/\" + (\"%03d\" % i) * 85)\n"
      "for i in range(600, 700): open(\"d/\" + (\"%03d\" % i) * 85, \"w\")\n"
      "os.mkdir(\"e\"); os.rename(\"d\", \"e/d\")'"),
    # a chain of 600 nested directories (deeper than a receiver's cache of 256, shallower
    # than Python's recursion limit, which pytest's removal of old temporary trees meets):
    # its lower half moved to the top, the top's first directory moved below its old
    # descendant (an inversion 300 levels deep)
    S("deep-chain-600",
      "p=$(printf 'd/%.0s' $(seq 600)); mkdir -p $p; echo bottom > ${p}f",
      "h=$(printf 'd/%.0s' $(seq 300)); mv ${h%/} top;"
      " mv d top/$(printf 'd/%.0s' $(seq 299))old-root", root_mtime_lost=True),
]
del S
