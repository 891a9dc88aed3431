"""Scenarios of session 33: parts of upstream tests the older recipes left out.

Every xfstests and btrfs-progs send/receive test has a scenario or a test here
(docs/upstream-tests.md), but some recipes took one part of their test or changed its
shape. These take what was left: btrfs/038's clone source snapshot (``send -p A -c C``)
of a file with a compressed extent at a data offset, where the old recipe used reflinks
within the snapshot; btrfs/046's whole shape (a preallocated file written in about a
hundred unaligned pieces before snapshot A, then a 10-byte write into one of them:
the old recipe wrote into bare preallocation in B); btrfs/214's other four cases (a
capability added to a file a full stream sent without one, and ``chgrp``, which removes a
file's capabilities, followed by ``setcap`` again, with the file first, between and last
among its siblings' inode numbers, then ``chgrp`` back with other capabilities).
"""

from __future__ import annotations

from .recipe import Scenario

__all__ = ["SUBCASES"]

S = Scenario

#: btrfs/214's capabilities (one ``setcap`` argument, two clauses)
_CAPS = "'cap_sys_ptrace+ep cap_sys_nice+ep'"

SUBCASES: list[Scenario] = [
    # btrfs/038 as upstream runs it: a compressed extent referenced at a data offset; the
    # clone source C (the state of B, taken just before it) lets B's stream clone from it
    S("compressed-data-offset-clones-038",
      'xfs_io -f -c "truncate 118811" -c "pwrite -S 0x0d -b 39987 92267 39987" foo',
      'xfs_io -c "pwrite -S 0x3e -b 80000 200000 80000" foo; sync;'
      ' xfs_io -c "pwrite -S 0xdc -b 10000 250000 10000"'
      ' -c "pwrite -S 0xff -b 10000 300000 10000" foo',
      clones=True),
    # btrfs/214's cases: d0/foo.bar gets capabilities only in B; in d1-d4 foo.bar has them
    # in A, alone, first, between and last of its directory's files, and B changes its
    # group (which removes them) and sets them again; d5's foo.bar has group 100 and them
    # in A, B changes the group back to 0 and sets other capabilities
    S("caps-chgrp-reset-214",
      "mkdir d0 d1 d2 d3 d4 d5; touch d0/foo.bar d1/foo.bar;"
      " touch d2/foo.bar d2/foo.bax d2/foo.baz; touch d3/foo1 d3/foo.bar d3/foo3;"
      " touch d4/foo1 d4/foo2 d4/foo.bar; touch d5/foo.bar; chgrp 100 d5/foo.bar;"
      f" for d in d1 d2 d3 d4 d5; do setcap {_CAPS} $d/foo.bar; done",
      f"setcap {_CAPS} d0/foo.bar;"
      f" for d in d1 d2 d3 d4; do chgrp 100 $d/foo.bar; setcap {_CAPS} $d/foo.bar; done;"
      " chgrp 0 d5/foo.bar; setcap 'cap_sys_time+ep cap_syslog+ep' d5/foo.bar"),
    # btrfs/046's shape: 64 MiB preallocated (upstream: 256; not in the size), written in
    # 100 pieces of upstream's sizes (11 bytes to 123 KiB) at unaligned offsets spread over
    # it (some past the preallocation's end) before A; B writes 10 bytes into the first.
    # The kernel once took a range of such a file for a hole and sent zeros over its data
    S("write-into-prealloc-pieces-046",
      'xfs_io -f -c "falloc -k 0 64M" foo; python3 -c \'import os\n'
      'sizes = (9216, 1121, 67584, 7000, 113664, 123, 39936, 125952, 17408, 23552, 33792,'
      ' 101376, 105472, 42757, 11)\n'
      'fd = os.open("foo", os.O_WRONLY)\n'
      'for i in range(100):\n'
      '    off = (i * 2654435761 + 16190218) % (2 ** 26 + 2 ** 21)\n'
      '    os.pwrite(fd, bytes([i + 1]) * sizes[i % len(sizes)], off)\'',
      'xfs_io -c "pwrite -S 0xff -b 10 16190218 10" foo'),
]
del S
